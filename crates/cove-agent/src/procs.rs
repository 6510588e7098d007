//! Background processes: `/bin/sh -c` as the sandbox user, in a cgroup of its own, started and
//! left running. Their standard input is a pipe the host writes to; their output is kept (the
//! last [`KEPT_OUTPUT_BYTES`], both streams) and streamed to any number of readers as
//! server-sent events. A process lives in the agent's memory like any other, so it survives a
//! pause; its readers' streams do not.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use cove_api::process::{
    ProcessInfo, ProcessInput, ProcessStartRequest, KEPT_OUTPUT_BYTES, MAX_PROCESSES, TIMEOUT_EXIT_CODE,
};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::exec::{ExecCgroup, ExecError};
use crate::reaper::Reaper;
use crate::reply::Body;
use crate::sys;
use crate::tap::{Event, Stream, Tap};
use crate::user::SandboxUser;

/// How long output is still read after the process exits, from children that hold its pipes.
const DRAIN_GRACE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("no process {0} was started in this sandbox (or it was deleted)")]
    NotFound(u32),
    #[error("this sandbox keeps {MAX_PROCESSES} processes, all running: delete one first")]
    TooMany,
    #[error("the standard input of process {0} is closed")]
    StdinClosed(u32),
    #[error(transparent)]
    Exec(#[from] ExecError),
}

#[derive(Default)]
pub struct Procs {
    procs: Mutex<BTreeMap<u32, Arc<Proc>>>,
}

