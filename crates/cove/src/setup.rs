//! `cove setup`: host preparation. Installs the Debian packages Cove needs, fetches the guest
//! kernel, builds the system template's root filesystem and the initramfs holding the agent,
//! all into the cache directory. Every step is skipped when its output is already there.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "mmdebstrap",
    "e2fsprogs",
    "xz-utils",
    "zstd",
    "ca-certificates",
    "curl",
    "python3",
    "iproute2",
    "nftables",
];
const KERNEL_SH: &str = include_str!("../../../images/kernel.sh");
const ROOTFS_SH: &str = include_str!("../../../images/rootfs.sh");
/// The code interpreter service, installed into its template's root filesystem.
const CODE_INTERPRETER: &[(&str, &str)] = &[
    ("server.py", include_str!("../../../images/code-interpreter/server.py")),
    ("node_worker.js", include_str!("../../../images/code-interpreter/node_worker.js")),
    ("cove_inline.py", include_str!("../../../images/code-interpreter/cove_inline.py")),
];
/// The desktop service, installed into its template's root filesystem.
const DESKTOP: &[(&str, &str)] = &[("server.py", include_str!("../../../images/desktop/server.py"))];

struct Steps {
    n: usize,
    total: usize,
}

impl Steps {
    fn start(&mut self, what: &str) -> Instant {
        self.n += 1;
        println!("[{}/{}] {what}", self.n, self.total);
        let _ = std::io::stdout().flush();
        Instant::now()
    }
    fn done(&self, t: Instant) {
        println!("      done in {:.1}s", t.elapsed().as_secs_f64());
    }
}

pub fn run(cache_dir: &Path, agent: Option<PathBuf>) -> Result<()> {
    std::fs::create_dir_all(cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
    let mut steps = Steps { n: 0, total: 6 };

    let t = steps.start("host packages and the unprivileged VM user");
    install_packages()?;
    create_vm_user()?;
    steps.done(t);

    let t = steps.start("guest kernel (Debian linux-image-cloud-amd64)");
    run_script("kernel.sh", KERNEL_SH, cache_dir, &[], &[])?;
    steps.done(t);

    let t =
        steps.start("system template root filesystem (debian:bookworm, mmdebstrap; minutes on first run)");
    run_script("rootfs.sh", ROOTFS_SH, cache_dir, &[], &[])?;
    steps.done(t);

    let t = steps.start(
        "code interpreter template root filesystem (system/code-interpreter:v0.1.0: numpy, pandas, matplotlib)",
    );
    build_service_rootfs(cache_dir, "code-interpreter", CODE_INTERPRETER)?;
    steps.done(t);

    let t = steps.start(
        "desktop template root filesystem (system/desktop:v0.1.0: Xvfb, XFCE, x11vnc, noVNC, xdotool, ffmpeg)",
    );
    build_service_rootfs(cache_dir, "desktop", DESKTOP)?;
    steps.done(t);

    let t = steps.start("initramfs with the guest agent");
    let agent = match agent {
        Some(a) => a,
        None => find_agent()?,
    };
    build_initramfs(cache_dir, &agent)?;
    steps.done(t);
    println!("setup complete: {}", cache_dir.display());
    Ok(())
}

/// The root filesystem of a system template with a service: `images/rootfs.sh VARIANT`, given
/// the service's files (embedded in this binary) in a directory of their own.
fn build_service_rootfs(cache_dir: &Path, variant: &str, files: &[(&str, &str)]) -> Result<()> {
    let service = tempfile_dir()?.join(variant);
    std::fs::create_dir_all(&service)?;
    for (name, body) in files {
        std::fs::write(service.join(name), body)?;
    }
    // run_script removes its temporary directory, the service files with it.
    run_script("rootfs.sh", ROOTFS_SH, cache_dir, &[variant], &[("COVE_SERVICE_DIR", &service)])
}

fn install_packages() -> Result<()> {
    let mut missing = missing_packages();
    if missing.is_empty() {
        println!("      all present");
        return Ok(());
    }
    let status =
        Command::new("apt-get").args(["update", "-qq"]).status().context("running apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed");
    }
    // Installing one package can remove another that came from elsewhere (a `qemu-utils` from
    // backports goes when `qemu-system-x86` comes from bookworm): check again and install what
    // went missing, from the distribution this time.
    for _ in 0..2 {
        println!("      installing {}", missing.join(" "));
        let status = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get install")?;
        if !status.success() {
            bail!("apt-get install {} failed", missing.join(" "));
        }
        missing = missing_packages();
        if missing.is_empty() {
            return Ok(());
        }
    }
    bail!("still missing after installing: {}", missing.join(" "))
}

