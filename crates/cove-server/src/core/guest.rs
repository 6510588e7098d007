//! Access to a sandbox's guest: its agent (held running while in use) and its TCP ports.

use super::*;

/// A sandbox's agent, with a shared hold of its operation lock: no pause, stop or snapshot
/// starts while this lives. A streamed answer keeps it until the stream ends.
pub struct Guest {
    agent: AgentClient,
    _lease: tokio::sync::OwnedRwLockReadGuard<()>,
}

impl Guest {
    /// The agent without the hold, for a connection that must not keep the sandbox from
    /// pausing (a terminal): its requests fail when the sandbox pauses.
    pub fn release(self) -> AgentClient {
        self.agent
    }
}

impl std::ops::Deref for Guest {
    type Target = AgentClient;
    fn deref(&self) -> &AgentClient {
        &self.agent
    }
}

impl Core {
    /// The agent of a sandbox, resuming it first if it is paused (or waiting for the resume or
    /// snapshot in progress); 409 naming the state when it has no VM to offer. The sandbox stays
    /// running while the answer is held: a pause, stop or snapshot (a timeout's too) waits for
    /// it, and a call that arrives during one waits for it and resumes the sandbox.
    pub async fn agent(&self, org: &str, id: &str) -> Result<Guest, ApiError> {
        loop {
            let lease = self.op_lock(id).read_owned().await;
            let rec = self.get(org, id)?;
            match rec.state {
                S::Running => return Ok(Guest { agent: self.host.agent(id).await?, _lease: lease }),
                S::Paused | S::Unpausing | S::Snapshotting => {
                    drop(lease);
                    self.resume(org, id).await?;
                }
                other => return Err(not_in(id, other, "running")),
            }
        }
    }

    /// The sandbox, running: a paused one is resumed first (requests that arrive during a
    /// pause, resume or snapshot wait for it).
    pub async fn running(&self, org: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        let rec = self.get(org, id)?;
        match rec.state {
            S::Running => Ok(rec),
            S::Paused | S::Unpausing | S::Snapshotting => self.resume(org, id).await,
            other => Err(not_in(id, other, "running")),
        }
    }

    /// A TCP connection to `port` of the sandbox's guest (resumed if paused).
    pub async fn connect_guest(
        &self,
        org: &str,
        id: &str,
        port: u16,
    ) -> Result<cove_runner::GuestStream, ApiError> {
        self.running(org, id).await?;
        self.host.connect_guest(id, port).await.map_err(|e| match e {
            cove_runner::RunnerError::Io(_, io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                ApiError::BadGateway(format!("nothing listens on port {port} in sandbox {id}"))
            }
            e => {
                tracing::warn!(sandbox_id = %id, port, error = %error_chain(&e), "reaching a guest port");
                ApiError::BadGateway(format!("port {port} of sandbox {id} could not be reached"))
            }
        })
    }
}
