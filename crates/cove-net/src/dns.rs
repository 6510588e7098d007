//! The policy DNS server of a sandbox (UDP and TCP on the gateway address, port 53), and the
//! host-side resolver the proxies use to dial allowed names.
//!
//! - custom: A queries for allowed names are forwarded upstream (answers in the always-denied set
//!   dropped, CNAME chain kept); AAAA/HTTPS/SVCB for allowed names get NODATA; other types
//!   REFUSED; names not allowed get NXDOMAIN without any upstream query.
//! - allow-all: everything is forwarded except AAAA/HTTPS/SVCB (NODATA); denied answers dropped.
//! - deny-all: REFUSED, never upstream.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use cove_api::sandbox::NetworkMode;
use simple_dns::rdata::RData;
use simple_dns::{Packet, PacketFlag, Question, CLASS, QCLASS, QTYPE, RCODE, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::decisions::Decision;
use crate::policy::{self, Policy};

/// Upstream query timeout.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Per-sandbox query budget (queries per second, also the burst).
pub const QUERY_RATE: f64 = 200.0;
/// Longest name (presentation form) we answer for.
pub const MAX_NAME: usize = 253;
const MAX_TCP_CONNS: usize = 32;
const MAX_INFLIGHT: usize = 128;
const TCP_IDLE: Duration = Duration::from_secs(10);

/// A token bucket.
pub struct RateLimit {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub fn new(rate: f64) -> RateLimit {
        RateLimit { rate, state: Mutex::new((rate, Instant::now())) }
    }

    pub fn take(&self) -> bool {
        let mut st = self.state.lock().expect("rate limit");
        let now = Instant::now();
        st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * self.rate).min(self.rate);
        st.1 = now;
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What a sandbox's DNS server needs.
pub struct DnsContext {
    pub sandbox: String,
    pub policy: Arc<ArcSwap<Policy>>,
    pub upstream: SocketAddr,
    pub limit: RateLimit,
}

fn header_only(query: &[u8], rcode: RCODE) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut out = query[..12].to_vec();
    // QR=1, keep opcode and RD; RA=1; rcode.
    out[2] = 0x80 | (query[2] & 0x79);
    out[3] = 0x80 | (rcode as u8 & 0x0f);
    out[4..12].fill(0);
    Some(out)
}

fn reply_to(query: &Packet<'_>, rcode: RCODE) -> Option<Vec<u8>> {
    let mut p = Packet::new_reply(query.id());
    p.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        p.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    *p.rcode_mut() = rcode;
    p.questions = query.questions.clone();
    p.build_bytes_vec_compressed().ok()
}

fn is_type(q: QTYPE, t: u16) -> bool {
    u16::from(q) == t
}

const T_A: u16 = 1;
const T_AAAA: u16 = 28;
const T_SVCB: u16 = 64;
const T_HTTPS: u16 = 65;

/// The query's name, normalised, if every label is a plain host label.
fn query_name(q: &Question<'_>) -> Option<String> {
    let mut out = String::new();
    for l in q.qname.get_labels() {
        let s = l.to_string();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return None;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(&s);
    }
    if out.is_empty() || out.len() > MAX_NAME {
        return None;
    }
    policy::normalize_host(&out)
}

/// Answers one DNS message from the guest according to `policy`. `None` = send nothing.
pub async fn answer(policy: &Policy, upstream: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let Ok(q) = Packet::parse(query) else {
        // Unknown query types fail to parse; refuse them.
        return header_only(query, RCODE::Refused);
    };
    if q.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    if q.opcode() != simple_dns::OPCODE::StandardQuery || q.questions.len() != 1 {
        return reply_to(&q, RCODE::NotImplemented);
    }
    let question = &q.questions[0];
    if question.qclass != QCLASS::CLASS(CLASS::IN) {
        return reply_to(&q, RCODE::Refused);
    }
    let mode = policy.mode();
    if mode == NetworkMode::DenyAll {
        Decision::DnsDeny.record();
        return reply_to(&q, RCODE::Refused);
    }
    let Some(name) = query_name(question) else {
        return reply_to(&q, if mode == NetworkMode::Custom { RCODE::NameError } else { RCODE::Refused });
    };
    let qtype = question.qtype;
    let v6_or_svc = [T_AAAA, T_SVCB, T_HTTPS].iter().any(|t| is_type(qtype, *t));
    match mode {
        NetworkMode::Custom => {
            if !policy.allows_name(&name) {
                tracing::debug!(name, "dns: name not allowed, NXDOMAIN");
                Decision::DnsDeny.record();
                return reply_to(&q, RCODE::NameError);
            }
            if v6_or_svc {
                return reply_to(&q, RCODE::NoError);
            }
            if !is_type(qtype, T_A) {
                return reply_to(&q, RCODE::Refused);
            }
        }
        _ => {
            if v6_or_svc {
                return reply_to(&q, RCODE::NoError);
            }
        }
    }
    Decision::DnsAllow.record();
    match forward(upstream, query).await {
        Ok(resp) => match filter_response(&resp, q.id(), mode == NetworkMode::Custom) {
            Some(out) => Some(out),
            None => reply_to(&q, RCODE::ServerFailure),
        },
        Err(e) => {
            tracing::debug!(name, error = %e, "dns: upstream failed");
            reply_to(&q, RCODE::ServerFailure)
        }
    }
}

fn record_allowed(rd: &RData<'_>, strict: bool) -> bool {
    match rd {
        RData::A(a) => !policy::denied(Ipv4Addr::from(a.address).into()),
        RData::CNAME(_) => true,
        RData::AAAA(_) | RData::HTTPS(_) | RData::SVCB(_) => false,
        _ => !strict,
    }
}

/// Drops denied A records, and all AAAA/HTTPS/SVCB; in strict (custom) mode keeps only A and
/// CNAME answers and no authority/additional data. Restores the guest's id.
fn filter_response(resp: &[u8], id: u16, strict: bool) -> Option<Vec<u8>> {
    let mut p = Packet::parse(resp).ok()?;
    p.set_id(id);
    p.answers.retain(|rr| record_allowed(&rr.rdata, strict));
    if strict {
        p.name_servers.clear();
        p.additional_records.clear();
    } else {
        p.name_servers.retain(|rr| record_allowed(&rr.rdata, false));
        p.additional_records.retain(|rr| record_allowed(&rr.rdata, false));
    }
    p.build_bytes_vec_compressed().ok()
}

/// Sends `query` upstream with a fresh random id (UDP, TCP on truncation); returns the response
/// with the id still the upstream one.
pub async fn forward(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    if query.len() < 12 {
        return Err(std::io::Error::other("short query"));
    }
    let mut msg = query.to_vec();
    let id: u16 = rand::random();
    msg[..2].copy_from_slice(&id.to_be_bytes());
    let resp = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        let bind: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("addr");
        let sock = UdpSocket::bind(bind).await?;
        sock.connect(upstream).await?;
        sock.send(&msg).await?;
        let mut buf = vec![0u8; 65535];
        loop {
            let n = sock.recv(&mut buf).await?;
            let r = &buf[..n];
            // Match the id and the question section.
            if n >= 12 && r[..2] == msg[..2] && r[2] & 0x80 != 0 && same_question(&msg, r) {
                if r[2] & 0x02 != 0 {
                    return forward_tcp(upstream, &msg).await;
                }
                return Ok(r.to_vec());
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream DNS timed out"))??;
    Ok(resp)
}

fn same_question(q: &[u8], r: &[u8]) -> bool {
    match (Packet::parse(q), Packet::parse(r)) {
        (Ok(q), Ok(r)) => {
            q.questions.len() == r.questions.len()
                && q.questions.iter().zip(r.questions.iter()).all(|(a, b)| {
                    a.qtype == b.qtype && a.qname.to_string().eq_ignore_ascii_case(&b.qname.to_string())
                })
        }
        // An unparsable response (or query) can't be checked: reject it.
        _ => false,
    }
}

async fn forward_tcp(upstream: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(upstream).await?;
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    s.write_all(&framed).await?;
    let len = s.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    if buf.len() < 12 || buf[..2] != msg[..2] {
        return Err(std::io::Error::other("mismatched DNS response"));
    }
    Ok(buf)
}

/// Resolves `name` to IPv4 addresses through `upstream`, dropping denied ones (host side, for
/// the proxies). Errors when nothing usable is left.
pub async fn resolve_a(upstream: SocketAddr, name: &str) -> std::io::Result<Vec<Ipv4Addr>> {
    let mut q = Packet::new_query(rand::random());
    q.set_flags(PacketFlag::RECURSION_DESIRED);
    let qname = simple_dns::Name::new(name).map_err(|e| std::io::Error::other(format!("bad name: {e}")))?;
    q.questions.push(Question::new(qname, TYPE::A.into(), CLASS::IN.into(), false));
    let bytes = q.build_bytes_vec().map_err(std::io::Error::other)?;
    let resp = forward(upstream, &bytes).await?;
    let p = Packet::parse(&resp).map_err(std::io::Error::other)?;
    if p.rcode() != RCODE::NoError {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{name}: DNS {:?}", p.rcode()),
        ));
    }
    let ips: Vec<Ipv4Addr> = p
        .answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .filter(|ip| !policy::denied((*ip).into()))
        .collect();
    if ips.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{name}: no permitted IPv4 address"),
        ));
    }
    Ok(ips)
}

