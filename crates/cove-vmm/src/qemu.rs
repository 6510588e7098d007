//! QEMU as the VM backend, driven over QMP.
//!
//! Guest RAM is a `memory-backend-file`: either shared (`share=on`, a file on tmpfs that *is*
//! the RAM) or private (`share=off`, a copy-on-write mapping of a file on disk or of a sealed
//! memfd QEMU inherits: the guest runs at once and its pages are read on first touch, while
//! what it writes stays in QEMU's own memory; see [`GuestMemory`]). A save writes only device state (about a megabyte, `xen-save-devices-state`, which
//! skips every RAM block whatever its mapping); the RAM is the runner's business (see the
//! runner's `memfile`). Restoring starts QEMU with `-incoming defer` on the RAM file and feeds
//! it that device state over a Unix socket the runner serves, which keeps QEMU's `-sandbox`
//! able to deny spawning processes.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::qmp::Qmp;
use crate::{sys, Accel, Boot, Cgroup, GuestMemory, VmHandle, VmSpec, Vmm, VmmError};

const QMP_WAIT: Duration = Duration::from_secs(10);
const MIGRATION_WAIT: Duration = Duration::from_secs(300);

/// Unprivileged account QEMU drops to once it has opened its files (`cove setup` creates it).
pub const VM_USER: &str = "cove-vm";
/// The TAP (in the VM's network namespace) and MAC of the guest's NIC: the same for every VM,
/// so that any saved state restores into any namespace.
const TAP: &str = "tap0";
const MAC: &str = "52:54:00:c0:0e:02";

pub struct QemuVmm {
    pub binary: PathBuf,
    pub accel: Accel,
    /// (uid, gid) of `VM_USER`; when absent QEMU keeps running as root.
    pub user: Option<(u32, u32)>,
}

/// The machine QEMU emulates (`-machine`). Device states carry no description of themselves
/// (`suppress-vmdesc`), as they have no configuration section (see [`STATE_FORMAT`]).
const MACHINE: &str = "q35,memory-backend=mem,vmport=off,smbus=off,sata=off,usb=off,suppress-vmdesc=on";

/// What [`QemuVmm::save`] writes: version 2 is `xen-save-devices-state` output (devices only,
/// no configuration section, read with `migration.send-configuration=off`); version 1 was a
/// migration stream with `x-ignore-shared`. States of another version do not load.
pub const STATE_FORMAT: u32 = 2;

/// The guest-visible devices (`-device`), in order. Saved device states depend on them: see
/// [`device_set`].
fn devices() -> [String; 6] {
    [
        "virtio-blk-pci,drive=root,id=rootdisk".into(),
        "virtio-serial-pci,id=vser".into(),
        format!("virtserialport,bus=vser.0,chardev=agent,name={}", cove_proto::PORT_NAME),
        format!("virtserialport,bus=vser.0,chardev=fs,name={}", cove_proto::fs::PORT_NAME),
        "virtio-rng-pci".into(),
        format!("virtio-net-pci,netdev=net0,mac={MAC},id=nic0"),
    ]
}

/// What saved device states depend on, read off the machine and devices QEMU is given: the
/// machine type, each device's driver, and the virtio-serial ports by name, e.g.
/// `q35 virtio-blk virtio-serial(cove.agent,cove.fs) virtio-rng virtio-net`. Images and
/// template snapshots record it and restore only where it is the same, so a device added,
/// removed or renamed here makes new templates and refuses older images with a clear error.
pub fn device_set() -> String {
    let mut parts = vec![MACHINE.split(',').next().unwrap_or(MACHINE).to_string()];
    let mut ports = Vec::new();
    for d in devices() {
        let driver = d.split(',').next().unwrap_or_default();
        if driver == "virtserialport" {
            ports.extend(d.split(',').find_map(|kv| kv.strip_prefix("name=")).map(str::to_string));
        } else {
            parts.push(driver.trim_end_matches("-pci").to_string());
        }
    }
    if let Some(serial) = parts.iter_mut().find(|p| *p == "virtio-serial") {
        *serial = format!("virtio-serial({})", ports.join(","));
    }
    parts.join(" ")
}

