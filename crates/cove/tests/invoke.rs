//! Real-VM tests of the invoke route and presigned URLs: a small Python server in the guest
//! reached from the host as `<id>-<port>.<domain>` (API key, removed before the guest),
//! `<id>.<domain>` (the sandbox's `PORT`) and `<token>.<domain>` (presigned, no key), with
//! plain responses, server-sent events and a WebSocket; a paused sandbox resumes on the request.
//!
//! The server's sandbox domain is its default, `localhost:<listen port>`. glibc does not resolve
//! `*.localhost`, so the client here resolves every name to 127.0.0.1 itself.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{assert_field, Api, Leftovers, TestServer};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The guest's server: `GET /hello` (hostname, the names of the headers received and the
/// X-Forwarded-Proto|Host|For values),
/// `GET /sse` (three events, 200 ms apart, chunked), `GET /ws` (WebSocket echo).
const SERVER_PY: &str = r#"
import base64, hashlib, socket, sys, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/hello":
            names = ",".join(sorted(k.lower() for k in self.headers.keys()))
            fwd = "|".join(self.headers.get("X-Forwarded-" + h, "-") for h in ("Proto", "Host", "For"))
            body = ("hello from %s\nheaders: %s\nforwarded: %s\n" % (socket.gethostname(), names, fwd)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for n in range(1, 4):
                event = b"data: tick %d\n\n" % n
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(0.2)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        elif self.path == "/ws":
            key = self.headers.get("Sec-WebSocket-Key", "")
            accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.wfile.flush()
            self.echo()
            self.close_connection = True
        else:
            self.send_error(404)

    def read(self, n):
        data = self.rfile.read(n)
        if len(data) < n:
            raise EOFError
        return data

    def send_frame(self, opcode, payload):
        head = bytes([0x80 | opcode])
        if len(payload) < 126:
            head += bytes([len(payload)])
        elif len(payload) < 65536:
            head += bytes([126]) + len(payload).to_bytes(2, "big")
        else:
            head += bytes([127]) + len(payload).to_bytes(8, "big")
        self.wfile.write(head + payload)
        self.wfile.flush()

    def echo(self):
        try:
            while True:
                b0, b1 = self.read(2)
                opcode, masked, n = b0 & 0x0F, b1 & 0x80, b1 & 0x7F
                if n == 126:
                    n = int.from_bytes(self.read(2), "big")
                elif n == 127:
                    n = int.from_bytes(self.read(8), "big")
                mask = self.read(4) if masked else b"\0\0\0\0"
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(self.read(n)))
                if opcode == 8:
                    self.send_frame(8, payload[:2])
                    return
                if opcode == 9:
                    self.send_frame(10, payload)
                elif opcode in (1, 2):
                    self.send_frame(opcode, payload)
        except (EOFError, ConnectionError):
            return

ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
"#;

/// Resolves every name to the loopback address: the sandbox domain is `localhost:<port>`.
struct Loopback;

impl reqwest::dns::Resolve for Loopback {
    fn resolve(&self, _name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async {
            let addrs: reqwest::dns::Addrs = Box::new(std::iter::once(SocketAddr::from(([127, 0, 0, 1], 0))));
            Ok(addrs)
        })
    }
}

fn loopback_client() -> reqwest::Client {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(Loopback))
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// The listen port of the server (`http://127.0.0.1:<port>`).
fn listen_port(server: &TestServer) -> u16 {
    server.url.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap()
}

/// What a request to the sandbox domain answered.
struct Got {
    status: u16,
    body: String,
    content_type: String,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn message(&self) -> String {
        self.json()["message"].as_str().unwrap_or_else(|| panic!("no message: {}", self.body)).to_string()
    }
}

async fn get(http: &reqwest::Client, url: &str, key: Option<&str>) -> Got {
    let mut r = http.get(url);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let content_type =
        resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = resp.text().await.unwrap_or_else(|e| panic!("body of {url}: {e}"));
    Got { status, body, content_type }
}

/// Asserts a `/hello` answer from sandbox `id` in which no `authorization` header arrived.
fn assert_hello(got: &Got, id: &str, what: &str) {
    assert_eq!(got.status, 200, "{what}: {}", got.body);
    assert!(got.body.starts_with(&format!("hello from {id}\n")), "{what}: {}", got.body);
    let headers = got.body.lines().find_map(|l| l.strip_prefix("headers: ")).unwrap_or_default();
    let names: Vec<&str> = headers.split(',').collect();
    assert!(names.contains(&"host"), "{what}: no host header in {names:?}");
    assert!(
        !names.iter().any(|n| n.contains("authorization")),
        "{what}: the API key entered the sandbox: {names:?}"
    );
    // The app is told how it was reached: scheme, the Host the client used, the client.
    let fwd = got.body.lines().find_map(|l| l.strip_prefix("forwarded: ")).unwrap_or_default();
    let parts: Vec<&str> = fwd.split('|').collect();
    assert_eq!(parts.len(), 3, "{what}: {}", got.body);
    assert_eq!((parts[0], parts[2]), ("http", "127.0.0.1"), "{what}: {fwd}");
    assert!(parts[1].contains(".localhost:"), "{what}: forwarded host {fwd}");
}

