//! The host↔agent protocol.
//!
//! The runner and the guest agent talk over one virtio-serial port. A connection starts with a
//! one-line handshake that carries the protocol version and a nonce, so that bytes left over
//! from an earlier connection (for example one cut by a snapshot) are skipped; after it the
//! byte stream carries HTTP/2, which multiplexes any number of concurrent requests and streams.
//!
//! ```text
//! host  → guest   COVE-HELLO <version> <nonce>\n
//! guest → host    COVE-READY <version> <nonce>\n
//! ... HTTP/2 (host is the client) ...
//! ```
//!
//! Before a template snapshot the host sends `COVE-PARK <version> <nonce>` instead; the agent
//! answers `COVE-PARKED <version> <nonce>` and keeps waiting for a greeting.
//!
//! A guest that resumes on the runner that paused it needs only the time and fresh entropy,
//! and the greeting brings them (version [`CLOCK_VERSION`]), which spares the guest an HTTP/2
//! request on the resume's critical path:
//!
//! ```text
//! host  → guest   COVE-HELLO 2 <nonce>\n            (queued before the guest runs)
//! host  → guest   COVE-CLOCK <unix_ns> <entropy>\n  (written once it runs)
//! guest → host    COVE-READY 2 <nonce>\n            (clock set, entropy added)
//! ```
//!
//! An agent older than that answers `COVE-ERROR unsupported protocol 2` and skips the clock
//! line; the host then greets it again with version 1 and sends the clock over HTTP/2.
//!
//! A guest new to the host, or resumed from an image, needs its whole [`Identity`], and the
//! greeting of version [`IDENTITY_VERSION`] brings it the same way, as JSON of a stated length:
//!
//! ```text
//! host  → guest   COVE-HELLO 3 <nonce>\n            (queued before the guest runs)
//! host  → guest   COVE-IDENTITY <length>\n<JSON>    (written once it runs)
//! guest → host    COVE-READY 3 <nonce>\n            (identity applied)
//! ```
//!
//! An agent that cannot apply it answers `COVE-ERROR <why>`, one that predates it
//! `COVE-ERROR unsupported protocol 3`; the host then greets it again with version 1 and sends
//! the identity over HTTP/2.
//!
//! The HTTP/2 routes are the constants below. Request and response bodies are the public API's
//! types from `cove-api` wherever one exists, so the control plane forwards what it validated.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of this protocol. Bump on any incompatible change; the agent refuses a host whose
/// version it does not speak, and the host refuses an agent that answers another.
pub const PROTOCOL_VERSION: u32 = 1;

/// Name of the virtio-serial port (`virtserialport,name=`).
pub const PORT_NAME: &str = "cove.agent";

/// The greeting version that a `COVE-CLOCK` line follows (see the module's documentation).
/// Everything else is as in [`PROTOCOL_VERSION`].
pub const CLOCK_VERSION: u32 = 2;

/// The greeting version that a `COVE-IDENTITY` header and its JSON follow (see the module's
/// documentation). Everything else is as in [`PROTOCOL_VERSION`].
pub const IDENTITY_VERSION: u32 = 3;

/// `COVE-IDENTITY <length>`, then `length` bytes: an [`Identity`] as JSON.
pub const IDENTITY: &str = "COVE-IDENTITY";

/// Longest [`Identity`] JSON a greeting carries; a longer one goes over HTTP/2.
pub const MAX_IDENTITY_JSON: usize = 1 << 20;

pub const HELLO: &str = "COVE-HELLO";
/// `COVE-CLOCK <unix_ns> <entropy_hex>`: the host's wall-clock time and fresh randomness.
pub const CLOCK: &str = "COVE-CLOCK";
pub const READY: &str = "COVE-READY";
/// Asks the agent to stay in the handshake loop, reading the port, and say so: the state a
/// template snapshot must capture, so that every clone's first bytes reach a fresh handshake.
pub const PARK: &str = "COVE-PARK";
pub const PARKED: &str = "COVE-PARKED";

/// Longest handshake line either side accepts.
pub const MAX_HANDSHAKE_LINE: usize = 128;

pub fn hello_line(nonce: u64) -> String {
    hello_line_of(PROTOCOL_VERSION, nonce)
}

/// The greeting of `version` ([`PROTOCOL_VERSION`] or [`CLOCK_VERSION`]).
pub fn hello_line_of(version: u32, nonce: u64) -> String {
    format!("{HELLO} {version} {nonce:016x}\n")
}

pub fn ready_line(nonce: &str) -> String {
    ready_line_of(PROTOCOL_VERSION, nonce)
}

