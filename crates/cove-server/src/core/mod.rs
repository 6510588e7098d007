//! The control plane's core: every sandbox action as one method. HTTP handlers (and later the
//! CLI and runner RPC) parse and validate, then call exactly one of these.
//!
//! Every state change is written to the store before the side effect it announces, with a
//! compare-and-set transition, so concurrent requests cannot both act and a restarted server
//! knows what was in flight (see `recover`).
//!
//! One module per concern: `lifecycle` (create, delete, pause, resume, stop, start, timeouts),
//! `machine` (the transition table), `recovery` (settling what a crash left in flight),
//! `snapshots`, `mounts`, `policy`, `presigned`, `guest` (agent and port access), `secrets`
//! (sealing credentials at rest), `templates`, `ssh` (SSH accesses).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use cove_api::sandbox::{
    ListSandboxes, MountConfig, MountRequest, MountUpdateRequest, NetworkPolicy, SandboxCreateRequest,
    SandboxResponse, SandboxState, DEFAULT_MEMORY_MIB, DEFAULT_TIMEOUT_SECS, DEFAULT_VCPU, MAX_MOUNTS,
};
use cove_api::snapshot::{ListSnapshots, SnapshotResponse, SnapshotRestoreRequest};
use cove_runner::image::new_image_prefix;
use cove_runner::{AfterCapture, AgentClient, RunnerError, SandboxHost, Unsealed, VmRequest};
use cove_store::sealed::Sealer;
use cove_store::{
    Change, Op, SandboxRecord, SnapshotQuery, SnapshotRecord, SnapshotState, Store, StoreError,
};
use tracing::Instrument;

use machine::Action;
use mounts::{mount_call_error, new_mount_id};
use policy::{check_policy, redact_policy};
use SandboxState as S;

mod guest;
mod lifecycle;
mod machine;
mod metadata;
mod mounts;
mod policy;
mod presigned;
mod recovery;
mod secrets;
mod snapshots;
mod ssh;
mod templates;
pub use guest::Guest;
pub use snapshots::snapshot_response;
pub use templates::{default_port, template_response};

use crate::error::{error_chain, ApiError};

#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Sandboxes an organization may hold in VM-holding states, unless it has its own limit.
    pub default_sandbox_limit: u64,
    /// The in-process runner's id in the records (with `Core::new`); with runners elsewhere
    /// only, what a new record says before its VM is placed (empty).
    pub runner_id: String,
    /// Where sandboxes' own services are reached: `<id>.<domain>` (the sandbox's `PORT`),
    /// `<id>-<port>.<domain>`, and presigned URLs `<token>.<domain>`. May carry a `:port`.
    pub sandbox_domain: String,
    /// Scheme of the URLs handed out (`https` behind TLS, `http` for local use).
    pub public_scheme: String,
    /// Templates an organization may hold.
    pub template_limit: u64,
    /// Where clients reach the SSH endpoint; `None` when the server runs none.
    pub ssh: Option<SshEndpoint>,
    /// The token runners sign their leases with; `None`: no runner registers here.
    pub cluster_token: Option<String>,
}

/// The address SSH clients are told to connect to.
#[derive(Debug, Clone)]
pub struct SshEndpoint {
    pub host: String,
    pub port: u16,
}

impl CoreConfig {
    /// One host, services of sandboxes under `localhost` (curl and browsers resolve
    /// `*.localhost` to the loopback address by themselves), plain HTTP.
    pub fn local(default_sandbox_limit: u64) -> CoreConfig {
        CoreConfig {
            default_sandbox_limit,
            runner_id: "local".into(),
            sandbox_domain: "localhost".into(),
            public_scheme: "http".into(),
            template_limit: cove_api::template::DEFAULT_TEMPLATE_LIMIT,
            ssh: None,
            cluster_token: None,
        }
    }
}

pub struct Core {
    sealer: Sealer,
    pub store: Arc<Store>,
    /// The machines the sandboxes run on: `cluster`, as the host it is to every action.
    pub host: Arc<dyn SandboxHost>,
    pub cluster: Arc<crate::cluster::Cluster>,
    pub cfg: CoreConfig,
    /// What `/metrics` reports besides the store's counts.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// One lock per sandbox: held exclusively by every operation that changes its VM or its
    /// state (pause, resume, snapshot, stop, start, mount and policy changes), shared by guest
    /// calls while they run ([`Guest`]). A burst of requests to a paused sandbox causes one
    /// resume, which the others wait for.
    ops: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    /// Sandboxes whose timeout is being handled.
    expiring: Mutex<std::collections::HashSet<String>>,
    /// How far each template upload in flight has come, by template id.
    building: Mutex<HashMap<String, cove_api::template::TemplateProgress>>,
}

fn new_sandbox_id() -> String {
    format!("sbx-{}", hex::encode(rand::random::<[u8; 10]>()))
}

