//! An offline "internet" for networking tests (feature `testing`).
//!
//! [`Internet::shared`] builds, once per process, a network namespace `cove-testnet` joined to
//! the host (root) namespace by a veth pair on 192.88.99.0/24 (the retired 6to4 relay prefix:
//! public, not in Cove's denied ranges, and used by no real network). Everything lives on that
//! one link, so the host gets no routes: the TEST-NET ranges (203.0.113.0/24, 198.51.100.0/24)
//! are deliberately not used, because some machines reach their package mirrors through them.
//! Inside it, on public-looking addresses, run a DNS
//! server, web servers (HTTP/1.1, HTTPS with HTTP/1.1 and HTTP/2, WebSocket, SSE), and raw
//! TCP/UDP echo servers. TLS certificates are minted on the fly by a private test root CA
//! ([`Internet::ca_pem`], [`Internet::ca_path`]).
//!
//! The sockets are created inside the namespace ([`crate::netns`]) but served by this very
//! process, on a dedicated thread with its own tokio runtime that lives as long as the process,
//! so every test of a binary (each with its own runtime) shares one `Internet`, and can read
//! back what the servers saw: DNS queries, recorded requests, connection and datagram counts.
//!
//! ```text
//! host ns: cove-inet0 192.88.99.1/24  <-veth->  cove-testnet: eth0 192.88.99.2/24
//!                                                           + 192.88.99.{10,11,12,20,53}/24
//!                                                           default via 192.88.99.1
//! ```
//!
//! | address            | ports                                                        |
//! |--------------------|--------------------------------------------------------------|
//! | 192.88.99.53       | DNS 53 (UDP, TCP)                                            |
//! | 192.88.99.10       | web 80, 443, 8080 (plain); TCP echo 7000; UDP echo 7001, 443 |
//! | 192.88.99.11/.12   | web 80, 443                                                  |
//! | 192.88.99.20       | web 80, 443; TCP echo 7000 (in [`CDN_NET`])                  |
//!
//! Web routes: `GET /` (JSON about the connection), `ANY /record/<key>`, `GET /echo-headers`,
//! `GET /bytes/<n>`, `POST /upload`, `GET /sse`, `GET /ws`; see [`Internet`].

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::netns;

mod dns;
mod git;
mod tls;
mod web;

/// Name of the internet's network namespace (`/run/netns/cove-testnet`).
pub const NETNS: &str = "cove-testnet";
/// The root-namespace end of the veth pair (the other end is `eth0` in [`NETNS`]).
pub const VETH: &str = "cove-inet0";
/// The host's address on [`VETH`]; traffic NATed by the host arrives from here.
pub const ROOT_SIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 88, 99, 1);
/// The internet's own address on its `eth0`.
pub const INTERNET_SIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 88, 99, 2);
/// The DNS server (UDP and TCP port 53).
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(192, 88, 99, 53);
/// The "allowed" web host (`api.allowed.test`, `*.wild.test`, ...); also echo servers.
pub const ALLOWED_IP: Ipv4Addr = Ipv4Addr::new(192, 88, 99, 10);
/// The "paid API" web host (`secret.test`), the one that gets injected credentials.
pub const SECRET_IP: Ipv4Addr = Ipv4Addr::new(192, 88, 99, 11);
/// The web host a policy should never let through (`evil.test`).
pub const EVIL_IP: Ipv4Addr = Ipv4Addr::new(192, 88, 99, 12);
/// A web host on a sub-range of its own (`cdn.test`, in [`CDN_NET`]); also a TCP echo server.
pub const CDN_IP: Ipv4Addr = Ipv4Addr::new(192, 88, 99, 20);
/// A CIDR holding [`CDN_IP`] and none of the other servers (for `allow_cidrs` tests).
pub const CDN_NET: &str = "192.88.99.16/28";
/// Every address serving web (ports 80 and 443).
pub const WEB_IPS: [Ipv4Addr; 4] = [ALLOWED_IP, SECRET_IP, EVIL_IP, CDN_IP];
/// Plain HTTP on [`ALLOWED_IP`] besides port 80.
pub const ALT_HTTP_PORT: u16 = 8080;
/// Raw TCP echo on [`ALLOWED_IP`] and [`CDN_IP`].
pub const TCP_ECHO_PORT: u16 = 7000;
/// UDP echo on [`ALLOWED_IP`] (also on port 443 there, standing in for QUIC).
pub const UDP_ECHO_PORT: u16 = 7001;
/// TTL of every DNS answer.
pub const DNS_TTL: u32 = 5;
/// The one account of the git server (`/git/<repo>` on every web host, repositories under
/// [`Internet::git_root`]): every request must carry it as HTTP basic credentials.
pub const GIT_USER: &str = "cove-tester";
pub const GIT_PASSWORD: &str = "s3cret-git-token-6d1f";
/// Common name of the test root CA.
pub const CA_COMMON_NAME: &str = "Cove test internet root";

