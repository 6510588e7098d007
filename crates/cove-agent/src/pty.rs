//! Terminal sessions: a login shell on a pseudo-terminal, as the sandbox user, in a cgroup of
//! its own (deleting the session kills everything it started). A session lives in the agent's
//! memory, so it survives a pause: the host's connection ends, the shell does not.
//!
//! The session keeps the last [`SCROLLBACK`] bytes of output; a connection gets them first,
//! then the output as it comes. Connections are HTTP/2 requests to `…/attach` whose body is the
//! terminal's input and whose answer is its output. A connection that cannot keep up loses
//! output, and is told so in the stream.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use cove_api::pty::{PtyCreateRequest, PtySessionInfo, DEFAULT_COLS, DEFAULT_ROWS, MAX_SESSIONS};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use crate::exec::ExecCgroup;
use crate::reaper::Reaper;
use crate::reply::Body;
use crate::sys;
use crate::tap::{Event, Stream, Tap};
use crate::user::SandboxUser;

/// Output a session keeps for the next connection.
pub const SCROLLBACK: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("no terminal session {0}")]
    NotFound(String),
    #[error("a terminal session {0} exists already")]
    Exists(String),
    #[error("this sandbox has {MAX_SESSIONS} terminal sessions, the most allowed: delete one first")]
    TooMany,
    #[error(transparent)]
    Cwd(#[from] crate::exec::ExecError),
    #[error("this sandbox's template has no shell (/bin/bash or /bin/sh)")]
    NoShell,
    #[error("starting the shell: {0}")]
    Io(#[from] io::Error),
}

#[derive(Default)]
pub struct Ptys {
    sessions: Mutex<BTreeMap<String, Arc<Session>>>,
}

struct Session {
    info: Mutex<PtySessionInfo>,
    user: SandboxUser,
    /// The shell's environment over the user's basic one.
    env: Vec<(String, String)>,
    /// What the shell runs instead of reading the terminal (`-lc command`).
    command: Option<String>,
    /// Set once the shell has started.
    running: Mutex<Option<Running>>,
    /// Its output; it ends when the terminal closes (the shell and whatever held it exited).
    output: Arc<Tap>,
}

struct Running {
    master: Arc<AsyncFd<OwnedFd>>,
    cgroup: Option<ExecCgroup>,
    pid: i32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ptys {
    pub fn create(
        &self,
        reaper: &Arc<Reaper>,
        user: &SandboxUser,
        sandbox_env: &BTreeMap<String, String>,
        req: PtyCreateRequest,
    ) -> Result<PtySessionInfo, PtyError> {
        let cwd = crate::exec::resolve_cwd(user, req.cwd.as_deref())?;
        let envs = req.envs.clone().unwrap_or_default();
        let mut env = vec![("TERM".to_string(), "xterm-256color".to_string())];
        env.extend(sandbox_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(envs.iter().map(|(k, v)| (k.clone(), v.clone())));
        let id = req.id.clone().unwrap_or_else(|| format!("pty-{:016x}", rand_u64()));
        let lazy_start = req.lazy_start.unwrap_or(false);
        let info = PtySessionInfo {
            id: id.clone(),
            cwd: cwd.display().to_string(),
            envs,
            cols: req.cols.unwrap_or(DEFAULT_COLS),
            rows: req.rows.unwrap_or(DEFAULT_ROWS),
            created_at: chrono::Utc::now(),
            active: false,
            lazy_start,
            exit_code: None,
        };
        let session = Arc::new(Session {
            info: Mutex::new(info),
            user: user.clone(),
            env,
            command: req.command.clone(),
            running: Mutex::new(None),
            output: Arc::new(Tap::new(SCROLLBACK)),
        });
        {
            let mut sessions = lock(&self.sessions);
            if sessions.contains_key(&id) {
                return Err(PtyError::Exists(id));
            }
            if sessions.len() >= MAX_SESSIONS {
                return Err(PtyError::TooMany);
            }
            sessions.insert(id.clone(), session.clone());
        }
        if !lazy_start {
            if let Err(e) = session.start(reaper) {
                lock(&self.sessions).remove(&id);
                return Err(e);
            }
        }
        Ok(session.info())
    }

    pub fn list(&self) -> Vec<PtySessionInfo> {
        lock(&self.sessions).values().map(|s| s.info()).collect()
    }

    fn get(&self, id: &str) -> Result<Arc<Session>, PtyError> {
        lock(&self.sessions).get(id).cloned().ok_or_else(|| PtyError::NotFound(id.to_string()))
    }

    pub fn info(&self, id: &str) -> Result<PtySessionInfo, PtyError> {
        Ok(self.get(id)?.info())
    }

    pub fn resize(&self, id: &str, cols: u16, rows: u16) -> Result<PtySessionInfo, PtyError> {
        let session = self.get(id)?;
        if let Some(r) = lock(&session.running).as_ref() {
            sys::set_winsize(r.master.get_ref().as_fd(), cols, rows)?;
        }
        let mut info = lock(&session.info);
        (info.cols, info.rows) = (cols, rows);
        Ok(info.clone())
    }

    /// Kills the shell and everything it started, and forgets the session.
    pub fn delete(&self, id: &str) -> Result<(), PtyError> {
        let session = lock(&self.sessions).remove(id).ok_or_else(|| PtyError::NotFound(id.to_string()))?;
        if let Some(r) = lock(&session.running).take() {
            match &r.cgroup {
                Some(cg) => cg.kill(),
                // Only while the shell runs: once reaped, its pid may be another process's.
                None if lock(&session.info).active => sys::kill_group(r.pid, libc::SIGKILL),
                None => {}
            }
        }
        session.output.end();
        Ok(())
    }

    /// A connection to the session: its input is `input`, the answer is its output (scrollback
    /// first). It ends when the terminal closes; when `detached` is cancelled (the host is going
    /// away) it fails, so that the host can tell the two apart.
    pub fn attach(
        &self,
        reaper: &Arc<Reaper>,
        id: &str,
        input: Incoming,
        detached: CancellationToken,
    ) -> Result<Body, PtyError> {
        let session = self.get(id)?;
        if lock(&session.running).is_none() && !session.output.has_ended() {
            session.start(reaper)?;
        }
        if let Some(master) = lock(&session.running).as_ref().map(|r| r.master.clone()) {
            tokio::spawn(feed(master, input, detached.clone()));
        }
        Ok(session.output.body(true, detached, |event| match event {
            Event::Chunk(c) => Some(c.data),
            Event::Dropped(n) => Some(Bytes::from(format!(
                "\r\n[cove: {n} chunks of output dropped: this connection read too slowly]\r\n"
            ))),
            Event::End => None,
        }))
    }
}

impl Session {
    fn info(&self) -> PtySessionInfo {
        lock(&self.info).clone()
    }

    /// Starts the shell on a new terminal, and the task that reads its output.
    fn start(self: &Arc<Self>, reaper: &Arc<Reaper>) -> Result<(), PtyError> {
        let mut running = lock(&self.running);
        if running.is_some() {
            return Ok(());
        }
        let info = self.info();
        let shell = ["/bin/bash", "/bin/sh"]
            .into_iter()
            .find(|s| std::path::Path::new(s).exists())
            .ok_or(PtyError::NoShell)?;
        let (master, slave) = sys::open_pty(info.cols, info.rows, self.user.uid)?;
        let cgroup = ExecCgroup::create();
        let procs_fd = cgroup.as_ref().and_then(|c| c.procs_fd());
        let cwd = PathBuf::from(&info.cwd);
        let env = self.env.iter().map(|(k, v)| (k, v));
        let args: Vec<&str> = match &self.command {
            Some(c) => vec!["-lc", c],
            None => vec!["-l"],
        };
        let mut cmd = crate::exec::user_command(&self.user, shell, &args, env, &cwd, procs_fd, true);
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        let (child, exited) = reaper.spawn(&mut cmd)?;
        // Its end of the terminal is the child's alone now (`cmd` holds the last copies).
        drop(cmd);
        let pid = child.id() as i32;
        sys::set_nonblocking(master.as_fd())?;
        let master = Arc::new(sys::async_fd(master)?);
        *running = Some(Running { master: master.clone(), cgroup, pid });
        lock(&self.info).active = true;
        let session = self.clone();
        tokio::spawn(async move {
            let code = exited.await.ok();
            let mut info = lock(&session.info);
            info.active = false;
            info.exit_code = code;
        });
        tokio::spawn(self.clone().pump(master));
        Ok(())
    }

    /// Reads the terminal until it closes: into the scrollback and to every connection.
    async fn pump(self: Arc<Self>, master: Arc<AsyncFd<OwnedFd>>) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match read(&master, &mut buf).await {
                // EIO: every process holding the terminal has gone.
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            self.output.push(Stream::Out, Bytes::copy_from_slice(&buf[..n]));
        }
        if let Some(r) = lock(&self.running).as_ref() {
            if let Some(cg) = &r.cgroup {
                cg.remove_if_empty();
            }
        }
        // Nothing holds the terminal: the shell has exited, whether or not its exit has been
        // reaped yet.
        lock(&self.info).active = false;
        self.output.end();
    }
}

/// Writes what the host sends to the terminal, until its stream ends or it detaches.
async fn feed(master: Arc<AsyncFd<OwnedFd>>, mut input: Incoming, detached: CancellationToken) {
    loop {
        let frame = tokio::select! {
            _ = detached.cancelled() => return,
            f = input.frame() => f,
        };
        let Some(Ok(frame)) = frame else { return };
        if let Ok(data) = frame.into_data() {
            if write_all(&master, &data).await.is_err() {
                return;
            }
        }
    }
}

async fn read(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut ready = fd.readable().await?;
        match ready.try_io(|f| sys::read(f.get_ref().as_fd(), buf)) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut ready = fd.writable().await?;
        match ready.try_io(|f| sys::write(f.get_ref().as_fd(), data)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
