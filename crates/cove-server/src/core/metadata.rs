//! The control plane's side of the in-guest metadata service: what a sandbox is told about
//! itself, from its record and its template's (see `cove_net::egress::metadata` for the
//! service).

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use cove_runner::host::{ExecMetadata, MetadataSource, MountMetadata, SandboxMetadata};

use super::Core;

/// The metadata source the host is given: the control plane, held weakly so that the host
/// (which the control plane owns) does not keep it alive.
struct Records(Weak<Core>);

#[async_trait::async_trait]
impl MetadataSource for Records {
    async fn sandbox_metadata(&self, sandbox_id: &str) -> Option<SandboxMetadata> {
        self.0.upgrade()?.sandbox_metadata(sandbox_id)
    }
}

impl Core {
    /// Tells the host to answer its sandboxes' metadata requests from this control plane.
    pub fn serve_metadata(self: &Arc<Self>) {
        self.host.set_metadata_source(Arc::new(Records(Arc::downgrade(self))));
    }

    fn sandbox_metadata(&self, id: &str) -> Option<SandboxMetadata> {
        let rec = match self.store.sandbox_by_id(id) {
            Ok(rec) => rec?,
            Err(e) => {
                tracing::warn!(sandbox_id = id, error = %e, "metadata: reading the sandbox record");
                return None;
            }
        };
        let (command, workdir, user, mut env) = match cove_api::template::system_template(&rec.template) {
            Some(t) => (
                t.command.iter().map(|s| s.to_string()).collect(),
                cove_api::template::SYSTEM_WORKDIR.to_string(),
                cove_api::template::SYSTEM_USER.to_string(),
                BTreeMap::new(),
            ),
            None => {
                let config = self.store.template(&rec.org_id, &rec.template).ok()??.image_config;
                let env = config
                    .env
                    .iter()
                    .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
                    .collect();
                let user = if config.user.is_empty() { "root".to_string() } else { config.user.clone() };
                (config.command(), config.working_dir.clone(), user, env)
            }
        };
        env.extend(rec.env.clone());
        let mounts = rec
            .mounts
            .iter()
            .map(|m| MountMetadata {
                id: m.id.clone(),
                kind: "object-storage".into(),
                bucket: m.bucket.clone(),
                mount_path: m.mount_path.clone(),
                // A mount that could not attach fails the request that asked for it, so every
                // recorded mount of a sandbox that asks is attached.
                status: "active".into(),
                status_reason: None,
                read_only: true,
            })
            .collect();
        Some(SandboxMetadata {
            exec: ExecMetadata { command: shell_join(&command), workdir, user, env },
            mounts,
            otel_endpoint: None,
        })
    }
}

/// A command line as a POSIX shell reads it back: words of safe characters as they are, any
/// other in single quotes.
fn shell_join(argv: &[String]) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c);
    argv.iter()
        .map(|w| {
            if !w.is_empty() && w.chars().all(safe) {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::shell_join;

    #[test]
    fn command_lines_are_shell_escaped() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(shell_join(&argv(&["python3", "app.py"])), "python3 app.py");
        assert_eq!(shell_join(&argv(&["sh", "-c", "echo it's $HOME"])), r"sh -c 'echo it'\''s $HOME'");
        assert_eq!(shell_join(&argv(&["a", ""])), "a ''");
        assert_eq!(shell_join(&[]), "");
    }
}
