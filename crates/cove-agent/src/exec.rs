//! One-shot commands: `/bin/sh -c` as the sandbox user, in a cgroup of its own so that a
//! timeout kills the command and everything it started, daemons included.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cove_api::process::{ExecuteRequest, ExecuteResponse, TIMEOUT_EXIT_CODE};
use tokio::io::AsyncReadExt;

use crate::reaper::Reaper;
use crate::sys;
use crate::user::SandboxUser;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Most output kept per stream; the rest is dropped and the response says so.
const MAX_OUTPUT: usize = 16 << 20;
/// How long output is still collected after the command exits, for background children that
/// hold the pipes open.
const DRAIN_GRACE: Duration = Duration::from_millis(50);
const CGROUP_ROOT: &str = "/sys/fs/cgroup/cove-exec";

static NEXT_EXEC: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cwd {0}: not a directory")]
    BadCwd(String),
    #[error("this sandbox's template has no /bin/sh to run commands with")]
    NoShell,
    #[error("starting the command: {0}")]
    Spawn(io::Error),
}

pub async fn run(
    reaper: &Reaper,
    user: &SandboxUser,
    sandbox_env: &BTreeMap<String, String>,
    req: &ExecuteRequest,
) -> Result<ExecuteResponse, ExecError> {
    let cwd = resolve_cwd(user, req.cwd.as_deref())?;
    let env = sandbox_env.iter().chain(req.envs.iter().flatten());
    if crate::service::namespace_init().is_some() {
        // Beside a system manager the command joins its namespaces, which takes a fork.
        return run_command(reaper, req.timeout_secs(), |procs_fd| {
            shell_command(user, env, &cwd, &req.command, procs_fd)
        })
        .await;
    }
    let cgroup = ExecCgroup::create();
    let started =
        spawn_shell(reaper, user, env, &cwd, &req.command, cgroup.as_ref().and_then(|c| c.procs_fd()))?;
    collect_until_exit(started, cgroup, req.timeout_secs()).await
}

/// A command started with no input and its output on pipes.
struct Started {
    pid: i32,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    exited: tokio::sync::oneshot::Receiver<i32>,
}

/// Starts `/bin/sh -c command` as [`shell_command`] would, but without forking the agent: see
/// [`cove_spawn::spawn`]. Its pipes and strings are made first, and its cgroup was made ahead.
fn spawn_shell<'a>(
    reaper: &Reaper,
    user: &SandboxUser,
    env: impl Iterator<Item = (&'a String, &'a String)>,
    cwd: &std::path::Path,
    command: &str,
    procs_fd: Option<i32>,
) -> Result<Started, ExecError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let nul =
        |_| ExecError::Spawn(io::Error::new(io::ErrorKind::InvalidInput, "nul byte found in provided data"));
    // The user's basic environment, then the sandbox's and the request's variables over it.
    let mut vars: BTreeMap<String, String> = base_env(user).into_iter().collect();
    vars.extend(env.map(|(k, v)| (k.clone(), v.clone())));
    let null = std::fs::File::open("/dev/null").map_err(ExecError::Spawn)?;
    let (out_r, out_w) = io::pipe().map_err(ExecError::Spawn)?;
    let (err_r, err_w) = io::pipe().map_err(ExecError::Spawn)?;
    let spec = cove_spawn::SpawnSpec {
        program: CString::new("/bin/sh").map_err(nul)?,
        argv: ["/bin/sh", "-c", command]
            .into_iter()
            .map(CString::new)
            .collect::<Result<_, _>>()
            .map_err(nul)?,
        envp: vars
            .iter()
            .map(|(k, v)| CString::new(format!("{k}={v}")))
            .collect::<Result<_, _>>()
            .map_err(nul)?,
        cwd: Some(CString::new(cwd.as_os_str().as_bytes()).map_err(nul)?),
        // As root, the command keeps root's groups.
        ids: (user.uid != 0 || user.gid != 0).then_some((user.uid, user.gid)),
        cgroup_procs: procs_fd.into_iter().collect(),
        netns: None,
        inherit: Vec::new(),
        stdio: [null.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
    };
    let (pid, exited) = reaper.spawn_with(|| cove_spawn::spawn(&spec)).map_err(spawn_error)?;
    Ok(Started { pid, stdout: Some(out_r.into()), stderr: Some(err_r.into()), exited })
}

