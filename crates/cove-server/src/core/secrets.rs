//! Secrets at rest: mount credentials and injected header values are sealed in the store and
//! opened only for the runner, which keeps them on the host.

use super::*;

pub(super) fn vm_request(rec: &SandboxRecord) -> VmRequest {
    VmRequest {
        id: rec.id.clone(),
        template: rec.template.clone(),
        vcpus: rec.vcpu,
        memory_mib: rec.memory,
        disk_mib: rec.disk,
        env: rec.env.clone(),
        unsealed: Unsealed { network_policy: rec.network_policy.clone(), mounts: rec.mounts.clone() },
    }
}

impl Core {
    /// Seals a secret in place (one already sealed is kept).
    pub(super) fn seal(&self, v: &mut String) {
        if !Sealer::is_sealed(v) {
            *v = self.sealer.seal(v);
        }
    }

    /// Opens a sealed secret in place. One that cannot be opened (key file lost or replaced) is
    /// left sealed, so an upstream gets a useless value rather than the sandbox getting anything.
    pub(super) fn open(&self, sandbox_id: &str, what: &str, v: &mut String) {
        match self.sealer.open(v) {
            Ok(plain) => *v = plain,
            Err(e) => tracing::error!(sandbox_id = %sandbox_id, error = %e, "sealed {what}"),
        }
    }

    /// The policy as stored: header values to inject sealed.
    pub(super) fn seal_policy(&self, mut policy: Option<NetworkPolicy>) -> Option<NetworkPolicy> {
        for t in policy.iter_mut().flat_map(|p| &mut p.transforms) {
            t.inject_headers.values_mut().for_each(|v| self.seal(v));
        }
        policy
    }

    /// A mount as stored: credentials sealed.
    pub(super) fn seal_mount(&self, mut m: MountConfig) -> MountConfig {
        [&mut m.access_key_id, &mut m.secret_access_key].into_iter().flatten().for_each(|v| self.seal(v));
        m
    }

    pub(super) fn open_mount(&self, sandbox_id: &str, mut m: MountConfig) -> MountConfig {
        for v in [&mut m.access_key_id, &mut m.secret_access_key].into_iter().flatten() {
            self.open(sandbox_id, "mount credential", v);
        }
        m
    }

    /// What the runner gets: the record's request, with sealed values opened.
    pub(super) fn vm_request(&self, rec: &SandboxRecord) -> VmRequest {
        let mut req = vm_request(rec);
        let secrets = &mut req.unsealed;
        secrets.mounts =
            std::mem::take(&mut secrets.mounts).into_iter().map(|m| self.open_mount(&rec.id, m)).collect();
        for t in secrets.network_policy.iter_mut().flat_map(|p| &mut p.transforms) {
            t.inject_headers.values_mut().for_each(|v| self.open(&rec.id, "header value", v));
        }
        req
    }
}