/// The answer to a greeting of `version`.
pub fn ready_line_of(version: u32, nonce: &str) -> String {
    format!("{READY} {version} {nonce}\n")
}

/// What either side answers a line it cannot take: `COVE-ERROR <message>`.
pub const ERROR: &str = "COVE-ERROR";

pub fn error_line(message: &str) -> String {
    format!("{ERROR} {message}\n")
}

/// The agent's answer to a greeting of a version it does not speak.
pub fn unsupported_line(version: u32) -> String {
    error_line(&format!("unsupported protocol {version}"))
}

pub fn clock_line(unix_time_ns: u128, entropy: &[u8]) -> String {
    format!("{CLOCK} {unix_time_ns} {}\n", hex::encode(entropy))
}

/// Parses `COVE-CLOCK <unix_ns> <entropy_hex>`; returns the time and the entropy's bytes.
pub fn parse_clock(line: &str) -> Option<(u128, Vec<u8>)> {
    let mut parts = line.trim_end().split(' ');
    (parts.next()? == CLOCK).then_some(())?;
    let time = parts.next()?.parse().ok()?;
    let entropy = hex::decode(parts.next()?).ok()?;
    parts.next().is_none().then_some((time, entropy))
}

/// The `COVE-IDENTITY` header and JSON that bring `identity` in a greeting; None if it is
/// longer than [`MAX_IDENTITY_JSON`].
pub fn identity_message(identity: &Identity) -> Option<Vec<u8>> {
    let json = serde_json::to_vec(identity).ok()?;
    (json.len() <= MAX_IDENTITY_JSON)
        .then(|| [format!("{IDENTITY} {}\n", json.len()).into_bytes(), json].concat())
}

/// Parses a `COVE-IDENTITY <length>` header; returns the length of the JSON that follows.
pub fn parse_identity_header(line: &str) -> Option<usize> {
    let mut parts = line.trim_end().split(' ');
    (parts.next()? == IDENTITY).then_some(())?;
    let len = parts.next()?.parse().ok().filter(|&n| n <= MAX_IDENTITY_JSON)?;
    parts.next().is_none().then_some(len)
}

pub fn park_line(nonce: u64) -> String {
    format!("{PARK} {PROTOCOL_VERSION} {nonce:016x}\n")
}

pub fn parked_line(nonce: &str) -> String {
    format!("{PARKED} {PROTOCOL_VERSION} {nonce}\n")
}

/// Parses `<MAGIC> <version> <nonce>`; returns (version, nonce).
pub fn parse_handshake<'a>(line: &'a str, magic: &str) -> Option<(u32, &'a str)> {
    let mut parts = line.trim_end().split(' ');
    (parts.next()? == magic).then_some(())?;
    let version = parts.next()?.parse().ok()?;
    let nonce = parts.next()?;
    parts.next().is_none().then_some((version, nonce))
}

pub mod routes {
    pub const HEALTH: &str = "/v1/health";
    pub const IDENTITY: &str = "/v1/identity";
    pub const DETACH: &str = "/v1/detach";
    pub const SYSTEM: &str = "/v1/system";
    pub const EXEC: &str = "/v1/exec";
    /// Followed by the public API's filesystem operation name, e.g. `/v1/fs/read-file`.
    pub const FS_PREFIX: &str = "/v1/fs/";
    /// Terminal sessions, as the public API's `pty` routes: `GET`/`POST /v1/pty`,
    /// `GET`/`DELETE /v1/pty/<id>`, `POST /v1/pty/<id>/resize`, and `POST /v1/pty/<id>/attach`,
    /// whose request body is the terminal's input and whose answer streams its output (what
    /// the session kept first); the answer ends when the shell exits, and fails when the agent
    /// detaches (a pause).
    pub const PTY: &str = "/v1/pty";
    /// Background processes: `GET`/`POST /v1/processes`, `GET`/`DELETE /v1/processes/<pid>`,
    /// `POST /v1/processes/<pid>/stdin`, `POST /v1/processes/<pid>/signal`, and
    /// `GET /v1/processes/<pid>/output?follow=true|false` (server-sent events; the answer fails
    /// when the agent detaches).
    pub const PROCESSES: &str = "/v1/processes";
    /// Followed by the public API's git operation name, e.g. `/v1/git/clone`, with its request
    /// body less any credentials; the answer is a `GitResult` (a `GitCommitResponse` for
    /// `commit`). Also `/v1/git/remote-url` ([`super::GitRemoteRequest`]): the URL a remote
    /// fetches from, as the output of a `GitResult`.
    pub const GIT_PREFIX: &str = "/v1/git/";
    /// Header of a git request whose network operation goes through the host's credential
    /// proxy ([`super::net::CREDENTIAL_PROXY_PORT`]), which adds the credentials the API was
    /// given to git's requests: any value turns it on.
    pub const GIT_VIA_PROXY: &str = "cove-git-via-proxy";
    /// Followed by the public API's LSP operation name, e.g. `/v1/lsp/completions`, with its
    /// request body; the answer is the public API's.
    pub const LSP_PREFIX: &str = "/v1/lsp/";
}

