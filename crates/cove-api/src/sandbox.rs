//! Sandbox lifecycle: create, inspect, list.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::process::valid_env_name;
use crate::{FieldError, Validate, Violations};

pub const DEFAULT_TEMPLATE: &str = "system/debian:bookworm";
pub const DEFAULT_VCPU: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 1024;
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
pub const MAX_TIMEOUT_SECS: u64 = 28_800;
pub const MAX_MOUNTS: usize = 8;
pub const MAX_ALLOW_DOMAINS: usize = 50;
pub const MAX_ALLOW_CIDRS: usize = 10;
pub const MAX_TRANSFORMS: usize = 20;
pub const MAX_TEMPLATE_NAME: usize = 255;
/// Largest writable disk a sandbox may ask for, MiB (a Cove limit; disks are sparse on the host).
pub const MAX_DISK_MIB: u64 = 256 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxCreateRequest {
    /// Template to create the sandbox from, e.g. `system/debian:bookworm`.
    pub template_name: String,
    /// Environment variables every process in the sandbox sees.
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub mounts: Option<Vec<MountRequest>>,
    /// Virtual CPUs, 1..=8 (default 1).
    #[serde(default)]
    pub vcpu: Option<u32>,
    /// Memory in MiB, even, 512..=8192 (default 1024).
    #[serde(default)]
    pub memory: Option<u64>,
    /// Writable disk in MiB, at least the template's (its default); the root filesystem is
    /// grown to fill it. A Cove addition.
    #[serde(default)]
    pub disk: Option<u64>,
    /// Lifetime in seconds, 1..=28800 (default 300).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Pause instead of deleting when the timeout expires.
    #[serde(default)]
    pub auto_pause: Option<bool>,
    #[serde(default)]
    pub network_policy: Option<NetworkPolicy>,
}

impl Validate for SandboxCreateRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        let name = self.template_name.trim();
        v.check(!name.is_empty(), "template_name", "must not be empty");
        v.check(
            self.template_name.len() <= MAX_TEMPLATE_NAME,
            "template_name",
            format!("must be at most {MAX_TEMPLATE_NAME} characters"),
        );
        if let Some(vcpu) = self.vcpu {
            v.check((1..=8).contains(&vcpu), "vcpu", "must be between 1 and 8");
        }
        if let Some(mem) = self.memory {
            v.check((512..=8192).contains(&mem), "memory", "must be between 512 and 8192 MiB");
            v.check(mem % 2 == 0, "memory", "must be an even number");
        }
        if let Some(disk) = self.disk {
            v.check(
                (1..=MAX_DISK_MIB).contains(&disk),
                "disk",
                format!("must be between 1 and {MAX_DISK_MIB} MiB"),
            );
        }
        if let Some(t) = self.timeout {
            v.check(
                (1..=MAX_TIMEOUT_SECS).contains(&t),
                "timeout",
                format!("must be between 1 and {MAX_TIMEOUT_SECS}"),
            );
        }
        for (key, value) in self.env_vars.iter().flatten() {
            v.check(valid_env_name(key), format!("env_vars.{key}"), "is not a valid variable name");
            v.check(!value.contains('\0'), format!("env_vars.{key}"), "must not contain NUL bytes");
        }
        if let Some(mounts) = &self.mounts {
            v.check(mounts.len() <= MAX_MOUNTS, "mounts", format!("at most {MAX_MOUNTS} mounts are allowed"));
            for (i, m) in mounts.iter().enumerate() {
                m.check(&mut v, &format!("mounts[{i}]"));
                v.check(
                    !mounts[..i].iter().any(|o| paths_overlap(&o.mount_path, &m.mount_path)),
                    format!("mounts[{i}].mount_path"),
                    "is already used by another mount, or is inside or around one",
                );
            }
        }
        if let Some(p) = &self.network_policy {
            p.check(&mut v, "network_policy");
        }
        v.finish()
    }
}

/// Lifecycle state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Starting,
    Stopping,
    Running,
    Snapshotting,
    Paused,
    Unpausing,
    Stopped,
    Deleting,
    Deleted,
    /// Cove's own (not in Leap0's list): the host it ran on stopped answering. Its VM is not
    /// recreated elsewhere (it holds memory nobody else has); it runs again if that host comes
    /// back with it, and can be deleted meanwhile.
    Lost,
}

