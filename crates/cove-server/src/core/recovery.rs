//! Crash recovery as a plan: what to do with a sandbox found after a restart is a pure function
//! of its recorded state, the operation it had in flight, and what the host reports
//! ([`Facts`]). [`plan`] decides; `Core::recover_one` carries the steps out. The table in
//! docs/architecture.md ("Crash recovery") is this function in words, and the tests below run
//! it over every state, operation and fact.

use super::*;

/// What the host reports about a sandbox found after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Its QEMU was found running and adopted.
    pub vm_alive: bool,
    /// The image its interrupted capture was writing (pause or snapshot) is complete.
    pub image_complete: bool,
    /// An interrupted resume's VM answered when given its identity again.
    pub vm_answers: bool,
}

/// One step of a plan, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// End the VM and its run files; the disk stays.
    EndVm,
    /// Remove the VM and every file of the sandbox.
    DestroyVm,
    /// Finish a stop: sync in the guest and end the VM (just end it if that fails).
    FinishStop,
    /// Run the VM stopped by an undone capture again and give it its identity; if it cannot
    /// run, end it and stop the sandbox instead.
    RunOnOrStop,
    DeleteImage(String),
    /// Mark a snapshot ready with its image's stored size.
    SnapshotReady(String),
    DeleteSnapshot(String),
    /// Record the state change (from the state the sandbox was found in).
    To(S),
    /// Record `paused` with the image that holds it.
    ToPaused(String),
    /// Record `running` with a fresh timeout and no image.
    ToRunning,
    /// Remove the sandbox's record (a create or restore that never finished).
    DeleteRecord,
    /// Finish a delete: VM, files, image and record.
    FinishDelete,
}

/// The steps that settle a sandbox found in `state` with `op` in flight. Settled states need
/// nothing, unless a `running` sandbox lost its VM.
pub fn plan(state: S, op: Option<&Op>, image: Option<&str>, facts: Facts) -> Vec<Step> {
    use Step::*;
    match (state, op) {
        (S::Running, _) if !facts.vm_alive => vec![EndVm, To(S::Stopped)],
        // Its runner is back (it was lost): with its VM, it runs on; without, it is stopped
        // with its disk kept, as after a reboot.
        (S::Lost, _) if facts.vm_alive => vec![To(S::Running)],
        (S::Lost, _) => vec![EndVm, To(S::Stopped)],
        (S::Running | S::Paused | S::Stopped | S::Deleted, _) => vec![],
        (S::Starting, Some(Op::Start)) => vec![EndVm, To(S::Stopped)],
        // A create or restore: nothing of it is the user's yet.
        (S::Starting, _) => vec![DestroyVm, DeleteRecord],
        (S::Snapshotting, Some(Op::Pause { image })) if facts.image_complete => {
            vec![DestroyVm, ToPaused(image.clone())]
        }
        (S::Snapshotting, Some(Op::Pause { image })) => vec![DeleteImage(image.clone()), RunOnOrStop],
        (S::Snapshotting, Some(&Op::Snapshot { ref snapshot_id, kill_after, .. }))
            if facts.image_complete =>
        {
            let mut steps = vec![SnapshotReady(snapshot_id.clone())];
            if kill_after {
                steps.extend([To(S::Deleting), FinishDelete]);
            } else {
                steps.push(RunOnOrStop);
            }
            steps
        }
        (S::Snapshotting, Some(Op::Snapshot { snapshot_id, image, .. })) => {
            vec![DeleteImage(image.clone()), DeleteSnapshot(snapshot_id.clone()), RunOnOrStop]
        }
        (S::Snapshotting, _) => vec![RunOnOrStop],
        // The VM got as far as running and answering: keep what it did since; the image is
        // spent. Otherwise the image is intact until the resume commits: start over from it.
        (S::Unpausing, op) if facts.vm_alive && facts.vm_answers => {
            let image = match op {
                Some(Op::Resume { image }) => Some(image.as_str()),
                _ => image,
            };
            let mut steps = vec![ToRunning];
            steps.extend(image.map(|i| DeleteImage(i.to_string())));
            steps
        }
        (S::Unpausing, _) => vec![DestroyVm, To(S::Paused)],
        (S::Stopping, _) => vec![FinishStop, To(S::Stopped)],
        (S::Deleting, _) => vec![FinishDelete],
    }
}

impl Core {
    /// Has every runner that joins the cluster, comes back after it was lost, or restarts under
    /// this control plane adopted again ([`Core::readopt`]).
    pub fn watch_host_restarts(self: &Arc<Self>) {
        let core = Arc::downgrade(self);
        self.cluster.set_join_listener(Arc::new(move |runner_id| {
            let Some(core) = core.upgrade() else { return };
            tokio::spawn(async move { core.readopt(&runner_id).await });
        }));
    }

