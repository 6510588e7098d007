//! SIGKILL to this process, for crash tests.

/// Sends SIGKILL to this process: it dies on the spot, as under `kill -9`.
pub fn kill_self() {
    // SAFETY: getpid and kill take and return integers only.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