impl SandboxState {
    pub const ALL: [SandboxState; 10] = [
        Self::Starting,
        Self::Stopping,
        Self::Running,
        Self::Snapshotting,
        Self::Paused,
        Self::Unpausing,
        Self::Stopped,
        Self::Deleting,
        Self::Deleted,
        Self::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Stopping => "stopping",
            Self::Running => "running",
            Self::Snapshotting => "snapshotting",
            Self::Paused => "paused",
            Self::Unpausing => "unpausing",
            Self::Stopped => "stopped",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
            Self::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// States in which a sandbox holds a VM (or is getting one) and so counts against the
    /// organization's sandbox limit. Paused and stopped sandboxes hold no VM and do not count.
    pub fn counts_against_limit(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Snapshotting | Self::Unpausing | Self::Stopping)
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sandbox as returned by create, get, pause, stop and start.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxResponse {
    pub id: String,
    pub template_id: String,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    pub vcpu: u32,
    pub memory: u64,
    pub disk: u64,
    pub timeout: u64,
    pub state: SandboxState,
    pub auto_pause: bool,
    #[serde(default)]
    pub network_policy: Option<NetworkPolicy>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxListItem {
    pub id: String,
    pub template_id: String,
    /// Runner handling the sandbox; empty when not assigned.
    pub pod_id: String,
    pub state: SandboxState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_change_time: Option<DateTime<Utc>>,
    /// Unix time, in seconds, at which the sandbox times out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_at: Option<i64>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ListSandboxesResponse {
    pub items: Vec<SandboxListItem>,
    pub total_items: u64,
}

/// Query of `GET /v1/sandboxes`. Kept as strings so that bad values become field errors.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListSandboxesQuery {
    /// Only sandboxes in this state.
    pub state: Option<String>,
    /// `created_at` (default) or `state`.
    pub sort: Option<String>,
    /// `asc` or `desc` (default).
    #[serde(rename = "order-by")]
    #[param(rename = "order-by")]
    pub order_by: Option<String>,
    /// 1-based page (default 1).
    pub page: Option<String>,
    /// Items per page, 1..=100 (default 20).
    #[serde(rename = "page-size")]
    #[param(rename = "page-size")]
    pub page_size: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    CreatedAt,
    State,
}

/// A validated `ListSandboxesQuery`.
#[derive(Debug, Clone)]
pub struct ListSandboxes {
    pub state: Option<SandboxState>,
    pub sort: SortKey,
    pub descending: bool,
    pub page: u64,
    pub page_size: u64,
}

impl ListSandboxesQuery {
    pub fn parse(&self) -> Result<ListSandboxes, Vec<FieldError>> {
        let mut v = Violations::default();
        let state = match self.state.as_deref() {
            None | Some("") => None,
            Some(s) => {
                let st = SandboxState::parse(s);
                v.check(st.is_some(), "state", format!("unknown state {s:?}"));
                st
            }
        };
        let sort = match self.sort.as_deref() {
            None | Some("") | Some("created_at") => SortKey::CreatedAt,
            Some("state") => SortKey::State,
            Some(_) => {
                v.push("sort", "must be one of created_at, state");
                SortKey::CreatedAt
            }
        };
        let (descending, page, page_size) =
            crate::parse_paging(&mut v, &self.order_by, &self.page, &self.page_size);
        v.finish()?;
        Ok(ListSandboxes { state, sort, descending, page, page_size })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxUserHomeDirResponse {
    pub user_home_dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxWorkdirResponse {
    pub workdir: String,
}

/// Egress policy of a sandbox; absent means `allow-all`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NetworkPolicy {
    pub mode: NetworkMode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transforms: Vec<TransformRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    AllowAll,
    DenyAll,
    Custom,
}

/// Per-domain request rewriting done on the host (credential brokering).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TransformRule {
    pub domain: String,
    /// Write-only: header values are never returned by the API.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inject_headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub strip_headers: Vec<String>,
}

/// The body of `PATCH /v1/sandbox/{id}/network-policy` is a policy by itself.
impl Validate for NetworkPolicy {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        self.check(&mut v, "");
        v.finish_at_root()
    }
}

impl NetworkPolicy {
    pub fn check(&self, v: &mut Violations, field: &str) {
        v.check(
            self.allow_domains.len() <= MAX_ALLOW_DOMAINS,
            format!("{field}.allow_domains"),
            format!("at most {MAX_ALLOW_DOMAINS} domains are allowed"),
        );
        v.check(
            self.allow_cidrs.len() <= MAX_ALLOW_CIDRS,
            format!("{field}.allow_cidrs"),
            format!("at most {MAX_ALLOW_CIDRS} CIDRs are allowed"),
        );
        v.check(
            self.transforms.len() <= MAX_TRANSFORMS,
            format!("{field}.transforms"),
            format!("at most {MAX_TRANSFORMS} transforms are allowed"),
        );
        let lists_used =
            !self.allow_domains.is_empty() || !self.allow_cidrs.is_empty() || !self.transforms.is_empty();
        v.check(
            self.mode == NetworkMode::Custom || !lists_used,
            format!("{field}.mode"),
            "allow_domains, allow_cidrs and transforms need mode custom",
        );
        for (i, d) in self.allow_domains.iter().enumerate() {
            v.check(
                valid_domain_pattern(d),
                format!("{field}.allow_domains[{i}]"),
                "is not a domain name or *.domain pattern",
            );
        }
        for (i, c) in self.allow_cidrs.iter().enumerate() {
            v.check(
                parse_ipv4_cidr(c).is_some(),
                format!("{field}.allow_cidrs[{i}]"),
                "is not an IPv4 CIDR such as 203.0.113.0/24",
            );
        }
        for (i, t) in self.transforms.iter().enumerate() {
            v.check(
                valid_domain_pattern(&t.domain),
                format!("{field}.transforms[{i}].domain"),
                "is not a domain name or *.domain pattern",
            );
            for name in t.inject_headers.keys().chain(t.strip_headers.iter()) {
                v.check(
                    valid_header_name(name),
                    format!("{field}.transforms[{i}]"),
                    format!("{name:?} is not a valid header name"),
                );
            }
        }
    }
}

/// `example.com` or `*.example.com`.
pub fn valid_domain_pattern(d: &str) -> bool {
    let name = d.strip_prefix("*.").unwrap_or(d);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Parses `a.b.c.d/n` (or a bare address, as /32).
pub fn parse_ipv4_cidr(s: &str) -> Option<(std::net::Ipv4Addr, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().ok()?),
        None => (s, 32),
    };
    (len <= 32).then_some(())?;
    Some((addr.parse().ok()?, len))
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// An object-storage mount as requested.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct MountRequest {
    #[serde(rename = "type")]
    pub kind: String,
    pub bucket: String,
    pub mount_path: String,
    pub endpoint: String,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub read_only: Option<bool>,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
}

impl MountRequest {
    fn fields(&self) -> MountFields<'_> {
        MountFields {
            bucket: Some(&self.bucket),
            mount_path: Some(&self.mount_path),
            endpoint: Some(&self.endpoint),
            prefix: self.prefix.as_deref(),
            read_only: self.read_only,
            access_key_id: self.access_key_id.as_deref(),
            secret_access_key: self.secret_access_key.as_deref(),
        }
    }