/// `POST /v1/git/remote-url`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GitRemoteRequest {
    pub path: String,
    pub remote: String,
}

/// Answer to `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentInfo {
    pub protocol: u32,
    pub agent_version: String,
    /// Seconds since the guest booted (monotonic; keeps counting across restores).
    pub uptime_secs: f64,
}

/// `POST /v1/identity`: sent after every boot and every restore, before the sandbox is handed
/// out, so that clones of one snapshot differ.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Identity {
    pub hostname: String,
    /// Environment every later process gets (replaces the previous set).
    pub env: BTreeMap<String, String>,
    /// Wall-clock time on the host when the request was sent, in nanoseconds since the epoch.
    pub unix_time_ns: u128,
    /// Fresh randomness (hex) mixed into the guest's entropy pool.
    pub entropy_hex: String,
    /// A CA certificate (PEM) the guest's system trust store must hold: the sandbox's egress CA,
    /// whose key stays on the host. Replaces the one sent before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_pem: Option<String>,
    /// Size of the root disk, in bytes: the agent waits until the guest sees the disk that
    /// large (the host may have just grown it) and grows the root filesystem to fill it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
}

/// The guest's network, the same in every sandbox (the host tells sandboxes apart by
/// namespace, not address), so that any saved state restores anywhere.
pub mod net {
    /// The guest's address and prefix on `eth0`.
    pub const GUEST_CIDR: &str = "10.250.0.2/30";
    /// Default gateway and DNS resolver (on the host side of the TAP).
    pub const GATEWAY: &str = "10.250.0.1";
    /// Port of the host's credential proxy on the gateway: an HTTP proxy that takes `CONNECT`
    /// only to a host the API has lent credentials for, for as long as one git command runs,
    /// and adds them to that command's requests (TLS ended with the sandbox's CA).
    pub const CREDENTIAL_PROXY_PORT: u16 = 15888;
    /// Where the egress CA goes in the guest, and the system bundle that gets it appended.
    pub const CA_FILE: &str = "/usr/local/share/ca-certificates/cove-egress.crt";
    pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
}

/// `GET /v1/system`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemInfo {
    pub user_home_dir: String,
    pub workdir: String,
}

