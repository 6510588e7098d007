//! SSH accesses: credentials for the SSH endpoint (`crate::sshd`), one sandbox each.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use cove_api::ssh::{SshAccess, SshValidateRequest, SshValidation};
use cove_api::{ErrorResponse, ValidationErrorResponse};

use crate::error::ApiError;
use crate::extract::{OrgId, ValidJson};
use crate::AppState;

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/ssh/access", tag = "SSH",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    description = "Create an SSH access: its id is the username, the password is answered only here (the server \
        keeps its SHA-256 hash). It lasts 24 hours. Logging in resumes a paused sandbox.",
    responses(
        (status = 201, description = "Created", body = SshAccess),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox", body = ErrorResponse),
        (status = 501, description = "This server runs no SSH endpoint", body = ErrorResponse)))]
pub async fn create(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<SshAccess>), ApiError> {
    Ok((StatusCode::CREATED, Json(s.core.create_ssh_access(&org, &id)?)))
}

#[utoipa::path(delete, path = "/v1/sandbox/{sandboxID}/ssh/{sshID}", tag = "SSH",
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("sshID" = String, Path, description = "SSH access id")),
    description = "Revoke an SSH access: new logins with it fail at once.",
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox or access", body = ErrorResponse)))]
pub async fn delete(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, ssh_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core.delete_ssh_access(&org, &id, &ssh_id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/ssh/{sshID}/validate", tag = "SSH",
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("sshID" = String, Path, description = "SSH access id")),
    request_body = SshValidateRequest,
    description = "Whether a password is this access's and the access has not expired.",
    responses(
        (status = 200, description = "The answer", body = SshValidation),
        (status = 400, description = "Invalid request", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox or access", body = ErrorResponse)))]
pub async fn validate(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, ssh_id)): Path<(String, String)>,
    ValidJson(req): ValidJson<SshValidateRequest>,
) -> Result<Json<SshValidation>, ApiError> {
    Ok(Json(s.core.validate_ssh_access(&org, &id, &ssh_id, &req.password)?))
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/ssh/{sshID}/regen", tag = "SSH",
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("sshID" = String, Path, description = "SSH access id")),
    description = "A new password for an access, good for another 24 hours; the old one stops working. Sessions \
        already open stay open.",
    responses(
        (status = 200, description = "Regenerated", body = SshAccess),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox or access", body = ErrorResponse)))]
pub async fn regenerate(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, ssh_id)): Path<(String, String)>,
) -> Result<Json<SshAccess>, ApiError> {
    Ok(Json(s.core.regenerate_ssh_access(&org, &id, &ssh_id)?))
}
