//! Terminal sessions. The REST calls are forwarded to the agent, which keeps the sessions; a
//! connection is a WebSocket whose binary messages are the terminal's input and output, relayed
//! to the agent's streaming `attach` call. A connection does not keep its sandbox running: a
//! pause (its timeout's too) closes it with code 1001, and connecting again resumes the
//! sandbox and finds the same shell, with what it printed meanwhile.

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use cove_api::pty::{valid_session_id, PtyCreateRequest, PtyListResponse, PtyResizeRequest, PtySessionInfo};
use cove_api::{ErrorResponse, ValidationErrorResponse};
use cove_proto::routes;
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper::Method;

use crate::error::ApiError;
use crate::extract::{OrgId, ValidJson};
use crate::forward::{forward_json, open_stream};
use crate::AppState;

/// Input messages a connection may have in flight to the agent.
const INPUT_QUEUE: usize = 64;

/// The agent path of session `sid`; 404 for an id no session can have.
fn session_path(id: &str, sid: &str, rest: &str) -> Result<String, ApiError> {
    if !valid_session_id(sid) {
        return Err(ApiError::NotFound(format!("no terminal session {sid:?} in sandbox {id}")));
    }
    Ok(format!("{}/{sid}{rest}", routes::PTY))
}

#[utoipa::path(get, path = "/v1/sandbox/{sandboxID}/pty", tag = "PTY", description = "The sandbox's terminal sessions.",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "Sessions", body = PtyListResponse),
        (status = 404, description = "No such sandbox", body = ErrorResponse)))]
pub async fn list(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    forward_json::<()>(&s, &org, &id, Method::GET, routes::PTY, None).await
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/pty", tag = "PTY",
    description = "Start a login shell on a new terminal, as the sandbox user (with `lazy_start`, at the first connection).",
    request_body = PtyCreateRequest, params(("sandboxID" = String, Path, description = "Sandbox id")),
    responses((status = 201, description = "Created", body = PtySessionInfo),
        (status = 400, description = "Invalid request", body = ValidationErrorResponse),
        (status = 404, description = "No such sandbox", body = ErrorResponse),
        (status = 409, description = "A session with this id exists, or too many sessions", body = ErrorResponse)))]
pub async fn create(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
    ValidJson(req): ValidJson<PtyCreateRequest>,
) -> Result<Response, ApiError> {
    forward_json(&s, &org, &id, Method::POST, routes::PTY, Some(&req)).await
}

#[utoipa::path(get, path = "/v1/sandbox/{sandboxID}/pty/{sessionID}", tag = "PTY", description = "One terminal session.",
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("sessionID" = String, Path, description = "Session id")),
    responses((status = 200, description = "The session", body = PtySessionInfo),
        (status = 404, description = "No such sandbox or session", body = ErrorResponse)))]
pub async fn get(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, sid)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    forward_json::<()>(&s, &org, &id, Method::GET, &session_path(&id, &sid, "")?, None).await
}

#[utoipa::path(delete, path = "/v1/sandbox/{sandboxID}/pty/{sessionID}", tag = "PTY",
    description = "Kill the session's shell and everything it started, and forget the session.",
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("sessionID" = String, Path, description = "Session id")),
    responses((status = 204, description = "Deleted"),
        (status = 404, description = "No such sandbox or session", body = ErrorResponse)))]
pub async fn delete(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, sid)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    forward_json::<()>(&s, &org, &id, Method::DELETE, &session_path(&id, &sid, "")?, None).await
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/pty/{sessionID}/resize", tag = "PTY",
    description = "Change the terminal's size; its programs get SIGWINCH.", request_body = PtyResizeRequest,
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("sessionID" = String, Path, description = "Session id")),
    responses((status = 200, description = "Resized", body = PtySessionInfo),
        (status = 400, description = "Invalid request", body = ValidationErrorResponse),
        (status = 404, description = "No such sandbox or session", body = ErrorResponse)))]
pub async fn resize(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, sid)): Path<(String, String)>,
    ValidJson(req): ValidJson<PtyResizeRequest>,
) -> Result<Response, ApiError> {
    forward_json(&s, &org, &id, Method::POST, &session_path(&id, &sid, "/resize")?, Some(&req)).await
}

#[utoipa::path(get, path = "/v1/sandbox/{sandboxID}/pty/{sessionID}/connect", tag = "PTY",
    description = "WebSocket: binary messages carry the terminal's input and output (text messages are taken as input \
        too). What the session printed before comes first. The server closes with 1000 when the terminal closes (its \
        shell exited), with 1001 when the sandbox pauses, stops or is deleted; connecting again resumes a paused sandbox.",
    params(("sandboxID" = String, Path, description = "Sandbox id"), ("sessionID" = String, Path, description = "Session id")),
    responses((status = 101, description = "Connected"),
        (status = 400, description = "Not a WebSocket upgrade request"),
        (status = 404, description = "No such sandbox or session", body = ErrorResponse),
        (status = 409, description = "The sandbox is not running", body = ErrorResponse)))]
pub async fn connect(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, sid)): Path<(String, String)>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let path = session_path(&id, &sid, "/attach")?;
    let guest = s.core.agent(&org, &id).await?;
    let (input, body) = crate::forward::fed_body(INPUT_QUEUE);
    let req = hyper::Request::post(format!("http://agent{path}")).body(body).map_err(ApiError::internal)?;
    let (agent, output) = open_stream(guest, req).await?;
    Ok(ws.on_upgrade(move |socket| async move {
        relay(socket, input, output).await;
        drop(agent);
    }))
}

/// Relays a terminal between a WebSocket and the agent until either side ends.
async fn relay(
    socket: WebSocket,
    input: tokio::sync::mpsc::Sender<Bytes>,
    mut output: hyper::body::Incoming,
) {
    let (mut to_client, mut from_client) = socket.split();
    let typed = async move {
        while let Some(Ok(msg)) = from_client.next().await {
            let data = match msg {
                Message::Binary(b) => b,
                Message::Text(t) => Bytes::from(t.as_str().to_owned()),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if input.send(data).await.is_err() {
                break;
            }
        }
    };
    let printed = async move {
        let (code, reason) = loop {
            match output.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if to_client.send(Message::Binary(data)).await.is_err() {
                            return;
                        }
                    }
                }
                None => break (1000, "the terminal closed: its shell exited"),
                Some(Err(_)) => {
                    break (1001, "the sandbox paused, stopped or went away; connect again to resume it")
                }
            }
        };
        let close = CloseFrame { code, reason: reason.into() };
        let _ = to_client.send(Message::Close(Some(close))).await;
    };
    // Whichever side ends first ends the other: the agent's stream is reset when `output` is
    // dropped, and its input ends when `input` is.
    tokio::select! {
        _ = typed => {}
        _ = printed => {}
    }
}
