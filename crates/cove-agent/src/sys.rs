//! The few system calls std does not wrap. Every unsafe block is here, each with its reason.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let (src, target, fstype) = (cstr(src)?, cstr(target)?, cstr(fstype)?);
    let data = data.map(cstr).transpose()?;
    let data_ptr = data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: every pointer is a valid NUL-terminated string (or null for data) that outlives
    // the call; mount(2) does not keep them.
    check(unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data_ptr) })
}

/// Detaches the mount at `target` now; it goes once nothing uses it any more.
pub fn umount_lazy(target: &str) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: valid NUL-terminated path, not retained.
    check(unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) })
}

pub fn chroot(path: &str) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: valid NUL-terminated path, not retained.
    check(unsafe { libc::chroot(p.as_ptr()) })
}

/// Loads a kernel module from an open file.
pub fn finit_module(fd: BorrowedFd<'_>) -> io::Result<()> {
    let params = cstr("")?;
    // SAFETY: fd is an open file descriptor borrowed for the call; params is a valid empty
    // string; finit_module(2) takes no other memory.
    let ret = unsafe { libc::syscall(libc::SYS_finit_module, fd.as_raw_fd(), params.as_ptr(), 0) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        // Already loaded (or built in) is fine.
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe the bytes of `name`, which outlives the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

pub fn set_realtime(unix_ns: u128) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec on the stack for the duration of the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
}

/// Credits `entropy` to the kernel's pool and forces the CRNG to reseed, so clones restored from
/// one snapshot stop sharing random streams.
pub fn add_entropy(entropy: &[u8]) -> io::Result<()> {
    use std::fs::OpenOptions;
    let f = OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut buf: Vec<u8> = Vec::with_capacity(8 + entropy.len());
    buf.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    buf.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    buf.extend_from_slice(entropy);
    buf.resize(buf.len().div_ceil(4) * 4, 0);
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: buf holds a complete rand_pool_info (header + buf_size bytes) and lives across the
    // call; the fd is open for writing.
    check(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, buf.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG, 0) })
}

/// Reaps one exited child, if any: Some((pid, raw wait status)).
pub fn wait_any_nohang() -> Option<(i32, i32)> {
    let mut status: libc::c_int = 0;
    // SAFETY: status is a valid out-pointer for the call.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    (pid > 0).then_some((pid, status))
}

pub fn kill_group(pgid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals the process group; no memory involved.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Runs in the forked child before exec: joins the exec's cgroup, starts a new session and drops
/// to the sandbox user. Only async-signal-safe calls (write, setsid, setgroups, setgid, setuid).
pub fn child_setup(cgroup_procs: Option<i32>, uid: u32, gid: u32) -> io::Result<()> {
    if let Some(fd) = cgroup_procs {
        // SAFETY: writes 1 byte from a static buffer to an fd the parent opened for this child.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: setsid has no arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    if uid != 0 || gid != 0 {
        let groups = [gid];
        // SAFETY: pointer/length describe `groups` on the stack.
        check(unsafe { libc::setgroups(1, groups.as_ptr()) })?;
        // SAFETY: plain integer arguments.
        check(unsafe { libc::setgid(gid) })?;
        // SAFETY: plain integer arguments.
        check(unsafe { libc::setuid(uid) })?;
    }
    Ok(())
}

/// Switches the read side of a file descriptor to non-blocking mode.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })
}

pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of buf.len() bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Registers an owned descriptor with tokio's reactor.
pub fn async_fd(fd: std::os::fd::OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor stays open (and is
    // not reused) for as long as it is registered, and nothing else holds it.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}