/// The packages of `PACKAGES` that are not installed.
fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

/// QEMU drops to this user after opening its files (see cove-vmm). It may use /dev/kvm.
fn create_vm_user() -> Result<()> {
    let user = cove_vmm::qemu::VM_USER;
    let exists = Command::new("id").arg("-u").arg(user).output().is_ok_and(|o| o.status.success());
    if !exists {
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(user)
            .status()
            .context("running useradd")?;
        if !status.success() {
            bail!("useradd {user} failed");
        }
        println!("      created user {user}");
    }
    let has_kvm_group =
        std::fs::read_to_string("/etc/group").is_ok_and(|g| g.lines().any(|l| l.starts_with("kvm:")));
    if has_kvm_group {
        let _ = Command::new("usermod").args(["-a", "-G", "kvm", user]).status();
    }
    Ok(())
}

/// Runs one of the embedded scripts as `bash SCRIPT CACHE_DIR ARGS...` with `env` added.
fn run_script(name: &str, body: &str, cache_dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<()> {
    let dir = tempfile_dir()?;
    let path = dir.join(name);
    std::fs::write(&path, body)?;
    let status = Command::new("bash")
        .arg(&path)
        .arg(cache_dir)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running {name}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("cove-setup-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The static guest agent: `$COVE_AGENT_BIN`, or built beside this binary.
pub fn find_agent() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("COVE_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no exe dir")?;
    let candidates = [
        dir.join("cove-agent"),
        dir.join("../x86_64-unknown-linux-gnu/release/cove-agent"),
        dir.join("../../x86_64-unknown-linux-gnu/release/cove-agent"),
    ];
    for c in &candidates {
        if c.exists() && is_static(c) {
            return Ok(c.clone());
        }
    }
    bail!(
        "no static cove-agent found (looked at {}); build it with scripts/build-agent or set COVE_AGENT_BIN",
        candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// An ELF without a program interpreter runs in the initramfs, where there is no libc.
fn is_static(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    bytes.starts_with(b"\x7fELF") && !bytes.windows(b"/lib64/ld-linux".len()).any(|w| w == b"/lib64/ld-linux")
}

/// Writes `<cache>/initramfs/initramfs.cpio`: /init (the agent), /dev/console, /modules/*.
pub fn build_initramfs(cache_dir: &Path, agent: &Path) -> Result<()> {
    if !is_static(agent) {
        bail!("{} is not a static executable", agent.display());
    }
    let modules = cache_dir.join("kernel/modules");
    let order = std::fs::read_to_string(modules.join("load-order"))
        .context("reading kernel/modules/load-order (run the kernel step)")?;
    let mut cpio = crate::cpio::Writer::default();
    cpio.dir("dev", 0o755);
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.dir("modules", 0o755);
    cpio.dir("newroot", 0o755);
    cpio.file("init", 0o755, &std::fs::read(agent).with_context(|| format!("reading {}", agent.display()))?);
    cpio.file("modules/load-order", 0o644, order.as_bytes());
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        cpio.file(
            &format!("modules/{name}"),
            0o644,
            &std::fs::read(modules.join(name)).with_context(|| format!("reading module {name}"))?,
        );
    }
    let out_dir = cache_dir.join("initramfs");
    std::fs::create_dir_all(&out_dir)?;
    let bytes = cpio.finish();
    let target = out_dir.join("initramfs.cpio");
    // Unchanged content keeps its mtime, so template snapshots stay valid.
    if std::fs::read(&target).ok().as_deref() == Some(&bytes[..]) {
        println!("      unchanged");
        return Ok(());
    }
    let tmp = out_dir.join("initramfs.cpio.tmp");
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, &target)?;
    println!("      {} ({} KiB)", target.display(), bytes.len() / 1024);
    Ok(())
}
