//! git in a sandbox: each request runs one git command (two for a commit, to name it) in a
//! repository of the guest. The same types are the guest agent's wire format.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{FieldError, Validate, Violations};

/// Default `max_count` of a log.
pub const DEFAULT_LOG_COUNT: u32 = 10;
/// Default lines of context around a diff's changes.
pub const DEFAULT_CONTEXT_LINES: u32 = 3;

/// What a git command printed (its standard output, then its standard error) and its exit
/// code. A command git ran and refused (no such branch, nothing to commit) is still a 200 with
/// a non-zero `exit_code`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitResult {
    pub output: String,
    pub exit_code: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitCommitResponse {
    /// The new commit's id; empty when the commit failed.
    pub sha: String,
    pub result: GitResult,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitCloneRequest {
    /// Repository URL (`https://`, `http://`, `ssh://`, `git://`, or a path in the sandbox).
    pub url: String,
    /// Destination directory; it must not exist or be empty.
    pub path: String,
    #[serde(default)]
    pub branch: Option<String>,
    /// A commit to check out after cloning.
    #[serde(default)]
    pub commit_id: Option<String>,
    /// Shallow clone depth.
    #[serde(default)]
    pub depth: Option<u32>,
    /// With `password`: HTTP basic credentials for an `https://` URL. They are added by the
    /// host to git's requests to that repository and never enter the sandbox.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitPathRequest {
    /// The repository (or a directory in it).
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitContextRequest {
    pub path: String,
    /// Lines of context around each change (default 3).
    #[serde(default)]
    pub context_lines: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitDiffRequest {
    pub path: String,
    /// Branch, tag or commit to compare the working tree with.
    pub target: String,
    #[serde(default)]
    pub context_lines: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitLogRequest {
    pub path: String,
    /// Most commits shown (default 10).
    #[serde(default)]
    pub max_count: Option<u32>,
    /// Only commits after this date (any form `git log --since` takes).
    #[serde(default)]
    pub start_timestamp: Option<String>,
    /// Only commits before this date.
    #[serde(default)]
    pub end_timestamp: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitShowRequest {
    pub path: String,
    /// Commit, branch or tag.
    pub revision: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitBranchesRequest {
    pub path: String,
    /// `local` (default), `remote` or `all`.
    #[serde(default)]
    pub branch_type: Option<String>,
    /// Only branches that contain this commit.
    #[serde(default)]
    pub contains: Option<String>,
    /// Only branches that do not contain this commit.
    #[serde(default)]
    pub not_contains: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitCreateBranchRequest {
    pub path: String,
    pub name: String,
    /// Switch to the new branch.
    #[serde(default)]
    pub checkout: Option<bool>,
    /// Where the branch starts (default: the current commit).
    #[serde(default)]
    pub base_branch: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitCheckoutBranchRequest {
    pub path: String,
    pub branch: String,
    /// Create the branch first.
    #[serde(default)]
    pub create: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitDeleteBranchRequest {
    pub path: String,
    pub name: String,
    /// Delete even if not merged.
    #[serde(default)]
    pub force: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitAddRequest {
    pub path: String,
    /// Paths to stage, relative to the repository (at least one).
    pub files: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitCommitRequest {
    pub path: String,
    pub message: String,
    /// Author (and committer) name; git's configured one, else the sandbox user's name.
    #[serde(default)]
    pub author: Option<String>,
    /// Author (and committer) email; git's configured one, else `<user>@<hostname>`.
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub allow_empty: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GitPushPullRequest {
    pub path: String,
    /// Remote name (default `origin`).
    #[serde(default)]
    pub remote: Option<String>,
    #[serde(default)]
    pub branch: Option<String>,
    /// Make `remote/branch` the current branch's upstream.
    #[serde(default)]
    pub set_upstream: Option<bool>,
    /// Pull only: rebase instead of merging.
    #[serde(default)]
    pub rebase: Option<bool>,
    /// With `password`: HTTP basic credentials for the remote's `https://` URL, added by the
    /// host; they never enter the sandbox.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

/// A revision, branch or remote name given to git: it may not look like an option, and may not
/// hold NUL, control characters or spaces.
fn check_name(v: &mut Violations, field: &str, value: &str) {
    if value.is_empty() {
        v.push(field, "must not be empty");
    } else if value.starts_with('-') {
        v.push(field, "must not start with '-'");
    } else if value.chars().any(|c| c.is_control() || c == ' ') {
        v.push(field, "must not contain spaces or control characters");
    } else if value.len() > 1024 {
        v.push(field, "must be at most 1024 bytes");
    }
}

fn check_opt_name(v: &mut Violations, field: &str, value: &Option<String>) {
    if let Some(s) = value {
        check_name(v, field, s);
    }
}

/// Text passed as one argument (a message, an author, a date): no NUL.
fn check_text(v: &mut Violations, field: &str, value: &Option<String>, single_line: bool) {
    if let Some(s) = value {
        v.check(!s.contains('\0'), field, "must not contain NUL bytes");
        if single_line {
            v.check(!s.contains('\n') && !s.contains('\r'), field, "must be one line");
            v.check(!s.starts_with('-'), field, "must not start with '-'");
        }
    }
}

/// Username and password come together (a password alone uses the username `git`), and only
/// with `https://`. `url` is `None` where the URL is the repository's remote.
fn check_credentials(
    v: &mut Violations,
    url: Option<&str>,
    username: &Option<String>,
    password: &Option<String>,
) {
    if username.is_some() && password.is_none() {
        v.push("password", "must be given with username");
    }
    if let Some(u) = username {
        v.check(!u.is_empty() && !u.contains(':'), "username", "must be non-empty and hold no ':'");
        v.check(!u.chars().any(char::is_control), "username", "must not contain control characters");
    }
    if let Some(p) = password {
        v.check(!p.chars().any(char::is_control), "password", "must not contain control characters");
    }
    if let (Some(url), Some(_)) = (url, password) {
        if !url.starts_with("https://") {
            v.push("url", "credentials are sent only to an https:// URL");
        }
    }
}

impl Validate for GitCloneRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_name(&mut v, "url", &self.url);
        if let Some((scheme, rest)) = self.url.split_once("://") {
            let authority = rest.split('/').next().unwrap_or_default();
            if authority.contains('@') && matches!(scheme, "http" | "https") {
                v.push("url", "must not hold credentials: give username and password instead");
            }
        }
        crate::check_path(&mut v, "path", &self.path);
        check_opt_name(&mut v, "branch", &self.branch);
        check_opt_name(&mut v, "commit_id", &self.commit_id);
        v.check(self.depth != Some(0), "depth", "must be at least 1");
        check_credentials(&mut v, Some(&self.url), &self.username, &self.password);
        v.finish()
    }
}

impl Validate for GitPathRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        crate::check_path(&mut v, "path", &self.path);
        v.finish()
    }
}

impl Validate for GitContextRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        crate::check_path(&mut v, "path", &self.path);
        v.finish()
    }
}

impl Validate for GitDiffRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        crate::check_path(&mut v, "path", &self.path);
        check_name(&mut v, "target", &self.target);
        v.finish()
    }
}

impl Validate for GitLogRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        crate::check_path(&mut v, "path", &self.path);
        v.check(self.max_count != Some(0), "max_count", "must be at least 1");
        check_text(&mut v, "start_timestamp", &self.start_timestamp, true);
        check_text(&mut v, "end_timestamp", &self.end_timestamp, true);
        v.finish()
    }
}

impl Validate for GitShowRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        crate::check_path(&mut v, "path", &self.path);
        check_name(&mut v, "revision", &self.revision);
        v.finish()
    }
}

impl Validate for GitBranchesRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        crate::check_path(&mut v, "path", &self.path);
        v.check(
            matches!(self.branch_type.as_deref(), None | Some("local" | "remote" | "all")),
            "branch_type",
            "must be one of local, remote, all",
        );
        check_opt_name(&mut v, "contains", &self.contains);
        check_opt_name(&mut v, "not_contains", &self.not_contains);
        v.finish()
    }
}

