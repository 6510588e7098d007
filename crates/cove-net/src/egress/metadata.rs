//! The metadata service a sandbox reaches at `http://169.254.169.254` (Leap0's IMDSv2-style
//! contract), answered on the host from the control plane's records.
//!
//! The guest's connections to 169.254.169.254:80 are redirected (nftables, in every network
//! mode) to a listener of the sandbox's own on the gateway, so the answer is always about the
//! sandbox whose namespace it came from; nothing in the guest can forge that. A session
//! starts with `PUT /latest/api/token` (`X-metadata-token-ttl-seconds`, 1 to 21600) and every
//! read carries the token (`X-metadata-token`); tokens belong to one sandbox. Reads under
//! `/latest/meta-data/leap0` walk one JSON document: `Accept: application/json` gives the node
//! as JSON, anything else the IMDS text form (an object's keys, `/` after those holding more; an
//! array's indexes; a value as text).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpStream;

use super::flows::Flow;
use super::Sandbox;
use crate::addr;

/// Version of the document's shape.
pub const SCHEMA_VERSION: u32 = 1;
const MAX_TTL_SECS: u64 = 21_600;
/// Live tokens a sandbox may hold; the oldest goes first past this.
const MAX_TOKENS: usize = 64;
const PREFIX: &str = "/latest/meta-data/leap0";

/// What the control plane knows of a sandbox, for its metadata service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SandboxMetadata {
    pub exec: ExecMetadata,
    pub mounts: Vec<MountMetadata>,
    /// An OpenTelemetry endpoint the guest may export to, if the sandbox has one.
    pub otel_endpoint: Option<String>,
}

/// The template's command and how commands run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecMetadata {
    /// Shell-escaped command line of the template's service; empty when it has none.
    pub command: String,
    pub workdir: String,
    pub user: String,
    /// The environment commands get (the template's, then the sandbox's).
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountMetadata {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub bucket: String,
    pub mount_path: String,
    /// `pending`, `active` or `failed`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    pub read_only: bool,
}

/// Where the answers come from: the control plane, by sandbox id. `None` for a sandbox it does
/// not know (the answer is then 404).
#[async_trait::async_trait]
pub trait MetadataSource: Send + Sync {
    async fn sandbox_metadata(&self, sandbox_id: &str) -> Option<SandboxMetadata>;
}

/// Session tokens of one sandbox, with their expiry.
#[derive(Default)]
pub(crate) struct Tokens(Mutex<HashMap<String, Instant>>);

impl Tokens {
    fn issue(&self, ttl: Duration) -> String {
        let token = hex::encode(rand::random::<[u8; 24]>());
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, exp| *exp > now);
        if map.len() >= MAX_TOKENS {
            if let Some(oldest) = map.iter().min_by_key(|(_, exp)| **exp).map(|(t, _)| t.clone()) {
                map.remove(&oldest);
            }
        }
        map.insert(token.clone(), now + ttl);
        token
    }

    fn valid(&self, token: &str) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(token).is_some_and(|exp| *exp > Instant::now())
    }
}

pub(crate) async fn serve(sb: Arc<Sandbox>, _flow: Arc<Flow>, stream: TcpStream) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let sb = sb.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(&sb, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "metadata connection ended");
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    r
}

async fn answer(sb: &Sandbox, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // Bodies are not used; reading a small one keeps the connection reusable.
    let _ = http_body_util::Limited::new(body, 4096).collect().await;
    let path = parts.uri.path().trim_end_matches('/');
    if path == "/latest/api/token" {
        if parts.method != Method::PUT {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use PUT to start a session\n");
        }
        let ttl = parts
            .headers
            .get("x-metadata-token-ttl-seconds")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|t| (1..=MAX_TTL_SECS).contains(t));
        return match ttl {
            Some(ttl) => text(StatusCode::OK, sb.metadata_tokens.issue(Duration::from_secs(ttl))),
            None => text(
                StatusCode::BAD_REQUEST,
                format!("X-metadata-token-ttl-seconds must be 1 to {MAX_TTL_SECS}\n"),
            ),
        };
    }
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "metadata is read with GET\n");
    }
    let token = parts.headers.get("x-metadata-token").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !sb.metadata_tokens.valid(token) {
        return text(
            StatusCode::UNAUTHORIZED,
            "a valid X-metadata-token is required (PUT /latest/api/token)\n",
        );
    }
    let Some(rest) = path.strip_prefix(PREFIX).filter(|r| r.is_empty() || r.starts_with('/')) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let record = match sb.shared.metadata.get() {
        Some(source) => source.sandbox_metadata(&sb.id).await,
        None => None,
    };
    let Some(record) = record else {
        return text(StatusCode::NOT_FOUND, "no metadata for this sandbox\n");
    };
    let doc = document(&sb.id, record, &sb.ca.cert_pem());
    let Some(node) = rest.split('/').filter(|s| !s.is_empty()).try_fold(&doc, |node, key| match node {
        Value::Object(m) => m.get(key),
        Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    }) else {
        return text(StatusCode::NOT_FOUND, "metadata path not found\n");
    };
    let json = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    if json {
        let mut r = text(StatusCode::OK, serde_json::to_vec(node).unwrap_or_default());
        r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
        return r;
    }
    text(StatusCode::OK, imds_text(node))
}

