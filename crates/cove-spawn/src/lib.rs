//! Starting a process the way `posix_spawn` does, with the set-up Cove's processes need
//! (cgroup, session, network namespace, inherited descriptors, user), without copying the
//! caller.
//!
//! `fork` of a large multi-threaded process (the runner, with its runtime and mappings; the
//! guest agent under emulation) copies its page tables and then takes copy-on-write faults
//! until the child execs: measured at 13–27 ms per QEMU started by the runner. `std`'s
//! `Command` forks whenever a `pre_exec` hook is set. Here `clone(CLONE_VM | CLONE_VFORK)`
//! runs the child in the caller's memory on a stack of its own, while the calling thread
//! waits until the child has exec'ed; the child makes system calls only.
//!
//! The only unsafe code of the crate is here, each block with its reason.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

/// A command for [`spawn`], every string made before the spawn (the child may not allocate).
pub struct SpawnSpec {
    /// The program's path (no `PATH` search).
    pub program: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// Directory to run in; the caller's when `None`.
    pub cwd: Option<CString>,
    /// `(uid, gid)` to run as, with no supplementary group but `gid`; the caller's when `None`.
    pub ids: Option<(u32, u32)>,
    /// Open `cgroup.procs` files of the cgroups the command runs in from its first instruction.
    pub cgroup_procs: Vec<RawFd>,
    /// An open network namespace (`/run/netns/…`) the command runs in.
    pub netns: Option<RawFd>,
    /// Descriptors the command keeps, at the same numbers (their close-on-exec flag cleared).
    pub inherit: Vec<RawFd>,
    /// The command's stdin, stdout and stderr.
    pub stdio: [RawFd; 3],
}

/// What the child reads, and where it leaves the errno of a step that failed.
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    ids: Option<(u32, u32)>,
    cgroup_procs: *const RawFd,
    cgroup_procs_len: usize,
    netns: RawFd,
    inherit: *const RawFd,
    inherit_len: usize,
    stdio: [RawFd; 3],
    mask: libc::sigset_t,
    last_signal: libc::c_int,
    errno: std::sync::atomic::AtomicI32,
}

/// Size of the child's stack: it makes a few dozen system calls and nothing else.
const SPAWN_STACK: usize = 64 << 10;

