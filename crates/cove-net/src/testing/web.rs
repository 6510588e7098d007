//! The web server: HTTP/1.1 in the clear, HTTP/1.1 and HTTP/2 over TLS, one set of routes.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::header::{
    CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    UPGRADE,
};
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::{Recorded, State};

pub(super) type Body = UnsyncBoxBody<Bytes, io::Error>;

/// What a request's handler knows of its connection.
struct Conn {
    ip: Ipv4Addr,
    port: u16,
    tls: bool,
    sni: Option<String>,
}

pub(super) async fn serve_plain(state: Arc<State>, stream: TcpStream, local: SocketAddrV4) {
    let conn = Conn { ip: *local.ip(), port: local.port(), tls: false, sni: None };
    serve_http(state, TokioIo::new(stream), conn).await;
}

pub(super) async fn serve_tls(state: Arc<State>, stream: TcpStream, local: SocketAddrV4, tls: TlsAcceptor) {
    let stream = match tls.accept(stream).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(%local, error = %e, "test internet: TLS handshake failed");
            return;
        }
    };
    let sni = stream.get_ref().1.server_name().map(str::to_owned);
    let conn = Conn { ip: *local.ip(), port: local.port(), tls: true, sni };
    serve_http(state, TokioIo::new(stream), conn).await;
}

async fn serve_http<I>(state: Arc<State>, io: I, conn: Conn)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let service = service_fn(move |req| handle(state.clone(), conn.clone(), req));
    let builder = auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection_with_upgrades(io, service).await {
        tracing::debug!(error = %e, "test internet: HTTP connection failed");
    }
}

async fn handle(
    state: Arc<State>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let response = if path == "/" {
        index(&conn, &req)
    } else if let Some(key) = path.strip_prefix("/record/") {
        let key = key.to_owned();
        record(&state, &conn, key, req).await
    } else if let Some(repo) = path.strip_prefix("/git/") {
        let path_info = format!("/{repo}");
        super::git::serve(&state, &state.git_root, &path_info, req).await
    } else if path == "/echo-headers" {
        echo_headers(&req)
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        match n.parse() {
            Ok(n) => bytes(n),
            Err(_) => text(StatusCode::BAD_REQUEST, "bad length\n"),
        }
    } else if path == "/upload" {
        upload(req).await
    } else if let Some(n) = path.strip_prefix("/drip/") {
        match n.parse() {
            Ok(n) => drip(n),
            Err(_) => text(StatusCode::BAD_REQUEST, "bad count\n"),
        }
    } else if path == "/sse" {
        sse()
    } else if path == "/ws" {
        websocket(req)
    } else {
        text(StatusCode::NOT_FOUND, "not found\n")
    };
    Ok(response)
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()).map_err(|never| match never {}).boxed_unsync())
        .expect("a valid response")
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    full(status, "text/plain", body)
}

fn json(value: serde_json::Value) -> Response<Body> {
    full(StatusCode::OK, "application/json", format!("{value}\n"))
}

fn proto(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// `Host`, or the `:authority` of an HTTP/2 request.
fn authority<B>(req: &Request<B>) -> Option<String> {
    match req.headers().get(HOST) {
        Some(host) => Some(String::from_utf8_lossy(host.as_bytes()).into_owned()),
        None => req.uri().authority().map(|a| a.to_string()),
    }
}

pub(super) fn headers_of<B>(req: &Request<B>) -> Vec<(String, String)> {
    req.headers()
        .iter()
        .map(|(name, value)| {
            (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned())
        })
        .collect()
}

/// `GET /`: where the request arrived, and how; no request header is echoed.
fn index<B>(conn: &Conn, req: &Request<B>) -> Response<Body> {
    json(json!({
        "server": conn.ip.to_string(),
        "port": conn.port,
        "host": authority(req),
        "sni": conn.sni,
        "proto": proto(req.version()),
        "tls": conn.tls,
    }))
}

/// Reads and discards the body; its length.
async fn drain(body: &mut Incoming) -> u64 {
    let mut len = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            len += data.len() as u64;
        }
    }
    len
}

