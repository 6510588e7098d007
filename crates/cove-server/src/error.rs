//! The one place where errors become HTTP answers.
//!
//! Status policy: 400 invalid input (with the fields), 401 no or unknown key, 404 unknown
//! resource or another organization's, 409 a state conflict or the sandbox limit on create (429 on start, restore and resume, as
//! the contract has it), 501 a part of
//! the contract Cove does not implement yet, 502 the guest agent failed, 503 the runner cannot
//! take the request. Internal details (paths, database errors) are logged, never sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cove_api::{ErrorResponse, FieldError, ValidationErrorResponse};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request")]
    Invalid(Vec<FieldError>),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The organization's sandbox limit, where the contract answers 429 (start, restore, resume).
    #[error("{0}")]
    TooMany(String),
    #[error("{0}")]
    NotImplemented(String),
    /// An error answered by the guest agent, passed on with its status.
    #[error("{message}")]
    Guest { status: StatusCode, message: String, field: Option<String> },
    #[error("{0}")]
    Unavailable(String),
    /// A sandbox's own service could not be reached (invoke route, presigned URLs).
    #[error("{0}")]
    BadGateway(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn field(field: &str, error: impl Into<String>) -> Self {
        ApiError::Invalid(vec![FieldError { field: field.into(), error: error.into() }])
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal(e.to_string())
    }

    /// A host-side failure of `what` for a sandbox (503): the whole chain goes to the log, the client gets
    /// what failed and why in words fit for it, never host paths, QEMU's output or the chain.
    pub fn unavailable(sandbox_id: &str, what: &str, e: &cove_runner::RunnerError) -> Self {
        tracing::warn!(sandbox_id, error = %error_chain(e), "{what}");
        ApiError::Unavailable(format!("{what}: {}", public_reason(e)))
    }
}

/// Why a host-side step failed, as a client may read it. Only the runner's own messages about
/// images and templates pass through; everything else is named by the part that failed.
pub fn public_reason(e: &cove_runner::RunnerError) -> String {
    use cove_runner::RunnerError as R;
    match e {
        R::UnknownTemplate(t) => format!("unknown template {t:?}"),
        R::ImagesMissing(_) => "this host is not set up for sandboxes (run `cove setup` on it)".into(),
        R::NoVm(id) => format!("sandbox {id} has no VM on this host"),
        R::Vmm(_) => "the VM could not be run (details are in the server log)".into(),
        R::Agent(a) => format!("the guest agent failed: {a}"),
        R::Io(what, _) => format!("a host operation failed ({what})"),
        // A damaged image names its file and chunk within the image, no host path.
        R::Blob(b @ cove_runner::BlobError::Corrupt { .. }) => b.to_string(),
        R::Blob(_) => "the image store failed (details are in the server log)".into(),
        R::Image(m) => m.clone(),
        R::Network(_) => "the sandbox's network could not be set up (details are in the server log)".into(),
        R::Oci(o) => o.to_string(),
        R::Mount { index, source } => format!("mount {index}: {source}"),
        R::Unavailable(m) => m.clone(),
    }
}

