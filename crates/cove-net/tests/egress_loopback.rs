//! End-to-end test of the egress listeners without a VM: a scratch "sandbox" namespace with the
//! gateway address on lo (the test plays the guest from inside it, with an nft output DNAT
//! standing in for the guest redirect), and an "internet" namespace on a veth holding servers
//! on 192.52.193.10 (public, not denied, and not a range `cove_net::testing`'s test internet
//! routes) that the runner reaches from the host namespace. Needs root, `ip`, `nft`.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cove_api::sandbox::{NetworkMode, NetworkPolicy, TransformRule};
use cove_net::ca::SandboxCa;
use cove_net::egress::{Egress, EgressConfig};
use cove_net::netns;
use cove_net::policy::Policy;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use simple_dns::rdata::{RData, A};
use simple_dns::{Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, RCODE, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER: Ipv4Addr = Ipv4Addr::new(192, 52, 193, 10);
/// What the "guest" dials; the proxy ignores it for names and dials SERVER by name.
const GUEST_DST: Ipv4Addr = Ipv4Addr::new(192, 52, 193, 99);
const SECRET: &str = "Bearer SECRET-VALUE-42";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run command");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn sh_in(args: &[&str], input: &str) {
    use std::io::Write;
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Deletes the scratch veth and namespaces even when the test fails.
struct Cleanup(Vec<String>, String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.1]).output();
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn usable() -> bool {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
    let tools = ["ip", "nft"].iter().all(|t| Command::new(t).arg("-V").output().is_ok());
    root && tools
}

fn setup() -> (Cleanup, PathBuf, PathBuf) {
    let pid = std::process::id();
    let (sns, ins, veth) = (format!("cove-egt-s{pid}"), format!("cove-egt-i{pid}"), format!("cegt{pid}"));
    let guard = Cleanup(vec![sns.clone(), ins.clone()], veth.clone());
    sh(&["ip", "netns", "add", &sns]);
    sh(&["ip", "netns", "add", &ins]);
    // Sandbox namespace: gateway on lo, the "guest" address on a veth routing TEST-NET-2.
    sh(&["ip", "-n", &sns, "link", "set", "lo", "up"]);
    sh(&["ip", "-n", &sns, "addr", "add", "10.250.0.1/32", "dev", "lo"]);
    sh(&["ip", "-n", &sns, "link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    sh(&["ip", "-n", &sns, "link", "set", "d1", "up"]);
    sh(&["ip", "-n", &sns, "addr", "add", "10.250.0.2/32", "dev", "d0"]);
    sh(&["ip", "-n", &sns, "link", "set", "d0", "up"]);
    sh(&["ip", "-n", &sns, "route", "add", "192.52.193.0/24", "dev", "d0", "src", "10.250.0.2"]);
    sh_in(
        &["ip", "netns", "exec", &sns, "nft", "-f", "-"],
        "table ip t {\n  chain o {\n    type nat hook output priority -100;\n    \
         ip daddr 192.52.193.0/24 tcp dport 443 dnat to 10.250.0.1:15443\n    \
         ip daddr 192.52.193.0/24 tcp dport 80 dnat to 10.250.0.1:15080\n  }\n}\n",
    );
    // "Internet" namespace reached from the host namespace over a veth.
    sh(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ins]);
    sh(&["ip", "addr", "add", "192.52.193.1/24", "dev", &veth]);
    sh(&["ip", "link", "set", &veth, "up"]);
    sh(&["ip", "-n", &ins, "link", "set", "lo", "up"]);
    sh(&["ip", "-n", &ins, "addr", "add", "192.52.193.10/24", "dev", "eth0"]);
    sh(&["ip", "-n", &ins, "link", "set", "eth0", "up"]);
    (guard, netns::path(&sns), netns::path(&ins))
}

/// A test root and a server certificate for the test names.
fn test_pki() -> (CertificateDer<'static>, CertificateDer<'static>, PrivateKeyDer<'static>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::default();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.distinguished_name.push(rcgen::DnType::CommonName, "egress test root");
    let root_cert = root.self_signed(&root_key).unwrap();
    let issuer = Issuer::new(root, root_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["splice.test".into(), "mitm.test".into(), "gone.test".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (
        root_cert.der().clone(),
        leaf.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// Echoes what arrived: host, authorization values, whether x-drop was present, protocol.
async fn echo(
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<http_body_util::Full<Bytes>>, Infallible> {
    let host = req
        .headers()
        .get("host")
        .map(|v| v.to_str().unwrap().to_string())
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let auth: Vec<String> =
        req.headers().get_all("authorization").iter().map(|v| v.to_str().unwrap().to_string()).collect();
    let body = format!(
        "host={host};auth={};drop={};proto={:?}",
        auth.join("|"),
        req.headers().contains_key("x-drop"),
        req.version()
    );
    Ok(hyper::Response::new(http_body_util::Full::new(Bytes::from(body))))
}

fn serve_servers(ins: &Path, leaf: CertificateDer<'static>, key: PrivateKeyDer<'static>) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let tls = netns::tcp_listener(ins, SocketAddr::from((SERVER, 443))).unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = tls.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(t) = acceptor.accept(s).await else { return };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(t), hyper::service::service_fn(echo))
                    .await;
            });
        }
    });
    let plain = netns::tcp_listener(ins, SocketAddr::from((SERVER, 80))).unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = plain.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), hyper::service::service_fn(echo))
                    .await;
            });
        }
    });
}