/// Starts the Python server on `port` in the guest and waits until it listens.
async fn start_server(api: &Api, id: &str, port: u16) {
    api.put_file(id, "/tmp/srv.py", SERVER_PY.as_bytes()).await;
    api.sh_ok(id, &format!("setsid nohup python3 /tmp/srv.py {port} >/tmp/srv.log 2>&1 </dev/null &")).await;
    let wait = format!(
        "bash -c 'for i in $(seq 150); do (echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && exit 0; \
         sleep 0.1; done; cat /tmp/srv.log; exit 1'"
    );
    api.sh_ok(id, &wait).await;
}

/// Reads `/sse` incrementally: three events, the first one complete before the body ended
/// (and before the last one was sent).
async fn check_sse(http: &reqwest::Client, url: &str, key: Option<&str>) {
    let mut r = http.get(url);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct:?}");
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut chunks_after_first: Option<usize> = None;
    let mut seen_at_first = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("SSE stream broke");
        if let Some(n) = chunks_after_first.as_mut() {
            *n += 1;
        }
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        if chunks_after_first.is_none() && buf.contains("data: tick 1\n\n") {
            chunks_after_first = Some(0);
            seen_at_first = buf.clone();
        }
    }
    assert_eq!(buf, "data: tick 1\n\ndata: tick 2\n\ndata: tick 3\n\n");
    assert!(
        chunks_after_first.is_some_and(|n| n > 0),
        "the first event did not arrive before the body ended (buffered?)"
    );
    assert!(!seen_at_first.contains("tick 3"), "the first event came with the last: {seen_at_first:?}");
}

/// A WebSocket to `/ws` through the invoke route: two messages echoed, then a clean close.
async fn check_websocket(listen: u16, host: &str, key: &str) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", listen)).await.unwrap();
    let mut req = format!("ws://{host}/ws").into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp).await.expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    for text in ["first message", "second message, a bit longer than the first one"] {
        ws.send(Message::text(text)).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("no echo within 30 s")
            .expect("WebSocket ended")
            .expect("WebSocket error");
        assert_eq!(got, Message::text(text));
    }
    ws.close(None).await.unwrap();
    // The guest answers the close; the stream then ends.
    while let Some(Ok(m)) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("close") {
        assert!(m.is_close(), "unexpected message after close: {m:?}");
    }
}

async fn presign(api: &Api, id: &str, body: Value) -> common::Resp {
    api.post(&format!("/v1/sandbox/{id}/presigned-url"), body).await
}