/// The zone the DNS server starts with; change it with [`Internet::set_record`].
pub const DEFAULT_ZONE: [(&str, Ipv4Addr); 9] = [
    ("api.allowed.test", ALLOWED_IP),
    ("other.allowed.test", ALLOWED_IP),
    ("www.allowed.test", ALLOWED_IP),
    ("secret.test", SECRET_IP),
    ("evil.test", EVIL_IP),
    ("cdn.test", CDN_IP),
    ("*.wild.test", ALLOWED_IP),
    ("rebind.test", Ipv4Addr::new(169, 254, 169, 254)),
    ("private.test", Ipv4Addr::new(10, 1, 2, 3)),
];

/// One request received by `ANY /record/<key>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub query: Option<String>,
    /// `Host`, or the `:authority` of an HTTP/2 request.
    pub authority: Option<String>,
    /// Every request header in the order received (duplicates kept, grouped under the first
    /// occurrence of their name), names in lower case.
    pub headers: Vec<(String, String)>,
    /// The server address the connection arrived at.
    pub server: Ipv4Addr,
    pub port: u16,
    pub tls: bool,
    /// The SNI the client sent, if TLS and any.
    pub sni: Option<String>,
    /// `HTTP/1.1` or `HTTP/2` (or `HTTP/1.0`).
    pub proto: String,
    /// Bytes of request body received.
    pub body_len: u64,
}

impl Recorded {
    /// The values of header `name` (case-insensitive), in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).into_iter().next()
    }
}

/// The test internet; see the [module docs](self).
pub struct Internet {
    state: Arc<State>,
    ca_pem: String,
    ca_path: PathBuf,
    /// Held for the life of the process: one process at a time owns the test internet (test
    /// binaries run one after another; a bench started beside them waits).
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// The lock file that serialises processes using the test internet.
const LOCK_FILE: &str = "/run/cove-testnet.lock";

/// What the servers share with the [`Internet`] handle.
struct State {
    ca: Arc<tls::Ca>,
    zone: Mutex<HashMap<String, Ipv4Addr>>,
    dns_log: Mutex<Vec<(String, u16)>>,
    recorded: Mutex<HashMap<String, Vec<Recorded>>>,
    recorded_changed: tokio::sync::Notify,
    connections: Mutex<HashMap<(Ipv4Addr, u16), usize>>,
    datagrams: Mutex<HashMap<(Ipv4Addr, u16), usize>>,
    /// Bare repositories the git server serves.
    git_root: PathBuf,
    git_log: Mutex<Vec<GitRequest>>,
}

/// One request the git server received.
#[derive(Debug, Clone)]
pub struct GitRequest {
    /// The path below `/git`.
    pub path: String,
    /// Whether it carried the account's credentials.
    pub authorized: bool,
    /// Its headers, names in lower case.
    pub headers: Vec<(String, String)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Lower case, no trailing dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl State {
    /// The zone's answer for `name`: an exact record, else the closest `*.` wildcard above it.
    fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        let zone = lock(&self.zone);
        if let Some(ip) = zone.get(name) {
            return Some(*ip);
        }
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(ip) = zone.get(&format!("*.{parent}")) {
                return Some(*ip);
            }
            rest = parent;
        }
        None
    }

    fn count_connection(&self, local: SocketAddrV4) {
        *lock(&self.connections).entry((*local.ip(), local.port())).or_default() += 1;
    }

    fn count_datagram(&self, local: SocketAddrV4) {
        *lock(&self.datagrams).entry((*local.ip(), local.port())).or_default() += 1;
    }

    fn record_git(&self, path: &str, authorized: bool, headers: Vec<(String, String)>) {
        lock(&self.git_log).push(GitRequest { path: path.to_string(), authorized, headers });
    }

    fn record(&self, key: String, rec: Recorded) {
        lock(&self.recorded).entry(key).or_default().push(rec);
        self.recorded_changed.notify_waiters();
    }
}

static SHARED: OnceLock<Internet> = OnceLock::new();

