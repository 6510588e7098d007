//! The compiled egress policy of one sandbox: which names and addresses it may reach, and which
//! header transforms apply to which domains. Immutable once compiled; updates swap a new one in.

use std::net::{IpAddr, Ipv4Addr};

use cove_api::sandbox::{NetworkMode, NetworkPolicy};
use ipnet::Ipv4Net;

/// Always denied as an upstream destination, in every mode (IPv4; IPv6 is denied entirely).
pub const DENIED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
];

/// Whether `ip` may never be an upstream destination.
pub fn denied(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => denied_v4(v4),
        // A v4-mapped address is really a v4 address; every other v6 form is denied.
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_none_or(denied_v4),
    }
}

fn denied_v4(ip: Ipv4Addr) -> bool {
    denied_nets().iter().any(|n| n.contains(&ip))
}

fn denied_nets() -> &'static [Ipv4Net] {
    static NETS: std::sync::OnceLock<Vec<Ipv4Net>> = std::sync::OnceLock::new();
    NETS.get_or_init(|| DENIED_V4.iter().map(|s| s.parse().expect("valid denied CIDR")).collect())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

/// A domain pattern, normalised: exact name or `*.base` (any depth below base, apex excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    Exact(String),
    Wildcard(String),
}

/// Header rewriting for one domain (HTTPS only for injection).
#[derive(Debug, Clone)]
pub struct Transform {
    pub domain: DomainPattern,
    /// Header names (lowercase) and values to set, replacing any the guest sent.
    pub inject: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Header names (lowercase) to remove.
    pub strip: Vec<http::HeaderName>,
}

impl DomainPattern {
    /// Parses `a.b.c` or `*.b.c` (case-insensitive, one trailing dot ignored).
    pub fn parse(raw: &str) -> Result<DomainPattern, String> {
        let s = raw.trim().to_ascii_lowercase();
        let s = s.strip_suffix('.').unwrap_or(&s).to_string();
        if s == "*" {
            return Err("a bare * is not allowed; use mode allow-all".into());
        }
        let (wild, base) = match s.strip_prefix("*.") {
            Some(b) => (true, b.to_string()),
            None => (false, s.clone()),
        };
        if !cove_api::sandbox::valid_domain_pattern(&base) || base.contains('*') {
            return Err("is not a domain name or *.domain pattern".into());
        }
        if wild && !base.contains('.') {
            return Err(format!("wildcard over a top-level domain (*.{base}) is not allowed"));
        }
        if base.parse::<Ipv4Addr>().is_ok() {
            return Err("is an IP address, not a domain name".into());
        }
        Ok(if wild { DomainPattern::Wildcard(base) } else { DomainPattern::Exact(base) })
    }

    /// `name` must already be normalised with [`normalize_host`].
    pub fn matches(&self, name: &str) -> bool {
        match self {
            DomainPattern::Exact(e) => e == name,
            DomainPattern::Wildcard(base) => {
                name.len() > base.len() + 1
                    && name.ends_with(base.as_str())
                    && name.as_bytes()[name.len() - base.len() - 1] == b'.'
            }
        }
    }

    /// Higher is more specific: exact beats every wildcard, longer wildcard bases beat shorter.
    fn specificity(&self) -> usize {
        match self {
            DomainPattern::Exact(_) => usize::MAX,
            DomainPattern::Wildcard(base) => base.len(),
        }
    }
}

/// Lowercases a host name and strips one trailing dot. `None` for names that can't be a DNS
/// name we would ever allow (empty, too long, bad characters).
pub fn normalize_host(host: &str) -> Option<String> {
    let h = host.to_ascii_lowercase();
    let h = h.strip_suffix('.').unwrap_or(&h);
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then(|| h.to_string())
}

/// Headers a transform may not name: hop-by-hop, `host`, `content-length`, pseudo-headers.
fn forbidden_header(name: &str) -> bool {
    name.starts_with(':')
        || crate::mitm::HOP_BY_HOP
            .iter()
            .chain(&["host", "content-length"])
            .any(|h| name.eq_ignore_ascii_case(h))
}

#[derive(Debug, Clone)]
pub struct Policy {
    mode: NetworkMode,
    domains: Vec<DomainPattern>,
    cidrs: Vec<Ipv4Net>,
    transforms: Vec<Transform>,
}

