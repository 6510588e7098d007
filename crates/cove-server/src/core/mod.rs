//! The control plane's core: every sandbox action as one method. HTTP handlers (and later the
//! CLI and runner RPC) parse and validate, then call exactly one of these.
//!
//! Every state change is written to the store before the side effect it announces, with a
//! compare-and-set transition, so concurrent requests cannot both act and a restarted server
//! knows what was in flight (see `recover`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use cove_api::sandbox::{
    ListSandboxes, MountConfig, MountRequest, MountUpdateRequest, NetworkPolicy, SandboxCreateRequest,
    SandboxResponse, SandboxState, DEFAULT_MEMORY_MIB, DEFAULT_TIMEOUT_SECS, DEFAULT_VCPU, MAX_MOUNTS,
};
use cove_api::snapshot::{ListSnapshots, SnapshotResponse, SnapshotRestoreRequest};
use cove_runner::image::new_image_prefix;
use cove_runner::{AfterCapture, AgentClient, Runner, RunnerError, VmRequest};
use cove_store::sealed::Sealer;
use cove_store::{
    Change, Op, SandboxRecord, SnapshotQuery, SnapshotRecord, SnapshotState, Store, StoreError,
};
use tracing::Instrument;

use machine::Action;
use SandboxState as S;

mod machine;
mod recovery;
mod templates;
pub use templates::template_response;

use crate::error::{error_chain, ApiError};

#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Sandboxes an organization may hold in VM-holding states, unless it has its own limit.
    pub default_sandbox_limit: u64,
    /// Name of the (single, in-process) runner.
    pub runner_id: String,
    /// Where sandboxes' own services are reached: `<id>.<domain>` (the sandbox's `PORT`),
    /// `<id>-<port>.<domain>`, and presigned URLs `<token>.<domain>`. May carry a `:port`.
    pub sandbox_domain: String,
    /// Scheme of the URLs handed out (`https` behind TLS, `http` for local use).
    pub public_scheme: String,
    /// Templates an organization may hold.
    pub template_limit: u64,
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
        }
    }
}

