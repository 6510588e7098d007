//! The test internet, used from the host (root) namespace through its routes. Needs root:
//! `cargo test -p cove-net --features testing --test internet`.
#![cfg(feature = "testing")]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cove_net::testing::{
    Internet, ALLOWED_IP, ALT_HTTP_PORT, CDN_IP, DNS_IP, DNS_TTL, EVIL_IP, SECRET_IP, TCP_ECHO_PORT,
    UDP_ECHO_PORT,
};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};
use simple_dns::rdata::RData;
use simple_dns::{Name, Packet, PacketFlag, Question, CLASS, QCLASS, QTYPE, RCODE, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message;

fn inet() -> &'static Internet {
    Internet::shared()
}

const TIMEOUT: Duration = Duration::from_secs(10);

fn query(name: &str, qtype: TYPE, id: u16) -> Vec<u8> {
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    packet.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(qtype),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    packet.build_bytes_vec().unwrap()
}

/// The reply's rcode, its A answers and their TTLs.
fn parse_reply(bytes: &[u8], id: u16) -> (RCODE, Vec<(Ipv4Addr, u32)>) {
    let reply = Packet::parse(bytes).unwrap();
    assert_eq!(reply.id(), id);
    assert!(reply.has_flags(PacketFlag::RESPONSE));
    let answers = reply
        .answers
        .iter()
        .map(|rr| match &rr.rdata {
            RData::A(a) => (Ipv4Addr::from(a.address), rr.ttl),
            other => panic!("unexpected answer {other:?}"),
        })
        .collect();
    (reply.rcode(), answers)
}

async fn dns_udp(name: &str, qtype: TYPE) -> (RCODE, Vec<(Ipv4Addr, u32)>) {
    let id = rand_id();
    let socket = UdpSocket::bind("0.0.0.0:0").await.unwrap();
    socket.send_to(&query(name, qtype, id), (DNS_IP, 53)).await.unwrap();
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(TIMEOUT, socket.recv(&mut buf)).await.expect("DNS reply").unwrap();
    parse_reply(&buf[..n], id)
}

async fn dns_tcp(name: &str, qtype: TYPE) -> (RCODE, Vec<(Ipv4Addr, u32)>) {
    let id = rand_id();
    let mut stream = TcpStream::connect((DNS_IP, 53)).await.unwrap();
    let q = query(name, qtype, id);
    stream.write_u16(q.len() as u16).await.unwrap();
    stream.write_all(&q).await.unwrap();
    let len = tokio::time::timeout(TIMEOUT, stream.read_u16()).await.expect("DNS reply").unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.unwrap();
    parse_reply(&buf, id)
}

fn rand_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0x1234);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test]
async fn dns_answers_from_the_zone_over_udp_and_tcp() {
    let inet = inet();
    assert_eq!(dns_udp("api.allowed.test", TYPE::A).await, (RCODE::NoError, vec![(ALLOWED_IP, DNS_TTL)]));
    assert_eq!(dns_tcp("API.Allowed.Test.", TYPE::A).await, (RCODE::NoError, vec![(ALLOWED_IP, DNS_TTL)]));
    assert_eq!(dns_udp("secret.test", TYPE::A).await, (RCODE::NoError, vec![(SECRET_IP, DNS_TTL)]));
    assert_eq!(dns_udp("cdn.test", TYPE::A).await, (RCODE::NoError, vec![(CDN_IP, DNS_TTL)]));
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    assert_eq!(dns_udp("rebind.test", TYPE::A).await, (RCODE::NoError, vec![(metadata, DNS_TTL)]));
    // Wildcards answer any depth below them, but not the name itself.
    assert_eq!(dns_udp("a.b.wild.test", TYPE::A).await, (RCODE::NoError, vec![(ALLOWED_IP, DNS_TTL)]));
    assert_eq!(dns_tcp("x.wild.test", TYPE::A).await, (RCODE::NoError, vec![(ALLOWED_IP, DNS_TTL)]));
    assert_eq!(dns_udp("wild.test", TYPE::A).await, (RCODE::NameError, vec![]));
    // Known name, other type: NOERROR without answers. Unknown names: NXDOMAIN.
    assert_eq!(dns_udp("api.allowed.test", TYPE::AAAA).await, (RCODE::NoError, vec![]));
    assert_eq!(dns_udp("nope.test", TYPE::A).await, (RCODE::NameError, vec![]));
    assert_eq!(dns_tcp("nope.test", TYPE::AAAA).await, (RCODE::NameError, vec![]));

    // Records set at runtime.
    let ip = Ipv4Addr::new(203, 0, 113, 99);
    inet.set_record("late.example.test", ip);
    assert_eq!(inet.resolve("late.example.test"), Some(ip));
    assert_eq!(dns_udp("late.example.test", TYPE::A).await, (RCODE::NoError, vec![(ip, DNS_TTL)]));
    inet.remove_record("late.example.test");
    assert_eq!(dns_udp("late.example.test", TYPE::A).await, (RCODE::NameError, vec![]));

    let log = inet.dns_queries_for("allowed.test");
    assert!(log.contains(&("api.allowed.test".to_string(), 1)), "{log:?}");
    assert!(log.contains(&("api.allowed.test".to_string(), 28)), "{log:?}");
    assert!(log.iter().all(|(name, _)| name.ends_with(".allowed.test")), "{log:?}");
    assert!(inet.dns_queries().contains(&("nope.test".to_string(), 1)));
    assert_eq!(inet.dns_queries_for("example.test").len(), 2);
    assert!(inet.connections(DNS_IP, 53) >= 2);
}

