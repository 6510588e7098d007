//! The runners a control plane drives, as one [`SandboxHost`]: `Core` talks to a cluster and
//! never to a runner directly.
//!
//! A call about a sandbox goes to the runner its record names (`runner_id`). Bringing a VM up
//! places it first: a new sandbox goes to the runner with the most free memory that has its
//! template; a resume or a restore prefers the runner the sandbox was on, and lands elsewhere
//! only on a runner that can restore its image (same device set, CPU and QEMU, template
//! version). The placement is written to the record before the VM is brought up, so a crash
//! knows where to look. A stopped sandbox starts only where its disk is.
//!
//! Members come and go: the in-process runner is one from the start; runners that register
//! (see [`Cluster::watch`]) join when their lease is renewed and leave when it lapses. Images
//! live in one store that every member reaches, so image calls go to any member.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use cove_api::sandbox::{MountConfig, NetworkPolicy};
use cove_api::template::TemplateProgress;
use cove_runner::host::{Loan, LoanGuard, MetadataSource};
use cove_runner::{
    AfterCapture, AgentClient, BuiltTemplate, CaptureStats, GuestStream, HostInfo, ImageManifest,
    RunnerError, SandboxHost, TemplateSource, VmRequest,
};
use cove_store::{now_ms, RunnerRecord, RunnerState, Store};

/// How long a runner's lease holds after it renews it, unless set otherwise
/// ([`Cluster::set_lease`]); runners renew every third of what the control plane answers.
pub const LEASE: Duration = Duration::from_secs(10);

/// How long a resume that moved a sandbox waits for its former runner to drop what it kept, and
/// the deletion of an image for the runners that did not delete it.
const FORGET_WAIT: Duration = Duration::from_secs(5);

type Member = Arc<dyn SandboxHost>;

/// Makes a member of a registered runner: connects to it (address, pinned fingerprint).
pub type Connector = Arc<
    dyn Fn(RunnerRecord) -> futures::future::BoxFuture<'static, Result<Member, RunnerError>> + Send + Sync,
>;

pub struct Cluster {
    store: Arc<Store>,
    members: RwLock<BTreeMap<String, Member>>,
    /// The runner of each sandbox as last placed or read (the record is the truth).
    placed: Mutex<HashMap<String, String>>,
    metadata: OnceLock<Arc<dyn MetadataSource>>,
    /// Told the id of a runner that joined, came back, or restarted under us: its sandboxes
    /// are to be adopted again (`Core::readopt`).
    joined: OnceLock<Arc<dyn Fn(String) + Send + Sync>>,
    lease_ms: std::sync::atomic::AtomicU64,
    /// Where each registered member was reached (address, fingerprint): a runner that
    /// registers from elsewhere is connected to again.
    reached_at: Mutex<HashMap<String, (String, String)>>,
    /// The template versions each registered runner said it holds at its last renewal.
    templates: Mutex<HashMap<String, Vec<String>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    pub fn new(store: Arc<Store>) -> Arc<Cluster> {
        Arc::new(Cluster {
            store,
            members: RwLock::default(),
            placed: Mutex::default(),
            metadata: OnceLock::new(),
            joined: OnceLock::new(),
            lease_ms: (LEASE.as_millis() as u64).into(),
            reached_at: Mutex::default(),
            templates: Mutex::default(),
        })
    }

