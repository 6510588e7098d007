//! Building responses: JSON, raw bytes, and errors in the protocol's `AgentError` shape.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{header, Response, StatusCode};
use serde::Serialize;

/// Body type of every agent response.
pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pub fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = status;
    r
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(v) => with_type(status, "application/json", full(v)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding response: {e}")),
    }
}

pub fn bytes(status: StatusCode, content_type: &str, body: Body) -> Response<Body> {
    with_type(status, content_type, body)
}

pub fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    field_error(status, None, message)
}

/// An error that names the request field at fault.
pub fn field_error(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Response<Body> {
    let body = cove_proto::AgentError { message: message.into(), field: field.map(str::to_string) };
    let v = serde_json::to_vec(&body).unwrap_or_default();
    with_type(status, "application/json", full(v))
}

fn with_type(status: StatusCode, content_type: &str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Maps an I/O error on a guest path to a status and a message naming the path.
pub fn io_error(path: &str, e: &std::io::Error) -> Response<Body> {
    use std::io::ErrorKind::*;
    let status = match e.kind() {
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists => StatusCode::CONFLICT,
        PermissionDenied => StatusCode::FORBIDDEN,
        InvalidInput | InvalidData | NotADirectory | IsADirectory | DirectoryNotEmpty => {
            StatusCode::BAD_REQUEST
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, format!("{path}: {e}"))
}
