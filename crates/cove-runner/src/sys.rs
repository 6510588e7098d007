//! lseek(2) with SEEK_DATA / SEEK_HOLE, which std does not expose; and SIGKILL to self for
//! crash tests.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

fn lseek(f: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an open descriptor with integer arguments; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after `offset`.
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    Ok(Some(r as u64))
}

/// Start of the next data extent at or after `offset`.
pub fn seek_data(f: &File, offset: u64) -> io::Result<Option<u64>> {
    lseek(f, offset, libc::SEEK_DATA)
}

/// Start of the next hole at or after `offset` (the end of the file counts as one).
pub fn seek_hole(f: &File, offset: u64) -> io::Result<u64> {
    Ok(lseek(f, offset, libc::SEEK_HOLE)?.unwrap_or(offset))
}

/// Sends SIGKILL to this process: it dies on the spot, as under `kill -9`.
pub fn kill_self() {
    // SAFETY: getpid and kill take and return integers only.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
