//! SSH access to a sandbox: a username (the access id) and a password, for Cove's SSH endpoint,
//! which opens a shell (or runs a command) in the sandbox.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{FieldError, Validate, Violations};

/// How long an access lasts from its creation or regeneration.
pub const ACCESS_LIFETIME_SECS: i64 = 24 * 3600;

/// An SSH access, with its password: answered only by create and regenerate (the password is
/// stored as a hash).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SshAccess {
    /// The SSH username.
    pub id: String,
    pub sandbox_id: String,
    /// The SSH password.
    pub password: String,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// A command that connects (OpenSSH's `ssh`; it asks for the password).
    pub ssh_command: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SshValidateRequest {
    pub password: String,
}

impl Validate for SshValidateRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        v.check(!self.password.is_empty(), "password", "must not be empty");
        v.finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SshValidation {
    /// The password is this access's and the access has not expired.
    pub valid: bool,
    pub sandbox_id: String,
}