#[tokio::test]
async fn invoke_route_and_presigned_urls() {
    let server = TestServer::shared();
    let listen = listen_port(server);
    let domain = format!("localhost:{listen}");
    let http = loopback_client();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);

    let id = api.create(json!({ "env_vars": { "PORT": "8000" }, "timeout": 1800 })).await;
    left.sandbox(&id);
    let bare = api.create(json!({})).await;
    left.sandbox(&bare);
    start_server(&api, &id, 8000).await;
    println!("guest server of {id} listens");

    // ---- <id>-<port>.<domain>: the API key is needed, and removed before the guest ----
    let hello = format!("http://{id}-8000.{domain}/hello");
    assert_hello(&get(&http, &hello, Some(&api.key)).await, &id, "explicit port");
    // Also with the key in leap0-authorization.
    let r = http.get(&hello).header("leap0-authorization", &api.key).send().await.unwrap();
    let got = Got { status: r.status().as_u16(), content_type: String::new(), body: r.text().await.unwrap() };
    assert_hello(&got, &id, "leap0-authorization");
    let got = get(&http, &hello, None).await;
    assert_eq!(got.status, 401, "no key: {}", got.body);
    let got = get(&http, &hello, Some("cove_not_a_key")).await;
    assert_eq!(got.status, 401, "wrong key: {}", got.body);
    let other = server.new_org(None);
    let got = get(&http, &hello, Some(&other.key)).await;
    assert_eq!(got.status, 404, "another org's key: {}", got.body);
    println!("explicit port: ok");

    // ---- <id>.<domain>: the sandbox's PORT ----
    assert_hello(&get(&http, &format!("http://{id}.{domain}/hello"), Some(&api.key)).await, &id, "PORT");
    let got = get(&http, &format!("http://{bare}.{domain}/hello"), Some(&api.key)).await;
    assert_eq!(got.status, 404, "no PORT: {}", got.body);
    let m = got.message();
    assert!(m.contains("PORT") && m.contains(&format!("{bare}-<port>")), "{m}");
    let got = get(&http, &format!("http://{id}.{domain}/hello"), None).await;
    assert_eq!(got.status, 401, "PORT route without a key: {}", got.body);
    // The Python server's own 404 passes through untouched.
    let got = get(&http, &format!("http://{id}.{domain}/nothing-here"), Some(&api.key)).await;
    assert_eq!(got.status, 404, "{}", got.body);
    assert!(!got.content_type.contains("json"), "the guest's 404 was replaced: {}", got.body);
    println!("PORT: ok");

    // ---- nothing listens ----
    let got = get(&http, &format!("http://{id}-9999.{domain}/hello"), Some(&api.key)).await;
    assert_eq!(got.status, 502, "closed port: {}", got.body);
    assert!(got.message().contains("9999"), "{}", got.body);
    println!("closed port: ok");

    // ---- server-sent events and WebSocket ----
    check_sse(&http, &format!("http://{id}-8000.{domain}/sse"), Some(&api.key)).await;
    println!("SSE: ok");
    check_websocket(listen, &format!("{id}-8000.{domain}"), &api.key).await;
    // Twice: an upgraded connection must not leave the route stuck.
    check_websocket(listen, &format!("{id}.{domain}"), &api.key).await;
    assert_hello(&get(&http, &hello, Some(&api.key)).await, &id, "after WebSockets");
    println!("WebSocket: ok");

    // ---- presigned URLs ----
    let r = presign(&api, &id, json!({ "port": 8000, "expires_in": 3 })).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let short = r.json();
    for f in ["id", "token", "url", "sandbox_id", "port", "expires_at", "created_at"] {
        assert!(!short[f].is_null(), "no {f} in {short}");
    }
    assert_eq!(short["sandbox_id"], json!(id));
    assert_eq!(short["port"], 8000);
    assert!(short["id"].as_str().unwrap().starts_with("psu-"), "{short}");
    let token = short["token"].as_str().unwrap();
    let url = short["url"].as_str().unwrap().to_string();
    assert_eq!(url, format!("http://{token}.{domain}"));
    let created = chrono::DateTime::parse_from_rfc3339(short["created_at"].as_str().unwrap()).unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(short["expires_at"].as_str().unwrap()).unwrap();
    let life = (expires - created).num_seconds();
    assert!((2..=3).contains(&life), "expires_at - created_at = {life} s: {short}");
    assert_hello(&get(&http, &format!("{url}/hello"), None).await, &id, "presigned");
    check_sse(&http, &format!("{url}/sse"), None).await;
    let got = get(&http, &format!("http://0123456789abcdef0123456789abcdef.{domain}/hello"), None).await;
    assert_eq!(got.status, 404, "wrong token: {}", got.body);

    // A long-lived URL for the resume checks, and one that is revoked.
    let r = presign(&api, &id, json!({ "port": 8000, "expires_in": 3600 })).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let long_url = r.json()["url"].as_str().unwrap().to_string();
    let r = presign(&api, &id, json!({ "port": 8000 })).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let revoked = r.json();
    let revoked_url = revoked["url"].as_str().unwrap().to_string();
    let revoked_path = format!("/v1/sandbox/{id}/presigned-url/{}", revoked["id"].as_str().unwrap());
    assert_hello(&get(&http, &format!("{revoked_url}/hello"), None).await, &id, "before revoking");
    let r = api.delete(&revoked_path).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let got = get(&http, &format!("{revoked_url}/hello"), None).await;
    assert_eq!(got.status, 404, "revoked URL: {}", got.body);
    let r = api.delete(&revoked_path).await;
    assert_eq!(r.status, 404, "revoking twice: {}", r.text());
    // Another org can neither revoke nor create.
    let r = other.delete(&format!("/v1/sandbox/{id}/presigned-url/{}", short["id"].as_str().unwrap())).await;
    assert_eq!(r.status, 404, "revoke by another org: {}", r.text());
    let r = presign(&other, &id, json!({ "port": 8000 })).await;
    assert_eq!(r.status, 404, "create by another org: {}", r.text());

    // Validation and unknown sandboxes.
    assert_field(&presign(&api, &id, json!({ "port": 0, "expires_in": 60 })).await, "port");
    assert_field(&presign(&api, &id, json!({ "port": 70000 })).await, "port");
    assert_field(&presign(&api, &id, json!({ "port": 8000, "expires_in": 0 })).await, "expires_in");
    let r = presign(&api, "sbx-doesnotexist", json!({ "port": 8000 })).await;
    assert_eq!(r.status, 404, "unknown sandbox: {}", r.text());

    // Expiry: the short URL (3 s) is gone.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let got = get(&http, &format!("{url}/hello"), None).await;
    assert_eq!(got.status, 404, "expired URL: {}", got.body);
    assert_hello(&get(&http, &format!("{long_url}/hello"), None).await, &id, "long-lived URL");
    println!("presigned URLs: ok");

    // ---- a paused sandbox resumes on the request ----
    for (what, url, key) in [
        ("presigned URL", format!("{long_url}/hello"), None),
        ("invoke route", hello.clone(), Some(api.key.as_str())),
    ] {
        let r = api.action(&id, "pause").await;
        assert_eq!(r.status, 201, "pause: {}", r.text());
        assert_eq!(api.state_of(&id).await, "paused");
        assert_hello(&get(&http, &url, key).await, &id, &format!("{what} of a paused sandbox"));
        assert_eq!(api.state_of(&id).await, "running", "{what} did not resume {id}");
        println!("resume by {what}: ok");
    }
    // The guest server is the same process, still serving streams.
    check_sse(&http, &format!("{long_url}/sse"), None).await;

    left.delete_sandbox(&bare).await;
    left.delete_sandbox(&id).await;
    // A deleted sandbox's URLs are gone.
    let got = get(&http, &format!("{long_url}/hello"), None).await;
    assert_eq!(got.status, 404, "URL of a deleted sandbox: {}", got.body);
    let got = get(&http, &hello, Some(&api.key)).await;
    assert_eq!(got.status, 404, "invoke of a deleted sandbox: {}", got.body);
}

