//! The per-sandbox egress listeners: policy DNS ([`crate::dns`]), the HTTP proxy (port 80
//! traffic, decided per request on Host) and the TLS proxy (port 443 traffic, decided on the
//! ClientHello SNI: spliced to a name-dialed upstream, or terminated for transform domains by
//! [`crate::mitm`]). Every proxied connection is registered so that policy updates cut the flows
//! the new policy no longer allows.

pub mod flows;
pub mod hello;
mod http;
pub mod lend;
pub mod metadata;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use cove_api::sandbox::NetworkMode;
use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::addr;
use crate::ca::SandboxCa;
use crate::decisions::Decision;
use crate::dns::{self, DnsContext, RateLimit};
use crate::policy::{self, Policy};
use flows::{Flow, FlowKey, Flows};

/// Concurrent proxied flows per sandbox.
pub const MAX_FLOWS: usize = 1024;
/// Deadline for the guest's ClientHello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for connecting to an upstream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct EgressConfig {
    /// Resolver for allowed names (host side).
    pub upstream_dns: SocketAddr,
    /// Extra trust anchors for upstream TLS, on top of the host's native roots.
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl EgressConfig {
    /// Upstream DNS = the first nameserver of /etc/resolv.conf (port 53); extra roots from a
    /// PEM file if given.
    pub fn from_host(extra_ca_pem: Option<&Path>) -> anyhow::Result<Self> {
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let upstream_dns = first_nameserver(&conf)
            .ok_or_else(|| anyhow::anyhow!("no usable nameserver in /etc/resolv.conf"))?;
        let mut extra_roots = Vec::new();
        if let Some(path) = extra_ca_pem {
            let pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            for c in rustls_pemfile::certs(&mut pem.as_slice()) {
                extra_roots.push(c.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?);
            }
            anyhow::ensure!(!extra_roots.is_empty(), "{}: no certificates", path.display());
        }
        Ok(EgressConfig { upstream_dns, extra_roots })
    }
}

fn first_nameserver(conf: &str) -> Option<SocketAddr> {
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
}

/// State shared by every sandbox.
pub(crate) struct Shared {
    pub upstream_dns: SocketAddr,
    /// Upstream TLS client configs: ALPN http/1.1 only, and h2 + http/1.1.
    pub tls_h1: Arc<rustls::ClientConfig>,
    pub tls_h2: Arc<rustls::ClientConfig>,
    /// Answers of the metadata service, once the control plane has said where they come from.
    pub metadata: std::sync::OnceLock<Arc<dyn metadata::MetadataSource>>,
}

/// One attached sandbox.
pub(crate) struct Sandbox {
    pub id: String,
    pub policy: Arc<ArcSwap<Policy>>,
    pub ca: Arc<SandboxCa>,
    pub flows: Arc<Flows>,
    /// Stops the listeners; parent of every flow's token.
    pub stop: CancellationToken,
    pub shared: Arc<Shared>,
    /// Credentials lent to the credential proxy ([`lend`]).
    pub loans: Mutex<Vec<Arc<lend::Lent>>>,
    /// Session tokens of the metadata service ([`metadata`]).
    pub metadata_tokens: metadata::Tokens,
}

/// Where a proxied connection goes.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Name(String),
    Ip(Ipv4Addr),
}

/// Whether the policy lets a connection go to `ip` by address: allow_cidrs in custom mode,
/// anything not denied in allow-all, nothing in deny-all.
pub fn ip_allowed(p: &Policy, ip: Ipv4Addr) -> bool {
    match p.mode() {
        NetworkMode::AllowAll => !policy::denied(ip.into()),
        NetworkMode::DenyAll => false,
        NetworkMode::Custom => p.allows_ip(ip.into()),
    }
}

pub struct Egress {
    shared: Arc<Shared>,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
}