/// `ANY /record/<key>`.
async fn record(state: &State, conn: &Conn, key: String, req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let head = Request::from_parts(parts, ());
    let body_len = drain(&mut body).await;
    state.record(
        key,
        Recorded {
            method: head.method().to_string(),
            path: head.uri().path().to_owned(),
            query: head.uri().query().map(str::to_owned),
            authority: authority(&head),
            headers: headers_of(&head),
            server: conn.ip,
            port: conn.port,
            tls: conn.tls,
            sni: conn.sni.clone(),
            proto: proto(head.version()).to_owned(),
            body_len,
        },
    );
    text(StatusCode::OK, "recorded\n")
}

/// `GET /echo-headers`: reflects the request headers, as a JSON object (repeated headers
/// joined with ", ").
fn echo_headers<B>(req: &Request<B>) -> Response<Body> {
    let mut out = serde_json::Map::new();
    for (name, value) in headers_of(req) {
        match out.get_mut(&name) {
            Some(serde_json::Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(&value);
            }
            _ => {
                out.insert(name, serde_json::Value::String(value));
            }
        }
    }
    json(serde_json::Value::Object(out))
}

const CHUNK: usize = 64 * 1024;

/// 64 KiB whose byte `i` is `i % 256`, so byte `k` of any `/bytes` response is `k % 256`.
fn pattern() -> Bytes {
    static PATTERN: OnceLock<Bytes> = OnceLock::new();
    PATTERN.get_or_init(|| (0..CHUNK).map(|i| i as u8).collect::<Vec<u8>>().into()).clone()
}

/// `GET /bytes/<n>`: `n` bytes, streamed in 64 KiB frames.
fn bytes(n: u64) -> Response<Body> {
    let stream = futures::stream::unfold(n, |left| async move {
        if left == 0 {
            return None;
        }
        let len = usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK));
        Some((Ok::<_, io::Error>(Frame::data(pattern().slice(..len))), left - len as u64))
    });
    Response::builder()
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, n)
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("a valid response")
}

/// `POST /upload`: `{"bytes": n, "sha256": "<hex>"}` of the streamed body.
async fn upload(req: Request<Incoming>) -> Response<Body> {
    let mut body = req.into_body();
    let mut hash = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hash.update(data);
                    len += data.len() as u64;
                }
            }
            Err(_) => return text(StatusCode::BAD_REQUEST, "body failed\n"),
        }
    }
    let sha256: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    json(json!({ "bytes": len, "sha256": sha256 }))
}

/// `GET /sse`: `data: tick N` for N = 1..=5, 100 ms apart, then the end of the body.
/// `GET /drip/<n>`: `n` lines of "drip", one every 100 ms. A stream that is always almost
/// caught up with its reader, so a cut connection shows at once (a bulk download would first
/// drain what the reader's socket had buffered).
fn drip(n: u32) -> Response<Body> {
    let stream = futures::stream::unfold(0u32, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some((Ok::<_, io::Error>(Frame::data(Bytes::from_static(b"drip\n"))), i + 1))
    });
    Response::builder()
        .header(CONTENT_TYPE, "text/plain")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("a valid response")
}

fn sse() -> Response<Body> {
    let stream = futures::stream::unfold(1u32, |n| async move {
        if n > 5 {
            return None;
        }
        if n > 1 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some((Ok::<_, io::Error>(Frame::data(Bytes::from(format!("data: tick {n}\n\n")))), n + 1))
    });
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .header(CACHE_CONTROL, "no-cache")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("a valid response")
}

/// `GET /ws`: a WebSocket (HTTP/1.1 Upgrade) echoing text and binary messages.
fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = req.headers().get(SEC_WEBSOCKET_KEY).cloned();
    let (true, Some(key)) = (upgrade, key) else {
        return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "test internet: WebSocket upgrade failed");
                return;
            }
        };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header(SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()).map_err(|never| match never {}).boxed_unsync())
        .expect("a valid response")
}