    fn check(&self, v: &mut Violations, field: &str) {
        v.check(self.kind == "object-storage", format!("{field}.type"), "must be object-storage");
        check_mount_fields(v, field, self.fields());
        let key = self.access_key_id.as_deref().unwrap_or("");
        let secret = self.secret_access_key.as_deref().unwrap_or("");
        v.check(
            key.is_empty() == secret.is_empty(),
            format!("{field}.secret_access_key"),
            "give both access_key_id and secret_access_key, or neither (a public bucket)",
        );
    }
}

impl Validate for MountRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        self.check(&mut v, "");
        v.finish_at_root()
    }
}

/// The secret is never printed.
impl std::fmt::Debug for MountRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_mount_fields(f, "MountRequest", &self.fields())
    }
}

/// `PATCH /v1/sandbox/{id}/mounts/{mountID}`: omitted fields keep their value; an empty
/// `prefix`, `access_key_id` or `secret_access_key` clears it. `id` and `type` cannot change.
#[derive(Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MountUpdateRequest {
    #[serde(default)]
    pub bucket: Option<String>,
    #[serde(default)]
    pub mount_path: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub read_only: Option<bool>,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
}

impl MountUpdateRequest {
    fn fields(&self) -> MountFields<'_> {
        MountFields {
            bucket: self.bucket.as_deref(),
            mount_path: self.mount_path.as_deref(),
            endpoint: self.endpoint.as_deref(),
            prefix: self.prefix.as_deref(),
            read_only: self.read_only,
            access_key_id: self.access_key_id.as_deref(),
            secret_access_key: self.secret_access_key.as_deref(),
        }
    }
}

