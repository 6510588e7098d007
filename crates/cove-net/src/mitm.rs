//! TLS termination for transform domains, and the HTTP forwarding shared with the plain-HTTP
//! proxy. The guest's TLS is completed with a leaf for exactly the SNI, minted by the sandbox CA;
//! every request is re-checked against the live policy, its authority must equal the SNI, header
//! transforms are applied, and it is forwarded to a name-dialed, fully verified upstream.
//! Header values from transforms are never logged or echoed.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::egress::flows::Flow;
use crate::egress::hello::Prefixed;
use crate::egress::lend::Lent;
use crate::egress::{Sandbox, Target};
use crate::policy::Transform;

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// Deadline for the guest's TLS handshake with us.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg.into())).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

pub(crate) fn denied_response(host: &str) -> Response<Body> {
    text(StatusCode::FORBIDDEN, format!("{host} is not allowed by the sandbox network policy\n"))
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1, plus the proxy
/// and HTTP/2-upgrade ones).
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// Removes hop-by-hop headers (the standard ones and those named in `Connection`). Returns the
/// `Upgrade` value if the message asked for a (non-h2c) protocol upgrade, which the caller may
/// re-add with `Connection: upgrade`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) -> Option<HeaderValue> {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let wants_upgrade = listed.contains(&header::UPGRADE);
    let upgrade = h.get(header::UPGRADE).cloned();
    for n in listed {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
    let upgrade = upgrade.filter(|u| {
        wants_upgrade && !u.to_str().map(|s| s.to_ascii_lowercase().contains("h2c")).unwrap_or(true)
    });
    upgrade
}

/// Applies a transform: `strip_headers` always; `inject_headers` (replacing every same-named
/// header, so upstream sees exactly one value) only when `inject`.
pub(crate) fn apply_transform(h: &mut HeaderMap, t: Option<&Transform>, inject: bool) {
    let Some(t) = t else { return };
    for n in &t.strip {
        h.remove(n);
    }
    if inject {
        for (n, v) in &t.inject {
            h.insert(n.clone(), v.clone());
        }
    }
}

/// Host part (lowercase, trailing dot stripped) and port of an authority; `None` if it has
/// userinfo or doesn't parse.
pub(crate) fn split_authority(a: &str) -> Option<(String, Option<u16>)> {
    if a.contains('@') {
        return None;
    }
    let auth: http::uri::Authority = a.parse().ok()?;
    let host = auth.host().trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    Some((host, auth.port_u16()))
}

/// The authority a request names: HTTP/1 `Host` (exactly one) which an absolute-form target must
/// agree with; HTTP/2 `:authority` (and `Host`, if also sent, must agree).
pub(crate) fn request_authority<B>(req: &Request<B>) -> Result<(String, String, Option<u16>), &'static str> {
    let hosts: Vec<&HeaderValue> = req.headers().get_all(header::HOST).iter().collect();
    if hosts.len() > 1 {
        return Err("more than one Host header");
    }
    let host_hdr = match hosts.first() {
        Some(v) => Some(v.to_str().map_err(|_| "bad Host header")?.trim().to_string()),
        None => None,
    };
    let uri_auth = req.uri().authority().map(|a| a.as_str().to_string());
    let raw = match (&host_hdr, &uri_auth) {
        (Some(h), _) => h.clone(),
        (None, Some(u)) if req.version() == Version::HTTP_2 => u.clone(),
        _ => return Err("missing Host header"),
    };
    let (host, port) = split_authority(&raw).ok_or("bad Host header")?;
    if let Some(u) = &uri_auth {
        let (uh, up) = split_authority(u).ok_or("bad request target")?;
        if uh != host || (up.is_some() && port.is_some() && up != port) {
            return Err("request target and Host disagree");
        }
    }
    Ok((raw, host, port))
}

/// A connection to one upstream, HTTP/1.1 or HTTP/2.
pub(crate) enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Incoming>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

impl Sender {
    fn usable(&self) -> bool {
        match self {
            Sender::H1(s) => !s.is_closed(),
            Sender::H2(s) => !s.is_closed(),
        }
    }

