//! Sandbox lifecycle endpoints.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use cove_api::sandbox::{
    ListSandboxesQuery, ListSandboxesResponse, Mount, MountRequest, MountUpdateRequest, NetworkPolicy,
    SandboxCreateRequest, SandboxListItem, SandboxResponse, SandboxUserHomeDirResponse,
    SandboxWorkdirResponse,
};
use cove_api::{ErrorResponse, ValidationErrorResponse};

use crate::core::response;
use crate::error::ApiError;
use crate::extract::{OrgId, ValidJson};
use crate::AppState;

#[utoipa::path(post, path = "/v1/sandbox", tag = "Sandbox", request_body = SandboxCreateRequest,
    description = "Create a sandbox from a template. Returns once the VM runs.",
    responses(
        (status = 201, description = "Created and running", body = SandboxResponse),
        (status = 400, description = "Invalid request", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 409, description = "Sandbox limit reached", body = ErrorResponse),
        (status = 501, description = "A requested feature is not implemented yet", body = ErrorResponse),
        (status = 503, description = "The VM could not be started", body = ErrorResponse)))]
pub async fn create(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    ValidJson(req): ValidJson<SandboxCreateRequest>,
) -> Result<(StatusCode, Json<SandboxResponse>), ApiError> {
    let rec = s.core.create_sandbox(&org, req).await?;
    Ok((StatusCode::CREATED, Json(response(&rec))))
}

#[utoipa::path(get, path = "/v1/sandbox/{sandboxID}", tag = "Sandbox",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "The sandbox", body = SandboxResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox in this organization", body = ErrorResponse)))]
pub async fn get(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<Json<SandboxResponse>, ApiError> {
    Ok(Json(response(&s.core.get(&org, &id)?)))
}

#[utoipa::path(delete, path = "/v1/sandbox/{sandboxID}", tag = "Sandbox",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    responses(
        (status = 204, description = "Deleted: VM, disk and memory are gone"),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox in this organization", body = ErrorResponse),
        (status = 409, description = "The sandbox is in a transition", body = ErrorResponse)))]
pub async fn delete(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.core.delete(&org, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(patch, path = "/v1/sandbox/{sandboxID}/network-policy", tag = "Sandbox",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    request_body = NetworkPolicy,
    description = "Replace the egress policy of a sandbox (a Cove addition). A running sandbox gets it at once: \
        connections the new policy forbids are cut before this returns. A paused or stopped sandbox gets it \
        when it next runs. Header values of transforms are write-only.",
    responses(
        (status = 200, description = "Policy replaced", body = SandboxResponse),
        (status = 400, description = "Invalid policy", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox in this organization", body = ErrorResponse),
        (status = 409, description = "The sandbox is changing state", body = ErrorResponse),
        (status = 503, description = "The policy could not be applied", body = ErrorResponse)))]
pub async fn set_network_policy(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
    ValidJson(policy): ValidJson<NetworkPolicy>,
) -> Result<Json<SandboxResponse>, ApiError> {
    let rec = s.core.set_network_policy(&org, &id, policy).await?;
    Ok(Json(response(&rec)))
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/pause", tag = "Sandbox",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    description = "Pause a running sandbox: its VM state, memory and disk are stored, the VM ends and its \
        host memory is released. Any later request that needs the guest resumes it.",
    responses(
        (status = 201, description = "Paused", body = SandboxResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox in this organization", body = ErrorResponse),
        (status = 409, description = "The sandbox is not running", body = ErrorResponse),
        (status = 503, description = "Storing the state failed; the sandbox keeps running", body = ErrorResponse)))]
pub async fn pause(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<SandboxResponse>), ApiError> {
    let rec = s.core.pause(&org, &id).await?;
    Ok((StatusCode::CREATED, Json(response(&rec))))
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/resume", tag = "Sandbox",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    description = "Resume a paused sandbox (requests that need the guest do this by themselves). A running \
        sandbox is returned as is.",
    responses(
        (status = 200, description = "Running", body = SandboxResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox in this organization", body = ErrorResponse),
        (status = 409, description = "The sandbox is neither paused nor running", body = ErrorResponse),
        (status = 429, description = "Sandbox limit reached", body = ErrorResponse),
        (status = 503, description = "Restoring failed; the sandbox stays paused", body = ErrorResponse)))]
pub async fn resume(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<Json<SandboxResponse>, ApiError> {
    Ok(Json(response(&s.core.resume(&org, &id).await?)))
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/stop", tag = "Sandbox",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    description = "Stop a running sandbox, keeping only its writable disk: processes and memory are gone.",
    responses(
        (status = 200, description = "Stopped", body = SandboxResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox in this organization", body = ErrorResponse),
        (status = 409, description = "The sandbox is not running", body = ErrorResponse)))]
pub async fn stop(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<Json<SandboxResponse>, ApiError> {
    Ok(Json(response(&s.core.stop(&org, &id).await?)))
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/start", tag = "Sandbox",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    description = "Boot a stopped sandbox afresh from its template, with the disk it kept.",
    responses(
        (status = 200, description = "Running", body = SandboxResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox in this organization", body = ErrorResponse),
        (status = 409, description = "The sandbox is not stopped", body = ErrorResponse),
        (status = 429, description = "Sandbox limit reached", body = ErrorResponse),
        (status = 503, description = "The VM could not be booted", body = ErrorResponse)))]
pub async fn start(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<Json<SandboxResponse>, ApiError> {
    Ok(Json(response(&s.core.start(&org, &id).await?)))
}

#[utoipa::path(get, path = "/v1/sandboxes", tag = "Sandbox", params(ListSandboxesQuery),
    responses(
        (status = 200, description = "A page of sandboxes", body = ListSandboxesResponse),
        (status = 400, description = "Invalid query", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse)))]
pub async fn list(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    query: Result<Query<ListSandboxesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ListSandboxesResponse>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::field("query", e.body_text()))?;
    let q = query.parse().map_err(ApiError::Invalid)?;
    let (rows, total) = s.core.list(&org, &q)?;
    let items = rows
        .iter()
        .map(|r| SandboxListItem {
            id: r.id.clone(),
            template_id: r.template.clone(),
            pod_id: r.runner_id.clone(),
            state: r.state,
            launch_time: r.launch_time,
            state_change_time: Some(r.state_changed_at),
            timeout_at: r.timeout_at,
            created_at: r.created_at,
        })
        .collect();
    Ok(Json(ListSandboxesResponse { items, total_items: total }))
}

async fn system_info(s: &AppState, org: &str, id: &str) -> Result<cove_proto::SystemInfo, ApiError> {
    let agent = s.core.agent(org, id).await?;
    Ok(agent.system().await.map_err(cove_runner::RunnerError::from)?)
}

#[utoipa::path(get, path = "/v1/sandbox/{sandboxID}/system/user-home-dir", tag = "Sandbox",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Home directory of the sandbox user", body = SandboxUserHomeDirResponse),
        (status = 404, description = "No such sandbox", body = ErrorResponse)))]