/// Upstream resolver on the host side: every name is SERVER, except rebind.test (a private
/// address). Counts queries.
async fn upstream_dns() -> (SocketAddr, Arc<AtomicUsize>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
            c.fetch_add(1, Ordering::SeqCst);
            let q = Packet::parse(&buf[..n]).unwrap();
            let mut r = Packet::new_reply(q.id());
            r.questions = q.questions.clone();
            let name = q.questions[0].qname.to_string();
            let ip = if name == "rebind.test" { Ipv4Addr::new(10, 1, 2, 3) } else { SERVER };
            r.answers.push(ResourceRecord::new(
                q.questions[0].qname.clone(),
                CLASS::IN,
                30,
                RData::A(A { address: ip.into() }),
            ));
            sock.send_to(&r.build_bytes_vec().unwrap(), peer).await.unwrap();
        }
    });
    (addr, count)
}

fn policy(domains: &[&str], transform: bool) -> Policy {
    let transforms = if transform {
        vec![TransformRule {
            domain: "mitm.test".into(),
            inject_headers: [("Authorization".to_string(), SECRET.to_string())].into(),
            strip_headers: vec!["X-Drop".into()],
        }]
    } else {
        vec![]
    };
    Policy::compile(Some(&NetworkPolicy {
        mode: NetworkMode::Custom,
        allow_domains: domains.iter().map(|d| d.to_string()).collect(),
        allow_cidrs: vec![],
        transforms,
    }))
    .unwrap()
}

async fn dns_query(sns: &Path, name: &str, tcp: bool) -> (RCODE, Vec<Ipv4Addr>) {
    let mut q = Packet::new_query(7);
    q.set_flags(PacketFlag::RECURSION_DESIRED);
    q.questions.push(Question::new(Name::new_unchecked(name), TYPE::A.into(), CLASS::IN.into(), false));
    let bytes = q.build_bytes_vec().unwrap();
    let gw = SocketAddr::from((Ipv4Addr::new(10, 250, 0, 1), 53));
    let resp = if tcp {
        let mut s = netns::tcp_connect(sns, gw).await.unwrap();
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        s.write_all(&framed).await.unwrap();
        let len = s.read_u16().await.unwrap() as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await.unwrap();
        buf
    } else {
        let sock = netns::udp_socket(sns, "0.0.0.0:0".parse().unwrap()).unwrap();
        sock.send_to(&bytes, gw).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await.unwrap().unwrap();
        buf.truncate(n);
        buf
    };
    let p = Packet::parse(&resp).unwrap();
    assert_eq!(p.id(), 7);
    let ips = p
        .answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect();
    (p.rcode(), ips)
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A TLS connection from the "guest" to GUEST_DST:443 with `sni`, trusting only `root`.
async fn tls_connect(
    sns: &Path,
    sni: &str,
    root: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = netns::tcp_connect(sns, SocketAddr::from((GUEST_DST, 443))).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timeout"))?
}

async fn h1<S>(io: S) -> Sender
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
    tokio::spawn(conn);
    s
}