/// Removes the CA file and git root that earlier test processes left in the temp dir (the
/// shared `Internet` lives as long as its process and is never dropped): those of processes
/// that have ended.
fn remove_files_of_ended_processes() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = ["cove-testnet-ca-", "cove-testnet-git-"]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .map(|rest| rest.trim_end_matches(".pem"))
            .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Internet {
    /// The process-wide internet, built on first use (replacing whatever an earlier process
    /// left behind). Needs root. Panics when it cannot be built.
    pub fn shared() -> &'static Internet {
        SHARED.get_or_init(|| match Internet::start() {
            Ok(internet) => internet,
            Err(e) => panic!("cannot build the test internet: {e}"),
        })
    }

    /// Deletes the namespace and the veth pair. Idempotent; errors ignored.
    pub fn cleanup() {
        // Deleting the veth pair is synchronous; deleting a namespace takes its devices down
        // asynchronously, so the link goes first.
        if Path::new("/sys/class/net").join(VETH).exists() {
            quiet("ip", &["link", "del", VETH]);
        }
        if netns::exists(NETNS) {
            quiet("ip", &["netns", "del", NETNS]);
        }
    }

    fn start() -> io::Result<Internet> {
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(LOCK_FILE)?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io::Error::from(e))?;
        remove_files_of_ended_processes();
        let (ca, ca_pem) = tls::Ca::new()?;
        let ca_path = std::env::temp_dir().join(format!("cove-testnet-ca-{}.pem", std::process::id()));
        std::fs::write(&ca_path, &ca_pem)?;
        let git_root = std::env::temp_dir().join(format!("cove-testnet-git-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&git_root);
        std::fs::create_dir_all(&git_root)?;
        let state = Arc::new(State {
            ca: Arc::new(ca),
            zone: Mutex::new(DEFAULT_ZONE.iter().map(|(n, ip)| (n.to_string(), *ip)).collect()),
            dns_log: Mutex::default(),
            recorded: Mutex::default(),
            recorded_changed: tokio::sync::Notify::new(),
            connections: Mutex::default(),
            datagrams: Mutex::default(),
            git_root,
            git_log: Mutex::default(),
        });

        let (tx, rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let servers = state.clone();
        std::thread::Builder::new().name("cove-testnet".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("cove-testnet-rt")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let result = async {
                    configure().await?;
                    serve(servers).await
                }
                .await;
                let ok = result.is_ok();
                let _ = tx.send(result);
                if ok {
                    // Keep the runtime, and so the servers, for the rest of the process.
                    std::future::pending::<()>().await;
                }
            });
        })?;
        rx.recv().map_err(|_| io::Error::other("the test internet's thread died"))??;
        Ok(Internet { state, ca_pem, ca_path, _lock: lock })
    }

    /// The directory whose bare repositories the git server serves (`<dir>/x.git` is
    /// `https://<any web host>/git/x.git`).
    pub fn git_root(&self) -> &Path {
        &self.state.git_root
    }

    /// Every request the git server has received, oldest first.
    pub fn git_requests(&self) -> Vec<GitRequest> {
        lock(&self.state.git_log).clone()
    }

    /// The test root CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A file holding [`Self::ca_pem`] (in the temp dir, named after the process id).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// Adds or replaces an A record. `name` may be a wildcard (`*.example.test`).
    pub fn set_record(&self, name: &str, ip: Ipv4Addr) {
        lock(&self.state.zone).insert(normalize(name), ip);
    }

    /// Removes a record; the name then answers NXDOMAIN (unless a wildcard covers it).
    pub fn remove_record(&self, name: &str) {
        lock(&self.state.zone).remove(&normalize(name));
    }

    /// What the DNS server answers for `name` (A record), wildcards included.
    pub fn resolve(&self, name: &str) -> Option<Ipv4Addr> {
        self.state.lookup(&normalize(name))
    }

    /// Every DNS question received so far (UDP and TCP): name (lower case, no trailing dot)
    /// and query type (1 = A, 28 = AAAA, ...).
    pub fn dns_queries(&self) -> Vec<(String, u16)> {
        lock(&self.state.dns_log).clone()
    }

    /// The DNS questions for `suffix` or any name below it.
    pub fn dns_queries_for(&self, suffix: &str) -> Vec<(String, u16)> {
        let suffix = normalize(suffix);
        let below = format!(".{suffix}");
        lock(&self.state.dns_log)
            .iter()
            .filter(|(name, _)| *name == suffix || name.ends_with(&below))
            .cloned()
            .collect()
    }

    /// The requests recorded under `key` by `ANY /record/<key>`, oldest first.
    pub fn recorded(&self, key: &str) -> Vec<Recorded> {
        lock(&self.state.recorded).get(key).cloned().unwrap_or_default()
    }

    /// Waits until at least one request is recorded under `key`, up to `timeout`; returns
    /// them (empty on timeout). Needs a tokio runtime with time enabled.
    pub async fn wait_recorded(&self, key: &str, timeout: Duration) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.state.recorded_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let got = self.recorded(key);
            if !got.is_empty() || tokio::time::timeout_at(deadline, changed).await.is_err() {
                return got;
            }
        }
    }

    /// TCP connections accepted so far on `ip:port` (any server, any port).
    pub fn connections(&self, ip: Ipv4Addr, port: u16) -> usize {
        lock(&self.state.connections).get(&(ip, port)).copied().unwrap_or(0)
    }

    /// UDP datagrams received so far on `ip:port` (the echo servers; not DNS).
    pub fn udp_datagrams(&self, ip: Ipv4Addr, port: u16) -> usize {
        lock(&self.state.datagrams).get(&(ip, port)).copied().unwrap_or(0)
    }
}

