//! Process signalling and reaping; every unsafe block says why it is sound. (QEMU itself is
//! started by `cove-spawn`.)

use std::io;

pub fn kill(pid: u32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits for child `pid` to exit (reaps it). Returns once it has.
pub fn wait(pid: u32) {
    let mut status = 0;
    // SAFETY: waitpid on our own child, with a valid out-pointer.
    while unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
}