    /// Performs the client handshake on `io`; the connection task ends with `cancel`.
    pub(crate) async fn handshake<I>(io: I, h2: bool, cancel: CancellationToken) -> std::io::Result<Sender>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        if h2 {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(async move {
                tokio::select! { _ = conn => {}, _ = cancel.cancelled() => {} }
            });
            Ok(Sender::H2(s))
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await.map_err(std::io::Error::other)?;
            tokio::spawn(async move {
                tokio::select! { _ = conn.with_upgrades() => {}, _ = cancel.cancelled() => {} }
            });
            Ok(Sender::H1(s))
        }
    }
}

/// The upstream connection of one guest connection (never shared across guest connections).
#[derive(Default)]
pub(crate) struct Pool {
    slot: tokio::sync::Mutex<Option<Sender>>,
}

impl Pool {
    /// Sends `req` (headers already transformed) for `authority`, connecting with `connect` when
    /// there's no usable connection. Upgrades (101) are spliced under `cancel`.
    pub(crate) async fn forward<C, F>(
        &self,
        mut req: Request<Incoming>,
        authority: &str,
        upgrade: Option<HeaderValue>,
        connect: C,
        cancel: &CancellationToken,
    ) -> Response<Body>
    where
        C: FnOnce() -> F,
        F: Future<Output = std::io::Result<Sender>>,
    {
        let existing = {
            let mut g = self.slot.lock().await;
            match g.take() {
                Some(Sender::H2(s)) if !s.is_closed() => {
                    *g = Some(Sender::H2(s.clone()));
                    Some(Sender::H2(s))
                }
                Some(s) if s.usable() => Some(s),
                _ => None,
            }
        };
        let mut sender = match existing {
            Some(s) => s,
            None => match connect().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(authority, error = %e, "upstream connect failed");
                    return text(StatusCode::BAD_GATEWAY, format!("cannot reach {authority}\n"));
                }
            },
        };
        // Shape the request for the upstream's protocol.
        let pq = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        let h2 = matches!(sender, Sender::H2(_));
        let on_upgrade = if upgrade.is_some() && !h2 { Some(hyper::upgrade::on(&mut req)) } else { None };
        if h2 {
            *req.uri_mut() = Uri::builder()
                .scheme("https")
                .authority(authority)
                .path_and_query(pq)
                .build()
                .unwrap_or_else(|_| Uri::from_static("/"));
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(header::HOST);
        } else {
            *req.uri_mut() = pq.parse().unwrap_or_else(|_| Uri::from_static("/"));
            *req.version_mut() = Version::HTTP_11;
            if let Ok(v) = HeaderValue::from_str(authority) {
                req.headers_mut().insert(header::HOST, v);
            }
            if let Some(u) = &upgrade {
                req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                req.headers_mut().insert(header::UPGRADE, u.clone());
            }
        }
        let result = match &mut sender {
            Sender::H1(s) => match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            },
            Sender::H2(s) => match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            },
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(authority, error = %e, "upstream request failed");
                return text(StatusCode::BAD_GATEWAY, format!("upstream {authority} failed\n"));
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(guest_up) = on_upgrade else {
                return text(StatusCode::BAD_GATEWAY, "unexpected protocol switch\n");
            };
            let up = hyper::upgrade::on(&mut resp);
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let (Ok(g), Ok(u)) = tokio::join!(guest_up, up) else { return };
                let (mut g, mut u) = (TokioIo::new(g), TokioIo::new(u));
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut g, &mut u) => {}
                    _ = cancel.cancelled() => {}
                }
            });
            let upgrade_hdr = resp.headers().get(header::UPGRADE).cloned();
            strip_hop_by_hop(resp.headers_mut());
            if let Some(u) = upgrade_hdr {
                resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                resp.headers_mut().insert(header::UPGRADE, u);
            }
            return resp.map(|b| b.boxed());
        }
        // Keep the connection for the next request (HTTP/2 stays in the slot already).
        if let Sender::H1(_) = sender {
            let mut g = self.slot.lock().await;
            if g.is_none() {
                *g = Some(sender);
            }
        }
        strip_hop_by_hop(resp.headers_mut());
        resp.map(|b| b.boxed())
    }
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

