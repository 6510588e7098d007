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

/// Processes a sandbox keeps track of (running, or finished and not deleted yet).
pub const MAX_PROCESSES: usize = 256;
/// Output a background process keeps for later readers, per process.
pub const KEPT_OUTPUT_BYTES: usize = 1 << 20;

/// `POST …/process/start`: a command run in the background, its output kept and streamed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessStartRequest {
    /// Shell command, run with `/bin/sh -c`.
    pub command: String,
    /// Working directory; the sandbox's working directory when omitted.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Environment applied to this process only, over the sandbox's own.
    #[serde(default)]
    pub envs: Option<BTreeMap<String, String>>,
    /// A label to find the process by (at most 64 characters).
    #[serde(default)]
    pub tag: Option<String>,
    /// Seconds after which the process and all its descendants are killed; none by default.
    #[serde(default)]
    pub timeout: Option<u64>,
}

impl Validate for ProcessStartRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let as_exec = ExecuteRequest {
            command: self.command.clone(),
            cwd: self.cwd.clone(),
            envs: self.envs.clone(),
            timeout: self.timeout,
        };
        let mut errors = as_exec.validate().err().unwrap_or_default();
        if self.tag.as_ref().is_some_and(|t| t.chars().count() > 64) {
            errors.push(FieldError { field: "tag".into(), error: "must be at most 64 characters".into() });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessInfo {
    /// The process id in the guest.
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    pub command: String,
    pub cwd: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub running: bool,
    /// Once it has exited (124 when its timeout killed it, 128 + N when signal N did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessListResponse {
    pub items: Vec<ProcessInfo>,
}

/// `POST …/process/{pid}/stdin`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ProcessInput {
    /// Text written to the process's standard input.
    #[serde(default)]
    pub data: String,
    /// Close its standard input after `data`.
    #[serde(default)]
    pub eof: bool,
}

/// One event of `GET …/process/{pid}/output` (server-sent events).
#[derive(Debug, Clone, PartialEq)]
pub enum OutputEvent {
    Stdout(String),
    Stderr(String),
    /// Chunks of output a slow reader missed.
    Dropped(u64),
    Exit(i32),
    /// The stream ended without the process: the sandbox paused or went away.
    Detached(String),
}

/// Takes the complete events off the front of `pending` (what the stream has delivered so
/// far); an incomplete one stays. Events of other names are skipped.
pub fn take_events(pending: &mut Vec<u8>) -> Vec<OutputEvent> {
    let mut events = Vec::new();
    while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
        let raw: Vec<u8> = pending.drain(..end + 2).collect();
        let text = String::from_utf8_lossy(&raw);
        let (mut name, mut data) = ("", serde_json::Value::Null);
        for line in text.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = n;
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = serde_json::from_str(d).unwrap_or(serde_json::Value::Null);
            }
        }
        let text = || data["data"].as_str().unwrap_or("").to_string();
        events.push(match name {
            "stdout" => OutputEvent::Stdout(text()),
            "stderr" => OutputEvent::Stderr(text()),
            "dropped" => OutputEvent::Dropped(data["chunks"].as_u64().unwrap_or(0)),
            "exit" => OutputEvent::Exit(data["exit_code"].as_i64().unwrap_or(1) as i32),
            "detached" => OutputEvent::Detached(data["message"].as_str().unwrap_or("detached").to_string()),
            _ => continue,
        });
    }
    events
}

/// Signals `POST …/process/{pid}/signal` sends, by name.
pub const SIGNALS: &[&str] = &["TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT"];

/// `POST …/process/{pid}/signal`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessSignal {
    /// `TERM`, `KILL`, `INT`, `HUP`, `QUIT`, `USR1`, `USR2`, `STOP` or `CONT` (a `SIG` prefix is
    /// allowed). It goes to the process's group; `KILL` to every process it started.
    pub signal: String,
}

impl ProcessSignal {
    /// The signal's name without `SIG`, if it is one of [`SIGNALS`].
    pub fn name(&self) -> Option<&'static str> {
        let n = self.signal.trim().to_ascii_uppercase();
        let n = n.strip_prefix("SIG").unwrap_or(&n).to_string();
        SIGNALS.iter().copied().find(|s| *s == n)
    }
}

impl Validate for ProcessSignal {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        v.check(self.name().is_some(), "signal", format!("must be one of {}", SIGNALS.join(", ")));
        v.finish()
    }
}

/// Largest `ProcessInput::data`, bytes.
pub const MAX_INPUT_BYTES: usize = 1 << 20;

impl Validate for ProcessInput {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        v.check(self.data.len() <= MAX_INPUT_BYTES, "data", "must be at most 1 MiB");
        v.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_taken_whole() {
        let mut pending =
            b"event: stdout\ndata: {\"data\":\"a\\n\"}\n\nevent: exit\ndata: {\"exit_code\":3}\n\nevent: std"
                .to_vec();
        assert_eq!(take_events(&mut pending), [OutputEvent::Stdout("a\n".into()), OutputEvent::Exit(3)]);
        assert_eq!(pending, b"event: std");
        pending.extend_from_slice(b"err\ndata: {\"data\":\"e\"}\n\nevent: ping\ndata: {}\n\n");
        assert_eq!(take_events(&mut pending), [OutputEvent::Stderr("e".into())]);
        assert!(pending.is_empty());
    }
}
