//! A minimal QMP client: one command at a time, events skipped.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::VmmError;

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects, retrying while QEMU is still creating the socket, and negotiates capabilities.
    pub async fn connect(path: &Path, wait: Duration) -> Result<Qmp, VmmError> {
        let deadline = tokio::time::Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(VmmError::Qmp(format!("connecting to {}: {e}", path.display())))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Qmp { reader: BufReader::new(r), writer: w };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(VmmError::Qmp(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await.map_err(|e| VmmError::Qmp(format!("reading: {e}")))? == 0 {
            return Err(VmmError::Qmp("QEMU closed the monitor".into()));
        }
        serde_json::from_str(&line).map_err(|e| VmmError::Qmp(format!("bad message {line:?}: {e}")))
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, VmmError> {
        let msg = if arguments.as_object().is_some_and(|o| o.is_empty()) {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes()).await.map_err(|e| VmmError::Qmp(format!("writing: {e}")))?;
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("unknown error");
                return Err(VmmError::Qmp(format!("{command}: {desc}")));
            }
        }
    }

    /// Polls `query-migrate` until the migration is over.
    pub async fn wait_migration(&mut self, limit: Duration) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let info = self.execute("query-migrate", json!({})).await?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                    return Err(VmmError::Qmp(format!("migration failed: {why}")));
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(VmmError::Qmp("migration did not finish in time".into()))
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }
}