/// Starts the command: the child joins its cgroups, starts a session, enters the network
/// namespace, keeps the descriptors it inherits, drops to its ids, enters its directory,
/// takes its stdio and execs. A step that fails leaves its errno for the parent, which returns
/// it. Signals are blocked around the clone and the child puts every caught signal back to
/// its default before unblocking, so no handler of the caller ever runs in it. Returns the
/// child's pid; the caller reaps it.
pub fn spawn(spec: &SpawnSpec) -> io::Result<i32> {
    let argv: Vec<*const libc::c_char> =
        spec.argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let envp: Vec<*const libc::c_char> =
        spec.envp.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let mut stack = vec![0u8; SPAWN_STACK];
    // SAFETY: sigset_t is plain data, filled by sigfillset/pthread_sigmask before any use.
    let (mut all, mut old): (libc::sigset_t, libc::sigset_t) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: valid out-pointers.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let args = ChildArgs {
        program: spec.program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: spec.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        ids: spec.ids,
        cgroup_procs: spec.cgroup_procs.as_ptr(),
        cgroup_procs_len: spec.cgroup_procs.len(),
        netns: spec.netns.unwrap_or(-1),
        inherit: spec.inherit.as_ptr(),
        inherit_len: spec.inherit.len(),
        stdio: spec.stdio,
        mask: old,
        last_signal: libc::SIGRTMAX(),
        errno: std::sync::atomic::AtomicI32::new(0),
    };
    // The stack grows down from its (16-byte aligned) top.
    let top = (stack.as_mut_ptr() as usize + SPAWN_STACK) & !15;
    // SAFETY: `child` only makes async-signal-safe system calls on its own stack and writes
    // nothing but `args.errno`; `args`, the strings and the stack outlive it, since
    // CLONE_VFORK returns only once the child has exec'ed or exited.
    let pid = unsafe {
        libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &args as *const ChildArgs as *mut libc::c_void,
        )
    };
    let clone_err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    drop(stack);
    if pid < 0 {
        return Err(clone_err);
    }
    match args.errno.load(std::sync::atomic::Ordering::SeqCst) {
        0 => Ok(pid),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// The child of [`spawn`]. Only system calls; `_exit` on any failure.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's ChildArgs, alive until this child execs or exits.
    let a = unsafe { &*(arg as *const ChildArgs) };
    let fail = || -> libc::c_int {
        let e = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL);
        a.errno.store(if e == 0 { libc::EINVAL } else { e }, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: ends this child only.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: async-signal-safe system calls only, with pointers and lengths the parent
    // prepared from slices that outlive this child.
    unsafe {
        // No handler of the caller's may run here: default dispositions for caught signals
        // (the child has its own table: no CLONE_SIGHAND), then the caller's mask back.
        for sig in 1..=a.last_signal {
            let mut act: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut act) == 0
                && act.sa_sigaction != libc::SIG_DFL
                && act.sa_sigaction != libc::SIG_IGN
            {
                act.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &act, std::ptr::null_mut());
            }
        }
        if libc::sigprocmask(libc::SIG_SETMASK, &a.mask, std::ptr::null_mut()) != 0 {
            return fail();
        }
        for &fd in std::slice::from_raw_parts(a.cgroup_procs, a.cgroup_procs_len) {
            if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                return fail();
            }
        }
        if libc::setsid() < 0 {
            return fail();
        }
        if a.netns >= 0 && libc::setns(a.netns, libc::CLONE_NEWNET) != 0 {
            return fail();
        }
        for &fd in std::slice::from_raw_parts(a.inherit, a.inherit_len) {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return fail();
            }
        }
        // Raw system calls: glibc's set*id wrappers would ask every thread of the caller
        // (whose memory this child shares, thread list included) to change its ids too.
        if let Some((uid, gid)) = a.ids {
            let groups = [gid];
            if libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setgid, gid) != 0
                || libc::syscall(libc::SYS_setuid, uid) != 0
            {
                return fail();
            }
        }
        if !a.cwd.is_null() && libc::chdir(a.cwd) != 0 {
            return fail();
        }
        for (to, &from) in a.stdio.iter().enumerate() {
            if libc::dup2(from, to as libc::c_int) < 0 {
                return fail();
            }
        }
        libc::execve(a.program, a.argv, a.envp);
        fail()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsRawFd;

    use super::*;

    fn spec(program: &str, argv: &[&str], stdout: RawFd, ids: Option<(u32, u32)>) -> SpawnSpec {
        SpawnSpec {
            program: CString::new(program).unwrap(),
            argv: argv.iter().map(|a| CString::new(*a).unwrap()).collect(),
            envp: vec![CString::new("COVE_X=spawned").unwrap()],
            cwd: Some(CString::new("/").unwrap()),
            ids,
            cgroup_procs: Vec::new(),
            netns: None,
            inherit: Vec::new(),
            stdio: [0, stdout, stdout],
        }
    }

    /// Runs `/bin/sh -c script` as `edit` sets it up; returns its output once it exited 0.
    fn sh(script: &str, edit: impl FnOnce(&mut SpawnSpec)) -> String {
        let (mut out_r, out_w) = io::pipe().unwrap();
        let mut s = spec("/bin/sh", &["sh", "-c", script], out_w.as_raw_fd(), None);
        edit(&mut s);
        let pid = spawn(&s).unwrap();
        drop(out_w);
        let mut out = String::new();
        out_r.read_to_string(&mut out).unwrap();
        let mut status = 0;
        // SAFETY: waits for our own child; status is a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(status, 0, "{out}");
        out
    }

    fn own_uid() -> String {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
        line.split_whitespace().next().unwrap().to_string()
    }

    /// The child runs with the environment, directory, session and stdio it was given, and
    /// (when the test runs as root) the ids it was given.
    #[test]
    fn a_child_gets_what_it_was_given() {
        let root = own_uid() == "0";
        let script =
            r#"echo $COVE_X; pwd; id -u; set -- $(cat /proc/$$/stat); [ "$6" = "$$" ] && echo leader"#;
        let out = sh(script, |s| s.ids = root.then_some((65534, 65534)));
        let want_uid = if root { "65534".to_string() } else { own_uid() };
        assert_eq!(out, format!("spawned\n/\n{want_uid}\nleader\n"));
    }

    /// A descriptor named in `inherit` is open in the command at its number; others opened
    /// close-on-exec (as Rust opens them all) are not.
    #[test]
    fn only_inherited_descriptors_stay_open() {
        let kept = std::fs::File::open("/dev/null").unwrap();
        let closed = std::fs::File::open("/dev/zero").unwrap();
        let (k, c) = (kept.as_raw_fd(), closed.as_raw_fd());
        let script =
            format!("[ -e /proc/self/fd/{k} ] && echo kept; [ -e /proc/self/fd/{c} ] || echo closed");
        assert_eq!(sh(&script, |s| s.inherit = vec![k]), "kept\nclosed\n");
    }

    /// An exec that fails is an error of the spawn, with its errno; the child is gone.
    #[test]
    fn a_failed_exec_is_the_spawns_error() {
        let e = spawn(&spec("/nonexistent/program", &["x"], 1, None)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