impl Validate for GitCreateBranchRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        crate::check_path(&mut v, "path", &self.path);
        check_name(&mut v, "name", &self.name);
        check_opt_name(&mut v, "base_branch", &self.base_branch);
        v.finish()
    }
}

impl Validate for GitCheckoutBranchRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        crate::check_path(&mut v, "path", &self.path);
        check_name(&mut v, "branch", &self.branch);
        v.finish()
    }
}

impl Validate for GitDeleteBranchRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        crate::check_path(&mut v, "path", &self.path);
        check_name(&mut v, "name", &self.name);
        v.finish()
    }
}

impl Validate for GitAddRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        crate::check_path(&mut v, "path", &self.path);
        v.check(!self.files.is_empty(), "files", "must name at least one path");
        for (i, f) in self.files.iter().enumerate() {
            crate::check_path(&mut v, &format!("files[{i}]"), f);
        }
        v.finish()
    }
}

impl Validate for GitCommitRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        crate::check_path(&mut v, "path", &self.path);
        v.check(!self.message.trim().is_empty(), "message", "must not be empty");
        check_text(&mut v, "message", &Some(self.message.clone()), false);
        check_text(&mut v, "author", &self.author, true);
        check_text(&mut v, "email", &self.email, true);
        for (field, value) in [("author", &self.author), ("email", &self.email)] {
            v.check(value.as_ref().is_none_or(|s| !s.trim().is_empty()), field, "must not be empty");
            v.check(
                value.as_ref().is_none_or(|s| !s.contains(['<', '>'])),
                field,
                "must not contain '<' or '>'",
            );
        }
        v.finish()
    }
}