impl From<cove_store::StoreError> for ApiError {
    fn from(e: cove_store::StoreError) -> Self {
        match e {
            cove_store::StoreError::LimitReached { count, limit } => ApiError::Conflict(format!(
                "sandbox limit reached: the organization has {count} active sandboxes (limit {limit})"
            )),
            cove_store::StoreError::NotFound => ApiError::NotFound("not found".into()),
            cove_store::StoreError::DuplicateName(n) => {
                ApiError::Conflict(format!("a snapshot named {n:?} already exists"))
            }
            cove_store::StoreError::InUse(m) => ApiError::Conflict(m),
            e @ (cove_store::StoreError::TemplateNameTaken(_)
            | cove_store::StoreError::TemplateLimit { .. }) => ApiError::Conflict(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<cove_runner::RunnerError> for ApiError {
    fn from(e: cove_runner::RunnerError) -> Self {
        use cove_runner::{AgentError, RunnerError};
        match e {
            RunnerError::Agent(AgentError::Status { status, message, field }) => {
                ApiError::Guest { status, message, field }
            }
            RunnerError::UnknownTemplate(t) => {
                ApiError::field("template_name", format!("unknown template {t:?}"))
            }
            RunnerError::Agent(e) => {
                ApiError::Guest { status: StatusCode::BAD_GATEWAY, message: e.to_string(), field: None }
            }
            RunnerError::ImagesMissing(_)
            | RunnerError::Image(_)
            | RunnerError::Blob(_)
            | RunnerError::Network(_)
            | RunnerError::Unavailable(_) => {
                tracing::warn!(error = %error_chain(&e), "host failure");
                ApiError::Unavailable(public_reason(&e))
            }
            other => ApiError::Internal(error_chain(&other)),
        }
    }
}

/// "outer: inner: innermost", for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let msg = |m: String| Json(ErrorResponse { message: m });
        match self {
            ApiError::Invalid(errors) => (
                StatusCode::BAD_REQUEST,
                Json(ValidationErrorResponse { message: "Invalid request".into(), errors }),
            )
                .into_response(),
            ApiError::Unauthorized => {
                (StatusCode::UNAUTHORIZED, msg("missing or invalid API key".into())).into_response()
            }
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, msg(m)).into_response(),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, msg(m)).into_response(),
            ApiError::TooMany(m) => (StatusCode::TOO_MANY_REQUESTS, msg(m)).into_response(),
            ApiError::NotImplemented(m) => (StatusCode::NOT_IMPLEMENTED, msg(m)).into_response(),
            ApiError::Guest { status, message, field } if status == StatusCode::BAD_REQUEST => (
                status,
                Json(ValidationErrorResponse {
                    message: message.clone(),
                    // The agent names the field when it knows it; otherwise it is the path.
                    errors: vec![FieldError {
                        field: field.unwrap_or_else(|| "path".into()),
                        error: message,
                    }],
                }),
            )
                .into_response(),
            ApiError::Guest { status, message, .. } => {
                let status = if status.is_server_error() { StatusCode::BAD_GATEWAY } else { status };
                (status, msg(message)).into_response()
            }
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, msg(m)).into_response(),
            ApiError::BadGateway(m) => (StatusCode::BAD_GATEWAY, msg(m)).into_response(),
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, msg("internal error".into())).into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cove_runner::RunnerError;
    use http_body_util::BodyExt;

    async fn answer(e: ApiError) -> (StatusCode, String) {
        let resp = e.into_response();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Host failures reach the client as what failed and why in its words: no host path, no
    /// QEMU output, no error chain.
    #[tokio::test]
    async fn host_failures_answer_without_paths_or_chains() {
        let qemu = "qemu-system-x86_64: -drive file=/var/lib/cove/sandboxes/sbx-1/disk.qcow2: Could not open";
        let secret_path = "/var/lib/cove";
        let cases = [
            RunnerError::Vmm(cove_runner::VmmError::Spawn(format!("exit 1; QEMU said: {qemu}"))),
            RunnerError::Io(
                "creating disk overlay".into(),
                std::io::Error::other(format!("{secret_path}/sandboxes/sbx-1/disk.qcow2: denied")),
            ),
            RunnerError::ImagesMissing(format!("{secret_path}/cache/kernel/vmlinuz")),
            RunnerError::Network(format!("nft: {secret_path}/net/sbx-1.nft: syntax error")),
        ];
        for e in cases {
            let (status, body) =
                answer(ApiError::unavailable("sbx-1", "the sandbox VM failed to start", &e)).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            assert!(body.contains("the sandbox VM failed to start: "), "{body}");
            for leak in [secret_path, "QEMU", "qemu-system", "qcow2", "nft"] {
                assert!(!body.contains(leak), "{leak:?} in {body}");
            }
        }
        // The same errors converted directly (a guest call, a resume by request).
        let (status, body) = answer(RunnerError::ImagesMissing(format!("{secret_path}/x")).into()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("cove setup") && !body.contains(secret_path), "{body}");
        let (status, body) =
            answer(RunnerError::Io("x".into(), std::io::Error::other(secret_path)).into()).await;
        assert_eq!(
            (status, body.contains(secret_path)),
            (StatusCode::INTERNAL_SERVER_ERROR, false),
            "{body}"
        );
    }
}