impl Egress {
    pub fn new(cfg: EgressConfig) -> anyhow::Result<Arc<Egress>> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        for c in cfg.extra_roots {
            roots.add(c)?;
        }
        tracing::debug!(native = added, total = roots.len(), "egress: upstream trust roots");
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let client = |alpn: &[&[u8]]| -> anyhow::Result<Arc<rustls::ClientConfig>> {
            let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(c))
        };
        let shared = Arc::new(Shared {
            upstream_dns: cfg.upstream_dns,
            tls_h1: client(&[b"http/1.1"])?,
            tls_h2: client(&[b"h2", b"http/1.1"])?,
            metadata: std::sync::OnceLock::new(),
        });
        Ok(Arc::new(Egress { shared, sandboxes: Mutex::new(HashMap::new()) }))
    }

    /// Starts this sandbox's listeners inside namespace `netns`: DNS udp+tcp on GATEWAY:53, the
    /// HTTP proxy on GATEWAY:15080 and the TLS proxy on GATEWAY:15443 (bound in every mode, so a
    /// policy update can switch to custom without rebinding). Replaces an earlier attach of the
    /// same id (stopping its listeners and flows first).
    pub async fn attach(
        self: &Arc<Self>,
        id: &str,
        netns: &Path,
        policy: Policy,
        ca: SandboxCa,
    ) -> io::Result<()> {
        self.detach(id);
        let gw = IpAddr::V4(addr::GATEWAY_IP);
        let (udp, dns_tcp, http_l, tls_l, lend_l, meta_l) = bind_all(netns, gw).await?;
        let sb = Arc::new(Sandbox {
            id: id.to_string(),
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            ca: Arc::new(ca),
            flows: Flows::new(MAX_FLOWS),
            stop: CancellationToken::new(),
            shared: self.shared.clone(),
            loans: Mutex::default(),
            metadata_tokens: Default::default(),
        });
        let ctx = Arc::new(DnsContext {
            sandbox: id.to_string(),
            policy: sb.policy.clone(),
            upstream: self.shared.upstream_dns,
            limit: RateLimit::new(dns::QUERY_RATE),
        });
        tokio::spawn(dns::serve_udp(udp, ctx.clone(), sb.stop.clone()));
        tokio::spawn(dns::serve_tcp(dns_tcp, ctx, sb.stop.clone()));
        tokio::spawn(accept_loop(sb.clone(), http_l, Proxy::Http));
        tokio::spawn(accept_loop(sb.clone(), tls_l, Proxy::Tls));
        tokio::spawn(accept_loop(sb.clone(), lend_l, Proxy::Lend));
        tokio::spawn(accept_loop(sb.clone(), meta_l, Proxy::Metadata));
        tracing::info!(sandbox = id, netns = %netns.display(), mode = ?sb.policy.load().mode(), "egress attached");
        if let Some(old) = self.sandboxes.lock().expect("sandboxes").insert(id.to_string(), sb) {
            stop(&old);
        }
        Ok(())
    }

    /// Swaps the policy. DNS answers and new decisions use it at once; proxied flows it no longer
    /// allows are cut before this returns; MITM connections re-check every request.
    pub fn update(&self, id: &str, policy: Policy) {
        let Some(sb) = self.sandboxes.lock().expect("sandboxes").get(id).cloned() else {
            tracing::warn!(sandbox = id, "egress update for a sandbox that is not attached");
            return;
        };
        sb.policy.store(Arc::new(policy));
        let p = sb.policy.load_full();
        let cut = sb.flows.cut_where(|k| k.allowed_by(&p));
        tracing::info!(sandbox = id, mode = ?p.mode(), cut, "egress policy updated");
    }

    /// Where the metadata service's answers come from (set once, by the control plane).
    pub fn set_metadata_source(&self, source: Arc<dyn metadata::MetadataSource>) {
        if self.shared.metadata.set(source).is_err() {
            tracing::warn!("the metadata source was already set; keeping the first");
        }
    }

    /// Lends credentials to the sandbox's credential proxy until the guard is dropped; `None`
    /// when the sandbox has no network attached.
    pub fn lend(&self, id: &str, loan: lend::Loan) -> Option<lend::LoanGuard> {
        let sb = self.sandboxes.lock().expect("sandboxes").get(id).cloned()?;
        Some(lend::lend(&sb, loan))
    }

    /// Stops the listeners and cuts every flow of the sandbox.
    pub fn detach(&self, id: &str) {
        if let Some(sb) = self.sandboxes.lock().expect("sandboxes").remove(id) {
            stop(&sb);
            tracing::info!(sandbox = id, "egress detached");
        }
    }

    /// Number of live proxied flows of a sandbox (for tests and metrics).
    pub fn flow_count(&self, id: &str) -> usize {
        self.sandboxes.lock().expect("sandboxes").get(id).map(|s| s.flows.len()).unwrap_or(0)
    }
}

