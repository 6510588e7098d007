//! What crosses the wire: the calls' arguments and answers as JSON, and `RunnerError` as a tagged
//! enum that keeps what the control plane tells apart (agent statuses and fields, the field of an
//! image pull's failure, a mount's index and kind, a refused guest port, an unknown template).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{AgentError, RunnerError};

/// A host's answer to a call: its value or its error.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer<T> {
    Ok(T),
    Err(WireError),
}

/// A line of `build_template`'s answer: progress, then the result.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildLine {
    Progress(cove_api::template::TemplateProgress),
    Done(Answer<crate::BuiltTemplate>),
}

#[derive(Serialize, Deserialize)]
pub struct WireSource {
    pub id: String,
    pub uri: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub free_mib: u64,
}

/// What a host has of the system templates: disk size (MiB) and when each was built (Unix
/// milliseconds), by name; and which run of the runner process answers. Asked at connect,
/// after every template change, and on every new connection.
#[derive(Serialize, Deserialize, Default, Clone)]
pub struct Inventory {
    pub templates: BTreeMap<String, (u64, Option<u64>)>,
    /// Random per runner process: a new one means the runner restarted.
    pub boot: String,
    pub info: crate::HostInfo,
}

#[derive(Serialize, Deserialize)]
pub struct WireLoan {
    pub host: String,
    pub port: u16,
    pub path_prefix: String,
    pub authorization: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireError {
    UnknownTemplate { template: String },
    ImagesMissing { message: String },
    NoVm { id: String },
    AgentConnect { message: String },
    AgentVersion { agent: u32, runner: u32 },
    AgentRequest { message: String },
    AgentStatus { status: u16, message: String, field: Option<String> },
    Vmm { message: String },
    Io { what: String, refused: bool, message: String },
    Blob { message: String },
    Image { message: String },
    Network { message: String },
    Unavailable { message: String },
    Oci { field: Option<String>, message: String },
    Mount { index: usize, mount: String, message: String },
}

/// The full message of an error and its causes.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s = format!("{s}: {c}");
        cause = c.source();
    }
    s
}

impl From<&RunnerError> for WireError {
    fn from(e: &RunnerError) -> WireError {
        use cove_mount::MountError as M;
        match e {
            RunnerError::UnknownTemplate(t) => WireError::UnknownTemplate { template: t.clone() },
            RunnerError::ImagesMissing(m) => WireError::ImagesMissing { message: m.clone() },
            RunnerError::NoVm(id) => WireError::NoVm { id: id.clone() },
            RunnerError::Agent(AgentError::Connect(m)) => WireError::AgentConnect { message: m.clone() },
            RunnerError::Agent(AgentError::Version(a, r)) => {
                WireError::AgentVersion { agent: *a, runner: *r }
            }
            RunnerError::Agent(AgentError::Request(m)) => WireError::AgentRequest { message: m.clone() },
            RunnerError::Agent(AgentError::Status { status, message, field }) => WireError::AgentStatus {
                status: status.as_u16(),
                message: message.clone(),
                field: field.clone(),
            },
            RunnerError::Vmm(v) => WireError::Vmm { message: chain(v) },
            RunnerError::Io(what, io) => WireError::Io {
                what: what.clone(),
                refused: io.kind() == std::io::ErrorKind::ConnectionRefused,
                message: chain(io),
            },
            // A damaged image's message names no host detail, and clients see it.
            RunnerError::Blob(b @ cove_blob::BlobError::Corrupt { .. }) => {
                WireError::Image { message: b.to_string() }
            }
            RunnerError::Blob(b) => WireError::Blob { message: chain(b) },
            RunnerError::Image(m) => WireError::Image { message: m.clone() },
            RunnerError::Network(m) => WireError::Network { message: m.clone() },
            RunnerError::Unavailable(m) => WireError::Unavailable { message: m.clone() },
            RunnerError::Oci(o) => WireError::Oci { field: o.field().map(str::to_string), message: chain(o) },
            RunnerError::Mount { index, source } => {
                let (mount, message) = match source {
                    M::NotFound(m) => ("not_found", m),
                    M::AccessDenied(m) => ("access_denied", m),
                    M::BadEndpoint(m) => ("bad_endpoint", m),
                    M::NoSuchBucket(m) => ("no_such_bucket", m),
                    M::InvalidPath(m) => ("invalid_path", m),
                    M::IsADirectory(m) => ("is_a_directory", m),
                    M::Other(m) => ("other", m),
                };
                WireError::Mount { index: *index, mount: mount.into(), message: message.clone() }
            }
        }
    }
}

