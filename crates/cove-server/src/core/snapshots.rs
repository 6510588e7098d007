//! Named snapshots: create (from a running sandbox), restore (into a new one), list, delete.

use super::lifecycle::NewSandbox;
use super::*;

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

impl Core {
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
        match self.host.capture(&self.vm_request(&rec), &snap.image, after).instrument(span).await {
            Ok((manifest, stats)) => {
                tracing::info!(sandbox_id = %id, snapshot_id = %snap_id, save_ms = stats.save_ms,
                    store_ms = stats.store_ms, stored_bytes = stats.stored_bytes, "snapshot stored");
                self.store.snapshot_ready(&snap_id, manifest.stored_bytes())?;
                self.metrics.image_bytes(crate::metrics::ImageBytes::Snapshot, manifest.stored_bytes());
                if kill_after {
                    let during = machine::rule(Action::Snapshot).during;
                    self.store.transition(id, &[during], machine::rule(Action::Delete).during)?;
                    self.finish_delete(&rec).await?;
                } else {
                    self.finish(id, Action::Snapshot, |c| c)?;
                }
            }
            Err(e) => {
                let _ = self.host.delete_image(&snap.image).await;
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
        let rec = self.new_record(
            org,
            NewSandbox {
                template: snap.template.clone(),
                vcpu: snap.vcpu,
                memory: snap.memory,
                disk: snap.disk,
                network_policy: self.seal_policy(req.network_policy).or_else(|| snap.network_policy.clone()),
                mounts: snap.mounts.clone(),
                env: snap.env.clone(),
                timeout: req.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS),
                auto_pause: req.auto_pause.unwrap_or(false),
                op: Op::Restore { snapshot_id: snap.id.clone() },
            },
        );
        // Held until it runs: a runner's recovery meanwhile leaves it to this.
        let _op = self.lock_sandbox(&rec.id).await;
        self.store.insert_sandbox(&rec, self.cfg.default_sandbox_limit).map_err(|e| match e {
            StoreError::NotFound => ApiError::NotFound(format!("snapshot {name:?} is being deleted")),
            other => limit_error(other),
        })?;
        let vm = self.vm_request(&rec);
        let span = tracing::info_span!("restore", sandbox_id = %rec.id, snapshot_id = %snap.id);
        self.bring_up(org, &rec, self.host.create_from_image(&vm, &snap.image).instrument(span), |e| {
            ApiError::unavailable(&rec.id, "restoring the snapshot failed", &e)
        })
        .await
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
        self.host.delete_image(&snap.image).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
        self.store.delete_snapshot(&snap.id)?;
        Ok(())
    }
}