struct Proc {
    info: Mutex<ProcessInfo>,
    /// Where writes to its standard input go; `None` once closed.
    stdin: Mutex<Option<tokio::sync::mpsc::Sender<Bytes>>>,
    output: Arc<Tap>,
    cgroup: Option<ExecCgroup>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Procs {
    pub fn start(
        &self,
        reaper: &Reaper,
        user: &SandboxUser,
        sandbox_env: &BTreeMap<String, String>,
        req: ProcessStartRequest,
    ) -> Result<ProcessInfo, ProcError> {
        self.make_room()?;
        let cwd = crate::exec::resolve_cwd(user, req.cwd.as_deref())?;
        let cgroup = ExecCgroup::create();
        let procs_fd = cgroup.as_ref().and_then(|c| c.procs_fd());
        let env = sandbox_env.iter().chain(req.envs.iter().flatten());
        let mut cmd = crate::exec::shell_command(user, env, &cwd, &req.command, procs_fd);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let (mut child, exited) = crate::exec::spawn(reaper, &mut cmd)?;
        let pid = child.id();
        let info = ProcessInfo {
            pid,
            tag: req.tag.clone(),
            command: req.command.clone(),
            cwd: cwd.display().to_string(),
            started_at: chrono::Utc::now(),
            running: true,
            exit_code: None,
        };
        let (stdin_tx, stdin_rx) = tokio::sync::mpsc::channel(16);
        let proc = Arc::new(Proc {
            info: Mutex::new(info.clone()),
            stdin: Mutex::new(Some(stdin_tx)),
            output: Arc::new(Tap::new(KEPT_OUTPUT_BYTES)),
            cgroup,
        });
        tokio::spawn(write_stdin(child.stdin.take().map(OwnedFd::from), stdin_rx));
        let readers = [
            tokio::spawn(read_into(child.stdout.take().map(OwnedFd::from), proc.output.clone(), Stream::Out)),
            tokio::spawn(read_into(child.stderr.take().map(OwnedFd::from), proc.output.clone(), Stream::Err)),
        ];
        tokio::spawn(proc.clone().watch(exited, readers, req.timeout.map(Duration::from_secs)));
        lock(&self.procs).insert(pid, proc);
        Ok(info)
    }

    /// Forgets the oldest finished process when the table is full; `TooMany` if none finished.
    fn make_room(&self) -> Result<(), ProcError> {
        let mut procs = lock(&self.procs);
        if procs.len() < MAX_PROCESSES {
            return Ok(());
        }
        let oldest_done = procs
            .iter()
            .filter(|(_, p)| !lock(&p.info).running)
            .min_by_key(|(_, p)| lock(&p.info).started_at)
            .map(|(pid, _)| *pid);
        match oldest_done {
            Some(pid) => {
                procs.remove(&pid);
                Ok(())
            }
            None => Err(ProcError::TooMany),
        }
    }

    fn get(&self, pid: u32) -> Result<Arc<Proc>, ProcError> {
        lock(&self.procs).get(&pid).cloned().ok_or(ProcError::NotFound(pid))
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        lock(&self.procs).values().map(|p| lock(&p.info).clone()).collect()
    }

    pub fn info(&self, pid: u32) -> Result<ProcessInfo, ProcError> {
        Ok(lock(&self.get(pid)?.info).clone())
    }

    pub async fn input(&self, pid: u32, input: ProcessInput) -> Result<(), ProcError> {
        let proc = self.get(pid)?;
        let tx = {
            let mut stdin = lock(&proc.stdin);
            let tx = stdin.clone().ok_or(ProcError::StdinClosed(pid))?;
            if input.eof {
                *stdin = None;
            }
            tx
        };
        if !input.data.is_empty() && tx.send(Bytes::from(input.data)).await.is_err() {
            return Err(ProcError::StdinClosed(pid));
        }
        Ok(())
    }

    /// Sends signal `name` (one of `cove_api::process::SIGNALS`) to the process's group; `KILL`
    /// to everything it started.
    pub fn signal(&self, pid: u32, name: &str) -> Result<ProcessInfo, ProcError> {
        let proc = self.get(pid)?;
        proc.signal(name);
        let info = lock(&proc.info).clone();
        Ok(info)
    }

    /// Kills the process and everything it started, and forgets it.
    pub fn delete(&self, pid: u32) -> Result<(), ProcError> {
        let proc = lock(&self.procs).remove(&pid).ok_or(ProcError::NotFound(pid))?;
        proc.signal("KILL");
        Ok(())
    }

    /// Its output as server-sent events: `stdout` and `stderr` (`{"data": text}`), `dropped`
    /// (`{"chunks": n}`) for output a slow reader lost, and `exit` (`{"exit_code": n}`) last.
    /// The kept output comes first; with `follow` the stream goes on until the process ends.
    pub fn output(&self, pid: u32, follow: bool, detached: CancellationToken) -> Result<Body, ProcError> {
        let proc = self.get(pid)?;
        let (mut out_text, mut err_text) = (Utf8Carry::default(), Utf8Carry::default());
        let info = proc.clone();
        Ok(proc.output.body(follow, detached, move |event| match event {
            Event::Chunk(c) => {
                let (name, carry) = match c.stream {
                    Stream::Out => ("stdout", &mut out_text),
                    Stream::Err => ("stderr", &mut err_text),
                };
                let text = carry.take(&c.data);
                (!text.is_empty()).then(|| sse(name, &serde_json::json!({ "data": text })))
            }
            Event::Dropped(n) => Some(sse("dropped", &serde_json::json!({ "chunks": n }))),
            Event::End => {
                let mut out = Vec::new();
                for (name, carry) in [("stdout", &mut out_text), ("stderr", &mut err_text)] {
                    let rest = carry.rest();
                    if !rest.is_empty() {
                        out.extend_from_slice(&sse(name, &serde_json::json!({ "data": rest })));
                    }
                }
                if let Some(code) = lock(&info.info).exit_code {
                    out.extend_from_slice(&sse("exit", &serde_json::json!({ "exit_code": code })));
                }
                Some(Bytes::from(out))
            }
        }))
    }
}

impl Proc {
    /// Signals the process's group while it runs (its pid may be another's once it has exited
    /// and been reaped); `KILL` goes through its cgroup, which holds only its own tree.
    fn signal(&self, name: &str) {
        if name == "KILL" {
            if let Some(cg) = &self.cgroup {
                cg.kill();
                return;
            }
        }
        let info = lock(&self.info);
        if !info.running {
            return;
        }
        let pid = info.pid as i32;
        let sig = match name {
            "KILL" => libc::SIGKILL,
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            "HUP" => libc::SIGHUP,
            "QUIT" => libc::SIGQUIT,
            "USR1" => libc::SIGUSR1,
            "USR2" => libc::SIGUSR2,
            "STOP" => libc::SIGSTOP,
            "CONT" => libc::SIGCONT,
            _ => return,
        };
        sys::kill_group(pid, sig);
    }