pub fn response(rec: &SandboxRecord) -> SandboxResponse {
    SandboxResponse {
        id: rec.id.clone(),
        template_id: rec.template.clone(),
        mounts: rec.mounts.iter().map(MountConfig::public).collect(),
        vcpu: rec.vcpu,
        memory: rec.memory,
        disk: rec.disk,
        timeout: rec.timeout,
        state: rec.state,
        auto_pause: rec.auto_pause,
        network_policy: rec.network_policy.clone().map(redact_policy),
        created_at: rec.created_at,
    }
}

/// Exclusive hold of a sandbox's operation lock.
type OpGuard = tokio::sync::OwnedRwLockWriteGuard<()>;

fn limit_error(e: StoreError) -> ApiError {
    match e {
        StoreError::LimitReached { count, limit } => ApiError::TooMany(format!(
            "sandbox limit reached: the organization has {count} active sandboxes (limit {limit})"
        )),
        other => other.into(),
    }
}

fn not_in(id: &str, state: SandboxState, wanted: &str) -> ApiError {
    if state == S::Lost {
        return ApiError::Conflict(format!(
            "sandbox {id} is lost: the host it ran on stopped answering; it runs again if that host \
             comes back, or delete it"
        ));
    }
    ApiError::Conflict(format!("sandbox {id} is {state}, not {wanted}"))
}

impl Core {
    /// `sealer` keeps the secrets users give (header values to inject) sealed in the store.
    pub fn new(store: Arc<Store>, host: Arc<dyn SandboxHost>, cfg: CoreConfig, sealer: Sealer) -> Core {
        let cluster = crate::cluster::Cluster::single(store.clone(), &cfg.runner_id, host);
        Core::clustered(store, cluster, cfg, sealer)
    }

    /// A control plane for the runners of `host` (which may have none yet).
    pub fn clustered(
        store: Arc<Store>,
        host: Arc<crate::cluster::Cluster>,
        cfg: CoreConfig,
        sealer: Sealer,
    ) -> Core {
        Core {
            store,
            host: host.clone(),
            cluster: host,
            cfg,
            sealer,
            metrics: Default::default(),
            ops: Mutex::new(HashMap::new()),
            expiring: Mutex::new(Default::default()),
            building: Mutex::new(HashMap::new()),
        }
    }

    fn op_lock(&self, id: &str) -> Arc<tokio::sync::RwLock<()>> {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.entry(id.to_string()).or_default().clone()
    }

    /// The sandbox's operation lock, exclusive: a change of state or of what the VM has (its
    /// mounts, its policy). It waits for guest calls in flight, and calls that arrive meanwhile
    /// wait for it.
    async fn lock_sandbox(&self, id: &str) -> OpGuard {
        self.op_lock(id).write_owned().await
    }

    /// Takes the sandbox's operation lock and reads it; 409 naming its state unless it is in
    /// `want`.
    async fn lock_for(
        &self,
        org: &str,
        id: &str,
        action: Action,
    ) -> Result<(OpGuard, SandboxRecord), ApiError> {
        let want = machine::rule(action).from;
        let guard = self.lock_sandbox(id).await;
        let rec = self.get(org, id)?;
        if !want.contains(&rec.state) {
            return Err(not_in(id, rec.state, &machine::describe(want)));
        }
        Ok((guard, rec))
    }

    /// Records `action` in flight with `op` on a sandbox just read in the action's starting
    /// state (see [`machine::RULES`]): 409 if it moved meanwhile, 429 if the action counts
    /// toward the organization's limit and it is reached.
    fn begin(&self, id: &str, action: Action, op: Op) -> Result<(), ApiError> {
        let rule = machine::rule(action);
        let mut change = Change::to(rule.during).op(op);
        if rule.counts_toward_limit {
            change = change.limit(self.cfg.default_sandbox_limit);
        }
        match self.store.update(id, rule.from, change).map_err(limit_error)? {
            Some(_) => Ok(()),
            None => Err(ApiError::Conflict(format!("sandbox {id} changed state; try again"))),
        }
    }

    /// Records `action` done: its end state, with what `more` adds to the change.
    fn finish(&self, id: &str, action: Action, more: impl FnOnce(Change) -> Change) -> Result<(), ApiError> {
        let rule = machine::rule(action);
        self.store.update(id, &[rule.during], more(Change::to(rule.done.state())))?;
        Ok(())
    }

    /// Records `action` failed on the host: back to its fallback state.
    fn fall_back(&self, id: &str, action: Action) -> Result<(), ApiError> {
        let rule = machine::rule(action);
        self.store.transition(id, &[rule.during], rule.failed.state())?;
        Ok(())
    }

    fn expires_at(rec: &SandboxRecord) -> i64 {
        Utc::now().timestamp() + rec.timeout as i64
    }

    pub fn get(&self, org: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        self.store.sandbox(org, id)?.ok_or_else(|| ApiError::NotFound(format!("sandbox {id} not found")))
    }

    pub fn list(&self, org: &str, q: &ListSandboxes) -> Result<(Vec<SandboxRecord>, u64), ApiError> {
        Ok(self.store.list_sandboxes(org, q)?)
    }
}
