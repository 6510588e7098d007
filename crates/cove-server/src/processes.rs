//! Background processes (a Cove addition): start a command and leave it running, follow its
//! output as server-sent events while it is written, write to its standard input, signal it,
//! list, delete. The agent keeps them; these handlers forward. Following a process does not
//! keep its sandbox running: a pause ends the stream with a `detached` event, and following
//! again resumes the sandbox and replays the output kept.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::Response;
use bytes::Bytes;
use cove_api::process::{ProcessInfo, ProcessInput, ProcessListResponse, ProcessSignal, ProcessStartRequest};
use cove_api::{ErrorResponse, ValidationErrorResponse};
use cove_proto::routes;
use http_body_util::BodyExt;
use hyper::Method;

use crate::error::ApiError;
use crate::extract::{OrgId, ValidJson};
use crate::forward::{forward_json, open_stream};
use crate::AppState;

/// The agent path of process `pid`; 404 for what cannot be a pid.
fn process_path(id: &str, pid: &str, rest: &str) -> Result<String, ApiError> {
    match pid.parse::<u32>() {
        Ok(n) => Ok(format!("{}/{n}{rest}", routes::PROCESSES)),
        Err(_) => Err(ApiError::NotFound(format!("no process {pid:?} in sandbox {id}"))),
    }
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/process/start", tag = "Process",
    description = "Cove addition. Start `/bin/sh -c command` as the sandbox user and return at once; its output is \
        kept (the last MiB) and can be followed. With `timeout` it and all its descendants are killed after that many \
        seconds (exit code 124).",
    request_body = ProcessStartRequest, params(("sandboxID" = String, Path, description = "Sandbox id")),
    responses((status = 201, description = "Started", body = ProcessInfo),
        (status = 400, description = "Invalid request", body = ValidationErrorResponse),
        (status = 404, description = "No such sandbox", body = ErrorResponse),
        (status = 409, description = "The sandbox is not running, or keeps 256 running processes", body = ErrorResponse)))]
pub async fn start(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
    ValidJson(req): ValidJson<ProcessStartRequest>,
) -> Result<Response, ApiError> {
    forward_json(&s, &org, &id, Method::POST, routes::PROCESSES, Some(&req)).await
}

#[utoipa::path(get, path = "/v1/sandbox/{sandboxID}/processes", tag = "Process",
    description = "Cove addition. The processes started with `process/start`, running or finished (until deleted).",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "Processes", body = ProcessListResponse),
        (status = 404, description = "No such sandbox", body = ErrorResponse)))]
pub async fn list(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    forward_json::<()>(&s, &org, &id, Method::GET, routes::PROCESSES, None).await
}

#[utoipa::path(get, path = "/v1/sandbox/{sandboxID}/process/{pid}", tag = "Process",
    description = "Cove addition. One process: whether it runs, its exit code once it has exited.",
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("pid" = u32, Path, description = "Process id")),
    responses((status = 200, description = "The process", body = ProcessInfo),
        (status = 404, description = "No such sandbox or process", body = ErrorResponse)))]
pub async fn get(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, pid)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    forward_json::<()>(&s, &org, &id, Method::GET, &process_path(&id, &pid, "")?, None).await
}

#[utoipa::path(delete, path = "/v1/sandbox/{sandboxID}/process/{pid}", tag = "Process",
    description = "Cove addition. Kill the process and everything it started, and forget it.",
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("pid" = u32, Path, description = "Process id")),
    responses((status = 204, description = "Deleted"),
        (status = 404, description = "No such sandbox or process", body = ErrorResponse)))]
pub async fn delete(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, pid)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    forward_json::<()>(&s, &org, &id, Method::DELETE, &process_path(&id, &pid, "")?, None).await
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/process/{pid}/stdin", tag = "Process",
    description = "Cove addition. Write to the process's standard input; with `eof`, close it after.",
    request_body = ProcessInput,
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("pid" = u32, Path, description = "Process id")),
    responses((status = 204, description = "Written"),
        (status = 404, description = "No such sandbox or process", body = ErrorResponse),
        (status = 409, description = "Its standard input is closed", body = ErrorResponse)))]
pub async fn stdin(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, pid)): Path<(String, String)>,
    ValidJson(req): ValidJson<ProcessInput>,
) -> Result<Response, ApiError> {
    forward_json(&s, &org, &id, Method::POST, &process_path(&id, &pid, "/stdin")?, Some(&req)).await
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/process/{pid}/signal", tag = "Process",
    description = "Cove addition. Send a signal to the process's group; `KILL` kills everything it started.",
    request_body = ProcessSignal,
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("pid" = u32, Path, description = "Process id")),
    responses((status = 200, description = "Sent", body = ProcessInfo),
        (status = 400, description = "Unknown signal", body = ValidationErrorResponse),
        (status = 404, description = "No such sandbox or process", body = ErrorResponse)))]
pub async fn signal(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, pid)): Path<(String, String)>,
    ValidJson(req): ValidJson<ProcessSignal>,
) -> Result<Response, ApiError> {
    forward_json(&s, &org, &id, Method::POST, &process_path(&id, &pid, "/signal")?, Some(&req)).await
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct OutputQuery {
    /// Go on until the process ends (default); `false` gives the output kept and ends.
    pub follow: Option<bool>,
}

/// What a follower is told when its stream ends before the process did.
const DETACHED: &[u8] = b"event: detached\ndata: {\"message\":\"the sandbox paused, stopped or went away; \
    follow again to resume it\"}\n\n";

#[utoipa::path(get, path = "/v1/sandbox/{sandboxID}/process/{pid}/output", tag = "Process",
    description = "Cove addition. The process's output as server-sent events, the output kept first: `stdout` and \
        `stderr` (`{\"data\": text}`), `dropped` (`{\"chunks\": n}`, output a slow reader lost), `exit` \
        (`{\"exit_code\": n}`) last. `detached` ends a stream that a pause cut; follow again to go on.",
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("pid" = u32, Path, description = "Process id"), OutputQuery),
    responses((status = 200, description = "text/event-stream"),
        (status = 404, description = "No such sandbox or process", body = ErrorResponse)))]
pub async fn output(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, pid)): Path<(String, String)>,
    Query(q): Query<OutputQuery>,
) -> Result<Response, ApiError> {
    let path = process_path(&id, &pid, "/output")?;
    let follow = q.follow.unwrap_or(true);
    let guest = s.core.agent(&org, &id).await?;
    let req = hyper::Request::get(format!("http://agent{path}?follow={follow}"))
        .body(cove_runner::agent::full(Bytes::new()))
        .map_err(ApiError::internal)?;
    let (agent, body) = open_stream(guest, req).await?;
    let events = futures::stream::unfold(Some((body, agent)), |state| async move {
        let (mut body, agent) = state?;
        match body.frame().await {
            Some(Ok(frame)) => {
                let data = frame.into_data().unwrap_or_default();
                Some((Ok::<_, std::convert::Infallible>(data), Some((body, agent))))
            }
            Some(Err(_)) => Some((Ok(Bytes::from_static(DETACHED)), None)),
            None => None,
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(events))
        .map_err(ApiError::internal)
}