impl Validate for MountUpdateRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_mount_fields(&mut v, "", self.fields());
        v.finish_at_root()
    }
}

/// The secret is never printed.
impl std::fmt::Debug for MountUpdateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_mount_fields(f, "MountUpdateRequest", &self.fields())
    }
}

fn debug_mount_fields(f: &mut std::fmt::Formatter<'_>, name: &str, m: &MountFields<'_>) -> std::fmt::Result {
    f.debug_struct(name)
        .field("bucket", &m.bucket)
        .field("mount_path", &m.mount_path)
        .field("endpoint", &m.endpoint)
        .field("prefix", &m.prefix)
        .field("read_only", &m.read_only)
        .field("access_key_id", &m.access_key_id)
        .field("secret_access_key", &m.secret_access_key.map(|_| "<redacted>"))
        .finish()
}

/// Whether one path is the other or inside it (mounts may not nest: the outer one is read-only).
pub fn paths_overlap(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim_end_matches('/'), b.trim_end_matches('/'));
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

/// The fields a mount request and a mount update share; `None` = not given.
struct MountFields<'a> {
    bucket: Option<&'a str>,
    mount_path: Option<&'a str>,
    endpoint: Option<&'a str>,
    prefix: Option<&'a str>,
    read_only: Option<bool>,
    access_key_id: Option<&'a str>,
    secret_access_key: Option<&'a str>,
}

/// Guest directories a mount may not cover: the kernel's and the system's own.
const RESERVED_MOUNT_ROOTS: &[&str] =
    &["/proc", "/sys", "/dev", "/run", "/etc", "/bin", "/sbin", "/usr", "/lib"];

fn check_mount_fields(v: &mut Violations, field: &str, m: MountFields<'_>) {
    if let Some(b) = m.bucket {
        v.check(
            (3..=63).contains(&b.len())
                && b.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b".-_".contains(&c)),
            format!("{field}.bucket"),
            "must be a bucket name: 3-63 characters of a-z, 0-9, '.', '-', '_'",
        );
    }
    if let Some(p) = m.mount_path {
        let components_ok = p.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..");
        v.check(
            p.starts_with('/') && p != "/" && components_ok && p.len() <= 1024,
            format!("{field}.mount_path"),
            "must be an absolute path other than /, without empty, . or .. components",
        );
        v.check(
            !RESERVED_MOUNT_ROOTS.iter().any(|r| p == *r || p.starts_with(&format!("{r}/"))),
            format!("{field}.mount_path"),
            "must not be inside a system directory (/proc, /sys, /dev, /run, /etc, /bin, /sbin, /usr, /lib)",
        );
    }
    if let Some(e) = m.endpoint {
        let host = e.strip_prefix("https://").or_else(|| e.strip_prefix("http://")).map(|rest| {
            rest.split(['/', '?', '#']).next().unwrap_or("").rsplit('@').next().unwrap_or("").to_string()
        });
        v.check(
            host.is_some_and(|h| !h.is_empty() && !h.starts_with(':') && !h.contains(char::is_whitespace)),
            format!("{field}.endpoint"),
            "must be a URL with scheme (http or https) and host",
        );
    }
    if let Some(p) = m.prefix.filter(|p| !p.is_empty()) {
        v.check(
            !p.starts_with('/') && p.ends_with('/') && !p.split('/').any(|s| s == ".." || s == "."),
            format!("{field}.prefix"),
            "must be relative, end with / and not contain . or .. components",
        );
    }
    v.check(m.read_only != Some(false), format!("{field}.read_only"), "object storage mounts are read-only");
    for (name, value) in [("access_key_id", m.access_key_id), ("secret_access_key", m.secret_access_key)] {
        v.check(
            value.is_none_or(|s| s.len() <= 1024 && !s.chars().any(char::is_control)),
            format!("{field}.{name}"),
            "must be at most 1024 printable characters",
        );
    }
}

/// Non-secret mount metadata.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Mount {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub bucket: String,
    pub mount_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

