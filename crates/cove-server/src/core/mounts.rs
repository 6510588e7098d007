//! Object-storage mounts of a sandbox: attach, change, detach, on a running or stopped one.

use super::*;

pub(super) fn new_mount_id() -> String {
    format!("mnt-{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// A mount that could not be attached, as the API says it: the field to fix (under `field`)
/// and why. The message names endpoint and bucket, never the secret.
pub(super) fn mount_error(field: &str, e: cove_mount::MountError) -> ApiError {
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
pub(super) fn mount_call_error(e: RunnerError, field: impl Fn(usize) -> String) -> ApiError {
    match e {
        RunnerError::Mount { index, source } => mount_error(&field(index), source),
        e => ApiError::from(e),
    }
}

/// 409 when another mount of the sandbox has `m`'s path, or one inside or around it.
pub(super) fn check_mount_path(rec: &SandboxRecord, m: &MountConfig) -> Result<(), ApiError> {
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

impl Core {
    /// The sandbox locked for a change of its mounts: running (a paused one is resumed first, as
    /// for any request that needs its guest) or stopped (the change is only recorded: a start
    /// boots afresh and mounts what is recorded); 409 naming any other state.
    pub(super) async fn lock_for_mounts(
        &self,
        org: &str,
        id: &str,
    ) -> Result<(OpGuard, SandboxRecord), ApiError> {
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
            S::Running => self.host.add_mount(id, &plain).await,
            _ => self.host.check_mount(&plain).await,
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
            S::Running => self.host.update_mount(id, &mount, remount).await,
            _ => self.host.check_mount(&mount).await,
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
            self.host.remove_mount(id, mount_id).await?;
        }
        let mounts: Vec<MountConfig> = rec.mounts.iter().filter(|m| m.id != mount_id).cloned().collect();
        self.store.set_mounts(id, &mounts)?;
        tracing::info!(sandbox_id = %id, mount_id, "mount deleted");
        Ok(())
    }
}
