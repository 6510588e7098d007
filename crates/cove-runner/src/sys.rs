//! The system calls the runner makes itself: SIGKILL to this process (crash tests), sealed memfds, detaching mounts, thread priority.

/// Sends SIGKILL to this process: it dies on the spot, as under `kill -9`.
pub fn kill_self() {
    // SAFETY: getpid and kill take and return integers only.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

/// A sealed copy of `from`'s data in a new memfd named `name`: nothing can write it, grow it or
/// shrink it any more (`F_SEAL_WRITE`, `F_SEAL_GROW`, `F_SEAL_SHRINK`, `F_SEAL_SEAL`), while
/// private (copy-on-write) mappings of it stay writable. Holes stay holes.
pub fn sealed_copy(from: &std::path::Path, name: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    let file = std::fs::File::from(sealable_memfd(name)?);
    let src = std::fs::File::open(from)?;
    file.set_len(src.metadata()?.len())?;
    crate::memfile::copy_data_between(&src, &file)?;
    let fd = file.into();
    seal(&fd)?;
    Ok(fd)
}

/// A new, empty memfd named `name` that can be sealed later (see [`seal`]).
pub fn sealable_memfd(name: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create takes a C string and flags; the fd it returns is ours alone.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just made and is owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Seals a memfd for good: no write, grow or shrink, and no seal taken off. Fails while a
/// writable shared mapping of it exists.
///
/// The write seal also waits (~150 ms) for every page of the file to lose the references the
/// kernel holds for a moment (a page being migrated, say), and fails with `EBUSY` if one
/// keeps one: that failure is tried again, a few times.
pub fn seal(fd: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    let mut tries = 0;
    loop {
        // SAFETY: fcntl on our fd with integer arguments.
        if unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(fd), libc::F_ADD_SEALS, seals) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        tries += 1;
        if e.raw_os_error() != Some(libc::EBUSY) || tries == SEAL_TRIES {
            return Err(e);
        }
        tracing::warn!(tries, "sealing a memfd: pages still referenced, trying again");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// How many times [`seal`] tries.
const SEAL_TRIES: u32 = 4;

/// Detaches the mount at `path` (`umount2(MNT_DETACH)`): it is gone from the tree at once and
/// lives on for what still holds it open. Not mounted there is not an error.
pub fn detach(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: umount2 takes a C string that outlives the call, and flags.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    match std::io::Error::last_os_error() {
        e if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(()),
        e => Err(e),
    }
}

/// Lowers the calling thread's CPU priority (nice 10): background work that must not slow the
/// guest down.
pub fn lower_priority() {
    // SAFETY: setpriority takes integers only (who = 0: the calling thread, on Linux).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_sealed_copy_has_the_data_and_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("ram");
        let f = std::fs::File::create(&from).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(b"template", 1 << 20).unwrap();
        let fd = super::sealed_copy(&from, "cove-tmpl-test").unwrap();
        let mut copy = std::fs::File::from(fd);
        let mut buf = [0u8; 8];
        copy.read_exact_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(&buf, b"template");
        assert_eq!(copy.metadata().unwrap().len(), 4 << 20);
        assert!(copy.write_all(b"x").is_err(), "sealed against writes");
        assert!(copy.set_len(1 << 20).is_err(), "sealed against shrinking");
        // Opened again read-write by path (as QEMU does), it still cannot be written.
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&copy));
        let again = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        assert!(again.write_all_at(b"x", 0).is_err());
    }
}