fn stop(sb: &Sandbox) {
    sb.flows.cut_all();
    sb.stop.cancel();
}

type Listeners = (tokio::net::UdpSocket, TcpListener, TcpListener, TcpListener, TcpListener, TcpListener);

/// Binds the sandbox's sockets (DNS over UDP and TCP, the HTTP, TLS and credential proxies,
/// the metadata service), retrying briefly while a replaced attach's sockets are closing.
async fn bind_all(netns: &Path, gw: IpAddr) -> io::Result<Listeners> {
    let mut attempt = 0;
    loop {
        let r = (|| -> io::Result<Listeners> {
            Ok((
                crate::netns::udp_socket(netns, SocketAddr::new(gw, addr::DNS_PORT))?,
                crate::netns::tcp_listener(netns, SocketAddr::new(gw, addr::DNS_PORT))?,
                crate::netns::tcp_listener(netns, SocketAddr::new(gw, addr::HTTP_PROXY_PORT))?,
                crate::netns::tcp_listener(netns, SocketAddr::new(gw, addr::TLS_PROXY_PORT))?,
                crate::netns::tcp_listener(netns, SocketAddr::new(gw, addr::CREDENTIAL_PROXY_PORT))?,
                crate::netns::tcp_listener(netns, SocketAddr::new(gw, addr::METADATA_PORT))?,
            ))
        })();
        match r {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < 40 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Proxy {
    Http,
    Tls,
    Lend,
    Metadata,
}

async fn accept_loop(sb: Arc<Sandbox>, listener: TcpListener, kind: Proxy) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = sb.stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!(sandbox = %sb.id, error = %e, "egress accept");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Some(flow) = sb.flows.register(&stream, &sb.stop) else {
            tracing::warn!(sandbox = %sb.id, "egress: too many flows, refusing");
            reset(stream);
            continue;
        };
        let flow = Arc::new(flow);
        let sb = sb.clone();
        tokio::spawn(async move {
            let cancel = flow.cancel.clone();
            let work = async {
                match kind {
                    Proxy::Tls => handle_tls(sb.clone(), flow.clone(), stream).await,
                    Proxy::Http => http::serve(sb.clone(), flow.clone(), stream).await,
                    Proxy::Lend => lend::serve(sb.clone(), flow.clone(), stream).await,
                    Proxy::Metadata => metadata::serve(sb.clone(), flow.clone(), stream).await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => tracing::debug!(sandbox = %sb.id, %peer, "egress: flow cut"),
                _ = work => {}
            }
        });
    }
}

/// The guest's destination before the redirect.
pub(crate) fn original_dst(s: &TcpStream) -> Option<SocketAddrV4> {
    let sa = getsockopt(s, sockopt::OriginalDst).ok()?;
    Some(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)), u16::from_be(sa.sin_port)))
}

/// Closes with RST.
/// Whether `ip` is an address of this host (in the runner's namespace): binding to it works
/// exactly when it is.
pub fn is_host_address(ip: Ipv4Addr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

pub(crate) fn reset(s: TcpStream) {
    let _ = setsockopt(&s, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 });
    drop(s);
}