impl Validate for GitPushPullRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        crate::check_path(&mut v, "path", &self.path);
        check_opt_name(&mut v, "remote", &self.remote);
        check_opt_name(&mut v, "branch", &self.branch);
        check_credentials(&mut v, None, &self.username, &self.password);
        v.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<T: Validate>(t: &T) -> Vec<String> {
        t.validate().err().unwrap_or_default().into_iter().map(|e| e.field).collect()
    }

    fn clone(url: &str) -> GitCloneRequest {
        GitCloneRequest {
            url: url.into(),
            path: "repo".into(),
            branch: None,
            commit_id: None,
            depth: None,
            username: None,
            password: None,
        }
    }

    #[test]
    fn clone_urls_and_credentials() {
        assert!(fields(&clone("https://git.test/a/b.git")).is_empty());
        assert!(fields(&clone("/home/user/origin.git")).is_empty());
        assert_eq!(fields(&clone("--upload-pack=touch /tmp/x")), ["url"]);
        assert_eq!(fields(&clone("https://u:p@git.test/a.git")), ["url"]);
        let with = |url: &str, user: Option<&str>, pass: Option<&str>| GitCloneRequest {
            username: user.map(Into::into),
            password: pass.map(Into::into),
            ..clone(url)
        };
        assert!(fields(&with("https://git.test/a.git", Some("u"), Some("p"))).is_empty());
        assert!(fields(&with("https://git.test/a.git", None, Some("token"))).is_empty());
        assert_eq!(fields(&with("http://git.test/a.git", Some("u"), Some("p"))), ["url"]);
        assert_eq!(fields(&with("https://git.test/a.git", Some("u"), None)), ["password"]);
        assert_eq!(fields(&with("https://git.test/a.git", Some("a:b"), Some("p"))), ["username"]);
        assert_eq!(fields(&GitCloneRequest { depth: Some(0), ..clone("/r") }), ["depth"]);
    }

    #[test]
    fn names_cannot_be_options() {
        let show = GitShowRequest { path: "r".into(), revision: "--output=/etc/passwd".into() };
        assert_eq!(fields(&show), ["revision"]);
        let b = GitBranchesRequest {
            path: "r".into(),
            branch_type: Some("both".into()),
            contains: Some("a b".into()),
            not_contains: None,
        };
        assert_eq!(fields(&b), ["branch_type", "contains"]);
        let add = GitAddRequest { path: "r".into(), files: vec![] };
        assert_eq!(fields(&add), ["files"]);
        let commit = GitCommitRequest {
            path: "r".into(),
            message: " ".into(),
            author: Some("a\nb".into()),
            email: Some("<x>".into()),
            allow_empty: None,
        };
        assert_eq!(fields(&commit), ["message", "author", "email"]);
    }
}
