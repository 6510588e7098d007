//! Process signalling and the child's set-up before exec; every unsafe block says why it is
//! sound.

use std::io;

pub fn kill(pid: u32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Run in the forked child before exec: starts a new session and writes "0" into each open
/// cgroup.procs fd, moving the child into the VM's cgroup. Both calls are async-signal-safe.
/// With `netns`, the child then enters that network namespace (setns(2), also
/// async-signal-safe), so QEMU opens the sandbox's TAP and has no other network.
pub fn detach_into_cgroups(fds: &[i32], netns: Option<i32>) -> io::Result<()> {
    // SAFETY: setsid takes no arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some(ns) = netns {
        // SAFETY: setns takes an fd the parent opened on a namespace file and a flag.
        if unsafe { libc::setns(ns, libc::CLONE_NEWNET) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    for &fd in fds {
        // SAFETY: writes one byte from a static buffer to an fd opened by the parent.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Lets a child inherit `fd` across exec (clears its close-on-exec flag). Async-signal-safe.
pub fn inherit(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on an fd number with integer arguments.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