impl From<WireError> for RunnerError {
    fn from(e: WireError) -> RunnerError {
        use cove_mount::MountError as M;
        match e {
            WireError::UnknownTemplate { template } => RunnerError::UnknownTemplate(template),
            WireError::ImagesMissing { message } => RunnerError::ImagesMissing(message),
            WireError::NoVm { id } => RunnerError::NoVm(id),
            WireError::AgentConnect { message } => RunnerError::Agent(AgentError::Connect(message)),
            WireError::AgentVersion { agent, runner } => {
                RunnerError::Agent(AgentError::Version(agent, runner))
            }
            WireError::AgentRequest { message } => RunnerError::Agent(AgentError::Request(message)),
            WireError::AgentStatus { status, message, field } => RunnerError::Agent(AgentError::Status {
                status: http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY),
                message,
                field,
            }),
            WireError::Vmm { message } => RunnerError::Vmm(cove_vmm::VmmError::Spawn(message)),
            WireError::Io { what, refused, message } => {
                let kind =
                    if refused { std::io::ErrorKind::ConnectionRefused } else { std::io::ErrorKind::Other };
                RunnerError::Io(what, std::io::Error::new(kind, message))
            }
            WireError::Blob { message } => RunnerError::Blob(cove_blob::BlobError::Remote(message)),
            WireError::Image { message } => RunnerError::Image(message),
            WireError::Network { message } => RunnerError::Network(message),
            WireError::Unavailable { message } => RunnerError::Unavailable(message),
            WireError::Oci { field, message } => RunnerError::Oci(match field.as_deref() {
                Some("credentials") => cove_oci::OciError::Unauthorized,
                Some(_) => cove_oci::OciError::Platform(message),
                None => cove_oci::OciError::Io(message, std::io::Error::other("on the runner")),
            }),
            WireError::Mount { index, mount, message } => RunnerError::Mount {
                index,
                source: match mount.as_str() {
                    "not_found" => M::NotFound(message),
                    "access_denied" => M::AccessDenied(message),
                    "bad_endpoint" => M::BadEndpoint(message),
                    "no_such_bucket" => M::NoSuchBucket(message),
                    "invalid_path" => M::InvalidPath(message),
                    "is_a_directory" => M::IsADirectory(message),
                    _ => M::Other(message),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind the control plane tells apart survives the trip.
    #[test]
    fn errors_keep_what_the_control_plane_matches_on() {
        let cases = [
            RunnerError::UnknownTemplate("t".into()),
            RunnerError::NoVm("sbx-1".into()),
            RunnerError::Agent(AgentError::Status {
                status: http::StatusCode::NOT_FOUND,
                message: "no such file".into(),
                field: Some("path".into()),
            }),
            RunnerError::Io("guest port".into(), std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            RunnerError::Oci(cove_oci::OciError::NotFound("x".into())),
            RunnerError::Oci(cove_oci::OciError::CredentialsRequired),
            RunnerError::Mount { index: 2, source: cove_mount::MountError::NoSuchBucket("b".into()) },
            RunnerError::Blob(cove_blob::BlobError::NotFound("images/x/manifest.json".into())),
            RunnerError::Unavailable("no runner has room".into()),
        ];
        for e in &cases {
            let wire = WireError::from(e);
            let json = serde_json::to_string(&wire).unwrap();
            let back = RunnerError::from(serde_json::from_str::<WireError>(&json).unwrap());
            assert_eq!(WireError::from(&back).kind(), wire.kind(), "{json}");
            match (e, &back) {
                (RunnerError::Oci(a), RunnerError::Oci(b)) => assert_eq!(a.field(), b.field()),
                (RunnerError::Io(_, a), RunnerError::Io(_, b)) => assert_eq!(a.kind(), b.kind()),
                (RunnerError::Mount { index: a, .. }, RunnerError::Mount { index: b, .. }) => {
                    assert_eq!(a, b)
                }
                (a, b) => assert_eq!(a.to_string(), b.to_string()),
            }
        }
    }

    /// A store's failure stays one (whose details clients never see), whatever it names.
    #[test]
    fn a_store_failure_stays_a_store_failure() {
        let e = RunnerError::Blob(cove_blob::BlobError::InvalidUrl {
            url: "s3://bucket/x".into(),
            reason: "endpoint http://10.0.0.9:9000 refused".into(),
        });
        let back = RunnerError::from(WireError::from(&e));
        assert!(matches!(back, RunnerError::Blob(cove_blob::BlobError::Remote(_))), "{back:?}");
        assert!(back.to_string().contains("10.0.0.9"), "the log keeps it: {back}");
    }

    impl WireError {
        fn kind(&self) -> String {
            serde_json::to_value(self).unwrap()["kind"].as_str().unwrap().to_string()
        }
    }
}
