//! Snapshot endpoints: create from a running sandbox, restore into a new sandbox, list, delete.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use cove_api::sandbox::SandboxResponse;
use cove_api::snapshot::{
    ListSnapshotsQuery, ListSnapshotsResponse, SnapshotCreateRequest, SnapshotResponse,
    SnapshotRestoreRequest,
};
use cove_api::{ErrorResponse, ValidationErrorResponse};

use crate::core::{response, snapshot_response};
use crate::error::ApiError;
use crate::extract::{OptionalJson, OrgId, ValidJson};
use crate::AppState;

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/snapshot/create", tag = "Snapshot",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    request_body = SnapshotCreateRequest,
    description = "Store a named snapshot of a running sandbox (memory, VM state, disk, settings). The \
        sandbox is `snapshotting` during the capture and then runs on, unless `kill_sandbox_after`.",
    responses(
        (status = 201, description = "Stored", body = SnapshotResponse),
        (status = 400, description = "Invalid request", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox in this organization", body = ErrorResponse),
        (status = 409, description = "Name taken, or the sandbox is not running", body = ErrorResponse),
        (status = 503, description = "Storing failed; the sandbox keeps running", body = ErrorResponse)))]
pub async fn create(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
    OptionalJson(req): OptionalJson<SnapshotCreateRequest>,
) -> Result<(StatusCode, Json<SnapshotResponse>), ApiError> {
    let snap = s.core.create_snapshot(&org, &id, req.name, req.kill_sandbox_after.unwrap_or(false)).await?;
    Ok((StatusCode::CREATED, Json(snapshot_response(&snap))))
}

#[utoipa::path(post, path = "/v1/snapshot/restore", tag = "Sandbox", request_body = SnapshotRestoreRequest,
    description = "Create a sandbox from a snapshot, with the snapshot's template, vCPUs, memory, disk and \
        environment; its processes carry on where they were.",
    responses(
        (status = 201, description = "Restored and running", body = SandboxResponse),
        (status = 400, description = "Invalid request", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such snapshot", body = ErrorResponse),
        (status = 429, description = "Sandbox limit reached", body = ErrorResponse),
        (status = 503, description = "The VM could not be restored", body = ErrorResponse)))]
pub async fn restore(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    ValidJson(req): ValidJson<SnapshotRestoreRequest>,
) -> Result<(StatusCode, Json<SandboxResponse>), ApiError> {
    let rec = s.core.restore_snapshot(&org, req).await?;
    Ok((StatusCode::CREATED, Json(response(&rec))))
}

#[utoipa::path(get, path = "/v1/snapshots", tag = "Snapshot", params(ListSnapshotsQuery),
    responses(
        (status = 200, description = "A page of snapshots", body = ListSnapshotsResponse),
        (status = 400, description = "Invalid query", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse)))]
pub async fn list(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    query: Result<Query<ListSnapshotsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ListSnapshotsResponse>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::field("query", e.body_text()))?;
    let q = query.parse().map_err(ApiError::Invalid)?;
    let (rows, total) = s.core.list_snapshots(&org, &q)?;
    Ok(Json(ListSnapshotsResponse {
        items: rows.iter().map(snapshot_response).collect(),
        total_items: total,
    }))
}

#[utoipa::path(delete, path = "/v1/snapshot/{snapshotID}", tag = "Snapshot",
    params(("snapshotID" = String, Path, description = "Snapshot id (or name)")),
    responses(
        (status = 204, description = "Deleted with its stored image"),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such snapshot in this organization", body = ErrorResponse),
        (status = 409, description = "A sandbox is being restored from it", body = ErrorResponse)))]
pub async fn delete(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.core.delete_snapshot(&org, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
