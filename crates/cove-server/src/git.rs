//! git endpoints. Each validates its request and forwards it to the guest agent, which runs
//! git in the sandbox. Credentials (clone, push, pull) are not forwarded: they are lent to the
//! host's credential proxy for the one command, which adds them to git's requests to that
//! repository, so that they never enter the sandbox.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::Response;
use cove_api::git::*;
use cove_api::{ErrorResponse, ValidationErrorResponse};
use cove_proto::routes;
use cove_runner::host::Loan;
use hyper::Method;
use serde::Serialize;

use crate::core::Guest;
use crate::error::ApiError;
use crate::extract::{OrgId, ValidJson};
use crate::forward::forward_request;
use crate::AppState;

/// Username sent with a password given alone (tokens accept any).
const TOKEN_USERNAME: &str = "git";

/// Credentials a request carries, and where they are for.
struct Credentials {
    /// The repository's URL; `None`: the URL of `remote` in the repository at `path`.
    url: Option<String>,
    path: String,
    remote: String,
    username: String,
    password: String,
}

/// A request whose credentials must not be forwarded.
trait Lends: Serialize + Sized {
    /// The credentials, and the request without them.
    fn take_credentials(self) -> (Option<Credentials>, Self) {
        (None, self)
    }
}

fn credentials(
    url: Option<String>,
    path: &str,
    remote: Option<&str>,
    username: Option<String>,
    password: Option<String>,
) -> Option<Credentials> {
    Some(Credentials {
        url,
        path: path.to_string(),
        remote: remote.unwrap_or("origin").to_string(),
        username: username.unwrap_or_else(|| TOKEN_USERNAME.to_string()),
        password: password?,
    })
}

impl Lends for GitCloneRequest {
    fn take_credentials(self) -> (Option<Credentials>, Self) {
        let creds = credentials(Some(self.url.clone()), &self.path, None, self.username, self.password);
        (creds, GitCloneRequest { username: None, password: None, ..self })
    }
}

impl Lends for GitPushPullRequest {
    fn take_credentials(self) -> (Option<Credentials>, Self) {
        let creds = credentials(None, &self.path, self.remote.as_deref(), self.username, self.password);
        (creds, GitPushPullRequest { username: None, password: None, ..self })
    }
}

impl Lends for GitPathRequest {}
impl Lends for GitContextRequest {}
impl Lends for GitDiffRequest {}
impl Lends for GitLogRequest {}
impl Lends for GitShowRequest {}
impl Lends for GitBranchesRequest {}
impl Lends for GitCreateBranchRequest {}
impl Lends for GitCheckoutBranchRequest {}
impl Lends for GitDeleteBranchRequest {}
impl Lends for GitAddRequest {}
impl Lends for GitCommitRequest {}

/// The loan for `creds`: for a clone its URL; for a push or pull the URL of the repository's
/// remote, which must be `https://`.
async fn loan(agent: &Guest, creds: Credentials) -> Result<Loan, ApiError> {
    let (url, field) = match creds.url {
        Some(url) => (url, "url"),
        None => {
            let found = agent
                .git_remote_url(&creds.path, &creds.remote)
                .await
                .map_err(cove_runner::RunnerError::from)?;
            if found.exit_code != 0 {
                let reason = found.output.trim().to_string();
                return Err(ApiError::field(
                    "remote",
                    format!("{} has no URL to send credentials to: {reason}", creds.remote),
                ));
            }
            (found.output.trim().to_string(), "remote")
        }
    };
    Loan::basic(&url, &creds.username, &creds.password)
        .ok_or_else(|| ApiError::field(field, "credentials are sent only to an https://host/path URL"))
}