/// curl on the host; returns (exit code, stdout, stderr).
fn host_curl(args: &[&str]) -> (i32, String, String) {
    let out =
        std::process::Command::new("curl").args(["-sS", "--max-time", "60"]).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// With `--tls-cert`/`--tls-key` the server speaks HTTPS (HTTP/2 by ALPN) for the API and the
/// sandbox domain alike, and hands out https URLs. curl resolves `*.localhost` by itself (and
/// accepts no wildcard certificate for a bare `*.localhost`, hence `sandbox.localhost`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_https_with_a_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,DNS:*.sandbox.localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "openssl could not make a test certificate");
    let srv = TestServer::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--sandbox-domain",
        "sandbox.localhost",
    ]);
    assert!(srv.url.starts_with("https://127.0.0.1:"), "{}", srv.url);
    let port = srv.url.rsplit(':').next().unwrap().to_string();
    let base = format!("https://localhost:{port}");
    let ca = cert.to_str().unwrap();
    let auth = format!("Authorization: Bearer {}", srv.admin_key);

    let (code, out, err) =
        host_curl(&["--cacert", ca, "--http2", "-w", " %{http_version}", &format!("{base}/healthz")]);
    assert_eq!((code, out.as_str()), (0, "ok 2"), "{err}");
    let (code, out, err) = host_curl(&[
        "--cacert",
        ca,
        "-H",
        &auth,
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"template_name":"system/debian:bookworm"}"#,
        &format!("{base}/v1/sandbox"),
    ]);
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["id"].as_str().unwrap().to_string();
    let exec = json!({"command": "cd /tmp && echo tls-ok > t.txt && (setsid nohup python3 -m http.server 8000 >/dev/null 2>&1 </dev/null &) && \
        for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:8000/ && exit 0; sleep 0.1; done; exit 1"});
    let (code, out, err) = host_curl(&[
        "--cacert",
        ca,
        "-H",
        &auth,
        "-H",
        "content-type: application/json",
        "-d",
        &exec.to_string(),
        &format!("{base}/v1/sandbox/{id}/process/execute"),
    ]);
    assert!(code == 0 && out.contains(r#""exit_code":0"#), "{out}{err}");
    // The invoke route over TLS; the presigned URL handed out is https.
    let (code, out, err) = host_curl(&[
        "--cacert",
        ca,
        "-H",
        &auth,
        &format!("https://{id}-8000.sandbox.localhost:{port}/t.txt"),
    ]);
    assert_eq!((code, out.as_str()), (0, "tls-ok\n"), "{err}");
    let (code, out, err) = host_curl(&[
        "--cacert",
        ca,
        "-H",
        &auth,
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"port":8000}"#,
        &format!("{base}/v1/sandbox/{id}/presigned-url"),
    ]);
    assert_eq!(code, 0, "{err}");
    let url = serde_json::from_str::<Value>(&out).unwrap()["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("https://") && url.ends_with(".sandbox.localhost"), "{url}");
    let (code, out, err) = host_curl(&["--cacert", ca, &format!("{url}:{port}/t.txt")]);
    assert_eq!((code, out.as_str()), (0, "tls-ok\n"), "{err}");
    let (code, _, err) =
        host_curl(&["--cacert", ca, "-X", "DELETE", "-H", &auth, &format!("{base}/v1/sandbox/{id}")]);
    assert_eq!(code, 0, "{err}");
}