    /// After a runner joined (new, back after it was lost, or restarted alone): its sandboxes
    /// are settled as at a restart of this server ([`Core::recover_runner`]).
    pub async fn readopt(&self, runner_id: &str) {
        let Some(member) = self.cluster.member(runner_id) else { return };
        if let Err(e) = self.recover_runner(runner_id, member.as_ref()).await {
            tracing::error!(runner_id, error = %e, "settling a runner's sandboxes");
        }
    }

    /// Brings the store and the hosts back in line after a restart: adopts VMs still running,
    /// finishes or undoes every operation a crash interrupted (see docs/architecture.md,
    /// "Crash recovery"), and removes files and images nobody owns. Runners that join later
    /// are settled when they do ([`Core::readopt`]).
    pub async fn recover(&self) -> Result<(), ApiError> {
        self.recover_templates().await?;
        for (runner_id, member) in self.cluster.members() {
            self.recover_runner(&runner_id, member.as_ref()).await?;
        }
        // Creates and restores a crash cut before their VM was placed anywhere.
        if self.cluster.member(&self.cfg.runner_id).is_none() {
            for rec in self.store.sandboxes_on_runner(&self.cfg.runner_id)? {
                if let Err(e) = self.recover_one(&rec, false).await {
                    tracing::error!(sandbox_id = %rec.id, error = %e, "recovering an unplaced sandbox");
                }
            }
        }
        let in_flight = self.store.sandboxes_in_flight()?;
        for snap in self.store.unsettled_snapshots()? {
            let capturing = in_flight
                .iter()
                .any(|r| matches!(&r.op, Some(Op::Snapshot { snapshot_id, .. }) if *snapshot_id == snap.id));
            if capturing {
                continue;
            }
            if let Err(e) = self.settle_snapshot(&snap).await {
                tracing::error!(snapshot_id = %snap.id, error = %e, "recovering snapshot");
            }
        }
        let referenced = self.store.referenced_images()?;
        match self.host.stored_images().await {
            Ok(images) => {
                for image in images.into_iter().filter(|i| !referenced.contains(i)) {
                    tracing::info!(image = %image, "removing an image nobody refers to");
                    let _ = self.host.delete_image(&image).await;
                }
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), "listing stored images"),
        }
        Ok(())
    }

    /// Settles one runner's sandboxes: adopts the VMs still running there, finishes or undoes
    /// every operation a crash interrupted (a `lost` sandbox whose VM lives runs on), and
    /// removes what the runner has of sandboxes not placed there (deleted, or moved while it
    /// was away). Each sandbox is taken under its operation lock, so none that this process is
    /// working on is touched: what is found in the middle of an operation was left by a crash.
    async fn recover_runner(&self, runner_id: &str, member: &dyn SandboxHost) -> Result<(), ApiError> {
        let mut held = Vec::new();
        for rec in self.store.sandboxes_on_runner(runner_id)? {
            let guard = self.lock_sandbox(&rec.id).await;
            if let Some(rec) = self.store.sandbox_by_id(&rec.id)?.filter(|r| r.runner_id == runner_id) {
                held.push((guard, rec));
            }
        }
        let with_vm: Vec<VmRequest> = held
            .iter()
            .map(|(_, r)| r)
            .filter(|r| {
                matches!(
                    r.state,
                    S::Running | S::Snapshotting | S::Stopping | S::Unpausing | S::Starting | S::Lost
                )
            })
            .map(|r| self.vm_request(r))
            .collect();
        let gone: std::collections::HashSet<String> = member.adopt(&with_vm).await.into_iter().collect();
        for (_guard, rec) in &held {
            if let Err(e) = self.recover_one(rec, !gone.contains(&rec.id)).await {
                tracing::error!(sandbox_id = %rec.id, error = %e, "recovering sandbox");
            }
        }
        let settled = held.len();
        drop(held);
        for id in member.sandboxes_on_host().await {
            // Read now: a sandbox placed there since is its own.
            match self.store.sandbox_by_id(&id) {
                Ok(Some(r)) if r.runner_id == runner_id => {}
                Ok(_) => {
                    tracing::info!(sandbox_id = %id, runner_id, "removing what a runner has of a sandbox not placed there");
                    let _ = member.destroy(&id).await;
                }
                Err(e) => tracing::warn!(sandbox_id = %id, error = %e, "reading a record"),
            }
        }
        tracing::info!(runner_id, sandboxes = settled, gone = gone.len(), "runner's sandboxes settled");
        Ok(())
    }

    /// A snapshot left `creating` with a complete image becomes ready; any other unsettled one
    /// (incomplete, or `deleting`) is removed with its image.
    pub(super) async fn settle_snapshot(&self, snap: &SnapshotRecord) -> Result<(), ApiError> {
        let stored = match snap.state {
            SnapshotState::Creating => self.stored_bytes(&snap.image).await?,
            _ => None,
        };
        if let Some(stored) = stored {
            self.store.snapshot_ready(&snap.id, stored)?;
        } else {
            tracing::info!(snapshot_id = %snap.id, "removing an unfinished snapshot");
            self.host.delete_image(&snap.image).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
            self.store.delete_snapshot(&snap.id)?;
        }
        Ok(())
    }

    /// The stored size of a complete image; `None` when it is incomplete. A store that cannot
    /// answer is an error, so that recovery never takes a complete image for a partial one and
    /// deletes it.
    pub(super) async fn stored_bytes(&self, image: &str) -> Result<Option<u64>, ApiError> {
        let manifest = self.host.find_image(image).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
        Ok(manifest.map(|m| m.stored_bytes()))
    }

    /// Settles one sandbox after a restart; `vm_alive` says whether its QEMU was adopted. What
    /// to do is [`recovery::plan`]'s to decide, from the facts gathered here.
    pub(super) async fn recover_one(&self, rec: &SandboxRecord, vm_alive: bool) -> Result<(), ApiError> {
        use recovery::Step;
        let id = rec.id.as_str();
        let host_err = |e: cove_runner::RunnerError| ApiError::internal(error_chain(&e));
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
            && self.host.reidentify(&self.vm_request(rec)).await.is_ok();
        let facts = recovery::Facts { vm_alive, image_complete: stored.is_some(), vm_answers };
        let steps = recovery::plan(rec.state, rec.op.as_ref(), rec.image.as_deref(), facts);
        if !steps.is_empty() {
            tracing::info!(sandbox_id = %id, state = %rec.state, op = ?rec.op, ?facts, ?steps, "settling a sandbox after a restart");
        }
        for step in steps {
            match step {
                Step::EndVm => self.host.end_vm(id).await.map_err(host_err)?,
                Step::DestroyVm => self.host.destroy(id).await.map_err(host_err)?,
                Step::FinishStop => {
                    if self.host.stop(id).await.is_err() {
                        self.host.end_vm(id).await.map_err(host_err)?;
                    }
                }
                Step::RunOnOrStop => self.run_on_or_stop(rec, vm_alive).await?,
                Step::DeleteImage(image) => self.host.delete_image(&image).await.map_err(host_err)?,
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
    pub(super) async fn run_on_or_stop(&self, rec: &SandboxRecord, vm_alive: bool) -> Result<(), ApiError> {
        if vm_alive && self.host.run_again(&rec.id).await.is_ok() {
            // Its clock stood still while it was stopped: set it again.
            if let Err(e) = self.host.reidentify(&self.vm_request(rec)).await {
                tracing::warn!(sandbox_id = %rec.id, error = %error_chain(&e), "re-sending the identity after recovery");
            }
            self.store.transition(&rec.id, &[S::Snapshotting], S::Running)?;
        } else {
            tracing::warn!(sandbox_id = %rec.id, "VM gone during an interrupted capture; marking it stopped");
            self.host.end_vm(&rec.id).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
            self.store.transition(&rec.id, &[S::Snapshotting], S::Stopped)?;
        }
        Ok(())
    }
}

/// Where a plan leaves the sandbox found in `found`: `None` when its record is gone.
#[cfg(test)]
pub(super) fn settles(found: S, steps: &[Step]) -> Option<S> {
    use Step::*;
    let mut state = Some(found);
    for step in steps {
        state = match step {
            To(s) => Some(*s),
            ToPaused(_) => Some(S::Paused),
            ToRunning => Some(S::Running),
            // Runs on (running) or, failing that, stops (stopped): both settled.
            RunOnOrStop => Some(S::Running),
            DeleteRecord | FinishDelete => None,
            _ => state,
        };
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use Step::*;

    fn ops() -> Vec<Option<Op>> {
        let mut ops = vec![
            None,
            Some(Op::Create),
            Some(Op::Restore { snapshot_id: "snap-1".into() }),
            Some(Op::Start),
            Some(Op::Pause { image: "pause-1".into() }),
            Some(Op::Resume { image: "pause-1".into() }),
            Some(Op::Stop),
        ];
        for kill_after in [false, true] {
            ops.push(Some(Op::Snapshot {
                snapshot_id: "snap-1".into(),
                image: "snap-img".into(),
                kill_after,
            }));
        }
        ops
    }

    fn all_facts() -> Vec<Facts> {
        let mut v = Vec::new();
        for vm_alive in [false, true] {
            for image_complete in [false, true] {
                for vm_answers in [false, true] {
                    v.push(Facts { vm_alive, image_complete, vm_answers });
                }
            }
        }
        v
    }

    /// Every state, operation and fact: the plan leaves the sandbox settled (or gone), never
    /// deletes the only copy of a paused sandbox, and never leaves a VM behind a record that is
    /// not running.
    #[test]
    fn every_case_settles_and_keeps_the_users_data() {
        for state in S::ALL {
            for op in ops() {
                for facts in all_facts() {
                    let image = Some("pause-1");
                    let steps = plan(state, op.as_ref(), image, facts);
                    let case = format!("{state:?} {op:?} {facts:?}: {steps:?}");
                    let end = settles(state, &steps);
                    assert!(end.is_none_or(super::super::machine::settled), "left unsettled: {case}");
                    // A paused sandbox's image is its only copy.
                    if end == Some(S::Paused) {
                        assert!(!steps.iter().any(|s| matches!(s, DeleteImage(_))), "{case}");
                    }
                    // A complete pause image is kept, and the sandbox is paused on it.
                    if state == S::Snapshotting
                        && matches!(op, Some(Op::Pause { .. }))
                        && facts.image_complete
                    {
                        assert_eq!(steps, vec![DestroyVm, ToPaused("pause-1".into())], "{case}");
                    }
                    // A complete snapshot image becomes a ready snapshot, whatever else happens.
                    if state == S::Snapshotting && matches!(op, Some(Op::Snapshot { .. })) {
                        assert_eq!(
                            steps.contains(&SnapshotReady("snap-1".into())),
                            facts.image_complete,
                            "{case}"
                        );
                        assert_eq!(
                            steps.contains(&DeleteSnapshot("snap-1".into())),
                            !facts.image_complete,
                            "{case}"
                        );
                    }
                    // Stopped or paused means no VM: one is ended or destroyed on the way there
                    // (RunOnOrStop ends it itself when it falls back to stopping).
                    let transient = !matches!(state, S::Running | S::Paused | S::Stopped | S::Deleted);
                    if transient && matches!(end, Some(S::Stopped | S::Paused)) {
                        assert!(
                            steps.iter().any(|s| matches!(s, EndVm | DestroyVm | FinishStop)),
                            "a VM may outlive the sandbox's run: {case}"
                        );
                    }
                    // Settled sandboxes are left alone unless their VM is gone.
                    if matches!(state, S::Paused | S::Stopped | S::Deleted) {
                        assert!(steps.is_empty(), "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_table() {
        let alive = Facts { vm_alive: true, image_complete: false, vm_answers: false };
        let gone = Facts { vm_alive: false, ..alive };
        let complete = Facts { image_complete: true, ..alive };
        let pause = Op::Pause { image: "p".into() };
        let resume = Op::Resume { image: "p".into() };
        let snap = |kill_after| Op::Snapshot { snapshot_id: "s".into(), image: "i".into(), kill_after };
        let cases: Vec<(S, Option<Op>, Facts, Vec<Step>)> = vec![
            (S::Running, None, alive, vec![]),
            (S::Running, None, gone, vec![EndVm, To(S::Stopped)]),
            (S::Starting, Some(Op::Create), alive, vec![DestroyVm, DeleteRecord]),
            (
                S::Starting,
                Some(Op::Restore { snapshot_id: "s".into() }),
                alive,
                vec![DestroyVm, DeleteRecord],
            ),
            (S::Starting, Some(Op::Start), alive, vec![EndVm, To(S::Stopped)]),
            (S::Snapshotting, Some(pause.clone()), complete, vec![DestroyVm, ToPaused("p".into())]),
            (S::Snapshotting, Some(pause), alive, vec![DeleteImage("p".into()), RunOnOrStop]),
            (S::Snapshotting, Some(snap(false)), complete, vec![SnapshotReady("s".into()), RunOnOrStop]),
            (
                S::Snapshotting,
                Some(snap(true)),
                complete,
                vec![SnapshotReady("s".into()), To(S::Deleting), FinishDelete],
            ),
            (
                S::Snapshotting,
                Some(snap(true)),
                alive,
                vec![DeleteImage("i".into()), DeleteSnapshot("s".into()), RunOnOrStop],
            ),
            (
                S::Unpausing,
                Some(resume.clone()),
                Facts { vm_answers: true, ..alive },
                vec![ToRunning, DeleteImage("p".into())],
            ),
            (S::Unpausing, Some(resume.clone()), alive, vec![DestroyVm, To(S::Paused)]),
            (S::Unpausing, Some(resume), Facts { vm_answers: true, ..gone }, vec![DestroyVm, To(S::Paused)]),
            (S::Stopping, Some(Op::Stop), alive, vec![FinishStop, To(S::Stopped)]),
            (S::Deleting, None, alive, vec![FinishDelete]),
        ];
        for (state, op, facts, want) in cases {
            assert_eq!(plan(state, op.as_ref(), None, facts), want, "{state:?} {op:?} {facts:?}");
        }
    }
}