/// Runs git operation `op` in sandbox `id`.
async fn run<T: Lends>(s: &AppState, org: &str, id: &str, op: &str, req: T) -> Result<Response, ApiError> {
    let agent = s.core.agent(org, id).await?;
    let (creds, req) = req.take_credentials();
    // Kept until the agent has answered, that is until git has exited.
    let lent = match creds {
        Some(c) => {
            let loan = loan(&agent, c).await?;
            Some(s.core.host.lend_credentials(id, loan).await?)
        }
        None => None,
    };
    let body = serde_json::to_vec(&req).map_err(ApiError::internal)?;
    let mut builder = hyper::Request::builder()
        .method(Method::POST)
        .uri(format!("http://agent{}{op}", routes::GIT_PREFIX))
        .header(header::CONTENT_TYPE, "application/json");
    if lent.is_some() {
        builder = builder.header(routes::GIT_VIA_PROXY, "1");
    }
    let req = builder.body(cove_runner::agent::full(body)).map_err(ApiError::internal)?;
    forward_request(agent, req).await
}

macro_rules! git_op {
    ($fn:ident, $op:literal, $req:ty, $resp:ty, $desc:literal) => {
        #[utoipa::path(post, path = concat!("/v1/sandbox/{sandboxID}/git/", $op), tag = "Git",
            description = $desc, request_body = $req,
            params(("sandboxID" = String, Path, description = "Sandbox id")),
            responses(
                (status = 200, description = "git ran; its exit code and output", body = $resp),
                (status = 400, description = "Invalid request, path not a directory, or no git in the template", body = ValidationErrorResponse),
                (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
                (status = 404, description = "No such sandbox", body = ErrorResponse),
                (status = 409, description = "The sandbox is not running", body = ErrorResponse)))]
        pub async fn $fn(
            State(s): State<AppState>,
            OrgId(org): OrgId,
            Path(id): Path<String>,
            ValidJson(req): ValidJson<$req>,
        ) -> Result<Response, ApiError> {
            run(&s, &org, &id, $op, req).await
        }
    };
}

git_op!(clone, "clone", GitCloneRequest, GitResult, "Clone a repository into `path`. `username` and `password` (https:// only) are added by the host to git's \
        requests to that repository and never enter the sandbox: not its config, its remote URL, or its memory."
);
git_op!(status, "status", GitPathRequest, GitResult, "`git status`.");
git_op!(
    branches,
    "branches",
    GitBranchesRequest,
    GitResult,
    "List branches: local (default), remote or all."
);
git_op!(
    diff_unstaged,
    "diff-unstaged",
    GitContextRequest,
    GitResult,
    "Changes in the working tree not yet staged."
);
git_op!(diff_staged, "diff-staged", GitContextRequest, GitResult, "Changes staged for the next commit.");
git_op!(
    diff,
    "diff",
    GitDiffRequest,
    GitResult,
    "Changes between the working tree and a branch, tag or commit."
);
git_op!(reset, "reset", GitPathRequest, GitResult, "Unstage everything staged.");
git_op!(
    log,
    "log",
    GitLogRequest,
    GitResult,
    "Commit history: at most `max_count` (default 10), optionally between two dates."
);
git_op!(show, "show", GitShowRequest, GitResult, "A commit, branch or tag: its message and changes.");
git_op!(
    create_branch,
    "create-branch",
    GitCreateBranchRequest,
    GitResult,
    "Create a branch, optionally from a base and switching to it."
);
git_op!(
    checkout_branch,
    "checkout-branch",
    GitCheckoutBranchRequest,
    GitResult,
    "Switch to a branch, optionally creating it."
);
git_op!(
    delete_branch,
    "delete-branch",
    GitDeleteBranchRequest,
    GitResult,
    "Delete a branch (`force` even if unmerged)."
);
git_op!(add, "add", GitAddRequest, GitResult, "Stage files.");
git_op!(commit, "commit", GitCommitRequest, GitCommitResponse, "Commit what is staged; the answer names the new commit. The author is the request's, else git's configured \
        one, else the sandbox user."
);
git_op!(push, "push", GitPushPullRequest, GitResult, "Push to a remote. Credentials are lent to the host's proxy for the remote's https:// URL, as for a clone."
);
git_op!(
    pull,
    "pull",
    GitPushPullRequest,
    GitResult,
    "Pull from a remote (merging, or rebasing with `rebase`). Credentials as for a push."
);