pub async fn user_home_dir(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<Json<SandboxUserHomeDirResponse>, ApiError> {
    let info = system_info(&s, &org, &id).await?;
    Ok(Json(SandboxUserHomeDirResponse { user_home_dir: info.user_home_dir }))
}

#[utoipa::path(get, path = "/v1/sandbox/{sandboxID}/system/workdir", tag = "Sandbox",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Working directory commands start in", body = SandboxWorkdirResponse),
        (status = 404, description = "No such sandbox", body = ErrorResponse)))]
pub async fn workdir(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<Json<SandboxWorkdirResponse>, ApiError> {
    let info = system_info(&s, &org, &id).await?;
    Ok(Json(SandboxWorkdirResponse { workdir: info.workdir }))
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/mounts", tag = "Sandbox", request_body = MountRequest,
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    description = "Attach a read-only object-storage mount to a sandbox (a paused one is resumed). The \
        bucket is reached from the host with the credentials, which never enter the guest; the guest sees a \
        lazy FUSE filesystem at `mount_path`. Answers once the path is mounted in the guest; for a stopped \
        sandbox, once the bucket answered (it is mounted when the sandbox starts).",
    responses(
        (status = 201, description = "Mounted", body = Mount),
        (status = 400, description = "Invalid mount, or the endpoint, bucket or credentials did not work", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox in this organization", body = ErrorResponse),
        (status = 409, description = "Mount limit reached, path in use, or the sandbox is neither running, paused nor stopped", body = ErrorResponse)))]
pub async fn add_mount(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
    ValidJson(req): ValidJson<MountRequest>,
) -> Result<(StatusCode, Json<Mount>), ApiError> {
    let m = s.core.add_mount(&org, &id, &req).await?;
    Ok((StatusCode::CREATED, Json(m.public())))
}

#[utoipa::path(patch, path = "/v1/sandbox/{sandboxID}/mounts/{mountID}", tag = "Sandbox",
    request_body = MountUpdateRequest,
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("mountID" = String, Path, description = "Mount id")),
    description = "Change a mount. Omitted fields keep their value; an empty `prefix`, `access_key_id` or \
        `secret_access_key` clears it. The guest mounts it anew unless only the credentials changed.",
    responses(
        (status = 200, description = "Updated", body = Mount),
        (status = 400, description = "Invalid update, or the endpoint, bucket or credentials did not work", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox or mount", body = ErrorResponse),
        (status = 409, description = "Path in use, or the sandbox is neither running, paused nor stopped", body = ErrorResponse)))]
pub async fn update_mount(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, mount_id)): Path<(String, String)>,
    ValidJson(req): ValidJson<MountUpdateRequest>,
) -> Result<Json<Mount>, ApiError> {
    let m = s.core.update_mount(&org, &id, &mount_id, &req).await?;
    Ok(Json(m.public()))
}

#[utoipa::path(delete, path = "/v1/sandbox/{sandboxID}/mounts/{mountID}", tag = "Sandbox",
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("mountID" = String, Path, description = "Mount id")),
    description = "Detach a mount: its path disappears in the guest.",
    responses(
        (status = 204, description = "Unmounted"),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox or mount", body = ErrorResponse),
        (status = 409, description = "The sandbox is neither running, paused nor stopped", body = ErrorResponse)))]
pub async fn delete_mount(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, mount_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core.delete_mount(&org, &id, &mount_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
