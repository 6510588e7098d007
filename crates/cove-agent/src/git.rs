//! git operations: each request of the public API becomes one git command line (a commit adds
//! a second, to name the commit), run as the sandbox user in the repository, never through a
//! shell. Nothing is asked interactively: a command that would prompt fails instead.
//!
//! Credentials never come here. When the API was given some, the host lends them to its
//! credential proxy for the duration of the command, and the request says to use it: git then
//! reaches the network only through that proxy (`-c http.proxy=…`, for this command alone).

use std::collections::BTreeMap;

use cove_api::git::*;
use cove_api::process::ExecuteResponse;
use cove_api::Validate;
use hyper::{Response, StatusCode};
use serde::de::DeserializeOwned;

use crate::exec::{self, ExecError};
use crate::reaper::Reaper;
use crate::reply::{self, Body};
use crate::user::SandboxUser;

/// Longest a command that talks to a remote may run.
const NETWORK_TIMEOUT_SECS: u64 = 600;
/// Longest a local command may run.
const LOCAL_TIMEOUT_SECS: u64 = 120;

/// What one request runs.
#[derive(Debug, PartialEq)]
pub struct Plan {
    /// The directory git runs in, as the request gave it (resolved against the working
    /// directory); for a clone, the directory it clones into (git runs in the working
    /// directory).
    pub dir: String,
    /// Argument lists for `git`, run in order until one fails.
    pub steps: Vec<Vec<String>>,
    /// Whether the command talks to a remote.
    pub network: bool,
    /// A commit: name the new commit afterwards, with these author defaults to fill in.
    pub commit: Option<CommitAuthor>,
}

#[derive(Debug, PartialEq)]
pub struct CommitAuthor {
    pub name: Option<String>,
    pub email: Option<String>,
}

fn args<const N: usize>(fixed: [&str; N]) -> Vec<String> {
    fixed.iter().map(|s| s.to_string()).collect()
}

fn context(n: Option<u32>) -> String {
    format!("-U{}", n.unwrap_or(DEFAULT_CONTEXT_LINES))
}

/// Why a request has no plan.
#[derive(Debug)]
pub enum Refusal {
    Invalid(String),
    UnknownOperation(String),
}

impl Refusal {
    fn answer(self) -> Response<Body> {
        match self {
            Refusal::Invalid(m) => reply::error(StatusCode::BAD_REQUEST, m),
            Refusal::UnknownOperation(op) => {
                reply::error(StatusCode::NOT_FOUND, format!("no git operation {op:?}"))
            }
        }
    }
}

fn parse<T: DeserializeOwned + Validate>(body: &[u8]) -> Result<T, Refusal> {
    let req: T =
        serde_json::from_slice(body).map_err(|e| Refusal::Invalid(format!("invalid JSON body: {e}")))?;
    req.validate().map_err(|errors| {
        Refusal::Invalid(
            errors.iter().map(|e| format!("{}: {}", e.field, e.error)).collect::<Vec<_>>().join("; "),
        )
    })?;
    Ok(req)
}