impl QemuVmm {
    pub fn new(accel: Accel) -> Self {
        let user = lookup_user(VM_USER);
        if user.is_none() {
            tracing::warn!(
                "user {VM_USER} does not exist (run `cove setup`): QEMU will keep running as root"
            );
        }
        QemuVmm { binary: PathBuf::from("qemu-system-x86_64"), accel: accel.resolve(), user }
    }

    fn args(&self, spec: &VmSpec, boot: &Boot) -> Vec<String> {
        let run = |f: &str| spec.run_dir.join(f).display().to_string();
        let accel = match self.accel {
            Accel::Kvm => "kvm",
            _ => "tcg,thread=multi,tb-size=256",
        };
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("cove-{},process=cove-{}", spec.name, spec.name),
            "-machine".into(),
            MACHINE.into(),
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            if self.accel == Accel::Kvm { "host".into() } else { "max".into() },
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-object".into(),
            {
                let (path, share) = match &spec.memory {
                    GuestMemory::Shared(p) => (p.display().to_string(), "on"),
                    GuestMemory::Private(p) => (p.display().to_string(), "off"),
                    GuestMemory::PrivateFd(fd) => (format!("/proc/self/fd/{fd}"), "off"),
                };
                format!("memory-backend-file,id=mem,size={}M,mem-path={path},share={share}", spec.memory_mib)
            },
            "-global".into(),
            "migration.send-configuration=off".into(),
            // After a restore the guest is not asked to announce itself on its network (a
            // gratuitous ARP and neighbour advertisement, ~1,100 blocks of its kernel to
            // translate, ~8 ms here, before its agent answers), nor is QEMU: its NIC's MAC is
            // the same in every namespace, and the host side learns it when it first asks.
            "-global".into(),
            "migration.announce-rounds=0".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", run("console.log")),
            "-drive".into(),
            format!(
                "file={},if=none,id=root,format=qcow2,cache=writeback,discard=unmap",
                spec.disk.display()
            ),
            "-chardev".into(),
            format!("socket,id=agent,path={},server=on,wait=off", run("agent.sock")),
            "-chardev".into(),
            format!("socket,id=fs,path={},server=on,wait=off", run("fs.sock")),
            "-netdev".into(),
            format!("tap,id=net0,ifname={TAP},script=no,downscript=no,vhost=off"),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", run("qmp.sock")),
            "-pidfile".into(),
            run("qemu.pid"),
        ];
        if let Boot::Fresh = boot {
            // A restored guest has its kernel in its RAM already: reading and laying out ~25
            // MB of kernel and initrd would only delay its QEMU's start (~8-12 ms here).
            a.extend([
                "-kernel".into(),
                spec.kernel.display().to_string(),
                "-initrd".into(),
                spec.initrd.display().to_string(),
                "-append".into(),
                spec.cmdline.clone(),
            ]);
        }
        // Backends (-chardev, -netdev) are set up before any device, wherever they stand; the
        // devices keep their order, which gives them their PCI slots.
        for d in devices() {
            a.extend(["-device".into(), d]);
        }
        if self.user.is_some() {
            // Once initialised (devices, RAM and sockets open) QEMU becomes an unprivileged
            // user. It needs set*id calls for that one step, so seccomp allows them; without
            // capabilities they cannot raise anything afterwards. (No -chroot: QEMU reopens
            // the disk by path when an incoming migration completes.)
            a.extend(["-runas".into(), VM_USER.into()]);
            a.extend([
                "-sandbox".into(),
                "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny".into(),
            ]);
        } else {
            a.extend([
                "-sandbox".into(),
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
            ]);
        }
        if let Boot::Restore { .. } = boot {
            a.push("-incoming".into());
            a.push("defer".into());
        }
        a
    }

    /// QEMU's command for [`cove_spawn::spawn`]: its arguments, an environment of its own, the
    /// inherited memory file (if any), stdout and stderr into `log`.
    fn command(
        &self,
        spec: &VmSpec,
        boot: &Boot,
        log: &std::fs::File,
        null: &std::fs::File,
        netns: i32,
    ) -> Result<cove_spawn::SpawnSpec, VmmError> {
        use std::os::unix::ffi::OsStrExt;
        let cstr = |b: &[u8]| {
            std::ffi::CString::new(b).map_err(|_| VmmError::Spawn("a NUL byte in QEMU's command".into()))
        };
        let program = find_program(&self.binary)
            .ok_or_else(|| VmmError::Spawn(format!("{} not found", self.binary.display())))?;
        let mut argv = vec![cstr(self.binary.as_os_str().as_bytes())?];
        for a in self.args(spec, boot) {
            argv.push(cstr(a.as_bytes())?);
        }
        Ok(cove_spawn::SpawnSpec {
            program: cstr(program.as_os_str().as_bytes())?,
            argv,
            envp: vec![cstr(QEMU_ENV.as_bytes())?],
            cwd: None,
            ids: None,
            cgroup_procs: Vec::new(),
            netns: Some(netns),
            // The memory file QEMU inherits, if any: it stays open (the caller's) until the
            // spawn returns.
            inherit: match spec.memory {
                GuestMemory::PrivateFd(fd) => vec![fd],
                _ => Vec::new(),
            },
            stdio: [null.as_raw_fd(), log.as_raw_fd(), log.as_raw_fd()],
        })
    }

    async fn qmp(&self, vm: &VmHandle) -> Result<Qmp, VmmError> {
        Qmp::connect(&vm.run_dir.join("qmp.sock"), QMP_WAIT).await
    }
}

