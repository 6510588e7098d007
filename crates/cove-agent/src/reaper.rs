//! Child reaping. As PID 1 the agent inherits every orphan in the guest, so one task reaps all
//! children with waitpid(-1) and hands each exit status to whoever spawned that child.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::sys;

pub struct Reaper {
    /// Held while spawning and while reaping, so a status is never collected for a pid that is
    /// not registered yet (and std's own wait after a failed exec never races the reaper).
    waiting: Mutex<HashMap<i32, oneshot::Sender<i32>>>,
}

impl Reaper {
    pub fn start() -> Arc<Reaper> {
        let reaper = Arc::new(Reaper { waiting: Mutex::new(HashMap::new()) });
        let r = reaper.clone();
        tokio::spawn(async move {
            let mut sigchld = match signal(SignalKind::child()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("cove-agent: cannot watch SIGCHLD: {e}");
                    return;
                }
            };
            loop {
                r.reap();
                // Tokio keeps a signal that arrives between `reap` and `recv`, so none is missed;
                // the timeout is only a backstop. It is long because every wakeup of an idle
                // guest costs the host CPU under TCG.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), sigchld.recv()).await;
            }
        });
        reaper
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<i32>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reap(&self) {
        let mut waiting = self.lock();
        while let Some((pid, status)) = sys::wait_any_nohang() {
            if let Some(tx) = waiting.remove(&pid) {
                let _ = tx.send(exit_code(status));
            }
        }
    }

    /// Spawns `cmd`; the receiver yields its exit code (128+N when killed by signal N).
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<i32>)> {
        let mut waiting = self.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiting.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// [`Reaper::spawn`] for a child that `start` makes, returning its pid.
    pub fn spawn_with(
        &self,
        start: impl FnOnce() -> io::Result<i32>,
    ) -> io::Result<(i32, oneshot::Receiver<i32>)> {
        let mut waiting = self.lock();
        let pid = start()?;
        let (tx, rx) = oneshot::channel();
        waiting.insert(pid, tx);
        Ok((pid, rx))
    }
}

/// A raw wait status as an exit code: 128+N when killed by signal N.
pub fn exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        -1
    }
}