/// Error body of every non-2xx answer from the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentError {
    pub message: String,
    /// For a 400: the request field at fault, when the agent knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_roundtrip() {
        let hello = hello_line(0xabc);
        let (v, nonce) = parse_handshake(&hello, HELLO).unwrap();
        assert_eq!(v, PROTOCOL_VERSION);
        assert_eq!(nonce, "0000000000000abc");
        let ready = ready_line(nonce);
        assert_eq!(parse_handshake(&ready, READY), Some((PROTOCOL_VERSION, nonce)));
        assert_eq!(parse_handshake("COVE-HELLO x y", HELLO), None);
        let park = park_line(7);
        let (_, nonce) = parse_handshake(&park, PARK).unwrap();
        assert_eq!(parse_handshake(&parked_line(nonce), PARKED), Some((PROTOCOL_VERSION, nonce)));
        // A PARKED answer is not a PARK request.
        assert_eq!(parse_handshake(&parked_line(nonce), PARK), None);
        assert_eq!(parse_handshake("junkCOVE-HELLO 1 a", HELLO), None);
    }

    #[test]
    fn clock_greeting_roundtrip() {
        let hello = hello_line_of(CLOCK_VERSION, 9);
        assert_eq!(parse_handshake(&hello, HELLO), Some((CLOCK_VERSION, "0000000000000009")));
        assert_eq!(parse_handshake(&ready_line_of(2, "ab"), READY), Some((2, "ab")));
        let line = clock_line(1_764_900_000_123_456_789, &[0, 0xff, 7]);
        assert_eq!(line, "COVE-CLOCK 1764900000123456789 00ff07\n");
        assert!(clock_line(u128::from(u64::MAX), &[0; 32]).len() < MAX_HANDSHAKE_LINE);
        assert_eq!(parse_clock(&line), Some((1_764_900_000_123_456_789, vec![0, 0xff, 7])));
        for bad in
            ["COVE-CLOCK 1", "COVE-CLOCK x 00", "COVE-CLOCK 1 0g", "COVE-CLOCK 1 00 extra", "CLOCK 1 00"]
        {
            assert_eq!(parse_clock(bad), None, "{bad}");
        }
    }

    #[test]
    fn identity_greeting_roundtrip() {
        let id = Identity {
            hostname: "sbx-1".into(),
            env: [("A".to_string(), "line\nbreak".to_string())].into(),
            trust_pem: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
            ..Identity::default()
        };
        let message = identity_message(&id).unwrap();
        let header_end = message.iter().position(|&b| b == b'\n').unwrap();
        let header = std::str::from_utf8(&message[..header_end]).unwrap();
        assert!(header.len() < MAX_HANDSHAKE_LINE, "{header}");
        let json = &message[header_end + 1..];
        assert_eq!(parse_identity_header(header), Some(json.len()));
        let back: Identity = serde_json::from_slice(json).unwrap();
        assert_eq!((back.hostname, back.env, back.trust_pem), (id.hostname, id.env, id.trust_pem));
        let too_long = format!("{IDENTITY} {}", MAX_IDENTITY_JSON + 1);
        for bad in ["COVE-IDENTITY", "COVE-IDENTITY x", "COVE-IDENTITY 1 2", "IDENTITY 1", too_long.as_str()]
        {
            assert_eq!(parse_identity_header(bad), None, "{bad}");
        }
        let huge = Identity {
            env: [("X".to_string(), "x".repeat(MAX_IDENTITY_JSON))].into(),
            ..Identity::default()
        };
        assert!(identity_message(&huge).is_none(), "too long for a greeting");
    }

    /// The wire shape of the protocol's own types; a change here is a protocol change.
    #[test]
    fn schema_snapshot() {
        let id = Identity {
            hostname: "h".into(),
            env: [("A".into(), "1".into())].into(),
            unix_time_ns: 5,
            entropy_hex: "00".into(),
            trust_pem: None,
            disk_bytes: None,
        };
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            r#"{"hostname":"h","env":{"A":"1"},"unix_time_ns":5,"entropy_hex":"00"}"#
        );
        let with_ca = Identity { trust_pem: Some("PEM".into()), disk_bytes: Some(1 << 30), ..id };
        assert!(serde_json::to_string(&with_ca)
            .unwrap()
            .ends_with(r#","trust_pem":"PEM","disk_bytes":1073741824}"#));
        let info = AgentInfo { protocol: 1, agent_version: "0.1.0".into(), uptime_secs: 1.5 };
        assert_eq!(
            serde_json::to_string(&info).unwrap(),
            r#"{"protocol":1,"agent_version":"0.1.0","uptime_secs":1.5}"#
        );
        assert_eq!(PROTOCOL_VERSION, 1);
    }
}

/// The filesystem port (`cove.fs`): the guest's FUSE server asks, the host answers, read-only.
///
/// Unlike the agent port, the guest is the client here. Every frame is
/// `u32 BE header_len | u32 BE data_len | header (JSON) | data`. On every new connection the host
/// first sends a frame with `hello` set; the guest then resends every request it has not had an
/// answer to (requests are idempotent reads), so a request cut by a snapshot or a host restart is
/// answered by the next host. Answers carry the request's id, so any number can be in flight.
pub mod fs {
    use serde::{Deserialize, Serialize};

    pub const PORT_NAME: &str = "cove.fs";
    /// The frame format and ops below; a host greets with it and a guest that speaks another
    /// one says so in its console.
    pub const FS_PROTOCOL: u32 = 1;
    pub const MAX_HEADER: usize = 4 << 20;
    pub const MAX_DATA: usize = 16 << 20;
    /// Largest `len` a read may ask for.
    pub const MAX_READ: u32 = 4 << 20;

    #[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "snake_case")]
    pub enum Op {
        Stat,
        List,
        Read,
        /// The answer to a host's `park` (`path` carries its nonce): every byte the host sent
        /// before the park has been read.
        Parked,
    }

