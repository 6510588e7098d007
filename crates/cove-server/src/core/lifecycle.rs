//! The sandbox lifecycle: create, delete, pause, resume, stop, start, timeouts. Transitions
//! come from [`super::machine::RULES`].

use super::*;
use crate::metrics::ImageBytes;

/// What a new sandbox is made of, from a template (create) or a snapshot (restore). Secrets
/// in `network_policy` and `mounts` are sealed already.
pub(super) struct NewSandbox {
    pub template: String,
    pub vcpu: u32,
    pub memory: u64,
    pub disk: u64,
    pub network_policy: Option<NetworkPolicy>,
    pub mounts: Vec<MountConfig>,
    pub env: std::collections::BTreeMap<String, String>,
    pub timeout: u64,
    pub auto_pause: bool,
    pub op: Op,
}

/// The action that makes a sandbox with `op` in flight: a restore, or else a create.
fn making(op: Option<&Op>) -> Action {
    match op {
        Some(Op::Restore { .. }) => Action::Restore,
        _ => Action::Create,
    }
}

impl Core {
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
        let rec = self.new_record(
            org,
            NewSandbox {
                template: template.id,
                vcpu: req.vcpu.unwrap_or(DEFAULT_VCPU),
                memory: req.memory.unwrap_or(DEFAULT_MEMORY_MIB),
                disk,
                network_policy: self.seal_policy(req.network_policy.clone()),
                mounts: mounts.into_iter().map(|m| self.seal_mount(m)).collect(),
                env: req.env_vars.clone().unwrap_or_default(),
                timeout: req.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS),
                auto_pause: req.auto_pause.unwrap_or(false),
                op: Op::Create,
            },
        );
        // Held until it runs: a runner's recovery meanwhile leaves it to this.
        let _op = self.lock_sandbox(&rec.id).await;
        self.store.insert_sandbox(&rec, self.cfg.default_sandbox_limit)?;
        let vm = self.vm_request(&rec);
        let span = tracing::info_span!("create", sandbox_id = %rec.id);
        self.bring_up(org, &rec, self.host.create(&vm).instrument(span), |e| match e {
            e @ RunnerError::Mount { .. } => mount_call_error(e, |i| format!("mounts[{i}]")),
            e => ApiError::unavailable(&rec.id, "the sandbox VM failed to start", &e),
        })
        .await
    }

    /// A record for a new sandbox of `org`, `starting`, with `new.op` in flight.
    pub(super) fn new_record(&self, org: &str, new: NewSandbox) -> SandboxRecord {
        let now = Utc::now();
        let rule = machine::rule(making(Some(&new.op)));
        SandboxRecord {
            id: new_sandbox_id(),
            org_id: org.to_string(),
            template: new.template,
            vcpu: new.vcpu,
            memory: new.memory,
            disk: new.disk,
            timeout: new.timeout,
            auto_pause: new.auto_pause,
            network_policy: new.network_policy,
            mounts: new.mounts,
            env: new.env,
            state: rule.during,
            runner_id: self.cfg.runner_id.clone(),
            created_at: now,
            launch_time: None,
            state_changed_at: now,
            timeout_at: Some(now.timestamp() + new.timeout as i64),
            snapshot_id: match &new.op {
                Op::Restore { snapshot_id } => Some(snapshot_id.clone()),
                _ => None,
            },
            op: Some(new.op),
            image: None,
        }
    }

    /// Makes the VM of a sandbox just recorded `starting` (`start`): on failure every trace of
    /// the attempt goes (VM, files, record) and `fail` says why; on success it is `running`,
    /// unless a delete won meanwhile (409, and the VM goes too).
    pub(super) async fn bring_up(
        &self,
        org: &str,
        rec: &SandboxRecord,
        start: impl std::future::Future<Output = Result<(), RunnerError>>,
        fail: impl FnOnce(RunnerError) -> ApiError,
    ) -> Result<SandboxRecord, ApiError> {
        if let Err(e) = start.await {
            let _ = self.host.destroy(&rec.id).await;
            self.store.delete_sandbox(&rec.id)?;
            return Err(fail(e));
        }
        let rule = machine::rule(making(rec.op.as_ref()));
        if self.store.transition(&rec.id, &[rule.during], rule.done.state())?.is_none() {
            let _ = self.host.destroy(&rec.id).await;
            return Err(ApiError::Conflict("sandbox was deleted while it started".into()));
        }
        self.get(org, &rec.id)
    }

    /// Deletes a sandbox: its VM, every file of it and its pause image. A sandbox already
    /// `deleting` (a delete interrupted by a crash) may be deleted again; one in a transition
    /// may not.
    pub async fn delete(&self, org: &str, id: &str) -> Result<(), ApiError> {
        let rec = self.get(org, id)?;
        let rule = machine::rule(Action::Delete);
        if self.store.transition(id, rule.from, rule.during)?.is_none() {
            return Err(ApiError::Conflict(format!(
                "sandbox {id} is {}; try again when it settles",
                rec.state
            )));
        }
        self.finish_delete(&rec).await
    }

    pub(super) async fn finish_delete(&self, rec: &SandboxRecord) -> Result<(), ApiError> {
        self.host.destroy(&rec.id).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
        if let Some(image) = &rec.image {
            self.host.delete_image(image).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
        }
        self.store.delete_sandbox(&rec.id)?;
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).remove(&rec.id);
        Ok(())
    }

    /// Pauses a running sandbox: its device state, RAM and disk go to the blob store, then the
    /// VM and its host memory are released. If storing fails the sandbox keeps running.
    pub async fn pause(&self, org: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        let (_op, rec) = self.lock_for(org, id, Action::Pause).await?;
        let image = new_image_prefix("pause");
        self.begin(id, Action::Pause, Op::Pause { image: image.clone() })?;
        let span = tracing::info_span!("pause", sandbox_id = %id);
        let started = std::time::Instant::now();
        let captured =
            self.host.capture(&self.vm_request(&rec), &image, AfterCapture::Release).instrument(span).await;
        self.metrics.operation("pause", captured.is_ok(), started.elapsed());
        match captured {
            Ok((_, stats)) => {
                cove_runner::fault_point("pause.released");
                tracing::info!(sandbox_id = %id, save_ms = stats.save_ms, store_ms = stats.store_ms,
                    stored_bytes = stats.stored_bytes, "paused");
                self.metrics.image_bytes(ImageBytes::Pause, stats.stored_bytes);
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
            s if machine::rule(Action::Resume).from.contains(&s) => {}
            other => return Err(not_in(id, other, "paused")),
        }
        let image = rec
            .image
            .clone()
            .ok_or_else(|| ApiError::internal(format!("paused sandbox {id} has no image")))?;
        self.begin(id, Action::Resume, Op::Resume { image: image.clone() })?;
        let span = tracing::info_span!("resume", sandbox_id = %id);
        let started = std::time::Instant::now();
        let resumed = self.host.create_from_image(&self.vm_request(&rec), &image).instrument(span).await;
        self.metrics.operation("resume", resumed.is_ok(), started.elapsed());
        if let Err(e) = resumed {
            self.fall_back(id, Action::Resume)?;
            return Err(ApiError::unavailable(id, "resuming failed, the sandbox stays paused", &e));
        }
        cove_runner::fault_point("resume.running");
        self.finish(id, Action::Resume, |c| c.image(None).timeout_at(Self::expires_at(&rec)))?;
        tracing::info!(sandbox_id = %id, elapsed_ms = started.elapsed().as_millis() as u64, "resumed");
        // The image is spent: the guest has moved on from it. Deleting it need not hold up the
        // answer; if it fails (or the server stops first), recovery deletes unreferenced images.
        let (host, metrics, sandbox_id) = (self.host.clone(), self.metrics.clone(), id.to_string());
        tokio::spawn(async move {
            if let Ok(Some(manifest)) = host.find_image(&image).await {
                metrics.image_bytes(ImageBytes::Resume, manifest.stored_bytes());
            }
            if let Err(e) = host.delete_image(&image).await {
                tracing::warn!(sandbox_id = %sandbox_id, error = %error_chain(&e), "deleting a spent pause image");
            }
        });
        self.get(org, id)
    }

    /// Stops a running sandbox: the guest syncs, the VM ends, only the writable disk is kept.
    pub async fn stop(&self, org: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        let (_op, _) = self.lock_for(org, id, Action::Stop).await?;
        self.begin(id, Action::Stop, Op::Stop)?;
        if let Err(e) = self.host.stop(id).await {
            // Whatever went wrong, the VM must not outlive a stopped sandbox.
            tracing::warn!(sandbox_id = %id, error = %error_chain(&e), "stop did not go cleanly; ending the VM");
            self.host.end_vm(id).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
        }
        self.finish(id, Action::Stop, |c| c)?;
        self.get(org, id)
    }

    /// Boots a stopped sandbox afresh from its template with the disk it kept.
    pub async fn start(&self, org: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        let (_op, rec) = self.lock_for(org, id, Action::Start).await?;
        self.begin(id, Action::Start, Op::Start)?;
        let span = tracing::info_span!("start", sandbox_id = %id);
        if let Err(e) = self.host.boot(&self.vm_request(&rec)).instrument(span).await {
            self.fall_back(id, Action::Start)?;
            return Err(ApiError::unavailable(id, "starting failed, the sandbox stays stopped", &e));
        }
        self.finish(id, Action::Start, |c| c.timeout_at(Self::expires_at(&rec)))?;
        self.get(org, id)
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
}