/// The plan for operation `op` (the public API's name) with JSON `body`.
pub fn plan(op: &str, body: &[u8]) -> Result<Plan, Refusal> {
    let local = |dir: String, steps: Vec<Vec<String>>| Plan { dir, steps, network: false, commit: None };
    Ok(match op {
        "clone" => {
            let r: GitCloneRequest = parse(body)?;
            let mut clone = args(["clone"]);
            if let Some(b) = &r.branch {
                clone.extend(["--branch".into(), b.clone()]);
            }
            if let Some(d) = r.depth {
                clone.push(format!("--depth={d}"));
            }
            clone.extend(["--".into(), r.url.clone(), r.path.clone()]);
            let mut steps = vec![clone];
            if let Some(c) = &r.commit_id {
                steps.push(vec![
                    "-C".into(),
                    r.path.clone(),
                    "checkout".into(),
                    "--detach".into(),
                    c.clone(),
                ]);
            }
            Plan { dir: r.path, steps, network: true, commit: None }
        }
        "remote-url" => {
            let r: cove_proto::GitRemoteRequest =
                serde_json::from_slice(body).map_err(|e| Refusal::Invalid(e.to_string()))?;
            local(r.path, vec![vec!["remote".into(), "get-url".into(), "--".into(), r.remote]])
        }
        "status" => {
            let r: GitPathRequest = parse(body)?;
            local(r.path, vec![args(["status"])])
        }
        "branches" => {
            let r: GitBranchesRequest = parse(body)?;
            let mut a = args(["branch", "--list"]);
            match r.branch_type.as_deref() {
                Some("remote") => a.push("--remotes".into()),
                Some("all") => a.push("--all".into()),
                _ => {}
            }
            if let Some(c) = r.contains {
                a.push(format!("--contains={c}"));
            }
            if let Some(c) = r.not_contains {
                a.push(format!("--no-contains={c}"));
            }
            local(r.path, vec![a])
        }
        "diff-unstaged" => {
            let r: GitContextRequest = parse(body)?;
            local(r.path, vec![vec!["diff".into(), context(r.context_lines)]])
        }
        "diff-staged" => {
            let r: GitContextRequest = parse(body)?;
            local(r.path, vec![vec!["diff".into(), "--cached".into(), context(r.context_lines)]])
        }
        "diff" => {
            let r: GitDiffRequest = parse(body)?;
            local(r.path, vec![vec!["diff".into(), context(r.context_lines), r.target, "--".into()]])
        }
        "reset" => {
            let r: GitPathRequest = parse(body)?;
            local(r.path, vec![args(["reset"])])
        }
        "log" => {
            let r: GitLogRequest = parse(body)?;
            let mut a =
                vec!["log".into(), format!("--max-count={}", r.max_count.unwrap_or(DEFAULT_LOG_COUNT))];
            if let Some(t) = r.start_timestamp {
                a.push(format!("--since={t}"));
            }
            if let Some(t) = r.end_timestamp {
                a.push(format!("--until={t}"));
            }
            local(r.path, vec![a])
        }
        "show" => {
            let r: GitShowRequest = parse(body)?;
            local(r.path, vec![vec!["show".into(), r.revision, "--".into()]])
        }
        "create-branch" => {
            let r: GitCreateBranchRequest = parse(body)?;
            let mut a = if r.checkout == Some(true) {
                vec!["switch".into(), "--create".into(), r.name]
            } else {
                vec!["branch".into(), "--".into(), r.name]
            };
            a.extend(r.base_branch);
            local(r.path, vec![a])
        }
        "checkout-branch" => {
            let r: GitCheckoutBranchRequest = parse(body)?;
            let a = if r.create == Some(true) {
                vec!["switch".into(), "--create".into(), r.branch]
            } else {
                vec!["switch".into(), r.branch]
            };
            local(r.path, vec![a])
        }
        "delete-branch" => {
            let r: GitDeleteBranchRequest = parse(body)?;
            let flag = if r.force == Some(true) { "-D" } else { "-d" };
            local(r.path, vec![vec!["branch".into(), flag.into(), "--".into(), r.name]])
        }
        "add" => {
            let r: GitAddRequest = parse(body)?;
            let mut a = args(["add", "--"]);
            a.extend(r.files);
            local(r.path, vec![a])
        }
        "commit" => {
            let r: GitCommitRequest = parse(body)?;
            let mut a = vec!["commit".into(), "--message".into(), r.message];
            if r.allow_empty == Some(true) {
                a.push("--allow-empty".into());
            }
            Plan {
                dir: r.path,
                steps: vec![a],
                network: false,
                commit: Some(CommitAuthor { name: r.author, email: r.email }),
            }
        }
        "push" | "pull" => {
            let r: GitPushPullRequest = parse(body)?;
            let mut a = vec![op.to_string()];
            let mut steps = Vec::new();
            if op == "push" && r.set_upstream == Some(true) {
                a.push("--set-upstream".into());
            }
            if op == "pull" {
                a.push(if r.rebase == Some(true) { "--rebase" } else { "--no-rebase" }.into());
                a.push("--no-edit".into());
            }
            let remote = r.remote.clone().or_else(|| r.branch.as_ref().map(|_| "origin".to_string()));
            a.extend(remote.clone());
            a.extend(r.branch.clone());
            steps.push(a);
            if let (true, "pull", Some(remote), Some(branch)) =
                (r.set_upstream == Some(true), op, remote, r.branch)
            {
                steps.push(vec!["branch".into(), format!("--set-upstream-to={remote}/{branch}")]);
            }
            Plan { dir: r.path, steps, network: true, commit: None }
        }
        _ => return Err(Refusal::UnknownOperation(op.to_string())),
    })
}

