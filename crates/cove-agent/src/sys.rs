//! The few system calls std does not wrap. Every unsafe block is here, each with its reason.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

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

/// The kernel's hostname, if it reads.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim_end().to_string())
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

/// `/dev/urandom`, opened once and kept (see `channel::greet_on_port`, which opens it before a
/// template's snapshot is taken): a restored guest then does not walk the path and run the
/// open's security hooks (~400 blocks of its kernel to translate under emulation) before it
/// answers its host.
pub fn entropy_pool() -> io::Result<&'static std::fs::File> {
    static URANDOM: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    if let Some(f) = URANDOM.get() {
        return Ok(f);
    }
    let opened = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    Ok(URANDOM.get_or_init(|| opened))
}

/// Credits `entropy` to the kernel's pool and forces the CRNG to reseed, so clones restored from
/// one snapshot stop sharing random streams.
pub fn add_entropy(entropy: &[u8]) -> io::Result<()> {
    let f = entropy_pool()?;
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

/// Grows the ext4 filesystem mounted at `mount_point`, online, to `bytes` (rounded down to its
/// block size); a no-op when it is that size already.
pub fn resize_ext4(mount_point: &str, bytes: u64) -> io::Result<()> {
    let dir = std::fs::File::open(mount_point)?;
    // SAFETY: statvfs is plain data, filled by the kernel.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open and st is a valid statvfs to write.
    check(unsafe { libc::fstatvfs(dir.as_raw_fd(), &mut st) })?;
    if st.f_bsize == 0 {
        return Err(io::Error::other("the root filesystem reports no block size"));
    }
    let blocks: u64 = bytes / st.f_bsize;
    // EXT4_IOC_RESIZE_FS = _IOW('f', 16, __u64)
    const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
    // SAFETY: the ioctl reads one u64, which lives across the call.
    check(unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks as *const u64) })
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
    join_cgroup(cgroup_procs)?;
    // SAFETY: setsid has no arguments.
    check(unsafe { libc::setsid() })?;
    drop_privileges(uid, gid)
}

/// The namespaces of a system manager running as PID 1 of its own (see
/// [`become_namespace_init`]), open in the agent, with the directory to work in once inside.
pub struct Namespaces {
    pub mnt: std::fs::File,
    pub pid: std::fs::File,
    pub cwd: CString,
}

impl Namespaces {
    pub fn of(pid: i32, cwd: &std::path::Path) -> io::Result<Namespaces> {
        use std::os::unix::ffi::OsStrExt;
        Ok(Namespaces {
            mnt: std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?,
            pid: std::fs::File::open(format!("/proc/{pid}/ns/pid"))?,
            cwd: CString::new(cwd.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?,
        })
    }
}

/// [`child_setup`] for a command that runs beside a system manager: it joins the manager's
/// mount and PID namespaces (so it sees the manager as PID 1, and the manager accepts it as a
/// local client) before dropping privileges. Joining a PID namespace takes a fork: the first
/// child stays behind as a stand-in ([`fork_stand_in`]). Only async-signal-safe calls.
pub fn child_setup_in(ns: &Namespaces, cgroup_procs: Option<i32>, uid: u32, gid: u32) -> io::Result<()> {
    join_cgroup(cgroup_procs)?;
    // SAFETY: setsid has no arguments.
    check(unsafe { libc::setsid() })?;
    // SAFETY: the fds are open namespace files; setns changes only this (single-threaded) child.
    check(unsafe { libc::setns(ns.mnt.as_raw_fd(), libc::CLONE_NEWNS) })?;
    // SAFETY: as above.
    check(unsafe { libc::setns(ns.pid.as_raw_fd(), libc::CLONE_NEWPID) })?;
    // Entering a mount namespace moves to its root: back to the command's directory.
    // SAFETY: cwd is a C string made before the fork.
    check(unsafe { libc::chdir(ns.cwd.as_ptr()) })?;
    fork_stand_in()?;
    drop_privileges(uid, gid)
}

fn join_cgroup(cgroup_procs: Option<i32>) -> io::Result<()> {
    if let Some(fd) = cgroup_procs {
        // SAFETY: writes 1 byte from a static buffer to an fd the parent opened for this child.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
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

/// Forks and returns in the new process only. The old one stays behind as a stand-in for it,
/// the process the agent watches: it holds no descriptor of the agent's but stdio (so std's
/// exec-error pipe closes once the new process has exec'ed), waits for it, and exits with its
/// status. Only async-signal-safe calls.
fn fork_stand_in() -> io::Result<()> {
    // SAFETY: fork in a child that only makes system calls afterwards.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        return Ok(());
    }
    // SAFETY: close_range takes plain integers.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: _exit ends this process at once.
            unsafe { libc::_exit(127) };
        }
    }
    // SAFETY: _exit ends this process at once.
    unsafe { libc::_exit(crate::reaper::exit_code(status)) }
}

