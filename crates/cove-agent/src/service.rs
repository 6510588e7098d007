//! The image's own command (`Entrypoint` + `Cmd` of a template made from a container image),
//! started at boot as a service: as the image's user, in its working directory, with its
//! environment, in a session and cgroup of its own. It is started before the template snapshot
//! is saved, so every sandbox of the template restores with it running. When it exits it is
//! started again, after a delay that doubles (1 s up to 60 s) while it keeps exiting fast; after
//! five fast exits in a row it is left stopped (a base image's `CMD ["bash"]` exits at once
//! without a terminal and is no service). Its output goes to `/var/log/cove-service.log`.
//!
//! A system manager (`/sbin/init`, systemd) must be PID 1, and the agent is: it runs as PID 1 of
//! PID, mount and cgroup namespaces of its own, as systemd runs in a container (`container=cove`).
//! It shares the filesystem, `/run` included; commands join its mount and PID namespaces (see
//! [`namespace_init`]), so `ps` shows it as PID 1 and `systemctl` reaches it.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::reaper::Reaper;
use crate::sys;
use crate::user::SandboxUser;

pub const LOG: &str = "/var/log/cove-service.log";
const CGROUP: &str = "/sys/fs/cgroup/cove-service";
/// A run this long counts as healthy: the next restart waits the shortest delay again.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
const MAX_DELAY: Duration = Duration::from_secs(60);
/// Fast exits in a row after which the command is not started again.
const GIVE_UP_AFTER: u32 = 5;

/// PID (in the agent's namespace) of the system manager the service runs as, while it runs.
static NAMESPACE_INIT: std::sync::Mutex<Option<i32>> = std::sync::Mutex::new(None);

/// The system manager commands run beside, if the image's command is one and it is running.
pub fn namespace_init() -> Option<i32> {
    let pid = (*NAMESPACE_INIT.lock().unwrap_or_else(|p| p.into_inner()))?;
    std::path::Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn set_namespace_init(pid: Option<i32>) {
    *NAMESPACE_INIT.lock().unwrap_or_else(|p| p.into_inner()) = pid;
}

pub fn start(reaper: Arc<Reaper>, user: SandboxUser, env: BTreeMap<String, String>, argv: Vec<String>) {
    if argv.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut delay = Duration::from_secs(1);
        let mut fast_exits = 0;
        loop {
            let started = Instant::now();
            let outcome = match run(&reaper, &user, &env, &argv) {
                Ok(exited) => format!("exited with status {}", exited.await.unwrap_or(-1)),
                Err(e) => format!("could not start: {e}"),
            };
            set_namespace_init(None);
            if started.elapsed() >= HEALTHY_RUN {
                delay = Duration::from_secs(1);
                fast_exits = 0;
            } else {
                fast_exits += 1;
            }
            if fast_exits >= GIVE_UP_AFTER {
                note(&format!(
                    "{} {outcome}, {fast_exits} times in a row within {}s of starting; not starting it again",
                    argv[0],
                    HEALTHY_RUN.as_secs()
                ));
                return;
            }
            note(&format!("{} {outcome}; starting it again in {}s", argv[0], delay.as_secs()));
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_DELAY);
        }
    });
}

fn run(
    reaper: &Reaper,
    user: &SandboxUser,
    env: &BTreeMap<String, String>,
    argv: &[String],
) -> std::io::Result<tokio::sync::oneshot::Receiver<i32>> {
    let log = open_log()?;
    let _ = std::fs::create_dir_all(CGROUP);
    let procs = std::fs::OpenOptions::new().write(true).open(format!("{CGROUP}/cgroup.procs")).ok();
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    let cwd = if user.workdir.is_dir() { user.workdir.clone() } else { "/".into() };
    let init = is_system_manager(&argv[0]);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(crate::exec::base_env(user))
        .envs(env)
        .envs(init.then_some(("container", "cove")))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let (uid, gid) = (user.uid, user.gid);
    // SAFETY: child_setup and become_namespace_init only make async-signal-safe system calls.
    #[allow(unsafe_code)]
    unsafe {
        if init {
            cmd.pre_exec(move || {
                sys::child_setup(None, uid, gid)?;
                sys::become_namespace_init(procs_fd)
            });
        } else {
            cmd.pre_exec(move || sys::child_setup(procs_fd, uid, gid));
        }
    }
    let (child, exited) = reaper.spawn(&mut cmd)?;
    if init {
        // The child is the stand-in; the manager is its one child, forked before the exec
        // that let the spawn return.
        let stand_in = child.id();
        let children = std::fs::read_to_string(format!("/proc/{stand_in}/task/{stand_in}/children"));
        set_namespace_init(children.ok().and_then(|c| c.split_whitespace().next()?.parse().ok()));
    }
    Ok(exited)
}

/// Whether `program` is a system manager, which must run as PID 1: systemd, or any `init`.
fn is_system_manager(program: &str) -> bool {
    let real = std::fs::canonicalize(program).unwrap_or_else(|_| program.into());
    [std::path::Path::new(program), &real]
        .iter()
        .any(|p| matches!(p.file_name().and_then(|n| n.to_str()), Some("init" | "systemd")))
}

fn open_log() -> std::io::Result<std::fs::File> {
    if let Some(dir) = std::path::Path::new(LOG).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).open(LOG)
}

/// A line of the supervisor's own in the service's log.
fn note(line: &str) {
    use std::io::Write;
    if let Ok(mut f) = open_log() {
        let _ = writeln!(f, "[cove] {line}");
    }
}
