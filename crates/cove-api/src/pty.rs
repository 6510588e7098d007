//! Interactive terminal sessions: a shell on a pseudo-terminal in the guest, driven over a
//! WebSocket. The same types are the guest agent's wire format.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::process::valid_env_name;
use crate::{FieldError, Validate, Violations};

pub const DEFAULT_COLS: u16 = 80;
pub const DEFAULT_ROWS: u16 = 24;
/// Largest terminal side accepted, in cells.
pub const MAX_SIDE: u16 = 1000;
/// Sessions one sandbox may hold at once.
pub const MAX_SESSIONS: usize = 64;

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct PtyCreateRequest {
    /// Session id (letters, digits, `.`, `_`, `-`; at most 64); generated when omitted.
    #[serde(default)]
    pub id: Option<String>,
    /// Directory the shell starts in; the sandbox's working directory when omitted.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Environment of the shell, over the sandbox's own (`TERM` is `xterm-256color` unless
    /// given).
    #[serde(default)]
    pub envs: Option<BTreeMap<String, String>>,
    /// Terminal columns (default 80).
    #[serde(default)]
    pub cols: Option<u16>,
    /// Terminal rows (default 24).
    #[serde(default)]
    pub rows: Option<u16>,
    /// Start the shell at the first connection instead of now.
    #[serde(default)]
    pub lazy_start: Option<bool>,
    /// Cove addition: run this command (`shell -lc command`) instead of an interactive login
    /// shell; the terminal closes when it exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

pub fn valid_session_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn check_side(v: &mut Violations, field: &str, value: Option<u16>) {
    if let Some(n) = value {
        v.check((1..=MAX_SIDE).contains(&n), field, format!("must be between 1 and {MAX_SIDE}"));
    }
}

impl Validate for PtyCreateRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        if let Some(id) = &self.id {
            v.check(valid_session_id(id), "id", "must be 1 to 64 letters, digits, '.', '_' or '-'");
        }
        if let Some(cwd) = &self.cwd {
            crate::check_path(&mut v, "cwd", cwd);
        }
        for key in self.envs.iter().flat_map(|e| e.keys()) {
            v.check(valid_env_name(key), format!("envs.{key}"), "is not a valid variable name");
        }
        check_side(&mut v, "cols", self.cols);
        check_side(&mut v, "rows", self.rows);
        if let Some(c) = &self.command {
            v.check(
                !c.trim().is_empty() && !c.contains('\0'),
                "command",
                "must be non-empty, without NUL bytes",
            );
        }
        v.finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PtySessionInfo {
    pub id: String,
    pub cwd: String,
    pub envs: BTreeMap<String, String>,
    pub cols: u16,
    pub rows: u16,
    pub created_at: DateTime<Utc>,
    /// Its shell runs (false before a lazy start and after the shell exited).
    pub active: bool,
    pub lazy_start: bool,
    /// Cove addition: the shell's exit code, once it has exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PtyListResponse {
    pub items: Vec<PtySessionInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PtyResizeRequest {
    pub cols: u16,
    pub rows: u16,
}

impl Validate for PtyResizeRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_side(&mut v, "cols", Some(self.cols));
        check_side(&mut v, "rows", Some(self.rows));
        v.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_field_at_fault() {
        let fields = |r: &PtyCreateRequest| -> Vec<String> {
            r.validate().err().unwrap_or_default().into_iter().map(|e| e.field).collect()
        };
        assert!(fields(&PtyCreateRequest::default()).is_empty());
        let bad = PtyCreateRequest {
            id: Some("a b".into()),
            cwd: Some(String::new()),
            envs: Some([("A=B".to_string(), String::new())].into()),
            cols: Some(0),
            rows: Some(MAX_SIDE + 1),
            lazy_start: None,
            command: Some(" ".into()),
        };
        assert_eq!(fields(&bad), ["id", "cwd", "envs.A=B", "cols", "rows", "command"]);
        assert!(valid_session_id("my-terminal_1.x") && !valid_session_id(&"x".repeat(65)));
        let resize = PtyResizeRequest { cols: 0, rows: 10 }.validate().unwrap_err();
        assert_eq!(resize[0].field, "cols");
    }
}
