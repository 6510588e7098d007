//! One-shot command execution.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{FieldError, Validate, Violations};

/// Default for `ExecuteRequest::timeout`, in seconds.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 30;
/// Longest accepted `ExecuteRequest::timeout`, in seconds (the longest sandbox lifetime).
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 28_800;
/// Exit code reported for a command killed by its timeout (as coreutils' `timeout`).
pub const TIMEOUT_EXIT_CODE: i32 = 124;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecuteRequest {
    /// Shell command, run with `/bin/sh -c`.
    pub command: String,
    /// Working directory; the user's home when omitted.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Environment applied to this process only, over the sandbox's own.
    #[serde(default)]
    pub envs: Option<BTreeMap<String, String>>,
    /// Timeout in seconds (default 30). The command and all its children are killed when it
    /// expires; the response then has exit code 124 and says so on stderr.
    #[serde(default)]
    pub timeout: Option<u64>,
}

impl ExecuteRequest {
    pub fn timeout_secs(&self) -> u64 {
        self.timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS)
    }
}

impl Validate for ExecuteRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        v.check(!self.command.trim().is_empty(), "command", "must not be empty");
        v.check(!self.command.contains('\0'), "command", "must not contain NUL bytes");
        if let Some(cwd) = &self.cwd {
            crate::check_path(&mut v, "cwd", cwd);
        }
        if let Some(t) = self.timeout {
            v.check(
                (1..=MAX_EXEC_TIMEOUT_SECS).contains(&t),
                "timeout",
                format!("must be between 1 and {MAX_EXEC_TIMEOUT_SECS}"),
            );
        }
        for key in self.envs.iter().flat_map(|e| e.keys()) {
            v.check(valid_env_name(key), format!("envs.{key}"), "is not a valid variable name");
        }
        v.finish()
    }
}

/// An environment variable name: non-empty, no `=` and no NUL.
pub fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('=') && !name.contains('\0')
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecuteResponse {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}
