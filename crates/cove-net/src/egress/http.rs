//! The plain-HTTP proxy (guest port 80): HTTP/1.1 served by hyper, decided per request on the
//! Host header; a keep-alive connection stays with its first host. No header injection over
//! plaintext (strip_headers still apply).

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::flows::{Flow, FlowKey};
use super::{ip_allowed, Sandbox, Target};
use crate::decisions::Decision;
use crate::mitm::{self, Body, Pool, Sender};

struct Conn {
    sb: Arc<Sandbox>,
    flow: Arc<Flow>,
    dst: SocketAddrV4,
    /// The host this connection is bound to after its first allowed request.
    host: Mutex<Option<String>>,
    pool: Pool,
}

pub(super) async fn serve(sb: Arc<Sandbox>, flow: Arc<Flow>, guest: TcpStream) {
    let Some(dst) = super::original_dst(&guest) else {
        return super::reset(guest);
    };
    let _ = guest.set_nodelay(true);
    let conn = Arc::new(Conn { sb, flow, dst, host: Mutex::new(None), pool: Pool::default() });
    let svc = hyper::service::service_fn(move |req| {
        let c = conn.clone();
        async move { Ok::<_, Infallible>(handle(c, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(guest), svc)
        .with_upgrades()
        .await;
}

fn closing(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn handle(c: Arc<Conn>, mut req: Request<Incoming>) -> Response<Body> {
    let id = &c.sb.id;
    let m = req.method();
    if m == Method::CONNECT || m == Method::TRACE || m.as_str().eq_ignore_ascii_case("TRACK") {
        return closing(mitm::text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed by the sandbox egress proxy\n",
        ));
    }
    let (raw, host) = match mitm::request_authority(&req) {
        Ok((raw, host, _)) => (raw, host),
        Err(e) => return closing(mitm::text(StatusCode::BAD_REQUEST, format!("{e}\n"))),
    };
    {
        let bound = c.host.lock().expect("host");
        if let Some(b) = bound.as_deref() {
            if b != host {
                tracing::info!(sandbox = %id, bound = b, host, "http: host switch on keep-alive, 421");
                return closing(mitm::text(
                    StatusCode::MISDIRECTED_REQUEST,
                    "this connection is bound to another host; open a new connection\n",
                ));
            }
        }
    }
    let policy = c.sb.policy.load_full();
    let (key, target) = match host.parse::<Ipv4Addr>() {
        Ok(ip) if ip_allowed(&policy, ip) => (FlowKey::Ip(ip), Target::Ip(ip)),
        Ok(_) => (FlowKey::Pending, Target::Ip(Ipv4Addr::UNSPECIFIED)),
        Err(_) if policy.allows_name(&host) => (FlowKey::Name(host.clone()), Target::Name(host.clone())),
        Err(_) => (FlowKey::Pending, Target::Ip(Ipv4Addr::UNSPECIFIED)),
    };
    if key == FlowKey::Pending || !c.flow.decide(key, &c.sb.policy) {
        tracing::info!(sandbox = %id, host, dst = %c.dst, decision = "deny", "http");
        Decision::HttpDeny.record();
        return closing(mitm::denied_response(&host));
    }
    *c.host.lock().expect("host") = Some(host.clone());
    let upgrade = mitm::strip_hop_by_hop(req.headers_mut());
    mitm::apply_transform(req.headers_mut(), policy.transform_for(&host), false);
    tracing::debug!(sandbox = %id, host, dst = %c.dst, method = %req.method(), decision = "allow", "http");
    Decision::HttpAllow.record();
    let cancel = c.flow.cancel.clone();
    let cc = c.clone();
    let connect = move || async move {
        let s = super::dial(&cc.sb, &target, cc.dst.port(), &cc.flow).await?;
        Sender::handshake(s, false, cc.flow.cancel.clone()).await
    };
    c.pool.forward(req, &raw, upgrade, connect, &cancel).await
}
