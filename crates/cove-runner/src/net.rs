//! Each sandbox's network on this host: its namespace and rules ([`cove_net::topology`]), the
//! egress listeners that judge names ([`cove_net::egress`]), and its CA, whose key stays in
//! `<data>/net/<id>.pem` (0600) and whose certificate the guest trusts.
//!
//! The network is up before QEMU starts and down when the VM ends (stop, delete, a pause
//! whose files were not kept), up again on resume. A pause that keeps a warm entry (see
//! `warm`) parks the namespace instead: its listeners go, its namespace, TAP, veth pair and
//! rules stay for the resume on this runner, which applies the sandbox's rules again and binds
//! the listeners while QEMU starts. A runner restart loses the listeners but not the
//! namespace: [`Network::reattach`] binds them again, and until then the redirected
//! connections are refused (fail closed).

use std::path::PathBuf;
use std::sync::Arc;

use cove_api::sandbox::NetworkPolicy;
use cove_net::ca::SandboxCa;
use cove_net::egress::{Egress, EgressConfig};
use cove_net::policy::{Policy, DENIED_V4};
use cove_net::topology::{self, Rules, SandboxNet};

use crate::RunnerError;

/// Environment every guest process gets so that common clients use the system bundle (which
/// holds the egress CA) rather than a bundle of their own.
const CA_ENV: &[(&str, &str)] = &[
    ("SSL_CERT_FILE", cove_proto::net::CA_BUNDLE),
    ("REQUESTS_CA_BUNDLE", cove_proto::net::CA_BUNDLE),
    ("CURL_CA_BUNDLE", cove_proto::net::CA_BUNDLE),
    ("GIT_SSL_CAINFO", cove_proto::net::CA_BUNDLE),
    ("NODE_EXTRA_CA_CERTS", cove_proto::net::CA_FILE),
];

pub struct Network {
    egress: Arc<Egress>,
    dir: PathBuf,
    /// The rules this process last applied in each namespace, so that a resume into a kept
    /// namespace under an unchanged policy runs no `nft` (empty after a restart: applied again).
    applied: Applied,
}

type Applied = Arc<std::sync::Mutex<std::collections::HashMap<String, Rules>>>;

fn applied_rules(map: &Applied) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Rules>> {
    map.lock().unwrap_or_else(|p| p.into_inner())
}

/// The part of a sandbox's network still being made after [`Network::start`].
pub struct NetworkFinish(Option<tokio::task::JoinHandle<Result<(), RunnerError>>>);

impl NetworkFinish {
    /// Nothing left to make.
    pub fn done() -> NetworkFinish {
        NetworkFinish(None)
    }

    /// Waits until the network is complete; at once when it was waited for before. Also
    /// called on a failed start, so that nothing is still being made when the network is
    /// taken down.
    pub async fn wait(&mut self) -> Result<(), RunnerError> {
        match self.0.take() {
            None => Ok(()),
            Some(task) => task.await.unwrap_or_else(|e| Err(net_err("creating the sandbox network", e))),
        }
    }
}

fn net_err(what: &str, e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Network(format!("{what}: {e}"))
}

fn compile(policy: Option<&NetworkPolicy>) -> Result<Policy, RunnerError> {
    Policy::compile(policy).map_err(|e| RunnerError::Network(format!("network_policy: {e}")))
}

fn rules(policy: &Policy) -> Rules {
    Rules { mode: policy.mode(), allow_cidrs: policy.allow_cidrs().to_vec() }
}

/// Applies `policy`'s rules in an existing namespace (unless this process applied the same
/// last) and binds its listeners there.
async fn bind(
    egress: &Arc<Egress>,
    applied: &Applied,
    id: &str,
    net: &SandboxNet,
    policy: Policy,
    ca: SandboxCa,
) -> Result<(), RunnerError> {
    let wanted = rules(&policy);
    let current = applied_rules(applied).remove(id);
    if current.as_ref() != Some(&wanted) {
        topology::apply(net, &wanted, DENIED_V4).await.map_err(|e| net_err("network rules", e))?;
    }
    applied_rules(applied).insert(id.to_string(), wanted);
    egress.attach(id, &net.netns(), policy, ca).await.map_err(|e| net_err("egress listeners", e))
}