async fn get(s: &mut Sender, host: &str, headers: &[(&str, &str)]) -> Result<(u16, String), String> {
    s.ready().await.map_err(|e| e.to_string())?;
    let mut b = hyper::Request::builder().uri("/").header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), s.send_request(b.body(Empty::new()).unwrap()))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_end_to_end() {
    if !usable() {
        eprintln!("skipping: needs root, ip and nft");
        return;
    }
    let (_guard, sns, ins) = setup();
    let (root, leaf, key) = test_pki();
    serve_servers(&ins, leaf, key);
    let (dns_addr, dns_count) = upstream_dns().await;

    let egress =
        Egress::new(EgressConfig { upstream_dns: dns_addr, extra_roots: vec![root.clone()] }).unwrap();
    let ca = SandboxCa::generate("egt");
    let ca_root = rustls_pemfile::certs(&mut ca.cert_pem().as_bytes()).next().unwrap().unwrap();
    egress
        .attach("egt", &sns, policy(&["splice.test", "plain.test", "rebind.test"], true), ca)
        .await
        .unwrap();
    // Re-attaching replaces the listeners (same ports).
    let ca = SandboxCa::generate("egt");
    let ca_root2 = rustls_pemfile::certs(&mut ca.cert_pem().as_bytes()).next().unwrap().unwrap();
    egress
        .attach("egt", &sns, policy(&["splice.test", "plain.test", "rebind.test"], true), ca)
        .await
        .unwrap();
    assert_ne!(ca_root, ca_root2);
    let ca_root = ca_root2;

    // DNS, UDP and TCP.
    assert_eq!(dns_query(&sns, "splice.test", false).await, (RCODE::NoError, vec![SERVER]));
    assert_eq!(dns_query(&sns, "mitm.test", true).await, (RCODE::NoError, vec![SERVER]));
    assert_eq!(
        dns_query(&sns, "rebind.test", false).await,
        (RCODE::NoError, vec![]),
        "private answer dropped"
    );
    let before = dns_count.load(Ordering::SeqCst);
    assert_eq!(dns_query(&sns, "evil.test", false).await.0, RCODE::NameError);
    assert_eq!(dns_count.load(Ordering::SeqCst), before, "unlisted names never reach upstream");

    // Splice: the guest sees the real certificate (trusting only the test root), nothing injected.
    let t = tls_connect(&sns, "splice.test", &root, &[b"http/1.1"]).await.expect("spliced handshake");
    let mut spliced = h1(t).await;
    let (st, body) = get(&mut spliced, "splice.test", &[("authorization", "guest")]).await.unwrap();
    assert_eq!(st, 200);
    assert!(body.contains("auth=guest;"), "{body}");
    // The sandbox CA is not involved in splicing.
    assert!(tls_connect(&sns, "splice.test", &ca_root, &[]).await.is_err());

    // Not allowed SNI, and a name that resolves only to denied addresses: no handshake.
    assert!(tls_connect(&sns, "evil.test", &root, &[]).await.is_err());
    assert!(tls_connect(&sns, "rebind.test", &root, &[]).await.is_err());

    // MITM over HTTP/1.1: the guest trusts the sandbox CA; exactly one injected Authorization.
    let t = tls_connect(&sns, "mitm.test", &ca_root, &[b"http/1.1"]).await.expect("mitm handshake");
    let mut mitm = h1(t).await;
    let (st, body) = get(
        &mut mitm,
        "mitm.test",
        &[("authorization", "fake"), ("Authorization", "fake2"), ("x-drop", "1")],
    )
    .await
    .unwrap();
    assert_eq!(st, 200);
    assert!(body.contains(&format!("auth={SECRET};")), "{body}");
    assert!(body.contains("drop=false"), "{body}");
    // Authority must equal the SNI; nothing forwarded, no secret echoed.
    let (st, body) = get(&mut mitm, "splice.test", &[]).await.unwrap();
    assert_eq!(st, 421);
    assert!(!body.contains("SECRET"));
    let (st, _) = get(&mut mitm, "mitm.test:443", &[]).await.unwrap();
    assert_eq!(st, 200, "port is stripped");

    // MITM over HTTP/2.
    let t = tls_connect(&sns, "mitm.test", &ca_root, &[b"h2", b"http/1.1"]).await.unwrap();
    assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(TokioExecutor::new(), TokioIo::new(t))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri("https://mitm.test/x")
        .header("authorization", "fake")
        .body(Empty::new())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(body.contains(&format!("auth={SECRET};")), "{body}");
    assert!(body.contains("proto=HTTP/2"), "{body}");

    // Plain HTTP: decided per request on Host; no injection even for the transform domain.
    let s = netns::tcp_connect(&sns, SocketAddr::from((GUEST_DST, 80))).await.unwrap();
    let mut plain = h1(s).await;
    let (st, body) = get(&mut plain, "plain.test", &[("authorization", "guest")]).await.unwrap();
    assert_eq!((st, body.contains("auth=guest;")), (200, true), "{body}");
    let (st, _) = get(&mut plain, "splice.test", &[]).await.unwrap();
    assert_eq!(st, 421, "keep-alive may not switch hosts");
    let s = netns::tcp_connect(&sns, SocketAddr::from((GUEST_DST, 80))).await.unwrap();
    let mut c = h1(s).await;
    let (st, body) = get(&mut c, "evil.test", &[]).await.unwrap();
    assert_eq!(st, 403);
    assert!(body.contains("evil.test is not allowed by the sandbox network policy"), "{body}");
    let s = netns::tcp_connect(&sns, SocketAddr::from((GUEST_DST, 80))).await.unwrap();
    let mut c = h1(s).await;
    let (st, body) = get(&mut c, "mitm.test", &[("x-drop", "1")]).await.unwrap();
    assert_eq!(st, 200);
    assert!(body.contains("auth=;") && body.contains("drop=false"), "plain HTTP: strip only: {body}");
    let s = netns::tcp_connect(&sns, SocketAddr::from((GUEST_DST, 80))).await.unwrap();
    let mut c = h1(s).await;
    assert_eq!(get(&mut c, "plain.test", &[("x", "y")]).await.unwrap().0, 200);
    c.ready().await.unwrap();
    let req =
        hyper::Request::builder().method("TRACE").uri("/").header("host", "plain.test").body(Empty::new());
    assert_eq!(c.send_request(req.unwrap()).await.unwrap().status(), 405);

    // Live update: splice.test removed and the transform dropped (mitm.test still allowed).
    assert!(egress.flow_count("egt") >= 3);
    egress.update("egt", policy(&["plain.test", "mitm.test"], false));
    assert!(get(&mut spliced, "splice.test", &[]).await.is_err(), "spliced flow cut");
    let (st, body) = get(&mut mitm, "mitm.test", &[("authorization", "guest")]).await.unwrap();
    assert_eq!(st, 200);
    assert!(body.contains("auth=guest;"), "transform removed for the next request: {body}");
    assert_eq!(dns_query(&sns, "splice.test", false).await.0, RCODE::NameError);
    // Now mitm.test is not allowed at all: that connection is cut.
    egress.update("egt", policy(&["plain.test"], false));
    assert!(get(&mut mitm, "mitm.test", &[]).await.map(|r| r.0 == 403).unwrap_or(true));
    assert!(get(&mut mitm, "mitm.test", &[]).await.is_err());

    // Detach: listeners gone.
    egress.detach("egt");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gw = SocketAddr::from((Ipv4Addr::new(10, 250, 0, 1), 15443));
    assert!(netns::tcp_connect(&sns, gw).await.is_err(), "listener closed after detach");
}