/// Runs the command `make` builds (given the descriptor that puts it in a cgroup of its own)
/// with no input, collects its output, and kills it and all it started after `timeout_secs`.
pub async fn run_command(
    reaper: &Reaper,
    timeout_secs: u64,
    make: impl FnOnce(Option<i32>) -> Command,
) -> Result<ExecuteResponse, ExecError> {
    let cgroup = ExecCgroup::create();
    let mut cmd = make(cgroup.as_ref().and_then(|c| c.procs_fd()));
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let (mut child, exited) = spawn(reaper, &mut cmd)?;
    let started = Started {
        pid: child.id() as i32,
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
        exited,
    };
    collect_until_exit(started, cgroup, timeout_secs).await
}

/// Collects a started command's output until it exits, or kills it and all it started after
/// `timeout_secs`; then removes its cgroup off the answer's path.
async fn collect_until_exit(
    started: Started,
    cgroup: Option<ExecCgroup>,
    timeout_secs: u64,
) -> Result<ExecuteResponse, ExecError> {
    let Started { pid, stdout, stderr, exited } = started;
    let (out_buf, err_buf) = (Shared::default(), Shared::default());
    let out_task = tokio::spawn(collect(stdout, out_buf.clone()));
    let err_task = tokio::spawn(collect(stderr, err_buf.clone()));

    let limit = Duration::from_secs(timeout_secs);
    let (code, timed_out) = match tokio::time::timeout(limit, exited).await {
        Ok(code) => (code.unwrap_or(-1), false),
        Err(_) => {
            match &cgroup {
                Some(cg) => cg.kill(),
                None => sys::kill_group(pid, libc::SIGKILL),
            }
            // The session leader is dead now; its group and cgroup go with it.
            sys::kill_group(pid, libc::SIGKILL);
            (TIMEOUT_EXIT_CODE, true)
        }
    };
    let stdout = finish(out_task, out_buf).await;
    let mut stderr = finish(err_task, err_buf).await;
    if timed_out {
        if !stderr.is_empty() && !stderr.ends_with('\n') {
            stderr.push('\n');
        }
        stderr.push_str(&format!(
            "cove: command timed out after {timeout_secs}s; it and all its child processes were killed\n"
        ));
    }
    if let Some(cg) = cgroup {
        // Removing a cgroup takes the guest milliseconds: not on the answer's path. A killed
        // command's processes may still be exiting: their cgroup goes once they are gone.
        let wait = if timed_out { Duration::from_secs(2) } else { Duration::ZERO };
        tokio::task::spawn_blocking(move || cg.remove_when_empty(wait));
    }
    Ok(ExecuteResponse { exit_code: code, stdout, stderr })
}

/// The directory a command asked for (relative to the working directory), or the working
/// directory; it must be one.
pub fn resolve_cwd(user: &SandboxUser, cwd: Option<&str>) -> Result<PathBuf, ExecError> {
    let cwd = cwd.map_or_else(|| user.workdir.clone(), |c| user.resolve(c));
    if !cwd.is_dir() {
        return Err(ExecError::BadCwd(cwd.display().to_string()));
    }
    Ok(cwd)
}

/// `/bin/sh -c command`, as [`user_command`] makes it.
pub fn shell_command<'a>(
    user: &SandboxUser,
    env: impl Iterator<Item = (&'a String, &'a String)>,
    cwd: &std::path::Path,
    command: &str,
    procs_fd: Option<i32>,
) -> Command {
    user_command(user, "/bin/sh", &["-c", command], env, cwd, procs_fd, false)
}

/// `program args` as `user` in `cwd` with `env` over the user's basic environment, in the
/// cgroup whose `cgroup.procs` is `procs_fd`, in a session of its own, beside a system manager
/// (a systemd image) in its namespaces if one runs. With `terminal`, its stdin (the caller's
/// terminal slave) becomes its controlling terminal. Its stdio is the caller's to set.
pub fn user_command<'a>(
    user: &SandboxUser,
    program: &str,
    args: &[&str],
    env: impl Iterator<Item = (&'a String, &'a String)>,
    cwd: &std::path::Path,
    procs_fd: Option<i32>,
    terminal: bool,
) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().envs(base_env(user)).envs(env).current_dir(cwd);
    let (uid, gid) = (user.uid, user.gid);
    let namespaces = crate::service::namespace_init().and_then(|pid| sys::Namespaces::of(pid, cwd).ok());
    // SAFETY: child_setup, child_setup_in and take_terminal only make async-signal-safe system
    // calls.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            match &namespaces {
                Some(ns) => sys::child_setup_in(ns, procs_fd, uid, gid)?,
                None => sys::child_setup(procs_fd, uid, gid)?,
            }
            if terminal {
                sys::take_terminal()?;
            }
            Ok(())
        });
    }
    cmd
}

