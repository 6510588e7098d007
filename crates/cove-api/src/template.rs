//! Templates made from container images: upload (pull and convert), rename, delete, inspect.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::sandbox::MAX_TEMPLATE_NAME;
use crate::{FieldError, Validate, Violations};

/// Names starting with this belong to the templates Cove ships.
pub const SYSTEM_PREFIX: &str = "system/";

/// A template Cove ships, built by `cove setup` (`images/rootfs.sh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemTemplate {
    pub name: &'static str,
    /// Directory of its root filesystem (`rootfs.qcow2`) in the cache directory.
    pub rootfs_dir: &'static str,
    /// The port of the service the template runs, which `https://<id>.<sandbox domain>`
    /// reaches (before the sandbox's `PORT` variable).
    pub service_port: Option<u16>,
    /// The service's command line (as in its `/etc/cove/image.json`, written by
    /// `images/rootfs.sh`); empty for none.
    pub command: &'static [&'static str],
    /// A shell command run in the guest at the template's first boot, before the snapshot is
    /// saved: it ends (status 0) once the service is ready, so that every sandbox restores
    /// with it ready.
    pub ready_probe: Option<&'static str>,
}

/// The account commands of every system template run as, and where they start.
pub const SYSTEM_USER: &str = "user";
pub const SYSTEM_WORKDIR: &str = "/home/user";

/// The code interpreter's port in its template's guests.
pub const CODE_INTERPRETER_PORT: u16 = 49999;
/// The desktop service's port in its template's guests (its API and the noVNC page).
pub const DESKTOP_PORT: u16 = 6080;

pub const SYSTEM_TEMPLATES: &[SystemTemplate] = &[
    SystemTemplate {
        name: crate::sandbox::DEFAULT_TEMPLATE,
        rootfs_dir: "rootfs",
        service_port: None,
        command: &[],
        ready_probe: None,
    },
    SystemTemplate {
        name: "system/code-interpreter:v0.1.0",
        rootfs_dir: "rootfs-code-interpreter",
        service_port: Some(CODE_INTERPRETER_PORT),
        command: &["/usr/bin/python3", "/opt/cove/code-interpreter/server.py"],
        // `?warm` also waits for the spare worker to have loaded numpy, pandas and matplotlib.
        ready_probe: Some(
            "curl -sf --retry 300 --retry-delay 1 --retry-connrefused -m 300 'http://127.0.0.1:49999/healthz?warm'",
        ),
    },
    SystemTemplate {
        name: "system/desktop:v0.1.0",
        rootfs_dir: "rootfs-desktop",
        service_port: Some(DESKTOP_PORT),
        command: &["/usr/bin/python3", "/opt/cove/desktop/server.py"],
        // `?ready` waits until every desktop process runs and XFCE has drawn its desktop.
        ready_probe: Some(
            "curl -sf --retry 300 --retry-delay 1 --retry-connrefused -m 300 'http://127.0.0.1:6080/api/healthz?ready'",
        ),
    },
];

/// The system template called `name`, if there is one.
pub fn system_template(name: &str) -> Option<&'static SystemTemplate> {
    SYSTEM_TEMPLATES.iter().find(|t| t.name == name)
}
pub const MAX_URI: usize = 500;
/// Templates an organization may hold unless the server says otherwise.
pub const DEFAULT_TEMPLATE_LIMIT: u64 = 25;
/// Free space a template's disk has beyond its content unless the upload asks for more.
pub const DEFAULT_FREE_MIB: u64 = 1024;
pub const MAX_FREE_MIB: u64 = 64 * 1024;

#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct UploadTemplateRequest {
    /// Template name: no whitespace, not starting with `system/`.
    pub name: String,
    /// Image reference to pull, e.g. `docker.io/library/python:3.12` or
    /// `registry.example.com:5000/team/app@sha256:…`.
    pub uri: String,
    #[serde(default)]
    pub credentials: Option<RegistryCredentials>,
    /// Cove addition: free space (MiB) the template's disk has beyond the image's content,
    /// 0..=65536 (default 1024). Sandboxes may ask for more with `disk` at create.
    #[serde(default)]
    pub disk_free_mib: Option<u64>,
}

impl fmt::Debug for UploadTemplateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UploadTemplateRequest")
            .field("name", &self.name)
            .field("uri", &self.uri)
            .field("credentials", &self.credentials)
            .field("disk_free_mib", &self.disk_free_mib)
            .finish()
    }
}