fn err(field: String, message: impl Into<String>) -> PolicyError {
    PolicyError { field, message: message.into() }
}

impl Policy {
    /// `None` = allow-all.
    pub fn compile(p: Option<&NetworkPolicy>) -> Result<Policy, PolicyError> {
        let Some(p) = p else {
            return Ok(Policy::allow_all());
        };
        let f = "network_policy";
        let mut policy =
            Policy { mode: p.mode, domains: Vec::new(), cidrs: Vec::new(), transforms: Vec::new() };
        if p.mode != NetworkMode::Custom
            && (!p.allow_domains.is_empty() || !p.allow_cidrs.is_empty() || !p.transforms.is_empty())
        {
            return Err(err(
                format!("{f}.mode"),
                "allow_domains, allow_cidrs and transforms need mode custom",
            ));
        }
        for (i, d) in p.allow_domains.iter().enumerate() {
            let pat = DomainPattern::parse(d).map_err(|m| err(format!("{f}.allow_domains[{i}]"), m))?;
            policy.domains.push(pat);
        }
        for (i, c) in p.allow_cidrs.iter().enumerate() {
            let field = format!("{f}.allow_cidrs[{i}]");
            let (addr, len) = cove_api::sandbox::parse_ipv4_cidr(c.trim())
                .ok_or_else(|| err(field.clone(), "is not an IPv4 CIDR such as 203.0.113.0/24"))?;
            let net = Ipv4Net::new(addr, len).map_err(|_| err(field.clone(), "invalid prefix length"))?;
            if net.network() != addr {
                return Err(err(field, format!("has host bits set (did you mean {}?)", net.trunc())));
            }
            if let Some(hit) = denied_nets().iter().find(|d| d.contains(&net.network()) || net.contains(*d)) {
                return Err(err(field, format!("overlaps the always-denied range {hit}")));
            }
            policy.cidrs.push(net);
        }
        for (i, t) in p.transforms.iter().enumerate() {
            let field = format!("{f}.transforms[{i}]");
            let domain = DomainPattern::parse(&t.domain).map_err(|m| err(format!("{field}.domain"), m))?;
            let mut inject: Vec<(http::HeaderName, http::HeaderValue)> = Vec::new();
            for (name, value) in &t.inject_headers {
                let hn = header_name(name, &format!("{field}.inject_headers"))?;
                let mut hv = http::HeaderValue::from_str(value).map_err(|_| {
                    err(
                        format!("{field}.inject_headers"),
                        format!("value of {name:?} is not a valid header value"),
                    )
                })?;
                hv.set_sensitive(true);
                if inject.iter().any(|(n, _)| *n == hn) {
                    return Err(err(format!("{field}.inject_headers"), format!("{name:?} is given twice")));
                }
                inject.push((hn, hv));
            }
            let mut strip = Vec::new();
            for name in &t.strip_headers {
                strip.push(header_name(name, &format!("{field}.strip_headers"))?);
            }
            if policy.transforms.iter().any(|o: &Transform| o.domain == domain) {
                return Err(err(format!("{field}.domain"), "another transform has the same domain"));
            }
            policy.transforms.push(Transform { domain, inject, strip });
        }
        Ok(policy)
    }

    pub fn allow_all() -> Policy {
        Policy { mode: NetworkMode::AllowAll, domains: Vec::new(), cidrs: Vec::new(), transforms: Vec::new() }
    }

    pub fn deny_all() -> Policy {
        Policy { mode: NetworkMode::DenyAll, domains: Vec::new(), cidrs: Vec::new(), transforms: Vec::new() }
    }

    pub fn mode(&self) -> NetworkMode {
        self.mode
    }

    pub fn allow_cidrs(&self) -> &[Ipv4Net] {
        &self.cidrs
    }

    pub fn transforms(&self) -> &[Transform] {
        &self.transforms
    }

    /// Custom: allow_domains ∪ transform domains; allow-all: every well-formed name; deny-all: none.
    /// IP literals are never "names".
    pub fn allows_name(&self, host: &str) -> bool {
        let Some(h) = normalize_host(host) else { return false };
        if h.parse::<Ipv4Addr>().is_ok() {
            return false;
        }
        match self.mode {
            NetworkMode::AllowAll => true,
            NetworkMode::DenyAll => false,
            NetworkMode::Custom => {
                self.domains.iter().any(|d| d.matches(&h))
                    || self.transforms.iter().any(|t| t.domain.matches(&h))
            }
        }
    }

