//! PID 1 duties: from the initramfs into the root disk, then the mounts a Linux userland expects.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::sys;

/// Written by the image builder into the initramfs: one module file name per line, in load order.
const MODULE_LIST: &str = "/modules/load-order";
const ROOT_DEVICE: &str = "/dev/vda";
const NEW_ROOT: &str = "/newroot";

pub fn early_boot() -> io::Result<()> {
    if Path::new(MODULE_LIST).exists() {
        switch_to_root_disk()?;
    }
    mount_userland()?;
    quiet_housekeeping();
    // Commands find their tools; the agent's own children inherit nothing else from the kernel.
    std::env::set_var("PATH", crate::exec::DEFAULT_PATH);
    if let Err(e) = sys::link_up("lo") {
        eprintln!("cove-agent: loopback: {e}");
    }
    if let Err(e) = configure_network() {
        eprintln!("cove-agent: network: {e}");
    }
    Ok(())
}

/// Turns down kernel housekeeping that wakes an idle guest for nothing a sandbox needs: under
/// TCG every wakeup costs the host CPU. Proactive compaction (kcompactd every 500 ms, to make
/// huge pages) is off, and the per-CPU memory statistics are folded every 10 s instead of
/// every second. These two alone took an idle default sandbox from 0.48% of a host core to
/// 0.25% (see docs/performance.md, "Idle sandboxes of every template").
fn quiet_housekeeping() {
    for (knob, value) in
        [("/proc/sys/vm/compaction_proactiveness", "0"), ("/proc/sys/vm/stat_interval", "10")]
    {
        if let Err(e) = std::fs::write(knob, value) {
            eprintln!("cove-agent: {knob}: {e}");
        }
    }
}

/// The guest's one NIC, with the address, route and resolver every sandbox has (the host
/// decides what they reach). No IPv6. Set with ioctls: an image need not have `ip`.
fn configure_network() -> io::Result<()> {
    use cove_proto::net::{GATEWAY, GUEST_CIDR};
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
    wait_for("/sys/class/net/eth0", Duration::from_secs(5))?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("bad {what}"));
    let (addr, prefix) = GUEST_CIDR.split_once('/').ok_or_else(|| bad("guest CIDR"))?;
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| bad("guest address"))?;
    let prefix: u32 = prefix.parse().map_err(|_| bad("guest prefix"))?;
    let netmask = std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix).unwrap_or(0));
    let gateway: std::net::Ipv4Addr = GATEWAY.parse().map_err(|_| bad("gateway"))?;
    sys::link_up("eth0")?;
    sys::set_ipv4("eth0", addr, netmask)?;
    sys::add_default_route(gateway)?;
    std::fs::write("/etc/resolv.conf", format!("nameserver {GATEWAY}\noptions timeout:2 attempts:2\n"))
}

/// Puts the sandbox's egress CA into the system trust store: its own file, and the bundle
/// rebuilt from the one the image shipped plus this CA (a CA sent earlier is dropped).
pub fn install_trust(pem: &str) -> io::Result<()> {
    use cove_proto::net::{CA_BUNDLE, CA_FILE};
    for file in [CA_FILE, CA_BUNDLE] {
        if let Some(dir) = Path::new(file).parent() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let original = format!("{CA_BUNDLE}.cove-orig");
    if !Path::new(&original).exists() {
        // An image without a system bundle gets one holding only this CA.
        match std::fs::copy(CA_BUNDLE, &original) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::write(&original, b"")?,
            Err(e) => return Err(e),
        }
    }
    let mut bundle = std::fs::read(&original)?;
    if !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(pem.as_bytes());
    let tmp = format!("{CA_BUNDLE}.cove-tmp");
    std::fs::write(&tmp, bundle)?;
    std::fs::rename(tmp, CA_BUNDLE)?;
    // Last: the file says the bundle has the CA (see `trusted`).
    std::fs::write(CA_FILE, pem)
}

fn switch_to_root_disk() -> io::Result<()> {
    let _ = std::fs::create_dir_all("/dev");
    mount_fs("devtmpfs", "/dev", "devtmpfs", 0, None)?;
    load_modules()?;
    wait_for(ROOT_DEVICE, Duration::from_secs(10))?;
    std::fs::create_dir_all(NEW_ROOT)?;
    sys::mount(ROOT_DEVICE, NEW_ROOT, "ext4", libc::MS_NOATIME, None)
        .map_err(|e| io::Error::new(e.kind(), format!("mounting {ROOT_DEVICE}: {e}")))?;
    std::fs::create_dir_all(format!("{NEW_ROOT}/dev"))?;
    sys::mount("/dev", &format!("{NEW_ROOT}/dev"), "", libc::MS_MOVE, None)?;
    std::env::set_current_dir(NEW_ROOT)?;
    sys::mount(".", "/", "", libc::MS_MOVE, None)?;
    sys::chroot(".")?;
    std::env::set_current_dir("/")?;
    Ok(())
}

