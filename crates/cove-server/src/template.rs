//! Template endpoints: upload an image as a template, rename, delete; list and get (Cove
//! additions).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use cove_api::template::{RenameTemplateRequest, Template, TemplateList, UploadTemplateRequest};
use cove_api::{ErrorResponse, ValidationErrorResponse};

use crate::core::template_response;
use crate::error::ApiError;
use crate::extract::{OrgId, ValidJson};
use crate::AppState;

#[utoipa::path(post, path = "/v1/template", tag = "Template", request_body = UploadTemplateRequest,
    description = "Pull a container image (linux/amd64) from its registry, convert it into a sandbox disk \
        and boot it once; answers when sandboxes can be created from it. Credentials are used for the pull \
        only and never stored. Registries are spoken to over HTTPS unless the server names them with \
        `--insecure-registry`.",
    responses(
        (status = 201, description = "Ready to create sandboxes from", body = Template),
        (status = 400, description = "Invalid request, or an image that cannot be pulled or used \
            (the field says which: `uri` or `credentials`)", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 409, description = "Name taken, or the organization's template limit reached", body = ErrorResponse)))]
pub async fn upload(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    ValidJson(req): ValidJson<UploadTemplateRequest>,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    let t = s.core.upload_template(&org, req).await?;
    Ok((StatusCode::CREATED, Json(template_response(&t))))
}

#[utoipa::path(patch, path = "/v1/template/{templateID}", tag = "Template",
    params(("templateID" = String, Path, description = "Template id")),
    request_body = RenameTemplateRequest,
    responses(
        (status = 204, description = "Renamed"),
        (status = 400, description = "Invalid name", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such template in this organization", body = ErrorResponse),
        (status = 409, description = "Name taken", body = ErrorResponse)))]
pub async fn rename(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
    ValidJson(req): ValidJson<RenameTemplateRequest>,
) -> Result<StatusCode, ApiError> {
    s.core.rename_template(&org, &id, &req)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/template/{templateID}", tag = "Template",
    params(("templateID" = String, Path, description = "Template id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such template in this organization", body = ErrorResponse),
        (status = 409, description = "A sandbox or snapshot uses it (the message names them)", body = ErrorResponse)))]
pub async fn delete(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.core.delete_template(&org, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/template/{templateID}", tag = "Template",
    params(("templateID" = String, Path, description = "Template id or name")),
    description = "Cove addition.",
    responses(
        (status = 200, description = "The template", body = Template),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such template in this organization", body = ErrorResponse)))]
pub async fn get(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<Json<Template>, ApiError> {
    Ok(Json(s.core.template(&org, &id)?))
}

#[utoipa::path(get, path = "/v1/templates", tag = "Template",
    description = "Cove addition: the system templates and the organization's own.",
    responses(
        (status = 200, description = "Templates", body = TemplateList),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse)))]
pub async fn list(State(s): State<AppState>, OrgId(org): OrgId) -> Result<Json<TemplateList>, ApiError> {
    Ok(Json(TemplateList { items: s.core.templates(&org)? }))
}