async fn curl(args: &[&str]) -> Vec<u8> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--noproxy", "*", "--max-time", "30"])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

async fn curl_json(args: &[&str]) -> Value {
    serde_json::from_slice(&curl(args).await).unwrap()
}

const RESOLVE_API: &str = "api.allowed.test:443:192.88.99.10";

#[tokio::test]
async fn https_with_sni_over_http1_and_http2() {
    let ca = inet().ca_path().to_str().unwrap();
    assert!(inet().ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    for (flag, proto) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")] {
        let got =
            curl_json(&["--resolve", RESOLVE_API, "--cacert", ca, flag, "https://api.allowed.test/"]).await;
        assert_eq!(got["server"], "192.88.99.10", "{got}");
        assert_eq!(got["host"], "api.allowed.test", "{got}");
        assert_eq!(got["sni"], "api.allowed.test", "{got}");
        assert_eq!(got["proto"], proto, "{got}");
        assert_eq!(got["tls"], true, "{got}");
    }
    // A name minted on the fly for another host; no SNI when dialling an address.
    let got = curl_json(&[
        "--resolve",
        "anything.wild.test:443:192.88.99.20",
        "--cacert",
        ca,
        "https://anything.wild.test/",
    ])
    .await;
    assert_eq!(
        (got["server"].as_str(), got["sni"].as_str()),
        (Some("192.88.99.20"), Some("anything.wild.test"))
    );
    let got = curl_json(&["--cacert", ca, "https://192.88.99.11/"]).await;
    assert_eq!(got["sni"], Value::Null, "{got}");
    assert_eq!(got["server"], "192.88.99.11", "{got}");
    // Plain HTTP, on 80 and 8080.
    let got = curl_json(&["-H", "Host: www.allowed.test", "http://192.88.99.10/"]).await;
    assert_eq!((got["host"].as_str(), got["tls"].as_bool()), (Some("www.allowed.test"), Some(false)));
    assert_eq!(got["proto"], "HTTP/1.1");
    let got = curl_json(&[&format!("http://{ALLOWED_IP}:{ALT_HTTP_PORT}/")]).await;
    assert_eq!(got["port"], 8080);
    // A request header is not echoed by `/`, only by `/echo-headers`.
    let got = curl(&["-H", "X-Secret: hunter2", "http://192.88.99.10/"]).await;
    assert!(!String::from_utf8_lossy(&got).contains("hunter2"));
    let got = curl_json(&["-H", "X-Secret: hunter2", "http://192.88.99.10/echo-headers"]).await;
    assert_eq!(got["x-secret"], "hunter2", "{got}");
}

#[tokio::test]
async fn record_keeps_what_the_server_received() {
    let inet = inet();
    let ca = inet.ca_path().to_str().unwrap();
    let args = [
        "--resolve",
        "secret.test:443:192.88.99.11",
        "--cacert",
        ca,
        "--http2",
        "-X",
        "PUT",
        "-H",
        "X-Dup: one",
        "-H",
        "X-Dup: two",
        "-H",
        "Authorization: Bearer injected",
        "--data-binary",
        "hello",
        "https://secret.test/record/k-secret?x=1",
    ];
    assert_eq!(curl(&args).await, b"recorded\n");
    let got = inet.wait_recorded("k-secret", TIMEOUT).await;
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str(), r.query.as_deref()),
        ("PUT", "/record/k-secret", Some("x=1"))
    );
    assert_eq!((r.server, r.port, r.tls), (SECRET_IP, 443, true));
    assert_eq!((r.sni.as_deref(), r.authority.as_deref()), (Some("secret.test"), Some("secret.test")));
    assert_eq!((r.proto.as_str(), r.body_len), ("HTTP/2", 5));
    assert_eq!(r.header_values("x-dup"), ["one", "two"]);
    assert_eq!(r.header("authorization"), Some("Bearer injected"));

    // Plain HTTP/1.1; and waiting for something that never comes ends empty.
    curl(&["-H", "Host: cdn.test", "http://192.88.99.20/record/k-plain"]).await;
    let got = inet.recorded("k-plain");
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].method.as_str(), got[0].proto.as_str()), ("GET", "HTTP/1.1"));
    assert_eq!((got[0].server, got[0].sni.as_deref(), got[0].tls), (CDN_IP, None, false));
    assert_eq!(got[0].header("host"), Some("cdn.test"));
    assert!(inet.wait_recorded("k-never", Duration::from_millis(200)).await.is_empty());
}

