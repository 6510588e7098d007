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
            | RunnerError::Network(_) => ApiError::Unavailable(error_chain(&e)),
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
