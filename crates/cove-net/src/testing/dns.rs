//! The authoritative-looking DNS server: A records from the zone, NXDOMAIN for the rest.

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, QTYPE, RCODE, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::{lock, normalize, State, DNS_TTL};

/// Answers `query`; `None` when it is not a query worth answering.
fn answer(state: &State, query: &[u8]) -> Option<Vec<u8>> {
    let query = Packet::parse(query).ok()?;
    if query.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    let mut reply = Packet::new_reply(query.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::RECURSION_AVAILABLE);
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    for question in &query.questions {
        let name = normalize(&question.qname.to_string());
        let qtype = question.qtype;
        lock(&state.dns_log).push((name.clone(), u16::from(qtype)));
        reply.questions.push(question.clone());
        match state.lookup(&name) {
            None => *reply.rcode_mut() = RCODE::NameError,
            Some(ip) if matches!(qtype, QTYPE::TYPE(TYPE::A) | QTYPE::ANY) => {
                reply.answers.push(ResourceRecord::new(
                    question.qname.clone(),
                    CLASS::IN,
                    DNS_TTL,
                    RData::A(A::from(ip)),
                ));
            }
            Some(_) => {}
        }
    }
    reply.build_bytes_vec_compressed().ok()
}

pub(super) async fn serve_udp(state: Arc<State>, socket: UdpSocket) {
    let mut buf = vec![0u8; 4096];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, peer)) => {
                if let Some(reply) = answer(&state, &buf[..n]) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "test internet: DNS receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// DNS over TCP: length-prefixed messages, as many as the client sends.
pub(super) async fn serve_tcp(state: Arc<State>, mut stream: TcpStream, _local: SocketAddrV4) {
    loop {
        let Ok(len) = stream.read_u16().await else { return };
        let mut query = vec![0u8; usize::from(len)];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        let Some(reply) = answer(&state, &query) else { return };
        let Ok(len) = u16::try_from(reply.len()) else { return };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&reply);
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}