/// Runs requests' plans for one sandbox user.
pub struct Git<'a> {
    pub reaper: &'a Reaper,
    pub user: &'a SandboxUser,
    pub env: BTreeMap<String, String>,
}

impl Git<'_> {
    /// Runs `op` and answers with its result. `via_proxy`: network operations go through the
    /// host's credential proxy.
    pub async fn handle(&self, op: &str, body: &[u8], via_proxy: bool) -> Response<Body> {
        let plan = match plan(op, body) {
            Ok(p) => p,
            Err(r) => return r.answer(),
        };
        // A clone runs in the working directory, the rest in the repository.
        let cwd = if op == "clone" { self.user.workdir.clone() } else { self.user.resolve(&plan.dir) };
        if !cwd.is_dir() {
            let msg = format!("{}: not a directory", cwd.display());
            return reply::field_error(StatusCode::BAD_REQUEST, Some("path"), msg);
        }
        let mut prefix = Vec::new();
        if via_proxy && plan.network {
            let proxy =
                format!("http://{}:{}", cove_proto::net::GATEWAY, cove_proto::net::CREDENTIAL_PROXY_PORT);
            prefix.extend(["-c".into(), format!("http.proxy={proxy}")]);
        }
        let mut env = self.env.clone();
        if let Some(author) = &plan.commit {
            match self.author_env(&cwd, author).await {
                Ok(vars) => env.extend(vars),
                Err(r) => return r,
            }
        }
        let timeout = if plan.network { NETWORK_TIMEOUT_SECS } else { LOCAL_TIMEOUT_SECS };
        let mut result = GitResult { output: String::new(), exit_code: 0 };
        for step in &plan.steps {
            let argv: Vec<String> = prefix.iter().chain(step).cloned().collect();
            match self.run(&cwd, &env, &argv, timeout).await {
                Ok(r) => {
                    result.output.push_str(&r.stdout);
                    result.output.push_str(&r.stderr);
                    result.exit_code = r.exit_code;
                }
                Err(r) => return r,
            }
            if result.exit_code != 0 {
                break;
            }
        }
        if plan.commit.is_none() {
            return reply::json(StatusCode::OK, &result);
        }
        let mut sha = String::new();
        if result.exit_code == 0 {
            let head = ["rev-parse".to_string(), "HEAD".to_string()];
            if let Ok(r) = self.run(&cwd, &env, &head, LOCAL_TIMEOUT_SECS).await {
                sha = r.stdout.trim().to_string();
            }
        }
        reply::json(StatusCode::OK, &GitCommitResponse { sha, result })
    }

    /// Author and committer for a commit: the request's, else git's configuration, else the
    /// sandbox user at the sandbox's hostname.
    async fn author_env(
        &self,
        cwd: &std::path::Path,
        author: &CommitAuthor,
    ) -> Result<Vec<(String, String)>, Response<Body>> {
        let mut vars = Vec::new();
        for (key, given, fallback) in [
            ("NAME", &author.name, self.user.name.clone()),
            ("EMAIL", &author.email, format!("{}@{}", self.user.name, hostname())),
        ] {
            let value = match given {
                Some(v) => v.clone(),
                None => {
                    let get = ["config".to_string(), "--get".into(), format!("user.{}", key.to_lowercase())];
                    let configured = self.run(cwd, &self.env, &get, LOCAL_TIMEOUT_SECS).await?;
                    if configured.exit_code == 0 && !configured.stdout.trim().is_empty() {
                        continue;
                    }
                    fallback
                }
            };
            vars.push((format!("GIT_AUTHOR_{key}"), value.clone()));
            vars.push((format!("GIT_COMMITTER_{key}"), value));
        }
        Ok(vars)
    }

    async fn run(
        &self,
        cwd: &std::path::Path,
        env: &BTreeMap<String, String>,
        argv: &[String],
        timeout: u64,
    ) -> Result<ExecuteResponse, Response<Body>> {
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let fixed = [
            ("GIT_TERMINAL_PROMPT".to_string(), "0".to_string()),
            ("GIT_SSH_COMMAND".to_string(), "ssh -o BatchMode=yes".to_string()),
        ];
        let vars: Vec<(String, String)> = env.clone().into_iter().chain(fixed).collect();
        let vars: BTreeMap<String, String> = vars.into_iter().collect();
        let made = exec::run_command(self.reaper, timeout, |procs_fd| {
            exec::user_command(self.user, "git", &args, vars.iter(), cwd, procs_fd, false)
        })
        .await;
        match made {
            Ok(r) => Ok(r),
            Err(ExecError::Spawn(e)) if e.kind() == std::io::ErrorKind::NotFound => Err(reply::error(
                StatusCode::BAD_REQUEST,
                "git is not installed in this sandbox's template: install it (apt-get install git) or use a template that has it",
            )),
            Err(e) => Err(reply::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sandbox".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(op: &str, body: serde_json::Value) -> Vec<Vec<String>> {
        plan(op, body.to_string().as_bytes()).unwrap().steps
    }

    #[test]
    fn every_operation_has_its_command_line() {
        assert_eq!(
            steps(
                "clone",
                serde_json::json!({"url": "https://g.test/r.git", "path": "r", "branch": "dev", "depth": 1, "commit_id": "abc"})
            ),
            [
                vec!["clone", "--branch", "dev", "--depth=1", "--", "https://g.test/r.git", "r"],
                vec!["-C", "r", "checkout", "--detach", "abc"]
            ]
        );
        assert_eq!(steps("status", serde_json::json!({"path": "r"})), [["status"]]);
        assert_eq!(
            steps("branches", serde_json::json!({"path": "r", "branch_type": "all", "contains": "abc"})),
            [["branch", "--list", "--all", "--contains=abc"]]
        );
        assert_eq!(steps("diff-unstaged", serde_json::json!({"path": "r"})), [["diff", "-U3"]]);
        assert_eq!(
            steps("diff-staged", serde_json::json!({"path": "r", "context_lines": 0})),
            [["diff", "--cached", "-U0"]]
        );
        assert_eq!(
            steps("diff", serde_json::json!({"path": "r", "target": "main"})),
            [["diff", "-U3", "main", "--"]]
        );
        assert_eq!(steps("reset", serde_json::json!({"path": "r"})), [["reset"]]);
        assert_eq!(
            steps("log", serde_json::json!({"path": "r", "max_count": 2, "start_timestamp": "2026-01-01"})),
            [["log", "--max-count=2", "--since=2026-01-01"]]
        );
        assert_eq!(
            steps("show", serde_json::json!({"path": "r", "revision": "HEAD~1"})),
            [["show", "HEAD~1", "--"]]
        );
        assert_eq!(
            steps(
                "create-branch",
                serde_json::json!({"path": "r", "name": "f", "checkout": true, "base_branch": "main"})
            ),
            [["switch", "--create", "f", "main"]]
        );
        assert_eq!(
            steps("create-branch", serde_json::json!({"path": "r", "name": "f"})),
            [["branch", "--", "f"]]
        );
        assert_eq!(
            steps("checkout-branch", serde_json::json!({"path": "r", "branch": "f"})),
            [["switch", "f"]]
        );
        assert_eq!(
            steps("delete-branch", serde_json::json!({"path": "r", "name": "f", "force": true})),
            [["branch", "-D", "--", "f"]]
        );
        assert_eq!(
            steps("add", serde_json::json!({"path": "r", "files": ["-a", "b"]})),
            [["add", "--", "-a", "b"]]
        );
        assert_eq!(
            steps("commit", serde_json::json!({"path": "r", "message": "m", "allow_empty": true})),
            [["commit", "--message", "m", "--allow-empty"]]
        );
        assert_eq!(
            steps("push", serde_json::json!({"path": "r", "branch": "f", "set_upstream": true})),
            [["push", "--set-upstream", "origin", "f"]]
        );
        assert_eq!(steps("push", serde_json::json!({"path": "r"})), [["push"]]);
        assert_eq!(
            steps(
                "pull",
                serde_json::json!({"path": "r", "remote": "up", "branch": "main", "rebase": true, "set_upstream": true})
            ),
            [
                vec!["pull", "--rebase", "--no-edit", "up", "main"],
                vec!["branch", "--set-upstream-to=up/main"]
            ]
        );
    }

    #[test]
    fn bad_requests_are_refused_before_git_runs() {
        assert!(plan("show", br#"{"path": "r", "revision": "--output=/tmp/x"}"#).is_err());
        assert!(plan("status", br#"{"path": ""}"#).is_err());
        assert!(plan("rebase", br#"{"path": "r"}"#).is_err());
        assert!(plan("status", b"{").is_err());
    }
}
