//! Credentials lent for one command: the credential proxy.
//!
//! When the API is given credentials for a git remote, the guest never sees them. The control
//! plane lends them here for as long as the one git command runs ([`crate::egress::Egress::lend`]);
//! the guest's git is told to use `http://GATEWAY:CREDENTIAL_PROXY_PORT` as its HTTP proxy. This
//! proxy takes `CONNECT` only to a host and port something is lent for, only while the sandbox's
//! policy allows that name, ends the guest's TLS with a leaf of the sandbox's CA (as for a
//! transform domain), and adds `Authorization` to the requests whose path lies under the
//! repository's. Upstream is dialed by name and verified against the host's roots. When the
//! loan is returned (its guard dropped) the entry goes, and requests on a connection still open
//! get 403.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::flows::{Flow, FlowKey};
use super::hello::Prefixed;
use super::Sandbox;

/// Longest request head the proxy reads.
const MAX_HEAD: usize = 8 << 10;
/// Deadline for the guest's `CONNECT`.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Credentials for one remote: `Authorization` for requests to `https://host:port` whose path
/// starts with `path_prefix`.
pub struct Loan {
    pub host: String,
    pub port: u16,
    /// The repository's path with a trailing `/` (`/org/repo.git/`).
    pub path_prefix: String,
    /// Marked sensitive: never printed by `http`'s `Debug`.
    pub authorization: HeaderValue,
}

impl std::fmt::Debug for Loan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loan")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("path_prefix", &self.path_prefix)
            .field("authorization", &"[redacted]")
            .finish()
    }
}

impl Loan {
    /// HTTP basic credentials for the repository at `url` (`https://host[:port]/path`).
    pub fn basic(url: &str, username: &str, password: &str) -> Option<Loan> {
        use base64::Engine as _;
        let rest = url.strip_prefix("https://")?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = crate::mitm::split_authority(authority)?;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        let mut authorization = HeaderValue::from_str(&format!("Basic {token}")).ok()?;
        authorization.set_sensitive(true);
        let path = path.split(['?', '#']).next().unwrap_or_default().trim_end_matches('/');
        Some(Loan { host, port: port.unwrap_or(443), path_prefix: format!("{path}/"), authorization })
    }
}

/// A loan in force.
pub(crate) struct Lent {
    pub loan: Loan,
    /// Cancelled when the loan is returned.
    pub returned: CancellationToken,
}

/// Keeps a loan in force; dropping it returns the loan.
pub struct LoanGuard {
    sandbox: Weak<Sandbox>,
    lent: Arc<Lent>,
}

impl Drop for LoanGuard {
    fn drop(&mut self) {
        self.lent.returned.cancel();
        if let Some(sb) = self.sandbox.upgrade() {
            lock(&sb.loans).retain(|l| !Arc::ptr_eq(l, &self.lent));
        }
        tracing::debug!(host = %self.lent.loan.host, "credential loan returned");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn lend(sb: &Arc<Sandbox>, loan: Loan) -> LoanGuard {
    tracing::info!(sandbox = %sb.id, host = %loan.host, port = loan.port, path = %loan.path_prefix, "credentials lent");
    let lent = Arc::new(Lent { loan, returned: CancellationToken::new() });
    lock(&sb.loans).push(lent.clone());
    LoanGuard { sandbox: Arc::downgrade(sb), lent }
}

/// Serves one connection to the credential proxy.
pub(crate) async fn serve(sb: Arc<Sandbox>, flow: Arc<Flow>, mut guest: TcpStream) {
    let (head, rest) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut guest)).await {
        Ok(Ok(v)) => v,
        _ => return,
    };
    let target = head.strip_prefix("CONNECT ").and_then(|r| r.split(' ').next());
    let Some((host, port)) = target.and_then(crate::mitm::split_authority) else {
        return refuse(guest, "405 Method Not Allowed", "this proxy only takes CONNECT host:port\n").await;
    };
    let port = port.unwrap_or(443);
    let lent = lock(&sb.loans).iter().find(|l| l.loan.host == host && l.loan.port == port).cloned();
    let Some(lent) = lent else {
        tracing::info!(sandbox = %sb.id, host, port, "credential proxy: nothing lent for this host");
        return refuse(guest, "403 Forbidden", "no credentials are lent for this host\n").await;
    };
    if !sb.policy.load().allows_name(&host) || !flow.decide(FlowKey::Name(host.clone()), &sb.policy) {
        tracing::info!(sandbox = %sb.id, host, "credential proxy: name not allowed by the policy");
        return refuse(guest, "403 Forbidden", "this host is not allowed by the sandbox network policy\n")
            .await;
    }
    if guest.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await.is_err() {
        return;
    }
    crate::mitm::serve(sb, flow, Prefixed::new(rest, guest), host, port, Some(lent)).await;
}

/// Reads up to the end of the request head: its first line, and what came after the head.
async fn read_head(s: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let first = buf[..end].split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(first).trim_end().to_string();
            return Ok((line, buf[end + 4..].to_vec()));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too long"));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn refuse(mut guest: TcpStream, status: &str, body: &str) {
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = guest.write_all(answer.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_loans_cover_the_repository_only() {
        let l = Loan::basic("https://Git.Test:8443/org/repo.git/?x=1", "u", "p").unwrap();
        assert_eq!((l.host.as_str(), l.port, l.path_prefix.as_str()), ("git.test", 8443, "/org/repo.git/"));
        assert_eq!(l.authorization.to_str().unwrap(), "Basic dTpw");
        assert!(l.authorization.is_sensitive());
        assert!(!format!("{l:?}").contains("dTpw"));
        assert_eq!(Loan::basic("https://git.test", "u", "p").unwrap().path_prefix, "/");
        assert!(Loan::basic("http://git.test/r", "u", "p").is_none());
        assert!(Loan::basic("https://u@git.test/r", "u", "p").is_none());
    }
}