#[async_trait]
impl Vmm for QemuVmm {
    async fn spawn(&self, spec: &VmSpec, boot: &Boot) -> Result<VmHandle, VmmError> {
        std::fs::create_dir_all(&spec.run_dir).map_err(|e| VmmError::io("creating run dir", e))?;
        if let Some((uid, gid)) = self.user {
            // The unprivileged QEMU creates its incoming-migration socket in the run dir and
            // reopens the writable disk after a migration.
            for p in [&spec.run_dir, &spec.disk] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))
                    .map_err(|e| VmmError::io(format!("handing {} to the VM user", p.display()), e))?;
            }
        }
        for f in ["qmp.sock", "agent.sock", "fs.sock", "qemu.pid", "incoming.sock"] {
            let _ = std::fs::remove_file(spec.run_dir.join(f));
        }
        let t0 = std::time::Instant::now();
        let limit = (spec.memory_mib + spec.overhead_mib) << 20;
        let cgroup = Cgroup::create(&spec.name, limit).map_err(|e| VmmError::io("creating cgroup", e))?;
        let procs: Vec<std::fs::File> = cgroup
            .procs_files()
            .iter()
            .map(|p| std::fs::OpenOptions::new().write(true).open(p))
            .collect::<Result<_, _>>()
            .map_err(|e| VmmError::io("opening cgroup.procs", e))?;
        let netns = std::fs::File::open(&spec.netns)
            .map_err(|e| VmmError::io(format!("opening network namespace {}", spec.netns.display()), e))?;
        let log = std::fs::File::create(spec.run_dir.join("qemu.log"))
            .map_err(|e| VmmError::io("creating qemu.log", e))?;
        let null = std::fs::File::open("/dev/null").map_err(|e| VmmError::io("opening /dev/null", e))?;
        let cmd = self.command(spec, boot, &log, &null, netns.as_raw_fd())?;
        // QEMU runs in its own session (a runner restart or a signal to the runner's group
        // does not touch it) and in the VM's network namespace, where it opens the TAP. It
        // cannot daemonize itself: `-sandbox spawn=deny` forbids the fork. Started without
        // copying the runner (see cove-spawn).
        let pid = cove_spawn::spawn(&cmd)
            .map_err(|e| VmmError::Spawn(format!("{}: {e}", self.binary.display())))?;
        let t_spawn = t0.elapsed();
        drop((netns, log, null));
        let pid = pid as u32;
        // Reap QEMU when it exits, so it never lingers as a zombie of the runner.
        std::thread::spawn(move || sys::wait(pid));
        // Into the VM's cgroup while QEMU starts: a move waits for an RCU grace period (~10-30
        // ms here, cgroup v1), which in the child before exec held up every start. The guest
        // cannot run before it is done (QEMU waits for its state or a `cont`): this is awaited
        // below. What QEMU allocates before it (its libraries, no guest RAM) stays charged to
        // the runner.
        let moved = tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            procs.iter().try_for_each(|mut f| f.write_all(pid.to_string().as_bytes()))
        });
        let vm = VmHandle { pid, run_dir: spec.run_dir.clone(), name: spec.name.clone() };
        let ready = Qmp::connect(&spec.run_dir.join("qmp.sock"), QMP_WAIT).await;
        let t_qmp = t0.elapsed();
        let moved = moved.await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let failed = match (ready, moved) {
            (Ok(_), Ok(())) => None,
            (Err(e), _) => {
                let log = std::fs::read_to_string(spec.run_dir.join("qemu.log")).unwrap_or_default();
                Some(VmmError::Spawn(format!("{e}; QEMU said: {}", log.trim())))
            }
            (Ok(_), Err(e)) => Some(VmmError::io("moving QEMU into its cgroup", e)),
        };
        if let Some(e) = failed {
            let _ = self.destroy(&vm).await;
            let _ = cgroup.remove();
            return Err(e);
        }
        tracing::debug!(
            spawn_ms = t_spawn.as_secs_f64() * 1e3,
            qmp_ms = t_qmp.as_secs_f64() * 1e3,
            cgroup_ms = t0.elapsed().as_secs_f64() * 1e3,
            "QEMU started"
        );
        Ok(vm)
    }

    async fn save(&self, vm: &VmHandle, state_file: &Path) -> Result<(), VmmError> {
        let mut qmp = self.qmp(vm).await?;
        qmp.execute("stop", json!({})).await?;
        // QEMU writes the file itself (it may create files in its run dir); `live` makes it
        // flush and let go of the disk, as a migration does, so the disk can be copied while
        // the VM stands stopped. A `cont` takes the disk back.
        let tmp = vm.run_dir.join("state.partial");
        let _ = std::fs::remove_file(&tmp);
        qmp.execute("xen-save-devices-state", json!({ "filename": tmp, "live": true })).await?;
        std::fs::rename(&tmp, state_file).map_err(|e| VmmError::io("renaming device state", e))?;
        Ok(())
    }

    /// Feeds a saved device state to a QEMU started with `-incoming defer`, then runs it.
    async fn restore(&self, vm: &VmHandle, state_file: &Path) -> Result<(), VmmError> {
        let mut qmp = self.qmp(vm).await?;
        let sock = vm.run_dir.join("incoming.sock");
        let uri = format!("unix:{}", sock.display());
        qmp.execute("migrate-incoming", json!({ "uri": uri })).await?;
        let state = tokio::fs::read(state_file).await.map_err(|e| VmmError::io("reading device state", e))?;
        let mut stream =
            UnixStream::connect(&sock).await.map_err(|e| VmmError::io("connecting to incoming socket", e))?;
        stream.write_all(&state).await.map_err(|e| VmmError::io("sending device state", e))?;
        stream.shutdown().await.map_err(|e| VmmError::io("sending device state", e))?;
        qmp.wait_migration(MIGRATION_WAIT).await?;
        qmp.execute("cont", json!({})).await?;
        Ok(())
    }

    async fn resume(&self, vm: &VmHandle) -> Result<(), VmmError> {
        self.qmp(vm).await?.execute("cont", json!({})).await?;
        Ok(())
    }

    async fn resize_disk(&self, vm: &VmHandle, bytes: u64) -> Result<(), VmmError> {
        // The writable overlay grows; reads past its backing file's end are zeros.
        self.qmp(vm).await?.execute("block_resize", json!({ "device": "root", "size": bytes })).await?;
        Ok(())
    }

    async fn destroy(&self, vm: &VmHandle) -> Result<(), VmmError> {
        if let Ok(Ok(mut qmp)) = tokio::time::timeout(Duration::from_millis(500), self.qmp(vm)).await {
            let _ = tokio::time::timeout(Duration::from_millis(500), qmp.execute("quit", json!({}))).await;
        }
        for i in 0..500 {
            if !alive(vm.pid, &vm.name) {
                break;
            }
            if i == 50 {
                let _ = sys::kill(vm.pid, libc::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if alive(vm.pid, &vm.name) {
            return Err(VmmError::Spawn(format!("QEMU pid {} did not exit", vm.pid)));
        }
        // An exited QEMU keeps its cgroup busy until it has been reaped: retry briefly.
        let cgroup = Cgroup::locate(&vm.name);
        for _ in 0..200 {
            if cgroup.remove().is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Err(e) = cgroup.remove() {
            return Err(VmmError::io("removing the VM's cgroup", e));
        }
        Ok(())
    }

    fn find(&self, name: &str, run_dir: &Path) -> Option<VmHandle> {
        let pid: u32 = std::fs::read_to_string(run_dir.join("qemu.pid")).ok()?.trim().parse().ok()?;
        alive(pid, name).then(|| VmHandle { pid, run_dir: run_dir.to_path_buf(), name: name.to_string() })
    }
}

/// Whether `pid` is alive and is the QEMU of VM `name` (not a recycled pid).
fn alive(pid: u32, name: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let want = format!("cove-{name},");
            let text = String::from_utf8_lossy(&cmdline);
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'));
            text.contains(&want) && !zombie
        }
        Err(_) => false,
    }
}

/// (uid, gid) of a user from /etc/passwd.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || f[0] != name {
            return None;
        }
        Some((f[2].parse().ok()?, f[3].parse().ok()?))
    })
}