/// Registry credentials. Only `basic` is served so far; the others are refused with a field
/// error. Never echoed, logged or stored.
#[derive(Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RegistryCredentials {
    /// `basic`, `aws`, `gcp` or `azure`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub aws_access_key_id: Option<String>,
    #[serde(default)]
    pub aws_secret_access_key: Option<String>,
    #[serde(default)]
    pub aws_region: Option<String>,
    #[serde(default)]
    pub gcp_service_account_json: Option<String>,
    #[serde(default)]
    pub azure_client_id: Option<String>,
    #[serde(default)]
    pub azure_client_secret: Option<String>,
    #[serde(default)]
    pub azure_tenant_id: Option<String>,
}

impl fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("type", &self.kind)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl RegistryCredentials {
    /// The username and password of `basic` credentials.
    pub fn basic(&self) -> Option<(&str, &str)> {
        (self.kind == "basic").then_some(())?;
        Some((self.username.as_deref()?, self.password.as_deref()?))
    }

    fn check(&self, v: &mut Violations) {
        let required: &[(&str, &Option<String>)] = match self.kind.as_str() {
            "basic" => &[("username", &self.username), ("password", &self.password)],
            "aws" => &[
                ("aws_access_key_id", &self.aws_access_key_id),
                ("aws_secret_access_key", &self.aws_secret_access_key),
            ],
            "gcp" => &[("gcp_service_account_json", &self.gcp_service_account_json)],
            "azure" => &[
                ("azure_client_id", &self.azure_client_id),
                ("azure_client_secret", &self.azure_client_secret),
                ("azure_tenant_id", &self.azure_tenant_id),
            ],
            _ => {
                v.push("credentials.type", "must be one of basic, aws, gcp, azure");
                return;
            }
        };
        let mut complete = true;
        for (field, value) in required {
            if value.as_deref().is_none_or(str::is_empty) {
                v.push(format!("credentials.{field}"), format!("is required when type is {}", self.kind));
                complete = false;
            }
        }
        if complete && self.kind != "basic" {
            v.push(
                "credentials.type",
                format!("{} credentials are not supported by this server; use basic", self.kind),
            );
        }
    }
}

/// Checks a template name as the contract asks (and what a name must be to be shown and typed).
pub fn check_name(v: &mut Violations, field: &str, name: &str) {
    if name.is_empty() {
        v.push(field, "must not be empty");
    } else if name.chars().count() > MAX_TEMPLATE_NAME {
        v.push(field, format!("must be at most {MAX_TEMPLATE_NAME} characters"));
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        v.push(field, "must not contain whitespace");
    } else if name.to_ascii_lowercase().starts_with(SYSTEM_PREFIX) {
        v.push(field, format!("must not start with {SYSTEM_PREFIX:?} (reserved for system templates)"));
    }
}

impl Validate for UploadTemplateRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_name(&mut v, "name", &self.name);
        let uri = self.uri.trim();
        if uri.is_empty() {
            v.push("uri", "must not be empty");
        } else if self.uri.len() > MAX_URI {
            v.push("uri", format!("must be at most {MAX_URI} characters"));
        } else if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
            v.push("uri", "must not contain whitespace");
        }
        if let Some(c) = &self.credentials {
            c.check(&mut v);
        }
        if let Some(free) = self.disk_free_mib {
            v.check(free <= MAX_FREE_MIB, "disk_free_mib", format!("must be at most {MAX_FREE_MIB}"));
        }
        v.finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RenameTemplateRequest {
    pub name: String,
}

impl Validate for RenameTemplateRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_name(&mut v, "name", &self.name);
        v.finish()
    }
}

/// The image config's runtime defaults, which sandboxes of the template start with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// Default working directory of commands.
    pub working_dir: String,
    /// The user commands run as (root when empty).
    pub user: String,
    pub env: Option<BTreeMap<String, String>>,
}

/// A template (the contract's `UploadTemplateResponse`, with Cove's additions).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Template {
    pub id: String,
    pub name: String,
    /// Digest of the image manifest the template was made from.
    pub digest: String,
    pub image_config: ImageConfig,
    pub is_system: bool,
    pub created_at: DateTime<Utc>,
    /// Cove addition: the image reference it was pulled from.
    #[serde(default)]
    pub uri: String,
    /// Cove addition: disk size of its sandboxes, MiB.
    #[serde(default)]
    pub disk: u64,
    /// Cove addition: `ready`, or `building` while its upload runs (only `GET
    /// /v1/template/{id or name}` shows a building template).
    #[serde(default)]
    pub state: String,
    /// Cove addition: how far a building template has come.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TemplateProgress>,
}