/// Runs in the forked child before exec, for a system manager (systemd) that must be PID 1. The
/// child unshares a PID namespace and forks ([`fork_stand_in`]); the new process, PID 1 of its
/// namespace, joins the service's cgroup (`cgroup_procs`), takes mount and cgroup namespaces of
/// its own, mounts its own `/proc` and cgroup2, sees `/sys` read-only (as in a container), and
/// goes on to exec. Mounts the agent makes later (a bucket) still reach it. Only
/// async-signal-safe calls, and no allocation.
pub fn become_namespace_init(cgroup_procs: Option<i32>) -> io::Result<()> {
    // SAFETY: plain flag argument.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) })?;
    fork_stand_in()?;
    join_cgroup(cgroup_procs)?;
    // SAFETY: plain flag argument.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP) })?;
    let none = std::ptr::null::<libc::c_char>();
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: every string is a static C string (or null where mount(2) allows it).
    unsafe {
        check(libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_SLAVE, std::ptr::null()))?;
        check(libc::mount(c"proc".as_ptr(), c"/proc".as_ptr(), c"proc".as_ptr(), nosuid, std::ptr::null()))?;
        let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | nosuid;
        check(libc::mount(none, c"/sys".as_ptr(), none, ro, std::ptr::null()))?;
        // The agent's cgroup2 mount shows the whole tree, and the same filesystem cannot be
        // mounted again on its own root: replaced, here only, by one rooted at the namespace's.
        check(libc::umount2(c"/sys/fs/cgroup".as_ptr(), libc::MNT_DETACH))?;
        check(libc::mount(
            c"cgroup2".as_ptr(),
            c"/sys/fs/cgroup".as_ptr(),
            c"cgroup2".as_ptr(),
            nosuid,
            std::ptr::null(),
        ))?;
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

/// `struct rtentry` of linux/route.h (x86_64), which the libc crate defines for musl only.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_tos: libc::c_uchar,
    rt_class: libc::c_uchar,
    rt_pad4: [libc::c_short; 3],
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr_v4(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr is plain
    // bytes; this is how the socket API is meant to be used.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// An IPv4 datagram socket, the handle network ioctls go through.
fn inet_socket() -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

/// Brings a network interface up (`ip link set NAME up`), with no tool from the image.
pub fn link_up(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: req is a valid ifreq naming the interface; the ioctls read and write only it.
    unsafe {
        check(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut libc::ifreq))?;
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        check(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req as *const libc::ifreq))
    }
}

/// Gives an interface its IPv4 address and netmask.
pub fn set_ipv4(name: &str, addr: std::net::Ipv4Addr, netmask: std::net::Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    // SAFETY: req is a valid ifreq with an AF_INET address; the kernel only reads it.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req as *const libc::ifreq) })?;
    req.ifr_ifru.ifru_netmask = sockaddr_v4(netmask);
    // SAFETY: as above, with the netmask.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &req as *const libc::ifreq) })
}

/// Adds the default IPv4 route via `gateway`; one that exists already is fine.
pub fn add_default_route(gateway: std::net::Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    let any = std::net::Ipv4Addr::UNSPECIFIED;
    // SAFETY: RtEntry is plain old data; all-zero is a valid value.
    let mut rt: RtEntry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_v4(any);
    rt.rt_genmask = sockaddr_v4(any);
    rt.rt_gateway = sockaddr_v4(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: rt is a valid rtentry with no device pointer; the kernel only reads it.
    match check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &rt as *const RtEntry) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// A new pseudo-terminal of `cols` × `rows`: (master, slave), both close-on-exec; the slave
/// belongs to `uid`, who runs on it.
pub fn open_pty(cols: u16, rows: u16, uid: u32) -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: posix_openpt takes flags and returns a new descriptor or -1.
    let raw = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    check(raw)?;
    // SAFETY: raw is a descriptor just opened and owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: grantpt and unlockpt take the master's descriptor.
    check(unsafe { libc::grantpt(master.as_raw_fd()) })?;
    // SAFETY: as above.
    check(unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: name is a writable buffer of the length given.
    let r = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path into name.
    let raw = unsafe { libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    check(raw)?;
    // SAFETY: raw is a descriptor just opened and owned by nobody else.
    let slave = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: fchown on a valid descriptor; -1 keeps the group (tty).
    check(unsafe { libc::fchown(slave.as_raw_fd(), uid, u32::MAX) })?;
    set_winsize(master.as_fd(), cols, rows)?;
    Ok((master, slave))
}

/// Sets a terminal's size; its foreground processes get SIGWINCH.
pub fn set_winsize(fd: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer given.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) })
}

/// Runs in the forked child before exec, once its standard streams are a terminal's slave:
/// makes that terminal its controlling one, in a session of its own. Only async-signal-safe
/// calls.
pub fn take_terminal() -> io::Result<()> {
    // SAFETY: no arguments; it fails harmlessly for a process that leads its session already.
    unsafe { libc::setsid() };
    // SAFETY: TIOCSCTTY on stdin with a plain integer argument.
    check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) })
}