fn load_modules() -> io::Result<()> {
    let list = std::fs::read_to_string(MODULE_LIST)?;
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("/modules/{name}");
        let file = std::fs::File::open(&path)?;
        use std::os::fd::AsFd;
        sys::finit_module(file.as_fd())
            .map_err(|e| io::Error::new(e.kind(), format!("loading {name}: {e}")))?;
    }
    Ok(())
}

fn wait_for(path: &str, limit: Duration) -> io::Result<()> {
    let start = Instant::now();
    while !Path::new(path).exists() {
        if start.elapsed() > limit {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{path} did not appear")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn mount_userland() -> io::Result<()> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, None)?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    )?;
    mount_fs("tmpfs", "/dev/shm", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, Some("mode=1777"))?;
    mount_fs("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, Some("mode=755"))?;
    // Every command joins a cgroup of its own: `favordynmods` makes that move cheap (measured:
    // ~10 ms less per exec under TCG) for slightly dearer forks and exits.
    if mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, Some("favordynmods")).is_err() {
        mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, None)?;
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        if !Path::new(link).exists() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    Ok(())
}

/// Mounts unless something is mounted there already (devtmpfs moved in from the initramfs).
fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    match sys::mount(src, target, fstype, flags, data) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), format!("mounting {target}: {e}"))),
    }
}

/// Applies a new identity after boot or restore: hostname, clock, trusted CA, entropy.
///
/// What the guest has already (the same sandbox resumed from its image: hostname, CA and disk
/// unchanged) is not written again: on a guest just restored under emulation, every kernel path
/// a write takes is code to translate first, and the files and the journal flush of a resize
/// made up most of a resume's identity step.
pub fn apply_identity(id: &cove_proto::Identity) -> io::Result<()> {
    if !id.hostname.is_empty() && sys::hostname().as_deref() != Some(id.hostname.as_str()) {
        sys::sethostname(&id.hostname)?;
        let hosts = format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{0}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            id.hostname
        );
        std::fs::write("/etc/hosts", hosts)?;
        std::fs::write("/etc/hostname", format!("{}\n", id.hostname))?;
    }
    let entropy: Vec<u8> = (0..id.entropy_hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(id.entropy_hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    apply_clock(id.unix_time_ns, &entropy)?;
    if let Some(pem) = &id.trust_pem {
        if !trusted(pem) {
            install_trust(pem)?;
        }
    }
    if let Some(bytes) = id.disk_bytes {
        grow_root(bytes)?;
    }
    Ok(())
}

/// Whether the trust store holds `pem` as [`install_trust`] leaves it: its file is `pem` (written
/// last) and the bundle ends with it.
fn trusted(pem: &str) -> bool {
    use cove_proto::net::{CA_BUNDLE, CA_FILE};
    std::fs::read(CA_FILE).is_ok_and(|f| f == pem.as_bytes())
        && std::fs::read(CA_BUNDLE).is_ok_and(|b| b.ends_with(pem.as_bytes()))
}

/// Sets the wall clock (unless `unix_time_ns` is 0) and mixes `entropy` into the pool.
pub fn apply_clock(unix_time_ns: u128, entropy: &[u8]) -> io::Result<()> {
    if unix_time_ns > 0 {
        sys::set_realtime(unix_time_ns)?;
    }
    if !entropy.is_empty() {
        sys::add_entropy(entropy)?;
    }
    Ok(())
}

/// Grows the root filesystem to fill its disk, once the guest sees the disk `bytes` large: the
/// host grows a sandbox's disk just before it sends the identity, and the driver hears of it a
/// moment later.
fn grow_root(bytes: u64) -> io::Result<()> {
    // The size the root filesystem was last grown to. In memory, as the filesystem is on the
    // disk: both are saved and restored together, and a fresh boot grows once. A resize that
    // changes nothing still flushes the journal.
    static GROWN_TO: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    use std::sync::atomic::Ordering::Relaxed;
    let size_file = format!("/sys/class/block/{}/size", ROOT_DEVICE.trim_start_matches("/dev/"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let disk = loop {
        let sectors: u64 = std::fs::read_to_string(&size_file)?
            .trim()
            .parse()
            .map_err(|e| io::Error::other(format!("reading {size_file}: {e}")))?;
        if sectors * 512 >= bytes {
            break sectors * 512;
        }
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "the root disk is {} MiB, not the {} MiB it was grown to",
                (sectors * 512) >> 20,
                bytes >> 20
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if GROWN_TO.load(Relaxed) == disk {
        return Ok(());
    }
    sys::resize_ext4("/", disk)
        .map_err(|e| io::Error::new(e.kind(), format!("growing the root filesystem: {e}")))?;
    GROWN_TO.store(disk, Relaxed);
    Ok(())
}