impl Network {
    /// Installs the host-wide rules (forwarding, masquerade, what sandboxes may never reach).
    pub async fn new(data_dir: &std::path::Path, cfg: EgressConfig) -> Result<Network, RunnerError> {
        topology::ensure_host(DENIED_V4).await.map_err(|e| net_err("host network rules", e))?;
        let dir = data_dir.join("net");
        std::fs::create_dir_all(&dir).map_err(|e| RunnerError::io("creating net dir", e))?;
        let egress = Egress::new(cfg).map_err(|e| net_err("egress proxy", e))?;
        Ok(Network { egress, dir, applied: Applied::default() })
    }

    fn ca_path(&self, id: &str) -> PathBuf {
        ca_path(&self.dir, id)
    }

    /// The sandbox's CA, made on first use and kept until the sandbox is deleted (a paused
    /// guest still trusts it when it resumes).
    fn ca(&self, id: &str) -> Result<SandboxCa, RunnerError> {
        let path = self.ca_path(id);
        if let Ok(pem) = std::fs::read_to_string(&path) {
            if let Ok(ca) = SandboxCa::from_pem(&pem) {
                return Ok(ca);
            }
            tracing::warn!(sandbox_id = %id, "unreadable egress CA replaced");
        }
        let ca = SandboxCa::generate(id);
        write_private(&path, ca.to_pem().as_bytes()).map_err(|e| RunnerError::io("writing egress CA", e))?;
        Ok(ca)
    }

    /// Adds the CA variables to a guest environment (the user's own values win).
    pub fn guest_env(env: &mut std::collections::BTreeMap<String, String>) {
        for (k, v) in CA_ENV {
            env.entry(k.to_string()).or_insert_with(|| v.to_string());
        }
    }

    /// Builds the sandbox's namespace under `policy` and starts its listeners.
    pub async fn up(&self, id: &str, policy: Option<&NetworkPolicy>) -> Result<(), RunnerError> {
        let mut rest = self.start(id, policy).await?;
        rest.wait().await
    }

    /// As [`up`](Self::up), but returns once a VM can start in the namespace (its TAP is
    /// there); the veth pair, routes, rules and listeners come meanwhile, in the returned
    /// [`NetworkFinish`], which must be waited for before the guest runs.
    /// A namespace parked by a pause (whole: see [`topology::find_whole`]) is taken as it is;
    /// one left half made is made again.
    pub async fn start(
        &self,
        id: &str,
        policy: Option<&NetworkPolicy>,
    ) -> Result<NetworkFinish, RunnerError> {
        let policy = compile(policy)?;
        let ca = self.ca(id)?;
        let (egress, applied, id) = (self.egress.clone(), self.applied.clone(), id.to_string());
        if let Some(net) = topology::find_whole(&id).await {
            tracing::debug!(sandbox_id = %id, "sandbox network kept from its pause");
            return Ok(NetworkFinish(Some(tokio::spawn(async move {
                let bound = bind(&egress, &applied, &id, &net, policy, ca).await;
                if bound.is_err() {
                    let _ = topology::destroy(&id).await;
                }
                bound
            }))));
        }
        applied_rules(&self.applied).remove(&id);
        topology::create_tap(&id).await.map_err(|e| net_err("creating the sandbox network", e))?;
        Ok(NetworkFinish(Some(tokio::spawn(async move {
            let net = topology::finish(&id, &rules(&policy), DENIED_V4)
                .await
                .map_err(|e| net_err("creating the sandbox network", e))?;
            applied_rules(&applied).insert(id.clone(), rules(&policy));
            if let Err(e) = egress.attach(&id, &net.netns(), policy, ca).await {
                let _ = topology::destroy(&id).await;
                return Err(net_err("starting the egress listeners", e));
            }
            Ok(())
        }))))
    }

    /// After a runner restart: the namespace of a running VM is still there, its listeners
    /// are not.
    pub async fn reattach(&self, id: &str, policy: Option<&NetworkPolicy>) -> Result<(), RunnerError> {
        let policy = compile(policy)?;
        let Some(net) = topology::find(id).await else {
            return Err(RunnerError::Network(format!("sandbox {id} has no network namespace")));
        };
        bind(&self.egress, &self.applied, id, &net, policy, self.ca(id)?).await
    }