/// Runs a command, ignoring its output and failure.
fn quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Builds the namespace, veth pair and addresses afresh.
async fn configure() -> io::Result<()> {
    Internet::cleanup();
    let inet_side = INTERNET_SIDE_IP.to_string();
    let root_side = ROOT_SIDE_IP.to_string();
    ip(&["netns", "add", NETNS]).await?;
    ip(&["link", "add", VETH, "type", "veth", "peer", "name", "eth0", "netns", NETNS]).await?;
    ip(&["addr", "add", &format!("{root_side}/24"), "dev", VETH]).await?;
    ip(&["link", "set", VETH, "up"]).await?;
    ip_in(&["link", "set", "lo", "up"]).await?;
    ip_in(&["addr", "add", &format!("{inet_side}/24"), "dev", "eth0"]).await?;
    for addr in std::iter::once(DNS_IP).chain(WEB_IPS) {
        ip_in(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]).await?;
    }
    ip_in(&["link", "set", "eth0", "up"]).await?;
    ip_in(&["route", "add", "default", "via", &root_side]).await?;
    tokio::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n").await?;
    Ok(())
}

async fn ip(args: &[&str]) -> io::Result<()> {
    netns::run("ip", args, None).await
}

/// `ip` inside the internet's namespace.
async fn ip_in(args: &[&str]) -> io::Result<()> {
    let all: Vec<&str> = ["-n", NETNS].iter().chain(args).copied().collect();
    netns::run("ip", &all, None).await
}

/// Binds every server inside the namespace and spawns it on the current runtime.
async fn serve(state: Arc<State>) -> io::Result<()> {
    let ns = netns::path(NETNS);
    let at = |ip: Ipv4Addr, port: u16| SocketAddr::V4(SocketAddrV4::new(ip, port));

    let dns_udp = netns::udp_socket(&ns, at(DNS_IP, 53))?;
    tokio::spawn(dns::serve_udp(state.clone(), dns_udp));
    let dns_tcp = netns::tcp_listener(&ns, at(DNS_IP, 53))?;
    accept_loop(&state, dns_tcp, dns::serve_tcp)?;

    for ip in WEB_IPS {
        accept_loop(&state, netns::tcp_listener(&ns, at(ip, 80))?, web::serve_plain)?;
        let acceptor = tls::acceptor(state.ca.clone(), ip)?;
        let tls_listener = netns::tcp_listener(&ns, at(ip, 443))?;
        accept_loop(&state, tls_listener, move |state, stream, local| {
            web::serve_tls(state, stream, local, acceptor.clone())
        })?;
    }
    accept_loop(&state, netns::tcp_listener(&ns, at(ALLOWED_IP, ALT_HTTP_PORT))?, web::serve_plain)?;

    for ip in [ALLOWED_IP, CDN_IP] {
        accept_loop(&state, netns::tcp_listener(&ns, at(ip, TCP_ECHO_PORT))?, tcp_echo)?;
    }
    for port in [UDP_ECHO_PORT, 443] {
        let socket = netns::udp_socket(&ns, at(ALLOWED_IP, port))?;
        tokio::spawn(udp_echo(state.clone(), socket));
    }
    Ok(())
}

fn v4(addr: SocketAddr) -> io::Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => Err(io::Error::other(format!("unexpected IPv6 address {a}"))),
    }
}

/// Accepts connections forever, counting each, and serves each on its own task.
fn accept_loop<F, Fut>(state: &Arc<State>, listener: TcpListener, serve: F) -> io::Result<()>
where
    F: Fn(Arc<State>, TcpStream, SocketAddrV4) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let local = v4(listener.local_addr()?)?;
    let state = state.clone();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _peer)) => {
                    state.count_connection(local);
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve(state.clone(), stream, local));
                }
                Err(e) => {
                    tracing::warn!(%local, error = %e, "test internet: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
    Ok(())
}

async fn tcp_echo(_state: Arc<State>, stream: TcpStream, _local: SocketAddrV4) {
    let (mut rx, mut tx) = stream.into_split();
    if tokio::io::copy(&mut rx, &mut tx).await.is_ok() {
        let _ = tx.shutdown().await;
    }
}

async fn udp_echo(state: Arc<State>, socket: UdpSocket) {
    let Ok(local) = socket.local_addr().and_then(v4) else { return };
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, peer)) => {
                state.count_datagram(local);
                let _ = socket.send_to(&buf[..n], peer).await;
            }
            Err(e) => {
                tracing::debug!(%local, error = %e, "test internet: UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