/// How far the upload of a template has come.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct TemplateProgress {
    /// `pulling`, `unpacking`, `writing the disk` or `booting`.
    pub stage: String,
    pub layers_done: usize,
    pub layers_total: usize,
    /// Compressed layer bytes fetched (or found in the cache) so far, and in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    pub items: Vec<Template>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(r: Result<(), Vec<FieldError>>) -> Vec<String> {
        r.err().unwrap_or_default().into_iter().map(|e| e.field).collect()
    }

    fn upload(v: serde_json::Value) -> UploadTemplateRequest {
        serde_json::from_value(v).unwrap()
    }

    /// Each service template's command in the table (what its metadata says) is the one
    /// `images/rootfs.sh` writes into its `/etc/cove/image.json` (what the agent runs): the
    /// script's `install_service NAME` writes the config with `$dir` = `/opt/cove/NAME`.
    #[test]
    fn service_commands_match_their_image_config() {
        let script = include_str!("../../../images/rootfs.sh");
        let json = script
            .split("<<JSON\n")
            .nth(1)
            .and_then(|rest| rest.split("\nJSON\n").next())
            .expect("an image.json heredoc in rootfs.sh");
        for (template, service, port) in [
            ("system/code-interpreter:v0.1.0", "code-interpreter", CODE_INTERPRETER_PORT),
            ("system/desktop:v0.1.0", "desktop", DESKTOP_PORT),
        ] {
            assert!(script.contains(&format!("\n    install_service {service}\n")), "{service}");
            let config: serde_json::Value =
                serde_json::from_str(&json.replace("$dir", &format!("/opt/cove/{service}"))).unwrap();
            let t = system_template(template).unwrap();
            assert_eq!(config["cmd"], serde_json::json!(t.command), "{template}");
            assert_eq!(t.service_port, Some(port));
            assert!(t.ready_probe.unwrap().contains(&port.to_string()));
        }
    }

    #[test]
    fn names_and_uris() {
        assert!(upload(serde_json::json!({"name": "my-app:v1", "uri": "alpine:3"})).validate().is_ok());
        for bad in ["", "has space", "tab\there", "system/x", "SYSTEM/x", &"a".repeat(256)] {
            assert_eq!(
                fields(upload(serde_json::json!({"name": bad, "uri": "a"})).validate()),
                ["name"],
                "{bad:?}"
            );
        }
        for bad in ["", " ", "a b", &"a".repeat(501)] {
            assert_eq!(
                fields(upload(serde_json::json!({"name": "n", "uri": bad})).validate()),
                ["uri"],
                "{bad:?}"
            );
        }
        let r = upload(serde_json::json!({"name": "n", "uri": "u", "disk_free_mib": 70000}));
        assert_eq!(fields(r.validate()), ["disk_free_mib"]);
    }

    #[test]
    fn credentials_by_type() {
        let with =
            |c: serde_json::Value| upload(serde_json::json!({"name": "n", "uri": "u", "credentials": c}));
        let ok = with(serde_json::json!({"type": "basic", "username": "u", "password": "p"}));
        assert!(ok.validate().is_ok());
        assert_eq!(ok.credentials.as_ref().unwrap().basic(), Some(("u", "p")));
        assert!(!format!("{ok:?}").contains("\"p\""), "{ok:?}");
        assert_eq!(
            fields(with(serde_json::json!({"type": "basic", "username": "u"})).validate()),
            ["credentials.password"]
        );
        assert_eq!(fields(with(serde_json::json!({"type": "ftp"})).validate()), ["credentials.type"]);
        let aws =
            with(serde_json::json!({"type": "aws", "aws_access_key_id": "a", "aws_secret_access_key": "s"}));
        assert_eq!(fields(aws.validate()), ["credentials.type"]);
        assert_eq!(
            fields(with(serde_json::json!({"type": "azure", "azure_client_id": "a"})).validate()),
            ["credentials.azure_client_secret", "credentials.azure_tenant_id"]
        );
    }
}