    /// How long a lease holds from its renewal.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Another lease length (tests use a short one).
    pub fn set_lease(&self, lease: Duration) {
        self.lease_ms.store(lease.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// A cluster of one host, named `runner_id` in the records.
    pub fn single(store: Arc<Store>, runner_id: &str, host: Member) -> Arc<Cluster> {
        let cluster = Cluster::new(store);
        cluster.join(runner_id, host);
        cluster
    }

    /// The members, by runner id.
    pub fn members(&self) -> Vec<(String, Member)> {
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        members.iter().map(|(id, m)| (id.clone(), m.clone())).collect()
    }

    pub fn member(&self, runner_id: &str) -> Option<Member> {
        self.members.read().unwrap_or_else(|p| p.into_inner()).get(runner_id).cloned()
    }

    /// Adds (or replaces) a member; its sandboxes are then adopted (the join listener).
    pub fn join(self: &Arc<Self>, runner_id: &str, host: Member) {
        if let Some(source) = self.metadata.get() {
            host.set_metadata_source(source.clone());
        }
        let (me, id) = (Arc::downgrade(self), runner_id.to_string());
        host.set_restart_listener(Arc::new(move || {
            if let Some(cluster) = me.upgrade() {
                cluster.tell_joined(&id);
            }
        }));
        self.members.write().unwrap_or_else(|p| p.into_inner()).insert(runner_id.to_string(), host);
        tracing::info!(runner_id, "runner joined");
        self.tell_joined(runner_id);
    }

    fn leave(&self, runner_id: &str) {
        if self.members.write().unwrap_or_else(|p| p.into_inner()).remove(runner_id).is_some() {
            lock(&self.placed).retain(|_, r| r != runner_id);
            tracing::warn!(runner_id, "runner left the cluster");
        }
    }

    fn tell_joined(&self, runner_id: &str) {
        if let Some(listener) = self.joined.get() {
            listener(runner_id.to_string());
        }
    }

    /// Who to tell when a runner joins or restarts (see `joined`).
    pub fn set_join_listener(&self, listener: Arc<dyn Fn(String) + Send + Sync>) {
        let _ = self.joined.set(listener);
    }

    /// The runner a sandbox is placed on, from the record.
    fn runner_of(&self, id: &str) -> Result<String, RunnerError> {
        if let Some(r) = lock(&self.placed).get(id) {
            return Ok(r.clone());
        }
        let rec = self
            .store
            .sandbox_by_id(id)
            .map_err(|e| RunnerError::Unavailable(format!("reading sandbox {id}: {e}")))?
            .ok_or_else(|| RunnerError::NoVm(id.to_string()))?;
        lock(&self.placed).insert(id.to_string(), rec.runner_id.clone());
        Ok(rec.runner_id)
    }

    /// The member holding a sandbox's VM.
    fn host_of(&self, id: &str) -> Result<Member, RunnerError> {
        let runner = self.runner_of(id)?;
        self.member(&runner).ok_or_else(|| unreachable(&runner))
    }

    /// Removes what runner `runner_id` still has of sandbox `id`, which now runs elsewhere: the
    /// warm entry and network namespace its pause there kept. Best effort: a runner that does
    /// not answer is settled when it joins again (its leftovers of sandboxes placed elsewhere
    /// are removed then).
    async fn forget_on(&self, runner_id: &str, id: &str) {
        let Some(member) = self.member(runner_id) else { return };
        match tokio::time::timeout(FORGET_WAIT, member.destroy(id)).await {
            Ok(Ok(())) => {
                tracing::debug!(sandbox_id = %id, runner_id, "moved sandbox's files removed from its former runner")
            }
            Ok(Err(e)) => {
                tracing::warn!(sandbox_id = %id, runner_id, error = %e, "removing a moved sandbox's files from its former runner")
            }
            Err(_) => {
                tracing::warn!(sandbox_id = %id, runner_id, "its former runner did not answer in time; it is settled when it joins again")
            }
        }
    }

    /// Any member (image and mount-source calls: every member reaches the same stores).
    fn any(&self) -> Result<Member, RunnerError> {
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        members
            .values()
            .next()
            .cloned()
            .ok_or_else(|| RunnerError::Unavailable("no runner is connected".into()))
    }

    /// Members with `template` that have room for `req`, best first: `prefer` (where the
    /// sandbox was) if it has room, then by free memory, then by fewer sandboxes.
    fn candidates(
        &self,
        req: &VmRequest,
        template: &str,
        prefer: Option<&str>,
    ) -> Result<Vec<(String, Member)>, RunnerError> {
        // Without the sandbox's own record, which counts wherever it was created or ran last.
        let loads = self
            .store
            .runner_loads_without(&req.id)
            .map_err(|e| RunnerError::Unavailable(format!("reading loads: {e}")))?;
        // A user template's disk is on the runner that built it; one built before that was
        // recorded may be anywhere (the runner says if it lacks it).
        let built_on = match cove_api::template::system_template(template) {
            Some(_) => None,
            None => Some(self.store.template_runner(template).ok().flatten()),
        };
        let has = |id: &str, m: &Member| match &built_on {
            None => m.template_disk_mib(template).is_some(),
            Some(Some(runner)) => runner == id,
            Some(None) => true,
        };
        let mut fits = Vec::new();
        let mut any_has_template = false;
        for (id, m) in self.members() {
            if !has(&id, &m) {
                continue;
            }
            any_has_template = true;
            let load = loads.get(&id).copied().unwrap_or_default();
            let info = m.info();
            let free = info.memory_mib.saturating_sub(load.memory_mib);
            let counted = info.max_sandboxes == 0 || load.sandboxes < u64::from(info.max_sandboxes);
            if free >= req.memory_mib && counted {
                fits.push((prefer != Some(id.as_str()), std::cmp::Reverse(free), load.sandboxes, id, m));
            }
        }
        if !any_has_template {
            return Err(RunnerError::UnknownTemplate(template.to_string()));
        }
        if fits.is_empty() {
            return Err(RunnerError::Unavailable(format!(
                "no runner has room for a sandbox of {} MiB now; try again later",
                req.memory_mib
            )));
        }
        fits.sort_by(|a, b| (a.0, a.1, a.2, &a.3).cmp(&(b.0, b.1, b.2, &b.3)));
        Ok(fits.into_iter().map(|(.., id, m)| (id, m)).collect())
    }

    /// Records the placement, then lets `up` bring the VM up there.
    fn place(&self, id: &str, runner: &str) -> Result<(), RunnerError> {
        self.store
            .place_sandbox(id, runner)
            .map_err(|e| RunnerError::Unavailable(format!("recording the placement of {id}: {e}")))?;
        lock(&self.placed).insert(id.to_string(), runner.to_string());
        tracing::info!(sandbox_id = id, runner_id = runner, "placed");
        Ok(())
    }

    /// Follows the `runners` table: registered runners whose lease holds join (connected by
    /// `connect`); those whose lease lapsed are marked lost with their running sandboxes, and
    /// leave. A control plane that just started waits one lease before it marks anything lost,
    /// so runners it has not heard from yet get to renew. Runs until the cluster is dropped.
    pub fn watch(self: &Arc<Self>, connect: Connector) {
        let me = Arc::downgrade(self);
        let started = now_ms();
        tokio::spawn(async move {
            let connecting: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
            loop {
                let Some(cluster) = me.upgrade() else { return };
                if let Err(e) = cluster.tick(&connect, &connecting, started) {
                    tracing::warn!(error = %e, "following the runners");
                }
                drop(cluster);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    fn tick(
        self: &Arc<Self>,
        connect: &Connector,
        connecting: &Arc<Mutex<std::collections::HashSet<String>>>,
        started: i64,
    ) -> Result<(), cove_store::StoreError> {
        let now = now_ms();
        for r in self.store.runners()? {
            let id = r.lease.id.clone();
            match r.state {
                RunnerState::Active if r.lease_until >= now => {
                    lock(&self.templates).insert(id.clone(), r.lease.templates.clone());
                    let at = (r.lease.address.clone(), r.lease.fingerprint.clone());
                    let same = lock(&self.reached_at).get(&id) == Some(&at);
                    if (same && self.member(&id).is_some()) || !lock(connecting).insert(id.clone()) {
                        continue;
                    }
                    let (cluster, connect, connecting) = (self.clone(), connect.clone(), connecting.clone());
                    tokio::spawn(async move {
                        match connect(r).await {
                            Ok(host) => {
                                lock(&cluster.reached_at).insert(id.clone(), at);
                                cluster.join(&id, host)
                            }
                            Err(e) => {
                                tracing::warn!(runner_id = %id, error = %e, "connecting to a registered runner")
                            }
                        }
                        lock(&connecting).remove(&id);
                    });
                }
                RunnerState::Active => {
                    if now - started > self.lease().as_millis() as i64 && self.store.lose_runner(&id, now)? {
                        tracing::warn!(runner_id = %id, "runner lost: its lease lapsed");
                        self.leave(&id);
                    }
                }
                RunnerState::Lost => {
                    self.leave(&id);
                    for rec in self.store.lose_sandboxes_on(&id)? {
                        tracing::warn!(sandbox_id = %rec.id, runner_id = %id, "sandbox lost with its runner");
                    }
                }
            }
        }
        Ok(())
    }
}

fn unreachable(runner: &str) -> RunnerError {
    RunnerError::Unavailable(format!(
        "the runner this sandbox is on ({runner}) is not reachable; try again later"
    ))
}

#[async_trait]
impl SandboxHost for Cluster {
    fn info(&self) -> HostInfo {
        let mut all = HostInfo::default();
        for (_, m) in self.members() {
            let i = m.info();
            all.vcpus += i.vcpus;
            all.memory_mib += i.memory_mib;
        }
        all
    }

    async fn can_restore(&self, manifest: &ImageManifest) -> Result<(), RunnerError> {
        let mut first = None;
        for (_, m) in self.members() {
            match m.can_restore(manifest).await {
                Ok(()) => return Ok(()),
                Err(e) => first = first.or(Some(e)),
            }
        }
        Err(first.unwrap_or_else(|| RunnerError::Unavailable("no runner is connected".into())))
    }

    fn template_disk_mib(&self, template: &str) -> Option<u64> {
        self.members().iter().find_map(|(_, m)| m.template_disk_mib(template))
    }

    fn system_template_built_at(&self, template: &str) -> Option<std::time::SystemTime> {
        self.members().iter().find_map(|(_, m)| m.system_template_built_at(template))
    }

    /// On every member that has the template (a user template: the one that built it).
    async fn prepare_template(&self, template: &str, vcpus: u32, memory_mib: u64) -> Result<(), RunnerError> {
        let built_on = self.store.template_runner(template).ok().flatten();
        let with: Vec<Member> = self
            .members()
            .into_iter()
            .filter(|(id, m)| built_on.as_ref().map_or(m.template_disk_mib(template).is_some(), |r| r == id))
            .map(|(_, m)| m)
            .collect();
        if with.is_empty() {
            return Err(RunnerError::UnknownTemplate(template.to_string()));
        }
        for m in with {
            m.prepare_template(template, vcpus, memory_mib).await?;
        }
        Ok(())
    }

    /// On the member with the most free memory; its sandboxes are placed there.
    async fn build_template(
        &self,
        source: &TemplateSource,
        progress: &(dyn for<'p> Fn(&'p TemplateProgress) + Send + Sync),
    ) -> Result<BuiltTemplate, RunnerError> {
        let loads =
            self.store.runner_loads().map_err(|e| RunnerError::Unavailable(format!("reading loads: {e}")))?;
        let (runner, builder) = self
            .members()
            .into_iter()
            .max_by_key(|(id, m)| {
                m.info().memory_mib.saturating_sub(loads.get(id).map_or(0, |l| l.memory_mib))
            })
            .ok_or_else(|| RunnerError::Unavailable("no runner is connected".into()))?;
        self.store.set_template_runner(&source.id, &runner).map_err(|e| {
            RunnerError::Unavailable(format!("recording where template {} is built: {e}", source.id))
        })?;
        builder.build_template(source, progress).await
    }

    /// Where it was built (on every member if that is not known).
    async fn remove_template(&self, id: &str) -> Result<(), RunnerError> {
        let built_on = self.store.template_runner(id).ok().flatten();
        for (runner, m) in self.members() {
            if built_on.as_ref().is_none_or(|b| *b == runner) {
                m.remove_template(id).await?;
            }
        }
        Ok(())
    }

    async fn create(&self, req: &VmRequest) -> Result<(), RunnerError> {
        let (runner, host) = self.candidates(req, &req.template, None)?.remove(0);
        self.place(&req.id, &runner)?;
        host.create(req).await
    }

    async fn create_from_image(&self, req: &VmRequest, image: &str) -> Result<(), RunnerError> {
        let prefer = self.runner_of(&req.id).ok();
        let mut candidates = self.candidates(req, &req.template, prefer.as_deref())?;
        // One runner, and no lease saying which template versions it holds (this process's
        // runner, or one given by --runner): it checks the image itself, so the manifest need
        // not be read here as well (a resume's hot path).
        if let [(runner, _)] = candidates.as_slice() {
            if !lock(&self.templates).contains_key(runner) {
                let (runner, host) = candidates.remove(0);
                self.place(&req.id, &runner)?;
                return host.create_from_image(req, image).await;
            }
        }
        let manifest = self
            .any()?
            .find_image(image)
            .await?
            .ok_or_else(|| RunnerError::Image(format!("image {image} is incomplete or missing")))?;
        let mut refused = None;
        for (runner, host) in candidates {
            // A registered runner whose lease lists its template versions, without this one,
            // is not asked.
            let versions = lock(&self.templates).get(&runner).cloned().unwrap_or_default();
            if !versions.is_empty() && !versions.contains(&manifest.template_key) {
                tracing::info!(sandbox_id = %req.id, runner_id = %runner, "runner lacks the image's template version");
                refused = refused.or_else(|| {
                    Some(RunnerError::Image(format!(
                        "the template version {} this image was made from is not on runner {runner}",
                        manifest.template_key
                    )))
                });
                continue;
            }
            match host.can_restore(&manifest).await {
                Ok(()) => {
                    self.place(&req.id, &runner)?;
                    host.create_from_image(req, image).await?;
                    if let Some(old) = prefer.as_deref().filter(|old| *old != runner) {
                        self.forget_on(old, &req.id).await;
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::info!(sandbox_id = %req.id, runner_id = %runner, reason = %e, "runner cannot restore the image");
                    refused = refused.or(Some(e));
                }
            }
        }
        Err(refused.unwrap_or_else(|| RunnerError::Unavailable("no runner can restore this image".into())))
    }

    /// Where its disk is.
    async fn boot(&self, req: &VmRequest) -> Result<(), RunnerError> {
        self.host_of(&req.id)?.boot(req).await
    }

    async fn capture(
        &self,
        req: &VmRequest,
        image: &str,
        after: AfterCapture,
    ) -> Result<(ImageManifest, CaptureStats), RunnerError> {
        self.host_of(&req.id)?.capture(req, image, after).await
    }

    async fn stop(&self, id: &str) -> Result<(), RunnerError> {
        self.host_of(id)?.stop(id).await
    }

    /// On a runner that is gone, nothing to do now: it ends VMs nobody owns when it comes back.
    async fn end_vm(&self, id: &str) -> Result<(), RunnerError> {
        let runner = self.runner_of(id)?;
        match self.member(&runner) {
            Some(m) => m.end_vm(id).await,
            None => Ok(()),
        }
    }

    /// As `end_vm`: a runner that is gone removes what it has of the sandbox when it comes back.
    async fn destroy(&self, id: &str) -> Result<(), RunnerError> {
        let runner = match self.runner_of(id) {
            Ok(r) => r,
            Err(RunnerError::NoVm(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let done = match self.member(&runner) {
            Some(m) => m.destroy(id).await,
            None => Ok(()),
        };
        if done.is_ok() {
            lock(&self.placed).remove(id);
        }
        done
    }

    async fn adopt(&self, sandboxes: &[VmRequest]) -> Vec<String> {
        let mut by_runner: BTreeMap<String, Vec<VmRequest>> = BTreeMap::new();
        let mut gone = Vec::new();
        for req in sandboxes {
            match self.runner_of(&req.id) {
                Ok(r) if self.member(&r).is_some() => by_runner.entry(r).or_default().push(req.clone()),
                _ => gone.push(req.id.clone()),
            }
        }
        for (runner, reqs) in by_runner {
            if let Some(m) = self.member(&runner) {
                gone.extend(m.adopt(&reqs).await);
            }
        }
        gone
    }

    async fn run_again(&self, id: &str) -> Result<(), RunnerError> {
        self.host_of(id)?.run_again(id).await
    }

    async fn sandboxes_on_host(&self) -> Vec<String> {
        let mut all = Vec::new();
        for (_, m) in self.members() {
            all.extend(m.sandboxes_on_host().await);
        }
        all
    }

    async fn agent(&self, id: &str) -> Result<AgentClient, RunnerError> {
        self.host_of(id)?.agent(id).await
    }

    async fn reidentify(&self, req: &VmRequest) -> Result<(), RunnerError> {
        self.host_of(&req.id)?.reidentify(req).await
    }

    async fn connect_guest(&self, id: &str, port: u16) -> Result<GuestStream, RunnerError> {
        self.host_of(id)?.connect_guest(id, port).await
    }

    async fn check_mount(&self, mount: &MountConfig) -> Result<(), RunnerError> {
        self.any()?.check_mount(mount).await
    }

    async fn add_mount(&self, id: &str, mount: &MountConfig) -> Result<(), RunnerError> {
        self.host_of(id)?.add_mount(id, mount).await
    }

    async fn update_mount(&self, id: &str, mount: &MountConfig, remount: bool) -> Result<(), RunnerError> {
        self.host_of(id)?.update_mount(id, mount, remount).await
    }

    async fn remove_mount(&self, id: &str, mount_id: &str) -> Result<(), RunnerError> {
        self.host_of(id)?.remove_mount(id, mount_id).await
    }

    async fn set_network_policy(&self, id: &str, policy: Option<&NetworkPolicy>) -> Result<(), RunnerError> {
        self.host_of(id)?.set_network_policy(id, policy).await
    }

    fn set_metadata_source(&self, source: Arc<dyn MetadataSource>) {
        for (_, m) in self.members() {
            m.set_metadata_source(source.clone());
        }
        let _ = self.metadata.set(source);
    }

    async fn lend_credentials(&self, id: &str, loan: Loan) -> Result<LoanGuard, RunnerError> {
        self.host_of(id)?.lend_credentials(id, loan).await
    }

    async fn find_image(&self, image: &str) -> Result<Option<ImageManifest>, RunnerError> {
        self.any()?.find_image(image).await
    }

    async fn delete_image(&self, image: &str) -> Result<(), RunnerError> {
        let members: Vec<(String, Member)> = self
            .members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, m)| (id.clone(), m.clone()))
            .collect();
        let Some(((_, first), rest)) = members.split_first() else {
            return Err(RunnerError::Unavailable("no runner is connected".into()));
        };
        first.delete_image(image).await?;
        // Any runner may hold the image's RAM (a named snapshot restored there): the others are
        // told too. The store is theirs as well, so there is nothing left in it for them; one
        // that does not answer keeps its copy until newer snapshots push it out.
        let others = rest.iter().map(|(runner_id, m)| async move {
            match tokio::time::timeout(FORGET_WAIT, m.delete_image(image)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(image, runner_id, error = %e, "a runner did not drop a deleted image")
                }
                Err(_) => tracing::warn!(
                    image,
                    runner_id,
                    "a runner did not answer in time to drop a deleted image"
                ),
            }
        });
        futures::future::join_all(others).await;
        Ok(())
    }

    async fn stored_images(&self) -> Result<Vec<String>, RunnerError> {
        self.any()?.stored_images().await
    }
}

/// `POST /internal/v1/runners/lease`: a runner registers or renews its lease, signed with the
/// cluster's token (`cove_runner::remote::lease`). 404 when this control plane takes no runners.
pub async fn renew_lease(
    axum::extract::State(s): axum::extract::State<crate::AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<axum::Json<serde_json::Value>, crate::error::ApiError> {
    use crate::error::ApiError;
    use cove_runner::remote::lease;
    let Some(token) = &s.core.cfg.cluster_token else {
        return Err(ApiError::NotFound("this control plane takes no runners".into()));
    };
    let authorization = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if !lease::verify(token, authorization.unwrap_or(""), &body, now_ms()) {
        return Err(ApiError::Unauthorized);
    }
    let lease: cove_store::RunnerLease = serde_json::from_slice(&body)
        .map_err(|e| ApiError::field("body", format!("not a runner lease: {e}")))?;
    check_lease(&lease)?;
    let lease_ms = s.core.cluster.lease().as_millis() as i64;
    let before = s.core.store.renew_runner(&lease, now_ms() + lease_ms)?;
    match before {
        None => tracing::info!(runner_id = %lease.id, address = %lease.address, "runner registered"),
        Some(RunnerState::Lost) => tracing::warn!(runner_id = %lease.id, "a lost runner is back"),
        Some(RunnerState::Active) => {}
    }
    Ok(axum::Json(serde_json::json!({ "lease_ms": lease_ms })))
}

/// A runner's id is its certificate's: `runner-<first 16 hex digits of the fingerprint>`.
pub fn runner_id(fingerprint: &str) -> String {
    format!("runner-{}", &fingerprint[..fingerprint.len().min(16)])
}

fn check_lease(l: &cove_store::RunnerLease) -> Result<(), crate::error::ApiError> {
    use crate::error::ApiError;
    if l.fingerprint.len() != 64 || !l.fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::field("fingerprint", "not a SHA-256 fingerprint (64 hex digits)"));
    }
    if l.id != runner_id(&l.fingerprint) {
        return Err(ApiError::field("id", "is not runner-<first 16 hex digits of the fingerprint>"));
    }
    let port_ok = l.address.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !port_ok {
        return Err(ApiError::field("address", "is not host:port"));
    }
    Ok(())
}
