//! Counts of the egress decisions this process has made, for the server's metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// What the host decided about one guest lookup, connection or request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A DNS question sent upstream.
    DnsAllow,
    /// A DNS question answered NXDOMAIN or REFUSED by the policy.
    DnsDeny,
    /// A TLS connection spliced to its allowed destination.
    TlsSplice,
    /// A TLS connection terminated on the host (its domain has header transforms).
    TlsTerminate,
    /// A TLS connection reset: neither its name nor its address is allowed.
    TlsDeny,
    /// A plain HTTP request passed upstream.
    HttpAllow,
    /// A plain HTTP request answered 403 by the host.
    HttpDeny,
}

impl Decision {
    pub const ALL: [Decision; 7] = [
        Decision::DnsAllow,
        Decision::DnsDeny,
        Decision::TlsSplice,
        Decision::TlsTerminate,
        Decision::TlsDeny,
        Decision::HttpAllow,
        Decision::HttpDeny,
    ];

    /// (protocol, decision), as the metrics label them.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Decision::DnsAllow => ("dns", "allow"),
            Decision::DnsDeny => ("dns", "deny"),
            Decision::TlsSplice => ("tls", "allow"),
            Decision::TlsTerminate => ("tls", "terminate"),
            Decision::TlsDeny => ("tls", "deny"),
            Decision::HttpAllow => ("http", "allow"),
            Decision::HttpDeny => ("http", "deny"),
        }
    }

    pub fn count(self) -> u64 {
        COUNTS[self as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn record(self) {
        COUNTS[self as usize].fetch_add(1, Ordering::Relaxed);
    }
}

static COUNTS: [AtomicU64; Decision::ALL.len()] = [const { AtomicU64::new(0) }; Decision::ALL.len()];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_decision_has_its_own_counter() {
        let before: Vec<u64> = Decision::ALL.iter().map(|d| d.count()).collect();
        Decision::TlsDeny.record();
        for (d, b) in Decision::ALL.iter().zip(before) {
            let want = if *d == Decision::TlsDeny { b + 1 } else { b };
            // Other tests may count too, never down.
            assert!(d.count() >= want, "{d:?}");
        }
        assert!(Decision::ALL.iter().enumerate().all(|(i, d)| *d as usize == i));
    }
}