async fn handle(ctx: &DnsContext, query: &[u8]) -> Option<Vec<u8>> {
    if !ctx.limit.take() {
        tracing::debug!(sandbox = %ctx.sandbox, "dns: rate limited");
        return header_only(query, RCODE::Refused);
    }
    let policy = ctx.policy.load_full();
    answer(&policy, ctx.upstream, query).await
}

/// Serves DNS over UDP until `stop` fires.
pub async fn serve_udp(sock: UdpSocket, ctx: Arc<DnsContext>, stop: CancellationToken) {
    let sock = Arc::new(sock);
    let inflight = Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT));
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!(error = %e, "dns: udp recv");
                    continue;
                }
            },
        };
        let Ok(permit) = inflight.clone().try_acquire_owned() else { continue };
        let query = buf[..n].to_vec();
        let (sock, ctx, stop) = (sock.clone(), ctx.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = stop.cancelled() => {}
                r = handle(&ctx, &query) => if let Some(resp) = r {
                    let resp = truncate_for_udp(resp, &query);
                    let _ = sock.send_to(&resp, peer).await;
                }
            }
        });
    }
}

/// Responses larger than the client's UDP size get TC set and no records.
fn truncate_for_udp(resp: Vec<u8>, query: &[u8]) -> Vec<u8> {
    let limit = Packet::parse(query)
        .ok()
        .and_then(|q| q.opt().map(|o| o.udp_packet_size as usize))
        .unwrap_or(512)
        .max(512);
    if resp.len() <= limit {
        return resp;
    }
    let mut out = match Packet::parse(&resp) {
        Ok(mut p) => {
            p.answers.clear();
            p.name_servers.clear();
            p.additional_records.clear();
            p.build_bytes_vec().unwrap_or_else(|_| resp[..12].to_vec())
        }
        Err(_) => resp[..12].to_vec(),
    };
    out[2] |= 0x02;
    out
}