    /// Whether `ip` is inside allow_cidrs (custom mode only) and not denied.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        match (self.mode, ip) {
            (NetworkMode::Custom, IpAddr::V4(v4)) => {
                !denied(ip) && self.cidrs.iter().any(|n| n.contains(&v4))
            }
            _ => false,
        }
    }

    /// The most specific transform matching `host` (exact > longest wildcard base). None in deny-all.
    pub fn transform_for(&self, host: &str) -> Option<&Transform> {
        if self.mode == NetworkMode::DenyAll {
            return None;
        }
        let h = normalize_host(host)?;
        self.transforms.iter().filter(|t| t.domain.matches(&h)).max_by_key(|t| t.domain.specificity())
    }
}

fn header_name(name: &str, field: &str) -> Result<http::HeaderName, PolicyError> {
    if forbidden_header(name) {
        return Err(err(field.to_string(), format!("{name:?} is a hop-by-hop, host or pseudo header")));
    }
    http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| err(field.to_string(), format!("{name:?} is not a valid header name")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cove_api::sandbox::TransformRule;
    use std::collections::BTreeMap;

    fn custom(domains: &[&str], cidrs: &[&str], transforms: Vec<TransformRule>) -> NetworkPolicy {
        NetworkPolicy {
            mode: NetworkMode::Custom,
            allow_domains: domains.iter().map(|s| s.to_string()).collect(),
            allow_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            transforms,
        }
    }

    fn tr(domain: &str, inject: &[(&str, &str)], strip: &[&str]) -> TransformRule {
        TransformRule {
            domain: domain.into(),
            inject_headers: inject
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            strip_headers: strip.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn domain_matching() {
        let p = Policy::compile(Some(&custom(&["Example.COM.", "*.api.test.org"], &[], vec![]))).unwrap();
        assert!(p.allows_name("example.com"));
        assert!(p.allows_name("EXAMPLE.com."));
        assert!(!p.allows_name("www.example.com"));
        assert!(!p.allows_name("example.com.evil"));
        assert!(!p.allows_name("api.test.org"), "apex excluded");
        assert!(p.allows_name("a.api.test.org"));
        assert!(p.allows_name("x.y.z.API.test.org."), "any depth");
        assert!(!p.allows_name("xapi.test.org"));
        assert!(!p.allows_name(""));
        assert!(!p.allows_name("example.com.."));
        assert!(!p.allows_name("1.2.3.4"));
    }

    #[test]
    fn modes() {
        let all = Policy::compile(None).unwrap();
        assert_eq!(all.mode(), NetworkMode::AllowAll);
        assert!(all.allows_name("anything.example"));
        assert!(!all.allows_name("10.0.0.1"));
        let deny = Policy::compile(Some(&NetworkPolicy {
            mode: NetworkMode::DenyAll,
            allow_domains: vec![],
            allow_cidrs: vec![],
            transforms: vec![],
        }))
        .unwrap();
        assert!(!deny.allows_name("example.com"));
        let bad = NetworkPolicy {
            mode: NetworkMode::DenyAll,
            allow_domains: vec!["a.com".into()],
            allow_cidrs: vec![],
            transforms: vec![],
        };
        assert_eq!(Policy::compile(Some(&bad)).unwrap_err().field, "network_policy.mode");
    }

    #[test]
    fn bad_patterns() {
        for (d, want) in
            [("*", "bare"), ("*.com", "top-level"), ("*.*.com", "not a domain"), ("a..b", "not a domain")]
        {
            let e = Policy::compile(Some(&custom(&["ok.com", d], &[], vec![]))).unwrap_err();
            assert_eq!(e.field, "network_policy.allow_domains[1]", "{d}");
            assert!(e.message.contains(want), "{d}: {}", e.message);
        }
        let e = Policy::compile(Some(&custom(&[], &[], vec![tr("*.io", &[], &[])]))).unwrap_err();
        assert_eq!(e.field, "network_policy.transforms[0].domain");
    }

    #[test]
    fn cidr_overlap_rejected() {
        let ok = Policy::compile(Some(&custom(&[], &["203.0.113.0/24", "8.8.8.8"], vec![]))).unwrap();
        assert_eq!(ok.allow_cidrs().len(), 2);
        assert_eq!(ok.allow_cidrs()[1].to_string(), "8.8.8.8/32");
        assert!(ok.allows_ip("203.0.113.9".parse().unwrap()));
        assert!(!ok.allows_ip("203.0.114.9".parse().unwrap()));
        for (c, hit) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("0.0.0.0/0", "0.0.0.0/8"),
            ("10.1.2.3/32", "10.0.0.0/8"),
            ("169.254.169.254", "169.254.0.0/16"),
            ("172.0.0.0/8", "172.16.0.0/12"),
            ("224.0.0.1", "224.0.0.0/4"),
        ] {
            let e = Policy::compile(Some(&custom(&[], &["1.1.1.1", c], vec![]))).unwrap_err();
            assert_eq!(e.field, "network_policy.allow_cidrs[1]");
            assert!(e.message.contains(hit), "{c}: {}", e.message);
        }
        let e = Policy::compile(Some(&custom(&[], &["203.0.113.1/24"], vec![]))).unwrap_err();
        assert!(e.message.contains("host bits"));
        assert!(Policy::compile(Some(&custom(&[], &["nonsense"], vec![]))).is_err());
    }

    #[test]
    fn denied_addresses() {
        for ip in [
            "0.1.2.3",
            "10.250.0.1",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "172.31.255.255",
            "192.0.0.192",
            "192.168.1.1",
            "198.19.0.1",
            "224.0.0.251",
            "240.0.0.1",
            "255.255.255.255",
            "::1",
            "2001:4860:4860::8888",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::808:808",
        ] {
            assert!(denied(ip.parse().unwrap()), "{ip}");
        }
        for ip in
            ["8.8.8.8", "::ffff:8.8.8.8", "203.0.113.5", "172.32.0.1", "100.128.0.1", "192.0.1.1", "1.1.1.1"]
        {
            assert!(!denied(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn most_specific_transform() {
        let p = Policy::compile(Some(&custom(
            &[],
            &[],
            vec![
                tr("*.example.com", &[("x-which", "wide")], &[]),
                tr("*.api.example.com", &[("x-which", "narrow")], &[]),
                tr("v1.api.example.com", &[("x-which", "exact")], &[]),
            ],
        )))
        .unwrap();
        let which = |h: &str| p.transform_for(h).map(|t| t.inject[0].1.to_str().unwrap().to_string());
        assert_eq!(which("a.example.com").as_deref(), Some("wide"));
        assert_eq!(which("a.api.example.com").as_deref(), Some("narrow"));
        assert_eq!(which("V1.api.example.com.").as_deref(), Some("exact"));
        assert_eq!(which("example.com"), None);
        assert!(p.allows_name("x.api.example.com"), "transform domains are allowed implicitly");
        assert!(!p.allows_name("example.com"));
    }

    #[test]
    fn forbidden_transform_headers() {
        for h in ["Host", "connection", "Transfer-Encoding", ":authority", "upgrade", "te"] {
            let e =
                Policy::compile(Some(&custom(&[], &[], vec![tr("a.com", &[(h, "v")], &[])]))).unwrap_err();
            assert_eq!(e.field, "network_policy.transforms[0].inject_headers", "{h}");
            let e = Policy::compile(Some(&custom(&[], &[], vec![tr("a.com", &[], &[h])]))).unwrap_err();
            assert_eq!(e.field, "network_policy.transforms[0].strip_headers", "{h}");
        }
        let e = Policy::compile(Some(&custom(&[], &[], vec![tr("a.com", &[("x-k", "bad\nvalue")], &[])])))
            .unwrap_err();
        assert!(!e.message.contains("bad"), "values never echoed");
        let p = Policy::compile(Some(&custom(
            &[],
            &[],
            vec![tr("a.com", &[("Authorization", "Bearer s")], &["X-Api-Key"])],
        )))
        .unwrap();
        let t = p.transform_for("a.com").unwrap();
        assert_eq!(t.inject[0].0.as_str(), "authorization");
        assert!(t.inject[0].1.is_sensitive());
        assert_eq!(t.strip[0].as_str(), "x-api-key");
    }
}
