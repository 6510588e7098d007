//! A git server: `git http-backend` (Debian's git) run as a CGI program for `/git/<repo>`,
//! behind HTTP basic authentication, on every web host of the test internet.

use std::path::Path;
use std::process::Stdio;

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;

use super::web::{headers_of, Body};
use super::{State, GIT_PASSWORD, GIT_USER};

/// Largest request body taken (a push of the test repositories is far smaller).
const MAX_BODY: usize = 64 << 20;

/// Whether `authorization` is the one account's.
fn authorized(authorization: Option<&str>) -> bool {
    let expected = base64::engine::general_purpose::STANDARD.encode(format!("{GIT_USER}:{GIT_PASSWORD}"));
    authorization.and_then(|a| a.strip_prefix("Basic ")) == Some(expected.as_str())
}

fn answer(status: StatusCode, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::builder().status(status);
    for (n, v) in headers {
        r = r.header(*n, *v);
    }
    r.body(Full::new(body.into()).map_err(|never| match never {}).boxed_unsync()).expect("a valid response")
}

/// Serves `path_info` (the path below `/git`) from the repositories under `root`.
pub(super) async fn serve(
    state: &State,
    root: &Path,
    path_info: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let head = Request::from_parts(parts, ());
    let auth = head.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let ok = authorized(auth);
    state.record_git(path_info, ok, headers_of(&head));
    if !ok {
        return answer(
            StatusCode::UNAUTHORIZED,
            &[("www-authenticate", "Basic realm=\"cove test git\"")],
            "authentication required\n",
        );
    }
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return answer(StatusCode::PAYLOAD_TOO_LARGE, &[], "too large\n"),
    };
    let header =
        |name: &str| head.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REMOTE_USER", GIT_USER)
        .env("REMOTE_ADDR", "192.88.99.1")
        .env("REQUEST_METHOD", head.method().as_str())
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", head.uri().query().unwrap_or(""))
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return answer(StatusCode::INTERNAL_SERVER_ERROR, &[], format!("git http-backend: {e}\n")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&body).await;
    }
    let out = match child.wait_with_output().await {
        Ok(o) => o,
        Err(e) => return answer(StatusCode::INTERNAL_SERVER_ERROR, &[], format!("git http-backend: {e}\n")),
    };
    cgi_response(&out.stdout)
}

/// A CGI program's output as a response: its header lines (`Status:` sets the status), a blank
/// line, the body.
fn cgi_response(out: &[u8]) -> Response<Body> {
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    let split = split.or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((end, sep)) = split else {
        return answer(StatusCode::BAD_GATEWAY, &[], "bad CGI output\n");
    };
    let head = String::from_utf8_lossy(&out[..end]);
    let mut status = StatusCode::OK;
    let mut headers = Vec::new();
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().and_then(|c| c.parse::<u16>().ok());
            status = code.and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::BAD_GATEWAY);
        } else {
            headers.push((name.trim().to_string(), value.to_string()));
        }
    }
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    answer(status, &pairs, Bytes::copy_from_slice(&out[end + sep..]))
}