#[tokio::test]
async fn sse_bytes_and_upload() {
    let inet = inet();
    let ca = inet.ca_path().to_str().unwrap();
    let started = std::time::Instant::now();
    let events = curl(&["-N", "http://192.88.99.10/sse"]).await;
    let events = String::from_utf8(events).unwrap();
    let expected: String = (1..=5).map(|n| format!("data: tick {n}\n\n")).collect();
    assert_eq!(events, expected);
    assert!(started.elapsed() >= Duration::from_millis(400));
    let started = std::time::Instant::now();
    let drips = curl(&["-N", "http://192.88.99.10/drip/4"]).await;
    assert_eq!(String::from_utf8(drips).unwrap(), "drip\n".repeat(4));
    assert!(started.elapsed() >= Duration::from_millis(300));

    let n = 10 * 1024 * 1024 + 7;
    let body =
        curl(&["--resolve", RESOLVE_API, "--cacert", ca, &format!("https://api.allowed.test/bytes/{n}")])
            .await;
    assert_eq!(body.len(), n);
    assert!(body.iter().enumerate().all(|(i, b)| *b == i as u8));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload");
    let data: Vec<u8> = (0..3_000_001u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let sha: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    let upload = format!("@{}", file.display());
    for (flag, url) in
        [("--http2", "https://api.allowed.test/upload"), ("--http1.1", "http://192.88.99.10/upload")]
    {
        let got =
            curl_json(&["--resolve", RESOLVE_API, "--cacert", ca, flag, "--data-binary", &upload, url]).await;
        assert_eq!(got["bytes"], data.len() as u64, "{got}");
        assert_eq!(got["sha256"], sha.as_str(), "{got}");
    }
}

async fn ws_echo<S>(stream: S, url: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut ws, response) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(response.status(), 101);
    ws.send(Message::text("hello over ws")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello over ws"));
    let binary = vec![0u8, 1, 2, 255];
    ws.send(Message::binary(binary.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(binary));
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn websocket_echo_over_http_and_https() {
    let inet = inet();
    let tcp = TcpStream::connect((ALLOWED_IP, 80)).await.unwrap();
    ws_echo(tcp, "ws://api.allowed.test/ws").await;

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut inet.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect((ALLOWED_IP, 443)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.allowed.test").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    ws_echo(tls, "wss://api.allowed.test/ws").await;
}

#[tokio::test]
async fn tcp_and_udp_echo_and_counts() {
    let inet = inet();
    for ip in [ALLOWED_IP, CDN_IP] {
        let before = inet.connections(ip, TCP_ECHO_PORT);
        let mut stream = TcpStream::connect((ip, TCP_ECHO_PORT)).await.unwrap();
        stream.write_all(b"ping over tcp").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, b"ping over tcp");
        assert_eq!(inet.connections(ip, TCP_ECHO_PORT), before + 1);
    }

    for port in [UDP_ECHO_PORT, 443] {
        let before = inet.udp_datagrams(ALLOWED_IP, port);
        let socket = UdpSocket::bind("0.0.0.0:0").await.unwrap();
        socket.connect(SocketAddr::from((ALLOWED_IP, port))).await.unwrap();
        for i in 0..3u8 {
            socket.send(&[i; 100]).await.unwrap();
            let mut buf = [0u8; 200];
            let n = tokio::time::timeout(TIMEOUT, socket.recv(&mut buf)).await.unwrap().unwrap();
            assert_eq!(&buf[..n], &[i; 100]);
        }
        assert_eq!(inet.udp_datagrams(ALLOWED_IP, port), before + 3);
    }

    // Nothing in these tests dials evil.test: it saw no connection.
    assert_eq!(inet.connections(EVIL_IP, 80), 0);
    assert_eq!(inet.connections(EVIL_IP, 443), 0);
    // Every web host counts what it accepts.
    let before = inet.connections(SECRET_IP, 80);
    curl(&["http://192.88.99.11/"]).await;
    assert_eq!(inet.connections(SECRET_IP, 80), before + 1);
}