/// A mount as the platform keeps it: the request with its id. It holds the credentials (sealed
/// at rest by the control plane, plain only in the runner's memory) and is never returned:
/// [`MountConfig::public`] is what the API shows.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountConfig {
    pub id: String,
    pub bucket: String,
    pub mount_path: String,
    pub endpoint: String,
    /// `""` or a relative key prefix ending in `/`.
    #[serde(default)]
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<String>,
}

fn non_empty(s: Option<&String>) -> Option<String> {
    s.filter(|s| !s.is_empty()).cloned()
}

impl MountConfig {
    /// A new mount from a validated request.
    pub fn new(id: String, req: &MountRequest) -> MountConfig {
        MountConfig {
            id,
            bucket: req.bucket.clone(),
            mount_path: req.mount_path.clone(),
            endpoint: req.endpoint.clone(),
            prefix: req.prefix.clone().unwrap_or_default(),
            access_key_id: non_empty(req.access_key_id.as_ref()),
            secret_access_key: non_empty(req.secret_access_key.as_ref()),
        }
    }

    pub fn public(&self) -> Mount {
        Mount {
            id: self.id.clone(),
            kind: "object-storage".into(),
            bucket: self.bucket.clone(),
            mount_path: self.mount_path.clone(),
            prefix: Some(self.prefix.clone()).filter(|p| !p.is_empty()),
            read_only: true,
        }
    }

    /// Applies a validated update (empty strings clear); returns whether the guest must mount
    /// it anew, which is whenever more than the credentials changed.
    pub fn apply(&mut self, u: &MountUpdateRequest) -> bool {
        let before =
            (self.bucket.clone(), self.mount_path.clone(), self.endpoint.clone(), self.prefix.clone());
        if let Some(b) = &u.bucket {
            self.bucket = b.clone();
        }
        if let Some(p) = &u.mount_path {
            self.mount_path = p.clone();
        }
        if let Some(e) = &u.endpoint {
            self.endpoint = e.clone();
        }
        if let Some(p) = &u.prefix {
            self.prefix = p.clone();
        }
        if u.access_key_id.is_some() {
            self.access_key_id = non_empty(u.access_key_id.as_ref());
        }
        if u.secret_access_key.is_some() {
            self.secret_access_key = non_empty(u.secret_access_key.as_ref());
        }
        before != (self.bucket.clone(), self.mount_path.clone(), self.endpoint.clone(), self.prefix.clone())
    }

    /// Whether both or neither credential is set (one alone cannot sign a request).
    pub fn credentials_complete(&self) -> bool {
        self.access_key_id.is_some() == self.secret_access_key.is_some()
    }
}