    /// Keeps the namespace of a sandbox whose VM ended with a warm entry kept, for its resume
    /// here: only the listeners go. [`down`](Self::down) or the next [`start`](Self::start)
    /// takes it.
    pub fn park(&self, id: &str) {
        self.egress.detach(id);
    }

    /// Applies a new policy to a running sandbox: kernel rules first (they cut kernel-path
    /// flows at their next packet), then the listeners (they cut proxied flows).
    pub async fn set_policy(&self, id: &str, policy: Option<&NetworkPolicy>) -> Result<(), RunnerError> {
        let policy = compile(policy)?;
        let Some(net) = topology::find(id).await else {
            return Err(RunnerError::NoVm(id.to_string()));
        };
        applied_rules(&self.applied).remove(id);
        topology::apply(&net, &rules(&policy), DENIED_V4).await.map_err(|e| net_err("network rules", e))?;
        applied_rules(&self.applied).insert(id.to_string(), rules(&policy));
        self.egress.update(id, policy);
        Ok(())
    }

    /// Where the sandboxes' metadata service gets its answers.
    pub fn set_metadata_source(&self, source: Arc<dyn cove_net::egress::metadata::MetadataSource>) {
        self.egress.set_metadata_source(source);
    }

    /// Lends credentials to the sandbox's credential proxy until the guard is dropped.
    pub fn lend(
        &self,
        id: &str,
        loan: cove_net::egress::lend::Loan,
    ) -> Result<cove_net::egress::lend::LoanGuard, RunnerError> {
        self.egress.lend(id, loan).ok_or_else(|| RunnerError::NoVm(id.to_string()))
    }

    /// Takes the sandbox's network down (its VM has ended). The CA stays.
    pub async fn down(&self, id: &str) -> Result<(), RunnerError> {
        self.egress.detach(id);
        applied_rules(&self.applied).remove(id);
        topology::destroy(id).await.map_err(|e| net_err("removing the sandbox network", e))
    }

    /// Takes down the namespace of a sandbox that has no VM on this runner (deleted, paused,
    /// or run by another runner now). A namespace a process still runs in is another runner's
    /// on this host (see [`topology::in_use`]): it is left alone.
    pub async fn release(&self, id: &str) -> Result<(), RunnerError> {
        if !topology::in_use(id) {
            return self.down(id).await;
        }
        self.egress.detach(id);
        applied_rules(&self.applied).remove(id);
        tracing::info!(sandbox_id = %id, "sandbox namespace in use by another runner's VM on this host: kept");
        Ok(())
    }

    /// Forgets the sandbox for good (it is deleted, or runs on another runner now): network
    /// (see [`release`](Self::release)) and CA.
    pub async fn remove(&self, id: &str) -> Result<(), RunnerError> {
        self.release(id).await?;
        match std::fs::remove_file(self.ca_path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RunnerError::io("removing egress CA", e)),
        }
    }

    /// Ids of the sandboxes whose network this runner's data dir made (they have a CA here),
    /// whether or not their namespace still exists: how a restarted server finds its own
    /// leftovers among the namespaces of every server on the host.
    pub fn owned(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.strip_suffix(".pem").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn ca_path(net_dir: &std::path::Path, id: &str) -> PathBuf {
    net_dir.join(format!("{id}.pem"))
}

/// The CA certificate sandbox `id`'s guest must trust, if it has one.
pub fn trust_pem(data_dir: &std::path::Path, id: &str) -> Option<String> {
    let pem = std::fs::read_to_string(ca_path(&data_dir.join("net"), id)).ok()?;
    SandboxCa::from_pem(&pem).ok().map(|ca| ca.cert_pem())
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// A throwaway network for a VM that is not a sandbox (template builds, benchmarks):
/// deny-all, no listeners.
pub async fn scratch(name: &str) -> Result<PathBuf, RunnerError> {
    let rules = Rules { mode: cove_api::sandbox::NetworkMode::DenyAll, allow_cidrs: Vec::new() };
    let net = topology::create(name, &rules, DENIED_V4)
        .await
        .map_err(|e| net_err("creating a scratch network", e))?;
    Ok(net.netns())
}

pub async fn remove_scratch(name: &str) {
    if let Err(e) = topology::destroy(name).await {
        tracing::warn!(name, error = %e, "removing a scratch network");
    }
}