/// Connects to `target` (a name is resolved through the upstream resolver, denied addresses
/// dropped, the first survivors tried in order; never a second lookup) and registers the
/// upstream socket with the flow.
pub(crate) async fn dial(sb: &Sandbox, target: &Target, port: u16, flow: &Flow) -> io::Result<TcpStream> {
    let ips = match target {
        Target::Name(n) => dns::resolve_a(sb.shared.upstream_dns, n).await?,
        Target::Ip(ip) if !policy::denied((*ip).into()) && !is_host_address(*ip) => vec![*ip],
        Target::Ip(ip) => {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{ip} is denied")))
        }
    };
    let mut last = io::Error::other("no address");
    // The proxy dials from the host: an address of the host itself would reach services no
    // sandbox may see (the API, sshd). The kernel path refuses those in the host table; here
    // the same rule holds for names that resolve to them.
    for ip in ips.into_iter().filter(|ip| !is_host_address(*ip)).take(3) {
        let addr = SocketAddr::from((ip, port));
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                flow.add_socket(&s);
                let _ = s.set_nodelay(true);
                tracing::debug!(sandbox = %sb.id, ?target, %addr, "egress: upstream connected");
                return Ok(s);
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, format!("connect {addr} timed out")),
        }
    }
    Err(last)
}

async fn handle_tls(sb: Arc<Sandbox>, flow: Arc<Flow>, mut guest: TcpStream) {
    let Some(dst) = original_dst(&guest) else {
        tracing::debug!(sandbox = %sb.id, "tls: no original destination");
        return reset(guest);
    };
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, hello::read_client_hello(&mut guest)).await {
        Ok(Ok(h)) => Some(h),
        Ok(Err(e)) => {
            tracing::debug!(sandbox = %sb.id, %dst, error = %e, "tls: no usable ClientHello");
            None
        }
        Err(_) => {
            tracing::debug!(sandbox = %sb.id, %dst, "tls: ClientHello deadline");
            return reset(guest);
        }
    };
    let policy = sb.policy.load_full();
    let sni = hello.as_ref().and_then(|h| h.sni.clone());
    let name = sni.as_deref().filter(|n| n.parse::<Ipv4Addr>().is_err());
    // Decide.
    let (key, target, mitm) = match name {
        Some(n) if policy.allows_name(n) => {
            (FlowKey::Name(n.to_string()), Target::Name(n.to_string()), policy.transform_for(n).is_some())
        }
        _ if ip_allowed(&policy, *dst.ip()) => (FlowKey::Ip(*dst.ip()), Target::Ip(*dst.ip()), false),
        _ => {
            tracing::info!(sandbox = %sb.id, sni = sni.as_deref().unwrap_or("-"), %dst, decision = "deny", "tls");
            Decision::TlsDeny.record();
            return reset(guest);
        }
    };
    let Some(hello) = hello else {
        // Not TLS: nothing to judge or replay. (Addresses in allow_cidrs never get here: the
        // kernel forwards them before the redirect.)
        return reset(guest);
    };
    if !flow.decide(key.clone(), &sb.policy) {
        return reset(guest);
    }
    if mitm {
        let sni = name.expect("mitm needs a name").to_string();
        tracing::debug!(sandbox = %sb.id, sni, %dst, decision = "mitm", "tls");
        Decision::TlsTerminate.record();
        let guest = hello::Prefixed::new(hello.recorded, guest);
        return crate::mitm::serve(sb.clone(), flow, guest, sni, dst.port(), None).await;
    }
    tracing::debug!(sandbox = %sb.id, sni = sni.as_deref().unwrap_or("-"), %dst, decision = "splice", ?target, "tls");
    Decision::TlsSplice.record();
    let mut up = match dial(&sb, &target, dst.port(), &flow).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(sandbox = %sb.id, ?target, error = %e, "tls: upstream unreachable");
            return reset(guest);
        }
    };
    if up.write_all(&hello.recorded).await.is_err() {
        return reset(guest);
    }
    let _ = guest.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut guest, &mut up).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_addresses_are_recognised() {
        assert!(is_host_address(Ipv4Addr::LOCALHOST));
        assert!(!is_host_address(Ipv4Addr::new(203, 0, 113, 99)));
        // Every address on this host's interfaces (`ip -4 -o addr`) counts.
        let out = std::process::Command::new("ip").args(["-4", "-o", "addr"]).output().unwrap();
        for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Some(Ok(ip)) = word.split_once('/').map(|(ip, _)| ip.parse::<Ipv4Addr>()) {
                assert!(is_host_address(ip), "{ip}");
            }
        }
    }
}