pub struct Core {
    sealer: Sealer,
    pub store: Arc<Store>,
    pub runner: Arc<Runner>,
    pub cfg: CoreConfig,
    /// One lock per sandbox, held by every operation that changes its VM (pause, resume,
    /// snapshot, stop, start): concurrent requests queue behind it, so a burst of requests to a
    /// paused sandbox causes one resume, which the others wait for.
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

/// Header values given for injection are write-only.
fn redact_policy(mut p: cove_api::sandbox::NetworkPolicy) -> cove_api::sandbox::NetworkPolicy {
    for t in &mut p.transforms {
        for v in t.inject_headers.values_mut() {
            *v = "[redacted]".into();
        }
    }
    p
}

pub fn snapshot_response(s: &SnapshotRecord) -> SnapshotResponse {
    SnapshotResponse {
        id: s.id.clone(),
        name: s.name.clone(),
        template_id: s.template.clone(),
        vcpu: s.vcpu,
        memory: s.memory,
        disk: s.disk,
        network_policy: s.network_policy.clone().map(redact_policy),
        created_at: s.created_at,
    }
}

/// What the API's validation cannot see: CIDRs over ranges no sandbox may reach, wildcards
/// over a whole top-level domain, headers that cannot be set. `field` prefixes the error's
/// field.
fn check_policy(policy: Option<&NetworkPolicy>, field: &str) -> Result<(), ApiError> {
    cove_net::policy::Policy::compile(policy).map(|_| ()).map_err(|e| {
        let rest = e.field.strip_prefix("network_policy").unwrap_or(&e.field);
        let name = format!("{field}{rest}");
        ApiError::field(name.trim_start_matches('.'), e.message)
    })
}

fn vm_request(rec: &SandboxRecord) -> VmRequest {
    VmRequest {
        id: rec.id.clone(),
        template: rec.template.clone(),
        vcpus: rec.vcpu,
        memory_mib: rec.memory,
        disk_mib: rec.disk,
        env: rec.env.clone(),
        network_policy: rec.network_policy.clone(),
        mounts: rec.mounts.clone(),
    }
}

/// Exclusive hold of a sandbox's operation lock.
type OpGuard = tokio::sync::OwnedRwLockWriteGuard<()>;

/// A sandbox's agent, with a shared hold of its operation lock: no pause, stop or snapshot
/// starts while this lives. A streamed answer keeps it until the stream ends.
pub struct Guest {
    agent: AgentClient,
    _lease: tokio::sync::OwnedRwLockReadGuard<()>,
}

impl std::ops::Deref for Guest {
    type Target = AgentClient;
    fn deref(&self) -> &AgentClient {
        &self.agent
    }
}

fn new_mount_id() -> String {
    format!("mnt-{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// A mount that could not be attached, as the API says it: the field to fix (under `field`)
/// and why. The message names endpoint and bucket, never the secret.
fn mount_error(field: &str, e: cove_mount::MountError) -> ApiError {
    use cove_mount::MountError as E;
    let at = |name: &str| if field.is_empty() { name.to_string() } else { format!("{field}.{name}") };
    match e {
        E::BadEndpoint(m) => ApiError::field(&at("endpoint"), m),
        E::NoSuchBucket(m) => ApiError::field(&at("bucket"), m),
        E::AccessDenied(m) => ApiError::field(&at("access_key_id"), m),
        E::NotFound(m) | E::InvalidPath(m) => ApiError::field(&at("prefix"), m),
        E::IsADirectory(m) | E::Other(m) => {
            ApiError::Conflict(format!("the mount could not be attached: {m}"))
        }
    }
}

/// A runner error of a call about mounts: a mount that could not be connected names its field.
fn mount_call_error(e: RunnerError, field: impl Fn(usize) -> String) -> ApiError {
    match e {
        RunnerError::Mount { index, source } => mount_error(&field(index), source),
        e => ApiError::from(e),
    }
}

/// 409 when another mount of the sandbox has `m`'s path, or one inside or around it.
fn check_mount_path(rec: &SandboxRecord, m: &MountConfig) -> Result<(), ApiError> {
    match rec
        .mounts
        .iter()
        .find(|o| o.id != m.id && cove_api::sandbox::paths_overlap(&o.mount_path, &m.mount_path))
    {
        Some(o) => Err(ApiError::Conflict(format!(
            "mount_path {} overlaps mount {} at {}",
            m.mount_path, o.id, o.mount_path
        ))),
        None => Ok(()),
    }
}

fn limit_error(e: StoreError) -> ApiError {
    match e {
        StoreError::LimitReached { count, limit } => ApiError::TooMany(format!(
            "sandbox limit reached: the organization has {count} active sandboxes (limit {limit})"
        )),
        other => other.into(),
    }
}

fn not_in(id: &str, state: SandboxState, wanted: &str) -> ApiError {
    ApiError::Conflict(format!("sandbox {id} is {state}, not {wanted}"))
}

impl Core {
    /// `sealer` keeps the secrets users give (header values to inject) sealed in the store.
    pub fn new(store: Arc<Store>, runner: Arc<Runner>, cfg: CoreConfig, sealer: Sealer) -> Core {
        Core {
            store,
            runner,
            cfg,
            sealer,
            ops: Mutex::new(HashMap::new()),
            expiring: Mutex::new(Default::default()),
            building: Mutex::new(HashMap::new()),
        }
    }

    /// Seals a secret in place (one already sealed is kept).
    fn seal(&self, v: &mut String) {
        if !Sealer::is_sealed(v) {
            *v = self.sealer.seal(v);
        }
    }

    /// Opens a sealed secret in place. One that cannot be opened (key file lost or replaced) is
    /// left sealed, so an upstream gets a useless value rather than the sandbox getting anything.
    fn open(&self, sandbox_id: &str, what: &str, v: &mut String) {
        match self.sealer.open(v) {
            Ok(plain) => *v = plain,
            Err(e) => tracing::error!(sandbox_id = %sandbox_id, error = %e, "sealed {what}"),
        }
    }

    /// The policy as stored: header values to inject sealed.
    fn seal_policy(&self, mut policy: Option<NetworkPolicy>) -> Option<NetworkPolicy> {
        for t in policy.iter_mut().flat_map(|p| &mut p.transforms) {
            t.inject_headers.values_mut().for_each(|v| self.seal(v));
        }
        policy
    }

    /// A mount as stored: credentials sealed.
    fn seal_mount(&self, mut m: MountConfig) -> MountConfig {
        [&mut m.access_key_id, &mut m.secret_access_key].into_iter().flatten().for_each(|v| self.seal(v));
        m
    }

    fn open_mount(&self, sandbox_id: &str, mut m: MountConfig) -> MountConfig {
        for v in [&mut m.access_key_id, &mut m.secret_access_key].into_iter().flatten() {
            self.open(sandbox_id, "mount credential", v);
        }
        m
    }

    /// What the runner gets: the record's request, with sealed values opened.
    fn vm_request(&self, rec: &SandboxRecord) -> VmRequest {
        let mut req = vm_request(rec);
        req.mounts =
            std::mem::take(&mut req.mounts).into_iter().map(|m| self.open_mount(&rec.id, m)).collect();
        for t in req.network_policy.iter_mut().flat_map(|p| &mut p.transforms) {
            t.inject_headers.values_mut().for_each(|v| self.open(&rec.id, "header value", v));
        }
        req
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
        if rec.state != want {
            return Err(not_in(id, rec.state, want.as_str()));
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
        match self.store.update(id, &[rule.from], change).map_err(limit_error)? {
            Some(_) => Ok(()),
            None => Err(ApiError::Conflict(format!("sandbox {id} changed state; try again"))),
        }
    }

    /// Records `action` done: its end state, with what `more` adds to the change.
    fn finish(&self, id: &str, action: Action, more: impl FnOnce(Change) -> Change) -> Result<(), ApiError> {
        let rule = machine::rule(action);
        self.store.update(id, &[rule.during], more(Change::to(rule.done)))?;
        Ok(())
    }

    /// Records `action` failed on the host: back to its fallback state.
    fn fall_back(&self, id: &str, action: Action) -> Result<(), ApiError> {
        let rule = machine::rule(action);
        self.store.transition(id, &[rule.during], rule.failed)?;
        Ok(())
    }

    fn expires_at(rec: &SandboxRecord) -> i64 {
        Utc::now().timestamp() + rec.timeout as i64
    }

    pub async fn create_sandbox(
        &self,
        org: &str,
        req: SandboxCreateRequest,
    ) -> Result<SandboxRecord, ApiError> {
        let template = self.resolve_template(org, req.template_name.trim())?;
        let disk = req.disk.unwrap_or(template.disk_mib);
        if disk < template.disk_mib {
            return Err(ApiError::field(
                "disk",
                format!("must be at least the template's disk, {} MiB", template.disk_mib),
            ));
        }
        let mounts: Vec<MountConfig> =
            req.mounts.iter().flatten().map(|m| MountConfig::new(new_mount_id(), m)).collect();
        check_policy(req.network_policy.as_ref(), "network_policy")?;
        let now = Utc::now();
        let timeout = req.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS);
        let rec = SandboxRecord {
            id: new_sandbox_id(),
            org_id: org.to_string(),
            template: template.id,
            vcpu: req.vcpu.unwrap_or(DEFAULT_VCPU),
            memory: req.memory.unwrap_or(DEFAULT_MEMORY_MIB),
            disk,
            timeout,
            auto_pause: req.auto_pause.unwrap_or(false),
            network_policy: self.seal_policy(req.network_policy.clone()),
            mounts: mounts.into_iter().map(|m| self.seal_mount(m)).collect(),
            env: req.env_vars.clone().unwrap_or_default(),
            state: SandboxState::Starting,
            runner_id: self.cfg.runner_id.clone(),
            created_at: now,
            launch_time: None,
            state_changed_at: now,
            timeout_at: Some(now.timestamp() + timeout as i64),
            op: Some(Op::Create),
            image: None,
            snapshot_id: None,
        };
        self.store.insert_sandbox(&rec, self.cfg.default_sandbox_limit)?;
        let vm = self.vm_request(&rec);
        let span = tracing::info_span!("create", sandbox_id = %rec.id);
        if let Err(e) = self.runner.create(&vm).instrument(span).await {
            let _ = self.runner.destroy(&rec.id).await;
            self.store.delete_sandbox(&rec.id)?;
            return Err(match e {
                e @ RunnerError::Mount { .. } => mount_call_error(e, |i| format!("mounts[{i}]")),
                e => ApiError::unavailable(&rec.id, "the sandbox VM failed to start", &e),
            });
        }
        if self.store.transition(&rec.id, &[SandboxState::Starting], SandboxState::Running)?.is_none() {
            // Deleted while starting (e.g. by a concurrent delete): do not leave a VM behind.
            let _ = self.runner.destroy(&rec.id).await;
            return Err(ApiError::Conflict("sandbox was deleted while it started".into()));
        }
        self.get(org, &rec.id)
    }

    pub fn get(&self, org: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        self.store.sandbox(org, id)?.ok_or_else(|| ApiError::NotFound(format!("sandbox {id} not found")))
    }

    pub fn list(&self, org: &str, q: &ListSandboxes) -> Result<(Vec<SandboxRecord>, u64), ApiError> {
        Ok(self.store.list_sandboxes(org, q)?)
    }

    /// Deletes a sandbox: its VM, every file of it and its pause image. A sandbox already
    /// `deleting` (a delete interrupted by a crash) may be deleted again; one in a transition
    /// may not.
    pub async fn delete(&self, org: &str, id: &str) -> Result<(), ApiError> {
        let rec = self.get(org, id)?;
        let from = [S::Running, S::Paused, S::Stopped, S::Deleting];
        if self.store.transition(id, &from, S::Deleting)?.is_none() {
            return Err(ApiError::Conflict(format!(
                "sandbox {id} is {}; try again when it settles",
                rec.state
            )));
        }
        self.finish_delete(&rec).await
    }

    async fn finish_delete(&self, rec: &SandboxRecord) -> Result<(), ApiError> {
        self.runner.destroy(&rec.id).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
        if let Some(image) = &rec.image {
            self.runner.delete_image(image).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
        }
        self.store.delete_sandbox(&rec.id)?;
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).remove(&rec.id);
        Ok(())
    }

    /// The agent of a sandbox, resuming it first if it is paused (or waiting for the resume or
    /// snapshot in progress); 409 naming the state when it has no VM to offer. The sandbox stays
    /// running while the answer is held: a pause, stop or snapshot (a timeout's too) waits for
    /// it, and a call that arrives during one waits for it and resumes the sandbox.
    pub async fn agent(&self, org: &str, id: &str) -> Result<Guest, ApiError> {
        loop {
            let lease = self.op_lock(id).read_owned().await;
            let rec = self.get(org, id)?;
            match rec.state {
                S::Running => return Ok(Guest { agent: self.runner.agent(id).await?, _lease: lease }),
                S::Paused | S::Unpausing | S::Snapshotting => {
                    drop(lease);
                    self.resume(org, id).await?;
                }
                other => return Err(not_in(id, other, "running")),
            }
        }
    }

    /// The sandbox, running: a paused one is resumed first (requests that arrive during a
    /// pause, resume or snapshot wait for it).
    pub async fn running(&self, org: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        let rec = self.get(org, id)?;
        match rec.state {
            S::Running => Ok(rec),
            S::Paused | S::Unpausing | S::Snapshotting => self.resume(org, id).await,
            other => Err(not_in(id, other, "running")),
        }
    }

    /// A TCP connection to `port` of the sandbox's guest (resumed if paused).
    pub async fn connect_guest(
        &self,
        org: &str,
        id: &str,
        port: u16,
    ) -> Result<tokio::net::TcpStream, ApiError> {
        self.running(org, id).await?;
        self.runner.connect_guest(id, port).await.map_err(|e| match e {
            cove_runner::RunnerError::Io(_, io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                ApiError::BadGateway(format!("nothing listens on port {port} in sandbox {id}"))
            }
            e => {
                tracing::warn!(sandbox_id = %id, port, error = %error_chain(&e), "reaching a guest port");
                ApiError::BadGateway(format!("port {port} of sandbox {id} could not be reached"))
            }
        })
    }

    /// Issues a presigned URL for one port of a sandbox; the token is returned this once.
    pub fn create_presigned(
        &self,
        org: &str,
        id: &str,
        req: &cove_api::presigned::PresignedUrlCreateRequest,
    ) -> Result<cove_api::presigned::PresignedUrlResponse, ApiError> {
        let rec = self.get(org, id)?;
        let token = hex::encode(rand::random::<[u8; 16]>());
        // Whole seconds, so that expires_at is exactly created_at + expires_in.
        let now = chrono::DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap_or_else(Utc::now);
        let expires_in = req.expires_in.unwrap_or(cove_api::presigned::DEFAULT_EXPIRES_IN_SECS);
        let p = cove_store::PresignedRecord {
            id: format!("psu-{}", hex::encode(rand::random::<[u8; 8]>())),
            org_id: org.to_string(),
            sandbox_id: rec.id.clone(),
            port: u16::try_from(req.port)
                .map_err(|_| ApiError::field("port", "must be between 1 and 65535"))?,
            expires_at: now.timestamp() + expires_in,
            created_at: now,
        };
        self.store.insert_presigned(&p, &token)?;
        tracing::info!(sandbox_id = %id, presigned_id = %p.id, port = p.port, expires_in, "presigned URL issued");
        Ok(cove_api::presigned::PresignedUrlResponse {
            url: format!("{}://{token}.{}", self.cfg.public_scheme, self.cfg.sandbox_domain),
            token,
            id: p.id,
            sandbox_id: p.sandbox_id,
            port: p.port,
            expires_at: chrono::DateTime::from_timestamp(p.expires_at, 0).unwrap_or(now),
            created_at: p.created_at,
        })
    }

    pub fn delete_presigned(&self, org: &str, id: &str, presigned_id: &str) -> Result<(), ApiError> {
        self.get(org, id)?;
        self.store.delete_presigned(org, id, presigned_id).map_err(|e| match e {
            StoreError::NotFound => {
                ApiError::NotFound(format!("presigned URL {presigned_id} of sandbox {id} not found"))
            }
            e => e.into(),
        })
    }

    /// Replaces a sandbox's egress policy. A running sandbox gets it at once (flows it forbids
    /// are cut); a paused or stopped one when it next runs.
    pub async fn set_network_policy(
        &self,
        org: &str,
        id: &str,
        policy: NetworkPolicy,
    ) -> Result<SandboxRecord, ApiError> {
        check_policy(Some(&policy), "")?;
        let _op = self.lock_sandbox(id).await;
        let rec = self.get(org, id)?;
        match rec.state {
            S::Running => {
                self.runner
                    .set_network_policy(id, Some(&policy))
                    .await
                    .map_err(|e| ApiError::unavailable(id, "applying the network policy failed", &e))?;
            }
            S::Paused | S::Stopped => {}
            other => return Err(not_in(id, other, "running, paused or stopped")),
        }
        self.store.set_network_policy(id, self.seal_policy(Some(policy.clone())).as_ref())?;
        tracing::info!(sandbox_id = %id, mode = ?policy.mode, "network policy replaced");
        self.get(org, id)
    }

    /// The sandbox locked for a change of its mounts: running (a paused one is resumed first, as
    /// for any request that needs its guest) or stopped (the change is only recorded: a start
    /// boots afresh and mounts what is recorded); 409 naming any other state.
    async fn lock_for_mounts(&self, org: &str, id: &str) -> Result<(OpGuard, SandboxRecord), ApiError> {
        if self.get(org, id)?.state != S::Stopped {
            self.running(org, id).await?;
        }
        let guard = self.lock_sandbox(id).await;
        let rec = self.get(org, id)?;
        match rec.state {
            S::Running | S::Stopped => Ok((guard, rec)),
            other => Err(not_in(id, other, "running or stopped")),
        }
    }

    /// Attaches a mount to a sandbox (resumed first if paused): connected on the host first, so
    /// a wrong endpoint, bucket or credentials is a 400 naming the field; 409 over the limit or
    /// on a path already mounted.
    pub async fn add_mount(&self, org: &str, id: &str, req: &MountRequest) -> Result<MountConfig, ApiError> {
        let (_op, rec) = self.lock_for_mounts(org, id).await?;
        if rec.mounts.len() >= MAX_MOUNTS {
            return Err(ApiError::Conflict(format!(
                "sandbox {id} has {} mounts, the most allowed",
                rec.mounts.len()
            )));
        }
        let mount = MountConfig::new(new_mount_id(), req);
        check_mount_path(&rec, &mount)?;
        let plain = mount.clone();
        let attached = match rec.state {
            S::Running => self.runner.add_mount(id, &plain).await,
            _ => self.runner.check_mount(&plain).await,
        };
        attached.map_err(|e| mount_call_error(e, |_| String::new()))?;
        let mut mounts = rec.mounts.clone();
        mounts.push(self.seal_mount(mount));
        self.store.set_mounts(id, &mounts)?;
        tracing::info!(sandbox_id = %id, mount_id = %plain.id, bucket = %plain.bucket, path = %plain.mount_path, "mount added");
        Ok(plain)
    }

    /// Changes a mount; the guest mounts it anew unless only the credentials changed.
    pub async fn update_mount(
        &self,
        org: &str,
        id: &str,
        mount_id: &str,
        update: &MountUpdateRequest,
    ) -> Result<MountConfig, ApiError> {
        let (_op, rec) = self.lock_for_mounts(org, id).await?;
        let i = rec
            .mounts
            .iter()
            .position(|m| m.id == mount_id)
            .ok_or_else(|| ApiError::NotFound(format!("mount {mount_id} of sandbox {id} not found")))?;
        let mut mount = self.open_mount(id, rec.mounts[i].clone());
        let remount = mount.apply(update);
        if !mount.credentials_complete() {
            return Err(ApiError::field(
                "secret_access_key",
                "the mount would have only one of access_key_id and secret_access_key; give both, or clear both",
            ));
        }
        check_mount_path(&rec, &mount)?;
        let applied = match rec.state {
            S::Running => self.runner.update_mount(id, &mount, remount).await,
            _ => self.runner.check_mount(&mount).await,
        };
        applied.map_err(|e| mount_call_error(e, |_| String::new()))?;
        let mut mounts = rec.mounts.clone();
        mounts[i] = self.seal_mount(mount.clone());
        self.store.set_mounts(id, &mounts)?;
        tracing::info!(sandbox_id = %id, mount_id, remount, "mount updated");
        Ok(mount)
    }

    /// Detaches a mount: its path goes away in the guest.
    pub async fn delete_mount(&self, org: &str, id: &str, mount_id: &str) -> Result<(), ApiError> {
        let (_op, rec) = self.lock_for_mounts(org, id).await?;
        if !rec.mounts.iter().any(|m| m.id == mount_id) {
            return Err(ApiError::NotFound(format!("mount {mount_id} of sandbox {id} not found")));
        }
        if rec.state == S::Running {
            self.runner.remove_mount(id, mount_id).await?;
        }
        let mounts: Vec<MountConfig> = rec.mounts.iter().filter(|m| m.id != mount_id).cloned().collect();
        self.store.set_mounts(id, &mounts)?;
        tracing::info!(sandbox_id = %id, mount_id, "mount deleted");
        Ok(())
    }

    /// Pauses a running sandbox: its device state, RAM and disk go to the blob store, then the
    /// VM and its host memory are released. If storing fails the sandbox keeps running.
    pub async fn pause(&self, org: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        let (_op, rec) = self.lock_for(org, id, Action::Pause).await?;
        let image = new_image_prefix("pause");
        self.begin(id, Action::Pause, Op::Pause { image: image.clone() })?;
        let span = tracing::info_span!("pause", sandbox_id = %id);
        match self
            .runner
            .capture(&self.vm_request(&rec), &image, AfterCapture::Release)
            .instrument(span)
            .await
        {
            Ok((_, stats)) => {
                cove_runner::fault_point("pause.released");
                tracing::info!(sandbox_id = %id, save_ms = stats.save_ms, store_ms = stats.store_ms,
                    stored_bytes = stats.stored_bytes, "paused");
                self.finish(id, Action::Pause, |c| c.image(Some(image)))?;
                self.get(org, id)
            }
            Err(e) => {
                self.fall_back(id, Action::Pause)?;
                Err(ApiError::unavailable(id, "pausing failed, the sandbox keeps running", &e))
            }
        }
    }

    /// Resumes a paused sandbox from its image (no-op when it already runs). Callers that
    /// arrive during a resume wait for it and share its outcome.
    pub async fn resume(&self, org: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        let _op = self.lock_sandbox(id).await;
        let rec = self.get(org, id)?;
        match rec.state {
            S::Running => return Ok(rec),
            s if s == machine::rule(Action::Resume).from => {}
            other => return Err(not_in(id, other, "paused")),
        }
        let image = rec
            .image
            .clone()
            .ok_or_else(|| ApiError::internal(format!("paused sandbox {id} has no image")))?;
        self.begin(id, Action::Resume, Op::Resume { image: image.clone() })?;
        let span = tracing::info_span!("resume", sandbox_id = %id);
        let started = std::time::Instant::now();
        if let Err(e) = self.runner.create_from_image(&self.vm_request(&rec), &image).instrument(span).await {
            self.fall_back(id, Action::Resume)?;
            return Err(ApiError::unavailable(id, "resuming failed, the sandbox stays paused", &e));
        }
        cove_runner::fault_point("resume.running");
        self.finish(id, Action::Resume, |c| c.image(None).timeout_at(Self::expires_at(&rec)))?;
        tracing::info!(sandbox_id = %id, elapsed_ms = started.elapsed().as_millis() as u64, "resumed");
        // The image is spent: the guest has moved on from it. Deleting it need not hold up the
        // answer; if it fails (or the server stops first), recovery deletes unreferenced images.
        let (runner, sandbox_id) = (self.runner.clone(), id.to_string());
        tokio::spawn(async move {
            if let Err(e) = runner.delete_image(&image).await {
                tracing::warn!(sandbox_id = %sandbox_id, error = %error_chain(&e), "deleting a spent pause image");
            }
        });
        self.get(org, id)
    }

    /// Stops a running sandbox: the guest syncs, the VM ends, only the writable disk is kept.
    pub async fn stop(&self, org: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        let (_op, _) = self.lock_for(org, id, Action::Stop).await?;
        self.begin(id, Action::Stop, Op::Stop)?;
        if let Err(e) = self.runner.stop(id).await {
            // Whatever went wrong, the VM must not outlive a stopped sandbox.
            tracing::warn!(sandbox_id = %id, error = %error_chain(&e), "stop did not go cleanly; ending the VM");
            self.runner.end_vm(id).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
        }
        self.finish(id, Action::Stop, |c| c)?;
        self.get(org, id)
    }

    /// Boots a stopped sandbox afresh from its template with the disk it kept.
    pub async fn start(&self, org: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        let (_op, rec) = self.lock_for(org, id, Action::Start).await?;
        self.begin(id, Action::Start, Op::Start)?;
        let span = tracing::info_span!("start", sandbox_id = %id);
        if let Err(e) = self.runner.boot(&self.vm_request(&rec)).instrument(span).await {
            self.fall_back(id, Action::Start)?;
            return Err(ApiError::unavailable(id, "starting failed, the sandbox stays stopped", &e));
        }
        self.finish(id, Action::Start, |c| c.timeout_at(Self::expires_at(&rec)))?;
        self.get(org, id)
    }

    /// Stores a named snapshot of a running sandbox, which then runs on (or is deleted, with
    /// `kill_after`).
    pub async fn create_snapshot(
        &self,
        org: &str,
        id: &str,
        name: Option<String>,
        kill_after: bool,
    ) -> Result<SnapshotRecord, ApiError> {
        let (_op, rec) = self.lock_for(org, id, Action::Snapshot).await?;
        let snap_id = format!("snap-{}", hex::encode(rand::random::<[u8; 10]>()));
        let name = match name.map(|n| n.trim().to_string()) {
            Some(n) => n,
            None => format!("{id}-{}", Utc::now().format("%Y%m%d-%H%M%S-%3f")),
        };
        let snap = SnapshotRecord {
            id: snap_id.clone(),
            org_id: org.to_string(),
            name,
            template: rec.template.clone(),
            vcpu: rec.vcpu,
            memory: rec.memory,
            disk: rec.disk,
            network_policy: rec.network_policy.clone(),
            mounts: rec.mounts.clone(),
            env: rec.env.clone(),
            source_sandbox: id.to_string(),
            image: new_image_prefix("snap"),
            state: SnapshotState::Creating,
            stored_bytes: 0,
            created_at: Utc::now(),
        };
        self.store.insert_snapshot(&snap)?;
        let op = Op::Snapshot { snapshot_id: snap_id.clone(), image: snap.image.clone(), kill_after };
        if let Err(e) = self.begin(id, Action::Snapshot, op) {
            self.store.delete_snapshot(&snap_id)?;
            return Err(e);
        }
        let after = if kill_after { AfterCapture::Release } else { AfterCapture::Continue };
        let span = tracing::info_span!("snapshot", sandbox_id = %id, snapshot_id = %snap_id);
        match self.runner.capture(&self.vm_request(&rec), &snap.image, after).instrument(span).await {
            Ok((manifest, stats)) => {
                tracing::info!(sandbox_id = %id, snapshot_id = %snap_id, save_ms = stats.save_ms,
                    store_ms = stats.store_ms, stored_bytes = stats.stored_bytes, "snapshot stored");
                self.store.snapshot_ready(&snap_id, manifest.stored_bytes())?;
                if kill_after {
                    let during = machine::rule(Action::Snapshot).during;
                    self.store.transition(id, &[during], S::Deleting)?;
                    self.finish_delete(&rec).await?;
                } else {
                    self.finish(id, Action::Snapshot, |c| c)?;
                }
            }
            Err(e) => {
                let _ = self.runner.delete_image(&snap.image).await;
                self.store.delete_snapshot(&snap_id)?;
                self.fall_back(id, Action::Snapshot)?;
                return Err(ApiError::unavailable(id, "the snapshot failed", &e));
            }
        }
        self.store.snapshot(org, &snap_id)?.ok_or_else(|| ApiError::internal("snapshot vanished"))
    }

    /// A new sandbox from a snapshot, with the snapshot's template, vCPUs, memory, disk and
    /// environment.
    pub async fn restore_snapshot(
        &self,
        org: &str,
        req: SnapshotRestoreRequest,
    ) -> Result<SandboxRecord, ApiError> {
        let name = req.snapshot_name.trim();
        let snap = self
            .store
            .snapshot(org, name)?
            .filter(|s| s.state == SnapshotState::Ready)
            .ok_or_else(|| ApiError::NotFound(format!("snapshot {name:?} not found")))?;
        check_policy(req.network_policy.as_ref(), "network_policy")?;
        let now = Utc::now();
        let timeout = req.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS);
        let rec = SandboxRecord {
            id: new_sandbox_id(),
            org_id: org.to_string(),
            template: snap.template.clone(),
            vcpu: snap.vcpu,
            memory: snap.memory,
            disk: snap.disk,
            timeout,
            auto_pause: req.auto_pause.unwrap_or(false),
            network_policy: self.seal_policy(req.network_policy).or_else(|| snap.network_policy.clone()),
            mounts: snap.mounts.clone(),
            env: snap.env.clone(),
            state: S::Starting,
            runner_id: self.cfg.runner_id.clone(),
            created_at: now,
            launch_time: None,
            state_changed_at: now,
            timeout_at: Some(now.timestamp() + timeout as i64),
            op: Some(Op::Restore { snapshot_id: snap.id.clone() }),
            image: None,
            snapshot_id: Some(snap.id.clone()),
        };
        self.store.insert_sandbox(&rec, self.cfg.default_sandbox_limit).map_err(|e| match e {
            StoreError::NotFound => ApiError::NotFound(format!("snapshot {name:?} is being deleted")),
            other => limit_error(other),
        })?;
        let span = tracing::info_span!("restore", sandbox_id = %rec.id, snapshot_id = %snap.id);
        if let Err(e) =
            self.runner.create_from_image(&self.vm_request(&rec), &snap.image).instrument(span).await
        {
            let _ = self.runner.destroy(&rec.id).await;
            self.store.delete_sandbox(&rec.id)?;
            return Err(ApiError::unavailable(&rec.id, "restoring the snapshot failed", &e));
        }
        if self.store.transition(&rec.id, &[S::Starting], S::Running)?.is_none() {
            let _ = self.runner.destroy(&rec.id).await;
            return Err(ApiError::Conflict("sandbox was deleted while it started".into()));
        }
        self.get(org, &rec.id)
    }

    pub fn list_snapshots(
        &self,
        org: &str,
        q: &ListSnapshots,
    ) -> Result<(Vec<SnapshotRecord>, u64), ApiError> {
        let q = SnapshotQuery {
            name: q.name.clone(),
            sort_by_template: q.sort_by_template,
            descending: q.descending,
            page: q.page,
            page_size: q.page_size,
        };
        Ok(self.store.list_snapshots(org, &q)?)
    }

    /// Deletes a snapshot and its image; 409 while a sandbox is being restored from it.
    /// (Restored sandboxes own a full copy of what they need, so none depends on it later.)
    pub async fn delete_snapshot(&self, org: &str, id: &str) -> Result<(), ApiError> {
        let snap = match self.store.snapshot(org, id)? {
            Some(s) => s,
            None => return Err(ApiError::NotFound(format!("snapshot {id} not found"))),
        };
        let snap = self.store.begin_snapshot_delete(org, &snap.id)?;
        self.runner.delete_image(&snap.image).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
        self.store.delete_snapshot(&snap.id)?;
        Ok(())
    }

    /// Sandboxes whose timeout passed: paused when they asked for `auto_pause`, deleted
    /// otherwise.
    /// Pauses (with `auto_pause`) or deletes the sandboxes whose timeout passed, each on a task
    /// of its own: a pause waits for the guest calls in flight, and must not hold up the others.
    pub async fn expire(self: &Arc<Self>) {
        let expired = match self.store.expired(Utc::now().timestamp()) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "listing expired sandboxes");
                return;
            }
        };
        for rec in expired {
            if !self.expiring.lock().unwrap_or_else(|p| p.into_inner()).insert(rec.id.clone()) {
                continue;
            }
            let core = self.clone();
            tokio::spawn(async move {
                let result = if rec.auto_pause {
                    tracing::info!(sandbox_id = %rec.id, "timeout reached, pausing");
                    core.pause(&rec.org_id, &rec.id).await.map(|_| ())
                } else {
                    tracing::info!(sandbox_id = %rec.id, "timeout reached, deleting");
                    core.delete(&rec.org_id, &rec.id).await
                };
                if let Err(e) = result {
                    tracing::warn!(sandbox_id = %rec.id, error = %e, "handling an expired sandbox");
                }
                core.expiring.lock().unwrap_or_else(|p| p.into_inner()).remove(&rec.id);
            });
        }
    }

    /// Brings the store and the host back in line after a restart: adopts VMs still running,
    /// finishes or undoes every operation a crash interrupted (see docs/architecture.md,
    /// "Crash recovery"), and removes files and images nobody owns.
    pub async fn recover(&self) -> Result<(), ApiError> {
        self.recover_templates().await?;
        let records = self.store.sandboxes_on_runner(&self.cfg.runner_id)?;
        let with_vm: Vec<VmRequest> = records
            .iter()
            .filter(|r| {
                matches!(r.state, S::Running | S::Snapshotting | S::Stopping | S::Unpausing | S::Starting)
            })
            .map(|r| self.vm_request(r))
            .collect();
        let lost: std::collections::HashSet<String> =
            self.runner.recover(&with_vm).await.into_iter().collect();
        for rec in &records {
            if let Err(e) = self.recover_one(rec, !lost.contains(&rec.id)).await {
                tracing::error!(sandbox_id = %rec.id, error = %e, "recovering sandbox");
            }
        }
        for snap in self.store.unsettled_snapshots()? {
            let in_flight = records
                .iter()
                .any(|r| matches!(&r.op, Some(Op::Snapshot { snapshot_id, .. }) if *snapshot_id == snap.id));
            if in_flight {
                continue;
            }
            if let Err(e) = self.settle_snapshot(&snap).await {
                tracing::error!(snapshot_id = %snap.id, error = %e, "recovering snapshot");
            }
        }
        let records = self.store.sandboxes_on_runner(&self.cfg.runner_id)?;
        let known: std::collections::HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let mut unknown: Vec<String> = self.runner.sandbox_ids_on_host();
        unknown.extend(self.runner.sandbox_networks());
        unknown.sort();
        unknown.dedup();
        for id in unknown.into_iter().filter(|id| !known.contains(id.as_str())) {
            tracing::info!(sandbox_id = %id, "removing files and network of an unknown sandbox");
            let _ = self.runner.destroy(&id).await;
        }
        let referenced = self.store.referenced_images()?;
        match self.runner.stored_images().await {
            Ok(images) => {
                for image in images.into_iter().filter(|i| !referenced.contains(i)) {
                    tracing::info!(image = %image, "removing an image nobody refers to");
                    let _ = self.runner.delete_image(&image).await;
                }
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), "listing stored images"),
        }
        Ok(())
    }

    /// A snapshot left `creating` with a complete image becomes ready; any other unsettled one
    /// (incomplete, or `deleting`) is removed with its image.
    async fn settle_snapshot(&self, snap: &SnapshotRecord) -> Result<(), ApiError> {
        let stored = match snap.state {
            SnapshotState::Creating => self.stored_bytes(&snap.image).await?,
            _ => None,
        };
        if let Some(stored) = stored {
            self.store.snapshot_ready(&snap.id, stored)?;
        } else {
            tracing::info!(snapshot_id = %snap.id, "removing an unfinished snapshot");
            self.runner.delete_image(&snap.image).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
            self.store.delete_snapshot(&snap.id)?;
        }
        Ok(())
    }

    /// The stored size of a complete image; `None` when it is incomplete. A store that cannot
    /// answer is an error, so that recovery never takes a complete image for a partial one and
    /// deletes it.
    async fn stored_bytes(&self, image: &str) -> Result<Option<u64>, ApiError> {
        let manifest =
            self.runner.find_image(image).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
        Ok(manifest.map(|m| m.stored_bytes()))
    }

    /// Settles one sandbox after a restart; `vm_alive` says whether its QEMU was adopted. What
    /// to do is [`recovery::plan`]'s to decide, from the facts gathered here.
    async fn recover_one(&self, rec: &SandboxRecord, vm_alive: bool) -> Result<(), ApiError> {
        use recovery::Step;
        let id = rec.id.as_str();
        let runner_err = |e: cove_runner::RunnerError| ApiError::internal(error_chain(&e));
        let capture_image = match &rec.op {
            Some(Op::Pause { image } | Op::Snapshot { image, .. }) if rec.state == S::Snapshotting => {
                Some(image)
            }
            _ => None,
        };
        let stored = match capture_image {
            Some(image) => self.stored_bytes(image).await?,
            None => None,
        };
        let vm_answers = rec.state == S::Unpausing
            && vm_alive
            && self.runner.reidentify(&self.vm_request(rec)).await.is_ok();
        let facts = recovery::Facts { vm_alive, image_complete: stored.is_some(), vm_answers };
        let steps = recovery::plan(rec.state, rec.op.as_ref(), rec.image.as_deref(), facts);
        if !steps.is_empty() {
            tracing::info!(sandbox_id = %id, state = %rec.state, op = ?rec.op, ?facts, ?steps, "settling a sandbox after a restart");
        }
        for step in steps {
            match step {
                Step::EndVm => self.runner.end_vm(id).await.map_err(runner_err)?,
                Step::DestroyVm => self.runner.destroy(id).await.map_err(runner_err)?,
                Step::FinishStop => {
                    if self.runner.stop(id).await.is_err() {
                        self.runner.end_vm(id).await.map_err(runner_err)?;
                    }
                }
                Step::RunOnOrStop => self.run_on_or_stop(rec, vm_alive).await?,
                Step::DeleteImage(image) => self.runner.delete_image(&image).await.map_err(runner_err)?,
                Step::SnapshotReady(snapshot_id) => {
                    self.store.snapshot_ready(&snapshot_id, stored.unwrap_or(0))?
                }
                Step::DeleteSnapshot(snapshot_id) => self.store.delete_snapshot(&snapshot_id)?,
                Step::To(to) => {
                    self.store.transition(id, &[rec.state], to)?;
                }
                Step::ToPaused(image) => {
                    self.store.update(id, &[rec.state], Change::to(S::Paused).image(Some(image)))?;
                }
                Step::ToRunning => {
                    let change = Change::to(S::Running).image(None).timeout_at(Self::expires_at(rec));
                    self.store.update(id, &[rec.state], change)?;
                }
                Step::DeleteRecord => self.store.delete_sandbox(id)?,
                Step::FinishDelete => self.finish_delete(rec).await?,
            }
        }
        Ok(())
    }

    /// After an undone capture: the VM runs again if it survived, else the sandbox is stopped.
    async fn run_on_or_stop(&self, rec: &SandboxRecord, vm_alive: bool) -> Result<(), ApiError> {
        if vm_alive && self.runner.run_again(&rec.id).await.is_ok() {
            // Its clock stood still while it was stopped: set it again.
            if let Err(e) = self.runner.reidentify(&self.vm_request(rec)).await {
                tracing::warn!(sandbox_id = %rec.id, error = %error_chain(&e), "re-sending the identity after recovery");
            }
            self.store.transition(&rec.id, &[S::Snapshotting], S::Running)?;
        } else {
            tracing::warn!(sandbox_id = %rec.id, "VM gone during an interrupted capture; marking it stopped");
            self.runner.end_vm(&rec.id).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
            self.store.transition(&rec.id, &[S::Snapshotting], S::Stopped)?;
        }
        Ok(())
    }
}
