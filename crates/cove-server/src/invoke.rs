//! Reaching the services a sandbox runs: the invoke route and presigned URLs.
//!
//! Requests whose Host is below the sandbox domain never reach the API routes:
//! - `<id>.<domain>` goes to the template's service port (the code interpreter's), else to
//!   the port in the sandbox's `PORT` variable,
//! - `<id>-<port>.<domain>` goes to that port (both need the organization's API key, which is
//!   removed before the request enters the sandbox),
//! - `<token>.<domain>` is a presigned URL: no key, one port, until it expires or is revoked.
//!
//! The connection into the guest is made inside the sandbox's network namespace; a paused
//! sandbox is resumed first. Plain HTTP, streamed bodies (SSE) and upgrades (WebSocket) pass.

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cove_api::presigned::{PresignedUrlCreateRequest, PresignedUrlResponse};
use cove_api::{ErrorResponse, ValidationErrorResponse};
use hyper_util::rt::TokioIo;

use crate::error::{error_chain, ApiError};
use crate::extract::{api_key, OrgId, ValidJson};
use crate::AppState;

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/presigned-url", tag = "Presigned URL",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    request_body = PresignedUrlCreateRequest,
    description = "Create a temporary public URL to one port of a sandbox. The token is returned only \
        here; the server keeps its SHA-256 hash. The URL needs no API key and resumes a paused sandbox.",
    responses(
        (status = 201, description = "Created", body = PresignedUrlResponse),
        (status = 400, description = "Invalid request", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox in this organization", body = ErrorResponse)))]
pub async fn create_presigned(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
    ValidJson(req): ValidJson<PresignedUrlCreateRequest>,
) -> Result<(StatusCode, Json<PresignedUrlResponse>), ApiError> {
    Ok((StatusCode::CREATED, Json(s.core.create_presigned(&org, &id, &req)?)))
}

#[utoipa::path(delete, path = "/v1/sandbox/{sandboxID}/presigned-url/{id}", tag = "Presigned URL",
    params(("sandboxID" = String, Path, description = "Sandbox id"),
           ("id" = String, Path, description = "Presigned URL id")),
    description = "Revoke a presigned URL: it stops working at once.",
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "No such sandbox or presigned URL", body = ErrorResponse)))]
pub async fn delete_presigned(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path((id, presigned_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core.delete_presigned(&org, &id, &presigned_id)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Where a request for the sandbox domain goes.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// `<id>.<domain>`: the sandbox's `PORT`.
    Sandbox { id: String, port: Option<u16> },
    /// `<token>.<domain>`.
    Presigned { token: String },
    /// `<id>-<n>.<domain>` with `n` not a port.
    BadPort(String),
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Reads the target from a Host (port and case ignored); `None` when the host is not below
/// `domain`.
fn target(host: &str, domain: &str) -> Option<Target> {
    let host = strip_port(host.trim()).trim_end_matches('.').to_ascii_lowercase();
    let domain = strip_port(domain).trim_end_matches('.').to_ascii_lowercase();
    let label = host.strip_suffix(&domain)?.strip_suffix('.')?;
    if label.is_empty() || label.contains('.') {
        return None;
    }
    if label.starts_with("sbx-") {
        // Sandbox ids contain '-': a port is only a numeric suffix after the id's own part.
        if let Some((id, port)) = label.rsplit_once('-') {
            if id.len() > 4 && !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) {
                return Some(match port.parse::<u16>() {
                    Ok(p) if p > 0 => Target::Sandbox { id: id.to_string(), port: Some(p) },
                    _ => Target::BadPort(port.to_string()),
                });
            }
        }
        return Some(Target::Sandbox { id: label.to_string(), port: None });
    }
    Some(Target::Presigned { token: label.to_string() })
}

/// The middleware in front of the API routes: requests for the sandbox domain are proxied,
/// everything else goes on to the API.
pub async fn route(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let Some(target) = host.as_deref().and_then(|h| target(h, &s.core.cfg.sandbox_domain)) else {
        return next.run(req).await;
    };
    match proxy(&s, target, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn proxy(s: &AppState, target: Target, req: Request) -> Result<Response, ApiError> {
    // The caller's API key is Cove's, not the sandbox's: it is removed. A presigned URL's
    // caller has none, so its Authorization belongs to the app and passes.
    let keyed = matches!(target, Target::Sandbox { .. });
    let (org, id, port) = match target {
        Target::BadPort(p) => return Err(ApiError::field("host", format!("{p} is not a port (1-65535)"))),
        Target::Sandbox { id, port } => {
            let key = api_key(req.headers()).ok_or(ApiError::Unauthorized)?;
            let org = s.core.store.authenticate(&key)?.ok_or(ApiError::Unauthorized)?;
            let port = match port {
                Some(p) => p,
                None => {
                    let sandbox = s.core.get(&org, &id)?;
                    crate::core::default_port(&sandbox.template, &sandbox.env).ok_or_else(|| {
                        ApiError::NotFound(format!(
                            "sandbox {id} has no PORT variable: name the port in the host, as {id}-<port>.<domain>"
                        ))
                    })?
                }
            };
            (org, id, port)
        }
        Target::Presigned { token } => {
            let now = chrono::Utc::now().timestamp();
            let p = s
                .core
                .store
                .presigned_by_token(&token, now)?
                .ok_or_else(|| ApiError::NotFound("this URL does not exist or has expired".into()))?;
            (p.org_id, p.sandbox_id, p.port)
        }
    };
    let stream = s.core.connect_guest(&org, &id, port).await?;
    let forwarded = Forwarded {
        proto: s.core.cfg.public_scheme.clone(),
        host: req.headers().get(header::HOST).cloned(),
        client: req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip()),
    };
    forward(stream, req, keyed, &forwarded)
        .await
        .map_err(|e| ApiError::BadGateway(format!("port {port} of sandbox {id}: {e}")))
}

/// Headers that belong to one hop (the egress proxy's rule, shared), or that must not enter the
/// sandbox: the API key, when the request was authorized by one. An upgrade the client asked
/// for (`Connection: upgrade`) is passed on.
fn strip_headers(headers: &mut HeaderMap, upgrading: bool, keyed: bool) {
    headers.remove("leap0-authorization");
    if keyed {
        headers.remove(header::AUTHORIZATION);
    }
    let upgrade = cove_net::mitm::strip_hop_by_hop(headers);
    if let Some(protocol) = upgrade.filter(|_| upgrading) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// What the app in the sandbox is told about the original request, as proxies do
/// (`X-Forwarded-Proto`, `-Host`, `-For`), so it can build its own public URLs.
struct Forwarded {
    /// The scheme of the sandbox domain's URLs (`--public-scheme`).
    proto: String,
    host: Option<HeaderValue>,
    /// The client's address, when the server knows it.
    client: Option<std::net::IpAddr>,
}

impl Forwarded {
    /// Sets the headers; a client's own `X-Forwarded-For` is kept and ours appended.
    fn apply(&self, headers: &mut HeaderMap) {
        if let Ok(v) = HeaderValue::from_str(&self.proto) {
            headers.insert("x-forwarded-proto", v);
        }
        if let Some(h) = &self.host {
            headers.insert("x-forwarded-host", h.clone());
        }
        if let Some(ip) = self.client {
            let prior =
                headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
            let value = prior
                .into_iter()
                .chain(std::iter::once(ip.to_string().as_str()))
                .collect::<Vec<_>>()
                .join(", ");
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert("x-forwarded-for", v);
            }
        }
    }
}

/// Sends `req` over a fresh HTTP/1.1 connection to the guest and streams the answer back;
/// an upgrade (WebSocket) becomes a byte pipe between the two sides.
async fn forward(
    stream: cove_runner::GuestStream,
    mut req: Request,
    keyed: bool,
    forwarded: &Forwarded,
) -> Result<Response, String> {
    let upgrading = req.headers().contains_key(header::UPGRADE);
    let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    strip_headers(req.headers_mut(), upgrading, keyed);
    forwarded.apply(req.headers_mut());
    // The guest sees the path, not the proxy's absolute form.
    let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    *req.uri_mut() = path.parse().map_err(|e| format!("bad path: {e}"))?;
    *req.version_mut() = axum::http::Version::HTTP_11;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "invoke connection ended");
        }
    });
    let mut resp = sender.send_request(req).await.map_err(|e| error_chain(&e))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = client_upgrade {
            let guest = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client, guest) {
                    Ok((client, guest)) => {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(client),
                            &mut TokioIo::new(guest),
                        )
                        .await;
                    }
                    Err(e) => tracing::debug!(error = %e, "invoke upgrade failed"),
                }
            });
        }
    }
    Ok(resp.map(axum::body::Body::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_sandboxes_ports_and_tokens() {
        let d = "sandbox.example.com";
        let id = "sbx-0123456789abcdef0123";
        assert_eq!(target(&format!("{id}.{d}"), d), Some(Target::Sandbox { id: id.into(), port: None }));
        assert_eq!(
            target(&format!("{id}-3000.SANDBOX.example.com:443"), d),
            Some(Target::Sandbox { id: id.into(), port: Some(3000) })
        );
        assert_eq!(
            target(&format!("abcdef.{d}"), &format!("{d}:8080")),
            Some(Target::Presigned { token: "abcdef".into() })
        );
        assert_eq!(target("api.example.com", d), None);
        assert_eq!(target(d, d), None);
        assert_eq!(target(&format!("a.b.{d}"), d), None);
        assert_eq!(target(&format!("x{d}"), d), None);
        assert_eq!(target(&format!("{id}-0.{d}"), d), Some(Target::BadPort("0".into())));
        assert_eq!(target(&format!("{id}-99999.{d}"), d), Some(Target::BadPort("99999".into())));
    }

    #[test]
    fn the_api_key_never_enters_the_sandbox() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer k".parse().unwrap());
        h.insert("leap0-authorization", "k".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        h.insert(header::CONNECTION, "upgrade, x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        let mut presigned = h.clone();
        strip_headers(&mut h, true, true);
        assert!(h.get(header::AUTHORIZATION).is_none() && h.get("leap0-authorization").is_none());
        assert!(h.get(header::UPGRADE).is_some() && h.get("x-other").is_some());
        assert!(h.get("x-hop").is_none());
        // Without a key the app's own Authorization passes.
        strip_headers(&mut presigned, true, false);
        assert!(presigned.get(header::AUTHORIZATION).is_some());
    }

    #[test]
    fn forwarded_headers_tell_the_app_how_it_was_reached() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        h.insert("x-forwarded-proto", "gopher".parse().unwrap());
        let f = Forwarded {
            proto: "https".into(),
            host: Some("sbx-1-8000.example.com".parse().unwrap()),
            client: Some("192.0.2.7".parse().unwrap()),
        };
        f.apply(&mut h);
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "sbx-1-8000.example.com");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 192.0.2.7");
        let mut h = HeaderMap::new();
        Forwarded { proto: "http".into(), host: None, client: None }.apply(&mut h);
        assert!(h.get("x-forwarded-for").is_none() && h.get("x-forwarded-host").is_none());
    }
}