    /// guest → host. `path` is relative to the mount's root ("" is the root), '/'-separated.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Request {
        pub id: u64,
        pub op: Op,
        pub mount: String,
        pub path: String,
        #[serde(default)]
        pub offset: u64,
        #[serde(default)]
        pub len: u32,
    }

    #[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "snake_case")]
    pub enum Kind {
        File,
        Dir,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Entry {
        /// Last path component ("" for the root).
        pub name: String,
        pub kind: Kind,
        pub size: u64,
        /// Seconds since the epoch.
        pub mtime: i64,
    }

    /// host → guest. A hello (id 0, `hello` set) or the answer to request `id`: `errno` 0 and
    /// `entry` (stat), `entries` (list) or the frame's data (read); else a positive errno.
    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    pub struct Reply {
        pub id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub hello: Option<String>,
        /// With `hello`: the host's [`FS_PROTOCOL`].
        #[serde(default)]
        pub protocol: u32,
        /// Sent before the VM is saved: the guest answers `Parked`, which proves the host→guest
        /// stream was consumed up to a frame boundary. The host sends nothing more on this
        /// connection until its next `hello` (after a restore, or when the VM carries on).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub park: Option<String>,
        #[serde(default)]
        pub errno: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub entry: Option<Entry>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub entries: Option<Vec<Entry>>,
    }

    /// `POST /v1/mounts` on the agent port: mount `id` read-only at `path` (idempotent: the
    /// same id at the same path again is a no-op, so the host sends every mount after each
    /// restore).
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct MountRequest {
        pub id: String,
        pub path: String,
    }

    /// `POST /v1/mounts/remove` on the agent port: unmount `id` (lazily: open files keep their
    /// reference) and remove the directory if the agent made it. Unknown ids are a no-op.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct UnmountRequest {
        pub id: String,
    }

    pub const MOUNTS_ROUTE: &str = "/v1/mounts";
    pub const UNMOUNT_ROUTE: &str = "/v1/mounts/remove";

    pub fn encode<T: Serialize>(header: &T, data: &[u8]) -> Vec<u8> {
        let h = serde_json::to_vec(header).unwrap_or_default();
        let mut out = Vec::with_capacity(8 + h.len() + data.len());
        out.extend_from_slice(&(h.len() as u32).to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out
    }

    /// A decoded frame: its JSON header and its data.
    pub type Frame = (Vec<u8>, Vec<u8>);

    /// Splits the first whole frame off `buf`: Ok(None) when more bytes are needed, Err when the
    /// prefix is impossible (a desynchronised stream).
    pub fn decode(buf: &mut Vec<u8>) -> Result<Option<Frame>, String> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let hl = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let dl = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        if hl == 0 || hl > MAX_HEADER || dl > MAX_DATA {
            return Err(format!("bad frame prefix {hl}/{dl}"));
        }
        if buf.len() < 8 + hl + dl {
            return Ok(None);
        }
        let rest = buf.split_off(8 + hl + dl);
        let data = buf.split_off(8 + hl);
        let header = buf.split_off(8);
        *buf = rest;
        Ok(Some((header, data)))
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        #[test]
        fn frame_roundtrip() {
            let r = Reply { id: 7, ..Default::default() };
            let mut buf = encode(&r, b"abc");
            buf.extend_from_slice(&encode(&r, b"")[..5]);
            let (h, d) = decode(&mut buf).unwrap().unwrap();
            let back: Reply = serde_json::from_slice(&h).unwrap();
            assert_eq!((back.id, d.as_slice()), (7, &b"abc"[..]));
            assert!(decode(&mut buf).unwrap().is_none());
            assert_eq!(buf.len(), 5);
        }
    }
}

/// What a template made from a container image asks of the agent, written into its root
/// filesystem when the image is converted and read by the agent at every boot.
pub mod image {
    use serde::{Deserialize, Serialize};

    /// Where the converter writes [`ImageConfig`] in the guest's root filesystem.
    pub const CONFIG_PATH: &str = "/etc/cove/image.json";

    /// The image config's runtime defaults (the OCI image spec's `config` object).
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ImageConfig {
        /// `KEY=value` entries, in the image's order.
        #[serde(default)]
        pub env: Vec<String>,
        /// Default working directory of commands; the user's home when empty.
        #[serde(default)]
        pub working_dir: String,
        /// `name`, `uid`, `name:group` or `uid:gid`; root when empty (as in a container).
        #[serde(default)]
        pub user: String,
        #[serde(default)]
        pub entrypoint: Option<Vec<String>>,
        #[serde(default)]
        pub cmd: Option<Vec<String>>,
    }

    impl ImageConfig {
        /// The command the image runs: entrypoint followed by cmd; empty when it has neither.
        pub fn command(&self) -> Vec<String> {
            let mut argv = self.entrypoint.clone().unwrap_or_default();
            argv.extend(self.cmd.clone().unwrap_or_default());
            argv
        }
    }
}