/// QEMU's whole environment. Not the runner's, which may hold credentials (the blob store's
/// S3 keys): QEMU is the process a guest that escapes its VM lands in.
const QEMU_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `program` itself when it has a slash, else the first executable of that name on `PATH`.
fn find_program(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.components().count() > 1 {
        return Some(program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU is started by path (no shell, no `execvp`): a bare name is looked up on `PATH`.
    #[test]
    fn programs_are_found_on_the_path() {
        let sh = find_program(Path::new("sh")).expect("sh on PATH");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(find_program(Path::new("/opt/x/qemu")), Some(PathBuf::from("/opt/x/qemu")));
        assert_eq!(find_program(Path::new("no-such-program-cove")), None);
    }

    /// Every pause image and snapshot stored so far records this string and restores only where
    /// it is the same: a change here must be a real change of devices.
    #[test]
    fn the_device_set_is_read_off_the_devices() {
        assert_eq!(device_set(), "q35 virtio-blk virtio-serial(cove.agent,cove.fs) virtio-rng virtio-net");
        let spec = VmSpec {
            name: "sbx-1".into(),
            vcpus: 1,
            memory_mib: 512,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: String::new(),
            disk: "/d.qcow2".into(),
            memory: GuestMemory::Shared("/m".into()),
            run_dir: "/r".into(),
            overhead_mib: 0,
            netns: "/run/netns/n".into(),
        };
        let vmm = QemuVmm { binary: "qemu".into(), accel: Accel::Tcg, user: None };
        let args = vmm.args(&spec, &Boot::Fresh);
        let given: Vec<&String> = args.windows(2).filter(|w| w[0] == "-device").map(|w| &w[1]).collect();
        assert_eq!(
            given,
            devices().iter().collect::<Vec<_>>(),
            "QEMU gets exactly the devices fingerprinted"
        );
        assert!(args.windows(2).any(|w| w[0] == "-machine" && w[1] == MACHINE));
        // Only a fresh boot loads the kernel; a restore finds it in the guest's RAM.
        assert!(args.windows(2).any(|w| w[0] == "-kernel" && w[1] == "/k"));
        let restore = vmm.args(&spec, &Boot::Restore { state_file: "/s".into() });
        assert!(!restore.iter().any(|a| a == "-kernel" || a == "-initrd" || a == "-append"), "{restore:?}");
        assert!(restore.windows(2).any(|w| w[0] == "-incoming" && w[1] == "defer"));
    }
}
