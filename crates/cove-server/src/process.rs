//! Command execution.

use axum::extract::{Path, State};
use axum::Json;
use cove_api::process::{ExecuteRequest, ExecuteResponse};
use cove_api::{ErrorResponse, ValidationErrorResponse};

use crate::error::ApiError;
use crate::extract::{OrgId, ValidJson};
use crate::AppState;

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/process/execute", tag = "Process", request_body = ExecuteRequest,
    description = "Run `/bin/sh -c command` as the sandbox user and wait for it. On timeout the command and all \
        its descendants are killed; the exit code is then 124 and stderr says so.",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "The command ran", body = ExecuteResponse),
        (status = 400, description = "Invalid request", body = ValidationErrorResponse),
        (status = 404, description = "No such sandbox", body = ErrorResponse),
        (status = 409, description = "The sandbox is not running", body = ErrorResponse)))]
pub async fn execute(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
    ValidJson(req): ValidJson<ExecuteRequest>,
) -> Result<Json<ExecuteResponse>, ApiError> {
    let agent = s.core.agent(&org, &id).await?;
    let resp =
        agent.exec(&req).await.map_err(|e| match ApiError::from(cove_runner::RunnerError::from(e)) {
            ApiError::Guest { status, message, .. } if status == axum::http::StatusCode::BAD_REQUEST => {
                ApiError::field("cwd", message)
            }
            other => other,
        })?;
    Ok(Json(resp))
}
