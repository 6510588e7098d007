//! SSH accesses: a username and password per access, good for one sandbox until they expire.
//! The SSH endpoint (`crate::sshd`) asks [`Core::ssh_login`] who a login is.

use cove_api::ssh::{SshAccess, SshValidation, ACCESS_LIFETIME_SECS};
use cove_store::SshAccessRecord;

use super::*;

fn new_password() -> String {
    hex::encode(rand::random::<[u8; 20]>())
}

/// Whole seconds, so that `expires_at` is exactly the lifetime after `updated_at`.
fn now_whole() -> chrono::DateTime<Utc> {
    chrono::DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap_or_else(Utc::now)
}

impl Core {
    fn ssh_answer(&self, a: &SshAccessRecord, password: String) -> Result<SshAccess, ApiError> {
        let Some(endpoint) = &self.cfg.ssh else {
            return Err(ApiError::NotImplemented(
                "this Cove server runs no SSH endpoint (--ssh-listen)".into(),
            ));
        };
        Ok(SshAccess {
            id: a.id.clone(),
            sandbox_id: a.sandbox_id.clone(),
            password,
            expires_at: chrono::DateTime::from_timestamp(a.expires_at, 0).unwrap_or(a.updated_at),
            created_at: a.created_at,
            updated_at: a.updated_at,
            ssh_command: format!("ssh -p {} {}@{}", endpoint.port, a.id, endpoint.host),
        })
    }

    /// A new access to a sandbox; its password is answered this once.
    pub fn create_ssh_access(&self, org: &str, id: &str) -> Result<SshAccess, ApiError> {
        let rec = self.get(org, id)?;
        let now = now_whole();
        let access = SshAccessRecord {
            id: format!("ssh{}", hex::encode(rand::random::<[u8; 8]>())),
            org_id: org.to_string(),
            sandbox_id: rec.id,
            expires_at: now.timestamp() + ACCESS_LIFETIME_SECS,
            created_at: now,
            updated_at: now,
        };
        let password = new_password();
        let answer = self.ssh_answer(&access, password.clone())?;
        self.store.insert_ssh_access(&access, &password)?;
        tracing::info!(sandbox_id = %id, ssh_id = %access.id, "SSH access created");
        Ok(answer)
    }

    /// A new password and lifetime for an access; the old password stops working.
    pub fn regenerate_ssh_access(&self, org: &str, id: &str, ssh_id: &str) -> Result<SshAccess, ApiError> {
        let (mut access, _) = self.find_ssh_access(org, id, ssh_id, "")?;
        let now = now_whole();
        access.expires_at = now.timestamp() + ACCESS_LIFETIME_SECS;
        access.updated_at = now;
        let password = new_password();
        let answer = self.ssh_answer(&access, password.clone())?;
        self.store.renew_ssh_access(&access, &password)?;
        tracing::info!(sandbox_id = %id, ssh_id, "SSH access regenerated");
        Ok(answer)
    }

    pub fn validate_ssh_access(
        &self,
        org: &str,
        id: &str,
        ssh_id: &str,
        password: &str,
    ) -> Result<SshValidation, ApiError> {
        let (access, matches) = self.find_ssh_access(org, id, ssh_id, password)?;
        let valid = matches && access.expires_at > Utc::now().timestamp();
        Ok(SshValidation { valid, sandbox_id: access.sandbox_id })
    }

    pub fn delete_ssh_access(&self, org: &str, id: &str, ssh_id: &str) -> Result<(), ApiError> {
        self.get(org, id)?;
        self.store.delete_ssh_access(org, id, ssh_id).map_err(|e| match e {
            StoreError::NotFound => {
                ApiError::NotFound(format!("SSH access {ssh_id} of sandbox {id} not found"))
            }
            e => e.into(),
        })?;
        tracing::info!(sandbox_id = %id, ssh_id, "SSH access deleted");
        Ok(())
    }

    fn find_ssh_access(
        &self,
        org: &str,
        id: &str,
        ssh_id: &str,
        password: &str,
    ) -> Result<(SshAccessRecord, bool), ApiError> {
        self.get(org, id)?;
        self.store
            .ssh_access(org, id, ssh_id, password)?
            .ok_or_else(|| ApiError::NotFound(format!("SSH access {ssh_id} of sandbox {id} not found")))
    }

    /// The organization and sandbox a login opens: `None` unless `user` is an access whose
    /// password is `password` and which has not expired.
    pub fn ssh_login(&self, user: &str, password: &str) -> Option<(String, String)> {
        match self.store.ssh_login(user, password, Utc::now().timestamp()) {
            Ok(found) => found.map(|a| (a.org_id, a.sandbox_id)),
            Err(e) => {
                tracing::error!(error = %e, "SSH login: the store did not answer");
                None
            }
        }
    }
}