/// Starts `cmd` under the reaper: the child and its exit code to come.
pub fn spawn(
    reaper: &Reaper,
    cmd: &mut Command,
) -> Result<(std::process::Child, tokio::sync::oneshot::Receiver<i32>), ExecError> {
    reaper.spawn(cmd).map_err(spawn_error)
}

fn spawn_error(e: io::Error) -> ExecError {
    if e.kind() == io::ErrorKind::NotFound && !std::path::Path::new("/bin/sh").exists() {
        ExecError::NoShell
    } else {
        ExecError::Spawn(e)
    }
}

pub fn base_env(user: &SandboxUser) -> Vec<(String, String)> {
    let home = user.home.display().to_string();
    vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), home),
        ("USER".into(), user.name.clone()),
        ("LOGNAME".into(), user.name.clone()),
        ("SHELL".into(), "/bin/bash".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ]
}

/// Output of one stream, shared so that what was read is kept even if reading never ends.
#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

type Shared = std::sync::Arc<std::sync::Mutex<Captured>>;

async fn collect(fd: Option<OwnedFd>, into: Shared) {
    read_pipe(fd, |bytes| {
        let mut c = into.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_OUTPUT.saturating_sub(c.bytes.len());
        c.bytes.extend_from_slice(&bytes[..bytes.len().min(room)]);
        c.truncated |= bytes.len() > room;
    })
    .await
}

/// Reads a child's output pipe until it closes, giving `each` what every read returned.
pub async fn read_pipe(fd: Option<OwnedFd>, mut each: impl FnMut(&[u8])) {
    let Some(fd) = fd else { return };
    let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => each(&buf[..n]),
        }
    }
}

/// Waits briefly for the stream's end; a background process may hold the pipe open forever, so
/// after the grace period what was read so far is the output.
async fn finish(task: tokio::task::JoinHandle<()>, captured: Shared) -> String {
    let abort = task.abort_handle();
    if tokio::time::timeout(DRAIN_GRACE, task).await.is_err() {
        abort.abort();
    }
    let c = captured.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = String::from_utf8_lossy(&c.bytes).into_owned();
    if c.truncated {
        s.push_str(&format!("\n[cove: output truncated at {} MiB]\n", MAX_OUTPUT >> 20));
    }
    s
}

/// A cgroup v2 directory holding one command (or terminal session) and its descendants.
pub(crate) struct ExecCgroup {
    dir: String,
    procs: Option<std::fs::File>,
}

/// A cgroup made ahead of the command that will take it: creating one takes the guest several
/// milliseconds, which an exec need not wait for.
static SPARE: std::sync::Mutex<Option<ExecCgroup>> = std::sync::Mutex::new(None);

impl ExecCgroup {
    /// A new cgroup for one command: the spare one if there is one (and another is made for the
    /// next command in the background), else one made now.
    pub fn create() -> Option<Self> {
        let spare = SPARE.lock().unwrap_or_else(|p| p.into_inner()).take();
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::spawn_blocking(|| {
                let Some(made) = Self::make() else { return };
                let mut slot = SPARE.lock().unwrap_or_else(|p| p.into_inner());
                match slot.as_ref() {
                    // Another refill came first.
                    Some(_) => made.remove_if_empty(),
                    None => *slot = Some(made),
                }
            });
        }
        spare.or_else(Self::make)
    }

    fn make() -> Option<Self> {
        let n = NEXT_EXEC.fetch_add(1, Ordering::Relaxed);
        let dir = format!("{CGROUP_ROOT}/exec-{n}");
        std::fs::create_dir_all(&dir).ok()?;
        let procs = std::fs::OpenOptions::new().write(true).open(format!("{dir}/cgroup.procs")).ok();
        Some(ExecCgroup { dir, procs })
    }

    /// The descriptor of its `cgroup.procs`, for the child to join it before exec.
    pub fn procs_fd(&self) -> Option<i32> {
        self.procs.as_ref().map(|f| f.as_raw_fd())
    }

    pub fn kill(&self) {
        let _ = std::fs::write(format!("{}/cgroup.kill", self.dir), "1");
    }

    /// Removes the cgroup once empty; one that still holds background processes stays.
    pub fn remove_if_empty(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }

    /// Removes the cgroup, waiting up to `wait` for its processes to be gone (blocking).
    pub fn remove_when_empty(&self, wait: Duration) {
        let deadline = std::time::Instant::now() + wait;
        while let Err(e) = std::fs::remove_dir(&self.dir) {
            if e.raw_os_error() != Some(libc::EBUSY) || std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
