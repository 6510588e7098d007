//! Requests forwarded to a sandbox's agent as the API received them (filesystem, terminal
//! sessions): the answer streams back, agent errors keep their status.

use axum::body::Body;
use axum::http::header;
use axum::response::Response;
use cove_runner::AgentBody;
use http_body_util::BodyExt;
use hyper::Method;

use crate::core::Guest;
use crate::error::ApiError;
use crate::AppState;

/// Sends one request to the agent and streams its answer back. The sandbox stays running until
/// the answer has streamed.
pub async fn forward(
    agent: Guest,
    method: Method,
    uri: String,
    content_type: Option<header::HeaderValue>,
    body: AgentBody,
) -> Result<Response, ApiError> {
    let mut req = hyper::Request::builder().method(method).uri(format!("http://agent{uri}"));
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let req = req.body(body).map_err(ApiError::internal)?;
    forward_request(agent, req).await
}

/// [`forward`] for a request already built.
pub async fn forward_request(agent: Guest, req: hyper::Request<AgentBody>) -> Result<Response, ApiError> {
    let resp = send(&agent, req).await?;
    let mut out = Response::builder().status(resp.status());
    for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
        if let Some(v) = resp.headers().get(&name) {
            out = out.header(name, v.clone());
        }
    }
    let body = resp.into_body().map_frame(move |frame| {
        let _held = &agent;
        frame
    });
    out.body(Body::new(body)).map_err(ApiError::internal)
}

/// Sends a request whose answer streams for as long as it lasts (a terminal, a process's
/// output). The stream does not hold the sandbox running: the agent is released once the
/// answer has begun, and a pause ends the stream with an error. Returns the agent (to keep the
/// connection open) and the answer's body.
pub async fn open_stream(
    agent: Guest,
    req: hyper::Request<AgentBody>,
) -> Result<(cove_runner::AgentClient, hyper::body::Incoming), ApiError> {
    let resp = send(&agent, req).await?;
    Ok((agent.release(), resp.into_body()))
}

/// Sends a request to the agent; an answer with an error status is that error.
async fn send(
    agent: &Guest,
    req: hyper::Request<AgentBody>,
) -> Result<hyper::Response<hyper::body::Incoming>, ApiError> {
    let resp = agent.send(req).await.map_err(cove_runner::RunnerError::from)?;
    let status = resp.status();
    if !status.is_success() {
        let bytes = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        return Err(
            cove_runner::RunnerError::from(cove_runner::AgentError::from_answer(status, &bytes)).into()
        );
    }
    Ok(resp)
}

/// Forwards `req` (JSON, or nothing) to the agent's `path` in sandbox `id`.
pub async fn forward_json<T: serde::Serialize>(
    s: &AppState,
    org: &str,
    id: &str,
    method: Method,
    path: &str,
    req: Option<&T>,
) -> Result<Response, ApiError> {
    let agent = s.core.agent(org, id).await?;
    let bytes = match req {
        Some(r) => serde_json::to_vec(r).map_err(ApiError::internal)?,
        None => Vec::new(),
    };
    let ct = header::HeaderValue::from_static("application/json");
    forward(agent, method, path.to_string(), Some(ct), cove_runner::agent::full(bytes)).await
}

/// A request body fed by the sender: each `Bytes` sent is a chunk of it, and it ends when the
/// sender is dropped. At most `queue` chunks wait.
pub fn fed_body(queue: usize) -> (tokio::sync::mpsc::Sender<bytes::Bytes>, AgentBody) {
    let (input, queued) = tokio::sync::mpsc::channel::<bytes::Bytes>(queue);
    let frames = futures::stream::unfold(queued, |mut q| async move {
        let data = q.recv().await?;
        Some((Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(data)), q))
    });
    (input, http_body_util::StreamBody::new(frames).boxed_unsync())
}

/// A request body streamed on to the agent.
pub fn stream(body: Body) -> AgentBody {
    body.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>).boxed_unsync()
}