/// The whole document a sandbox sees: the record, plus what the network layer knows (the
/// resolver it must use and the CA its TLS is ended with).
pub fn document(sandbox_id: &str, m: SandboxMetadata, ca_cert_pem: &str) -> Value {
    let mut telemetry = serde_json::Map::new();
    if let Some(e) = m.otel_endpoint {
        telemetry.insert("otel_endpoint".into(), Value::String(e));
    }
    serde_json::json!({
        "schema_version": SCHEMA_VERSION,
        "sandbox": {"id": sandbox_id},
        "exec": m.exec,
        "network": {"dns_resolvers": [addr::GATEWAY_IP.to_string()], "ca_cert_pem": ca_cert_pem},
        "telemetry": telemetry,
        "mounts": m.mounts,
    })
}

/// The IMDS form of a node: an object's keys (sorted; `/` after those holding more), an
/// array's indexes with `/`, a value as plain text.
pub fn imds_text(node: &Value) -> String {
    let nested = |v: &Value| matches!(v, Value::Object(_) | Value::Array(_));
    match node {
        Value::Object(m) => {
            let mut keys: Vec<String> =
                m.iter().map(|(k, v)| if nested(v) { format!("{k}/") } else { k.clone() }).collect();
            keys.sort();
            keys.join("\n")
        }
        Value::Array(a) => (0..a.len())
            .map(|i| if nested(&a[i]) { format!("{i}/") } else { i.to_string() })
            .collect::<Vec<_>>()
            .join("\n"),
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_read_as_imds_text_and_json() {
        let m = SandboxMetadata {
            exec: ExecMetadata {
                command: "python3 app.py".into(),
                workdir: "/home/user".into(),
                user: "user".into(),
                env: [("PORT".to_string(), "3000".to_string())].into(),
            },
            mounts: vec![MountMetadata {
                id: "m1".into(),
                kind: "object-storage".into(),
                bucket: "b".into(),
                mount_path: "/data".into(),
                status: "active".into(),
                status_reason: None,
                read_only: true,
            }],
            otel_endpoint: None,
        };
        let doc = document("sbx-1", m, "PEM");
        assert_eq!(imds_text(&doc), "exec/\nmounts/\nnetwork/\nsandbox/\nschema_version\ntelemetry/");
        assert_eq!(imds_text(&doc["exec"]), "command\nenv/\nuser\nworkdir");
        assert_eq!(imds_text(&doc["mounts"]), "0/");
        assert_eq!(imds_text(&doc["network"]["dns_resolvers"]), "0");
        assert_eq!(imds_text(&doc["sandbox"]["id"]), "sbx-1");
        assert_eq!(imds_text(&doc["schema_version"]), "1");
        assert_eq!(doc["mounts"][0]["type"], "object-storage");
        assert_eq!(doc["network"]["ca_cert_pem"], "PEM");
        assert!(doc["telemetry"].as_object().unwrap().is_empty());
    }

    #[test]
    fn tokens_expire_and_are_bounded() {
        let t = Tokens::default();
        let short = t.issue(Duration::from_millis(1));
        let long = t.issue(Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!t.valid(&short) && t.valid(&long) && !t.valid("") && !t.valid("nope"));
        for _ in 0..2 * MAX_TOKENS {
            t.issue(Duration::from_secs(60));
        }
        assert!(t.0.lock().unwrap().len() <= MAX_TOKENS);
    }
}