struct MitmConn {
    sb: Arc<Sandbox>,
    sni: String,
    port: u16,
    flow: Arc<Flow>,
    pool: Pool,
    guest_h2: bool,
    /// Credentials lent for this connection (the credential proxy's connections).
    loan: Option<Arc<Lent>>,
    /// Fired to close the guest connection gracefully (policy no longer allows the name).
    close: CancellationToken,
}

/// Terminates the guest's TLS (whose ClientHello is in `guest`'s prefix) for `sni` and serves
/// its requests until it closes.
pub(crate) async fn serve(
    sb: Arc<Sandbox>,
    flow: Arc<Flow>,
    guest: Prefixed<TcpStream>,
    sni: String,
    port: u16,
    loan: Option<Arc<Lent>>,
) {
    let ck = match sb.ca.leaf(&sni) {
        Ok(ck) => ck,
        Err(e) => {
            tracing::warn!(sandbox = %sb.id, sni, error = %e, "mitm: cannot mint leaf");
            return;
        }
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let Ok(builder) =
        rustls::ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions()
    else {
        return;
    };
    let mut cfg = builder.with_no_client_auth().with_cert_resolver(Arc::new(FixedCert(ck)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(guest)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::debug!(sandbox = %sb.id, sni, error = %e, "mitm: guest handshake failed");
            return;
        }
        Err(_) => return,
    };
    let guest_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    tracing::debug!(sandbox = %sb.id, sni, h2 = guest_h2, "mitm: serving");
    let close = CancellationToken::new();
    let conn_ctx = Arc::new(MitmConn {
        sb,
        sni,
        port,
        flow,
        pool: Pool::default(),
        guest_h2,
        loan,
        close: close.clone(),
    });
    let svc = hyper::service::service_fn(move |req| {
        let c = conn_ctx.clone();
        async move { Ok::<_, Infallible>(handle(c, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder = if guest_h2 { builder.http2_only() } else { builder.http1_only() };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = close.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
}

async fn handle(c: Arc<MitmConn>, mut req: Request<Incoming>) -> Response<Body> {
    let sb = &c.sb;
    let policy = sb.policy.load_full();
    if !policy.allows_name(&c.sni) {
        tracing::info!(sandbox = %sb.id, sni = %c.sni, "mitm: name no longer allowed, closing");
        c.close.cancel();
        let mut r = denied_response(&c.sni);
        if !c.guest_h2 {
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        return r;
    }
    let m = req.method();
    if m == Method::TRACE || m.as_str().eq_ignore_ascii_case("TRACK") || m == Method::CONNECT {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed by the sandbox egress proxy\n");
    }
    let (raw_auth, host) = match request_authority(&req) {
        Ok((raw, host, _)) => (raw, host),
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    if host != c.sni {
        tracing::info!(sandbox = %sb.id, sni = %c.sni, host, "mitm: authority differs from SNI, 421");
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "request authority does not match the TLS server name\n",
        );
    }
    let transform = policy.transform_for(&c.sni);
    let upgrade = strip_hop_by_hop(req.headers_mut());
    let upgrade = if c.guest_h2 { None } else { upgrade };
    apply_transform(req.headers_mut(), transform, true);
    if let Some(lent) = &c.loan {
        if lent.returned.is_cancelled() {
            c.close.cancel();
            return text(StatusCode::FORBIDDEN, "the credentials lent for this command were returned\n");
        }
        if req.uri().path().starts_with(&lent.loan.path_prefix) {
            req.headers_mut().insert(header::AUTHORIZATION, lent.loan.authorization.clone());
        }
    }
    tracing::debug!(
        sandbox = %sb.id,
        sni = %c.sni,
        method = %req.method(),
        transformed = transform.is_some(),
        lent = c.loan.is_some(),
        "mitm: forwarding"
    );
    let cancel = c.flow.cancel.clone();
    let connect = || connect_tls(c.clone());
    c.pool.forward(req, &raw_auth, upgrade, connect, &cancel).await
}

async fn connect_tls(c: Arc<MitmConn>) -> std::io::Result<Sender> {
    let tcp = crate::egress::dial(&c.sb, &Target::Name(c.sni.clone()), c.port, &c.flow).await?;
    let cfg = if c.guest_h2 { c.sb.shared.tls_h2.clone() } else { c.sb.shared.tls_h1.clone() };
    let name = rustls::pki_types::ServerName::try_from(c.sni.clone()).map_err(std::io::Error::other)?;
    let tls =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsConnector::from(cfg).connect(name, tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream TLS handshake timed out")
            })??;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    Sender::handshake(tls, h2, c.flow.cancel.clone()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use cove_api::sandbox::{NetworkMode, NetworkPolicy, TransformRule};

    fn transform() -> crate::policy::Policy {
        crate::policy::Policy::compile(Some(&NetworkPolicy {
            mode: NetworkMode::Custom,
            allow_domains: vec![],
            allow_cidrs: vec![],
            transforms: vec![TransformRule {
                domain: "api.test".into(),
                inject_headers: [("Authorization".to_string(), "Bearer real".to_string())].into(),
                strip_headers: vec!["X-Dummy-Key".into(), "cookie".into()],
            }],
        }))
        .unwrap()
    }

    #[test]
    fn transform_replaces_and_strips() {
        let p = transform();
        let t = p.transform_for("api.test");
        let mut h = HeaderMap::new();
        h.append("authorization", HeaderValue::from_static("Bearer fake1"));
        h.append("AUTHORIZATION", HeaderValue::from_static("Bearer fake2"));
        h.append("x-dummy-key", HeaderValue::from_static("k"));
        h.append("Cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        h.append("accept", HeaderValue::from_static("*/*"));
        let mut plain = h.clone();
        apply_transform(&mut h, t, true);
        let auth: Vec<_> = h.get_all("authorization").iter().collect();
        assert_eq!(auth, vec![&HeaderValue::from_static("Bearer real")]);
        assert!(h.get("x-dummy-key").is_none() && h.get("cookie").is_none());
        assert_eq!(h.get("accept").unwrap(), "*/*");
        // Plain HTTP: strip only, never inject.
        apply_transform(&mut plain, t, false);
        assert_eq!(plain.get_all("authorization").iter().count(), 2);
        assert!(plain.get("x-dummy-key").is_none());
        assert!(!format!("{:?}", h).contains("real"), "transform values are sensitive in Debug");
    }

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, X-Foo, Upgrade"));
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("proxy-authorization", HeaderValue::from_static("x"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        assert_eq!(strip_hop_by_hop(&mut h), Some(HeaderValue::from_static("websocket")));
        assert_eq!(h.len(), 1);
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade, HTTP2-Settings"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("http2-settings", HeaderValue::from_static("AAA"));
        assert_eq!(strip_hop_by_hop(&mut h), None, "h2c upgrade is refused (dropped)");
        assert!(h.is_empty());
    }

    #[test]
    fn authority_rules() {
        let req = |uri: &str, hosts: &[&str]| {
            let mut b = Request::builder().uri(uri);
            for h in hosts {
                b = b.header("host", *h);
            }
            b.body(()).unwrap()
        };
        assert_eq!(request_authority(&req("/", &["API.test.:443"])).unwrap().1, "api.test");
        assert!(request_authority(&req("/", &[])).is_err());
        assert!(request_authority(&req("/", &["a.test", "b.test"])).is_err());
        assert!(request_authority(&req("/", &["user@a.test"])).is_err());
        assert!(request_authority(&req("http://b.test/", &["a.test"])).is_err());
        assert_eq!(request_authority(&req("http://A.test/x", &["a.test"])).unwrap().1, "a.test");
        let mut h2 = req("https://api.test/x", &[]);
        *h2.version_mut() = Version::HTTP_2;
        assert_eq!(request_authority(&h2).unwrap().1, "api.test");
    }
}