    /// Waits for the exit (killing the process at its timeout), records it, and ends the output
    /// once the pipes close or shortly after.
    async fn watch(
        self: Arc<Self>,
        exited: tokio::sync::oneshot::Receiver<i32>,
        readers: [tokio::task::JoinHandle<()>; 2],
        timeout: Option<Duration>,
    ) {
        let code = match timeout {
            None => exited.await.unwrap_or(-1),
            Some(limit) => match tokio::time::timeout(limit, exited).await {
                Ok(code) => code.unwrap_or(-1),
                Err(_) => {
                    self.signal("KILL");
                    self.output.push(
                        Stream::Err,
                        Bytes::from(format!(
                            "cove: process timed out after {}s; it and all its child processes were killed\n",
                            limit.as_secs()
                        )),
                    );
                    TIMEOUT_EXIT_CODE
                }
            },
        };
        {
            let mut info = lock(&self.info);
            info.running = false;
            info.exit_code = Some(code);
        }
        let aborts: Vec<_> = readers.iter().map(|r| r.abort_handle()).collect();
        if tokio::time::timeout(DRAIN_GRACE, futures::future::join_all(readers)).await.is_err() {
            aborts.iter().for_each(|a| a.abort());
        }
        if let Some(cg) = &self.cgroup {
            cg.remove_if_empty();
        }
        self.output.end();
    }
}

async fn read_into(fd: Option<OwnedFd>, tap: Arc<Tap>, stream: Stream) {
    crate::exec::read_pipe(fd, |bytes| tap.push(stream, Bytes::copy_from_slice(bytes))).await
}

async fn write_stdin(fd: Option<OwnedFd>, mut rx: tokio::sync::mpsc::Receiver<Bytes>) {
    let Some(fd) = fd else { return };
    let Ok(mut pipe) = tokio::net::unix::pipe::Sender::from_owned_fd(fd) else {
        return;
    };
    while let Some(data) = rx.recv().await {
        if pipe.write_all(&data).await.is_err() {
            return;
        }
    }
    // Dropping the pipe closes the process's standard input.
}

fn sse(event: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// Text from a byte stream cut anywhere: a character split between chunks waits for its rest.
#[derive(Default)]
struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    fn take(&mut self, bytes: &[u8]) -> String {
        self.0.extend_from_slice(bytes);
        let whole = match std::str::from_utf8(&self.0) {
            Ok(_) => self.0.len(),
            // Incomplete at the end: keep the start of that character for the next chunk.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.0.len(),
        };
        let rest = self.0.split_off(whole);
        let text = String::from_utf8_lossy(&self.0).into_owned();
        self.0 = rest;
        text
    }

    fn rest(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.0).into_owned();
        self.0.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_between_chunks_are_joined() {
        let mut c = Utf8Carry::default();
        let snowman = "☃".as_bytes();
        assert_eq!(c.take(&[b'a', snowman[0]]), "a");
        assert_eq!(c.take(&snowman[1..]), "☃");
        assert_eq!(c.take(&[0xff, b'b']), "\u{fffd}b");
        assert_eq!(c.take(&snowman[..2]), "");
        assert_eq!(c.rest(), "\u{fffd}");
    }
}