/// Serves DNS over TCP (2-byte length framing) until `stop` fires.
pub async fn serve_tcp(listener: TcpListener, ctx: Arc<DnsContext>, stop: CancellationToken) {
    let conns = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNS));
    loop {
        let (mut s, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else { continue };
        let (ctx, stop) = (ctx.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let serve = async {
                loop {
                    let len = tokio::time::timeout(TCP_IDLE, s.read_u16()).await.ok()?.ok()? as usize;
                    let mut buf = vec![0u8; len];
                    tokio::time::timeout(TCP_IDLE, s.read_exact(&mut buf)).await.ok()?.ok()?;
                    if let Some(resp) = handle(&ctx, &buf).await {
                        let mut framed = (resp.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&resp);
                        s.write_all(&framed).await.ok()?;
                    }
                }
                #[allow(unreachable_code)]
                Some(())
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = serve => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cove_api::sandbox::{NetworkPolicy, TransformRule};
    use simple_dns::rdata::{A, AAAA, CNAME, TXT};
    use simple_dns::{Name, ResourceRecord};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A tiny upstream: answers every A query with CNAME + a public and a denied address,
    /// AAAA with an address, TXT with text. Counts queries.
    async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
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
                let qn = q.questions[0].qname.clone();
                let target = Name::new_unchecked("edge.cdn.example");
                match u16::from(q.questions[0].qtype) {
                    1 => {
                        r.answers.push(ResourceRecord::new(
                            qn,
                            CLASS::IN,
                            60,
                            RData::CNAME(CNAME(target.clone())),
                        ));
                        for ip in [Ipv4Addr::new(203, 0, 113, 7), Ipv4Addr::new(169, 254, 169, 254)] {
                            r.answers.push(ResourceRecord::new(
                                target.clone(),
                                CLASS::IN,
                                60,
                                RData::A(A { address: ip.into() }),
                            ));
                        }
                    }
                    28 => r.answers.push(ResourceRecord::new(
                        qn,
                        CLASS::IN,
                        60,
                        RData::AAAA(AAAA { address: 1 }),
                    )),
                    16 => r.answers.push(ResourceRecord::new(
                        qn,
                        CLASS::IN,
                        60,
                        RData::TXT(TXT::new().with_string("hello").unwrap()),
                    )),
                    _ => *r.rcode_mut() = RCODE::NameError,
                }
                let out = r.build_bytes_vec().unwrap();
                sock.send_to(&out, peer).await.unwrap();
            }
        });
        (addr, count)
    }

    fn query(name: &str, t: TYPE) -> Vec<u8> {
        let mut q = Packet::new_query(0x4242);
        q.set_flags(PacketFlag::RECURSION_DESIRED);
        q.questions.push(Question::new(Name::new_unchecked(name), t.into(), CLASS::IN.into(), false));
        q.build_bytes_vec().unwrap()
    }

    fn custom() -> Policy {
        Policy::compile(Some(&NetworkPolicy {
            mode: NetworkMode::Custom,
            allow_domains: vec!["allowed.test".into(), "*.wild.test".into()],
            allow_cidrs: vec![],
            transforms: vec![TransformRule {
                domain: "api.secret.test".into(),
                inject_headers: Default::default(),
                strip_headers: vec![],
            }],
        }))
        .unwrap()
    }

    fn parse(r: &[u8]) -> Packet<'_> {
        let p = Packet::parse(r).unwrap();
        assert_eq!(p.id(), 0x4242);
        assert!(p.has_flags(PacketFlag::RESPONSE));
        p
    }

    fn a_records(p: &Packet<'_>) -> Vec<Ipv4Addr> {
        p.answers
            .iter()
            .filter_map(|rr| match &rr.rdata {
                RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn custom_mode_answers() {
        let (up, count) = upstream().await;
        let p = custom();

        // Allowed A: forwarded, denied address dropped, CNAME kept.
        for name in ["allowed.test", "ALLOWED.test", "x.y.wild.test", "api.secret.test"] {
            let r = answer(&p, up, &query(name, TYPE::A)).await.unwrap();
            let r = parse(&r);
            assert_eq!(r.rcode(), RCODE::NoError, "{name}");
            assert_eq!(a_records(&r), vec![Ipv4Addr::new(203, 0, 113, 7)], "{name}");
            assert!(r.answers.iter().any(|rr| matches!(rr.rdata, RData::CNAME(_))));
        }
        let forwarded = count.load(Ordering::SeqCst);
        assert_eq!(forwarded, 4);

        // Not allowed: NXDOMAIN without upstream.
        for name in ["wild.test", "evil.test", "allowed.test.evil", "metadata.google.internal"] {
            let r = answer(&p, up, &query(name, TYPE::A)).await.unwrap();
            assert_eq!(parse(&r).rcode(), RCODE::NameError, "{name}");
        }
        // AAAA / HTTPS / SVCB for allowed names: NODATA; TXT: REFUSED.
        for t in [TYPE::AAAA, TYPE::HTTPS, TYPE::SVCB] {
            let r = answer(&p, up, &query("allowed.test", t)).await.unwrap();
            let r = parse(&r);
            assert_eq!(r.rcode(), RCODE::NoError);
            assert!(r.answers.is_empty());
            assert_eq!(r.questions.len(), 1);
        }
        let r = answer(&p, up, &query("allowed.test", TYPE::TXT)).await.unwrap();
        assert_eq!(parse(&r).rcode(), RCODE::Refused);
        let mut any = Packet::new_query(0x4242);
        any.questions.push(Question::new(
            Name::new_unchecked("allowed.test"),
            QTYPE::ANY,
            CLASS::IN.into(),
            false,
        ));
        let r = answer(&p, up, &any.build_bytes_vec().unwrap()).await.unwrap();
        assert_eq!(parse(&r).rcode(), RCODE::Refused);
        // A label with a dot in it must not pass for allowed.test.
        let mut odd = query("x.test", TYPE::A);
        // Replace the wire name: one label "allowed.test".
        let name_end = odd.len() - 4;
        let mut wire = vec![12u8];
        wire.extend_from_slice(b"allowed.test");
        wire.push(0);
        odd.splice(12..name_end, wire);
        let r = answer(&p, up, &odd).await.unwrap();
        assert_eq!(parse(&r).rcode(), RCODE::NameError);
        assert_eq!(count.load(Ordering::SeqCst), forwarded, "nothing else reached upstream");
    }

    #[tokio::test]
    async fn allow_all_and_deny_all() {
        let (up, count) = upstream().await;
        let all = Policy::compile(None).unwrap();
        let r = answer(&all, up, &query("anything.example", TYPE::A)).await.unwrap();
        assert_eq!(a_records(&parse(&r)), vec![Ipv4Addr::new(203, 0, 113, 7)]);
        let r = answer(&all, up, &query("anything.example", TYPE::TXT)).await.unwrap();
        assert_eq!(parse(&r).answers.len(), 1, "TXT forwarded in allow-all");
        let r = answer(&all, up, &query("anything.example", TYPE::AAAA)).await.unwrap();
        let r = parse(&r);
        assert_eq!(r.rcode(), RCODE::NoError);
        assert!(r.answers.is_empty());
        assert_eq!(count.load(Ordering::SeqCst), 2);

        let deny = Policy::deny_all();
        for t in [TYPE::A, TYPE::AAAA, TYPE::TXT] {
            let r = answer(&deny, up, &query("anything.example", t)).await.unwrap();
            assert_eq!(parse(&r).rcode(), RCODE::Refused);
        }
        assert_eq!(count.load(Ordering::SeqCst), 2, "deny-all never goes upstream");
    }

    #[tokio::test]
    async fn upstream_timeout_is_servfail_and_resolve_filters() {
        // A socket that never answers.
        let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let p = custom();
        let t = Instant::now();
        let r = answer(&p, dead.local_addr().unwrap(), &query("allowed.test", TYPE::A)).await.unwrap();
        assert_eq!(parse(&r).rcode(), RCODE::ServerFailure);
        assert!(t.elapsed() < Duration::from_secs(4));

        let (up, _) = upstream().await;
        assert_eq!(resolve_a(up, "x.example").await.unwrap(), vec![Ipv4Addr::new(203, 0, 113, 7)]);
        assert!(header_only(&[1, 2], RCODE::Refused).is_none());
    }

    #[test]
    fn rate_limit() {
        let l = RateLimit::new(5.0);
        assert!((0..5).all(|_| l.take()));
        assert!(!l.take());
    }
}