/// The credentials are never printed.
impl std::fmt::Debug for MountConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountConfig")
            .field("id", &self.id)
            .field("bucket", &self.bucket)
            .field("mount_path", &self.mount_path)
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .field("credentials", &self.access_key_id.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: serde_json::Value) -> SandboxCreateRequest {
        serde_json::from_value(json).unwrap()
    }

    fn fields(r: Result<(), Vec<FieldError>>) -> Vec<String> {
        r.err().unwrap_or_default().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn create_constraints_name_their_field() {
        let ok = req(serde_json::json!({"template_name": "system/debian:bookworm"}));
        assert!(ok.validate().is_ok());
        let bad = req(serde_json::json!({
            "template_name": "t", "vcpu": 9, "memory": 1023, "timeout": 0,
            "network_policy": {"mode": "allow-all", "allow_cidrs": ["10.0.0.0/33"]}
        }));
        let f = fields(bad.validate());
        for want in ["vcpu", "memory", "timeout", "network_policy.mode", "network_policy.allow_cidrs[0]"] {
            assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
        }
        let odd = req(serde_json::json!({"template_name": "t", "memory": 513}));
        assert_eq!(fields(odd.validate()), vec!["memory"]);
    }

    #[test]
    fn mounts_are_validated_field_by_field() {
        let ok = serde_json::json!({"type":"object-storage","bucket":"assets","mount_path":"/data/a",
            "endpoint":"https://s3.example.com","prefix":"docs/","access_key_id":"k","secret_access_key":"s"});
        assert!(req(serde_json::json!({"template_name": "t", "mounts": [ok]})).validate().is_ok());
        let bad = serde_json::json!({"type":"nfs","bucket":"A","mount_path":"/proc/x",
            "endpoint":"https://","prefix":"/x","read_only":false,"access_key_id":"k"});
        let f = fields(req(serde_json::json!({"template_name": "t", "mounts": [bad]})).validate());
        for want in ["type", "bucket", "mount_path", "endpoint", "prefix", "read_only", "secret_access_key"] {
            assert!(f.contains(&format!("mounts[0].{want}")), "{want} in {f:?}");
        }
        let dup = serde_json::json!({"type":"object-storage","bucket":"abc","mount_path":"/data","endpoint":"http://s3"});
        let f = fields(req(serde_json::json!({"template_name": "t", "mounts": [dup, dup]})).validate());
        assert_eq!(f, vec!["mounts[1].mount_path"]);
        let dots = serde_json::json!({"type":"object-storage","bucket":"abc","mount_path":"/data/../etc","endpoint":"http://s3"});
        assert!(req(serde_json::json!({"template_name": "t", "mounts": [dots]})).validate().is_err());
        // Updates: only what is given is checked; empty strings clear.
        let u: MountUpdateRequest =
            serde_json::from_value(serde_json::json!({"prefix": "", "access_key_id": ""})).unwrap();
        assert!(u.validate().is_ok());
        let u: MountUpdateRequest =
            serde_json::from_value(serde_json::json!({"mount_path": "relative"})).unwrap();
        assert_eq!(u.validate().unwrap_err()[0].field, "mount_path");
        assert!(serde_json::from_value::<MountUpdateRequest>(serde_json::json!({"id": "x"})).is_err());
    }

    #[test]
    fn mount_updates_clear_with_empty_strings_and_say_when_to_remount() {
        let r: MountRequest = serde_json::from_value(serde_json::json!({"type":"object-storage",
            "bucket":"bkt","mount_path":"/data","endpoint":"http://s3","prefix":"a/",
            "access_key_id":"AK","secret_access_key":"SK"}))
        .unwrap();
        let mut m = MountConfig::new("mnt-1".into(), &r);
        assert!(format!("{m:?}{r:?}").find("SK").is_none(), "secret printed");
        let creds = MountUpdateRequest { access_key_id: Some("AK2".into()), ..Default::default() };
        assert!(!m.apply(&creds), "a credential change needs no remount");
        assert_eq!(m.access_key_id.as_deref(), Some("AK2"));
        let clear = MountUpdateRequest {
            prefix: Some(String::new()),
            access_key_id: Some(String::new()),
            secret_access_key: Some(String::new()),
            ..Default::default()
        };
        assert!(m.apply(&clear));
        assert_eq!((m.prefix.as_str(), &m.access_key_id, &m.secret_access_key), ("", &None, &None));
        assert!(m.credentials_complete());
        assert_eq!(m.public().prefix, None);
        assert!(m.apply(&MountUpdateRequest { bucket: Some("other".into()), ..Default::default() }));
        let mut half = m.clone();
        half.apply(&MountUpdateRequest { access_key_id: Some("AK".into()), ..Default::default() });
        assert!(!half.credentials_complete());
    }

    #[test]
    fn too_many_mounts_is_rejected() {
        let mounts: Vec<_> = (0..9)
            .map(|i| {
                serde_json::json!({"type":"object-storage","bucket":"bkt","mount_path":format!("/data{i}"),
                    "endpoint":"http://s3"})
            })
            .collect();
        let bad = req(serde_json::json!({"template_name": "t", "mounts": mounts}));
        assert_eq!(fields(bad.validate()), vec!["mounts"]);
    }

    #[test]
    fn list_query_rejects_bad_values() {
        let q = ListSandboxesQuery {
            state: Some("bogus".into()),
            page_size: Some("101".into()),
            order_by: Some("up".into()),
            ..Default::default()
        };
        let f: Vec<_> = q.parse().unwrap_err().into_iter().map(|e| e.field).collect();
        assert_eq!(f, vec!["state", "order-by", "page-size"]);
        let q = ListSandboxesQuery { page: Some("2".into()), ..Default::default() };
        let p = q.parse().unwrap();
        assert_eq!((p.page, p.page_size, p.descending), (2, 20, true));
    }

    #[test]
    fn domain_patterns() {
        assert!(valid_domain_pattern("api.openai.com"));
        assert!(valid_domain_pattern("*.example.com"));
        assert!(!valid_domain_pattern("*"));
        assert!(!valid_domain_pattern("a..b"));
        assert_eq!(parse_ipv4_cidr("1.2.3.0/24").map(|c| c.1), Some(24));
    }
}
