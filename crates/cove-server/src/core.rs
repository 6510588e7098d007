//! The control plane's core: every sandbox action as one method. HTTP handlers (and later the
//! CLI and runner RPC) parse and validate, then call exactly one of these.
//!
//! Every state change is written to the store before the side effect it announces, with a
//! compare-and-set transition, so concurrent requests cannot both act and a restarted server
//! knows what was in flight (see `recover`).

use std::sync::Arc;

use chrono::Utc;
use cove_api::sandbox::{
    ListSandboxes, NetworkMode, SandboxCreateRequest, SandboxResponse, SandboxState, DEFAULT_MEMORY_MIB,
    DEFAULT_TIMEOUT_SECS, DEFAULT_VCPU,
};
use cove_runner::{AgentClient, Runner, VmRequest};
use cove_store::{SandboxRecord, Store};
use tracing::Instrument;

use crate::error::{error_chain, ApiError};

#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Sandboxes an organization may hold in VM-holding states, unless it has its own limit.
    pub default_sandbox_limit: u64,
    /// Name of the (single, in-process) runner.
    pub runner_id: String,
}

pub struct Core {
    pub store: Arc<Store>,
    pub runner: Arc<Runner>,
    pub cfg: CoreConfig,
}

fn new_sandbox_id() -> String {
    format!("sbx-{}", hex::encode(rand::random::<[u8; 10]>()))
}

pub fn response(rec: &SandboxRecord) -> SandboxResponse {
    SandboxResponse {
        id: rec.id.clone(),
        template_id: rec.template.clone(),
        mounts: Vec::new(),
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

impl Core {
    pub async fn create_sandbox(
        &self,
        org: &str,
        req: SandboxCreateRequest,
    ) -> Result<SandboxRecord, ApiError> {
        let template = req.template_name.trim().to_string();
        let disk = self
            .runner
            .template_disk_mib(&template)
            .ok_or_else(|| ApiError::field("template_name", format!("unknown template {template:?}")))?;
        if req.mounts.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::NotImplemented("object storage mounts are not implemented yet".into()));
        }
        if req.network_policy.as_ref().is_some_and(|p| p.mode == NetworkMode::Custom) {
            return Err(ApiError::NotImplemented("custom network policies are not implemented yet".into()));
        }
        let now = Utc::now();
        let timeout = req.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS);
        let rec = SandboxRecord {
            id: new_sandbox_id(),
            org_id: org.to_string(),
            template: template.clone(),
            vcpu: req.vcpu.unwrap_or(DEFAULT_VCPU),
            memory: req.memory.unwrap_or(DEFAULT_MEMORY_MIB),
            disk,
            timeout,
            auto_pause: req.auto_pause.unwrap_or(false),
            network_policy: req.network_policy.clone(),
            env: req.env_vars.clone().unwrap_or_default(),
            state: SandboxState::Starting,
            runner_id: self.cfg.runner_id.clone(),
            created_at: now,
            launch_time: None,
            state_changed_at: now,
            timeout_at: Some(now.timestamp() + timeout as i64),
        };
        self.store.insert_sandbox(&rec, self.cfg.default_sandbox_limit)?;
        let vm = VmRequest {
            id: rec.id.clone(),
            template,
            vcpus: rec.vcpu,
            memory_mib: rec.memory,
            env: rec.env.clone(),
        };
        let span = tracing::info_span!("create", sandbox_id = %rec.id);
        if let Err(e) = self.runner.create(&vm).instrument(span).await {
            tracing::warn!(sandbox_id = %rec.id, error = %error_chain(&e), "sandbox VM failed to start");
            let _ = self.runner.destroy(&rec.id).await;
            self.store.delete_sandbox(&rec.id)?;
            return Err(match ApiError::from(e) {
                ApiError::Internal(m) => {
                    ApiError::Unavailable(format!("the sandbox VM failed to start: {m}"))
                }
                other => other,
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

    /// Deletes a sandbox: its VM and every file of it. A sandbox already `deleting` (a delete
    /// interrupted by a crash) may be deleted again.
    pub async fn delete(&self, org: &str, id: &str) -> Result<(), ApiError> {
        let rec = self.get(org, id)?;
        let from =
            [SandboxState::Running, SandboxState::Paused, SandboxState::Stopped, SandboxState::Deleting];
        if self.store.transition(id, &from, SandboxState::Deleting)?.is_none() {
            return Err(ApiError::Conflict(format!(
                "sandbox {id} is {}; try again when it settles",
                rec.state
            )));
        }
        self.finish_delete(id).await
    }

    async fn finish_delete(&self, id: &str) -> Result<(), ApiError> {
        self.runner.destroy(id).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
        self.store.delete_sandbox(id)?;
        Ok(())
    }

    /// The agent of a running sandbox; 409 naming the state otherwise.
    pub async fn agent(&self, org: &str, id: &str) -> Result<AgentClient, ApiError> {
        let rec = self.get(org, id)?;
        if rec.state != SandboxState::Running {
            return Err(ApiError::Conflict(format!("sandbox {id} is {}, not running", rec.state)));
        }
        Ok(self.runner.agent(id).await?)
    }

    /// Deletes running sandboxes whose timeout passed. (`auto_pause` sandboxes are deleted too
    /// until pause exists.)
    pub async fn expire(&self) {
        let expired = match self.store.expired(Utc::now().timestamp()) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "listing expired sandboxes");
                return;
            }
        };
        for rec in expired {
            tracing::info!(sandbox_id = %rec.id, "timeout reached, deleting");
            if let Err(e) = self.delete(&rec.org_id, &rec.id).await {
                tracing::warn!(sandbox_id = %rec.id, error = %e, "deleting expired sandbox");
            }
        }
    }

    /// Brings the store and the host back in line after a restart: adopts VMs still running,
    /// finishes interrupted deletes, drops half-made creates, removes files nobody owns.
    pub async fn recover(&self) -> Result<(), ApiError> {
        let records = self.store.sandboxes_on_runner(&self.cfg.runner_id)?;
        let running: Vec<String> =
            records.iter().filter(|r| r.state == SandboxState::Running).map(|r| r.id.clone()).collect();
        for lost in self.runner.recover(&running) {
            // The VM is gone (host reboot, QEMU killed); its disk is still there, so it is
            // stopped in the contract's sense.
            tracing::warn!(sandbox_id = %lost, "VM of a running sandbox is gone; marking it stopped");
            self.store.transition(&lost, &[SandboxState::Running], SandboxState::Stopped)?;
        }
        for rec in &records {
            match rec.state {
                SandboxState::Starting => {
                    tracing::info!(sandbox_id = %rec.id, "dropping a create interrupted by a restart");
                    let _ = self.runner.destroy(&rec.id).await;
                    self.store.delete_sandbox(&rec.id)?;
                }
                SandboxState::Deleting => {
                    tracing::info!(sandbox_id = %rec.id, "finishing an interrupted delete");
                    self.finish_delete(&rec.id).await?;
                }
                _ => {}
            }
        }
        let known: std::collections::HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        for dir in self.runner.sandbox_ids_on_host() {
            if !known.contains(dir.as_str()) {
                tracing::info!(sandbox_id = %dir, "removing files of an unknown sandbox");
                let _ = self.runner.destroy(&dir).await;
            }
        }
        Ok(())
    }
}
