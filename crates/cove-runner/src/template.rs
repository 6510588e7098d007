//! Template snapshots: a template's guest booted once per VM shape (vCPUs × memory) and saved,
//! so that creating a sandbox is a restore, not a boot.
//!
//! On disk, per shape: `disk.qcow2` (the template's frozen writable layer, read-only after the
//! save), `overlay.qcow2` (an empty overlay over it, copied for each new sandbox), `state.bin`
//! (device state) and `meta.json`; the RAM lives on tmpfs as `<shm>/tmpl-<key>.mem`.
//!
//! The system template's snapshots live in the cache dir, shared by every cove process on the
//! host; a user template's in the data dir beside its disk (`<data>/templates/<id>/snapshots`),
//! with their RAM in the data dir's own tmpfs directory.
//!
//! The key names the inputs (kernel, initramfs, rootfs) by a hash, so new images make a new
//! snapshot beside the old one and never touch files that running sandboxes use as their
//! disk's backing layer. Old versions are left in place (see docs/operations.md).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cove_vmm::{Boot, VmSpec, Vmm};
use serde::{Deserialize, Serialize};

use crate::agent::AgentClient;
use crate::images::{Images, KERNEL_CMDLINE};
use crate::{RunnerConfig, RunnerError, AGENT_WAIT_BOOT};

/// A usable template snapshot.
#[derive(Debug, Clone)]
pub struct TemplateSnapshot {
    /// Template name, e.g. `system/debian:bookworm`.
    pub template: String,
    pub key: String,
    /// The inputs this snapshot is made from, read once (see `Images::fingerprint`).
    pub fingerprint: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub dir: PathBuf,
    /// The snapshot's RAM, on disk in `dir` (sparse): kept with the frozen disk it belongs
    /// with, so a host reboot loses neither. Creates map a sealed memfd copy of it.
    pub memory_file: PathBuf,
    /// The RAM file of the VM that boots it, on tmpfs; moved into `memory_file` once saved.
    pub boot_memory: PathBuf,
    /// Sockets and logs of the VM that boots it.
    pub run_dir: PathBuf,
}

impl TemplateSnapshot {
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.bin")
    }
    pub fn overlay(&self) -> PathBuf {
        self.dir.join("overlay.qcow2")
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Meta {
    fingerprint: String,
    vcpus: u32,
    memory_mib: u64,
}

pub struct Templates {
    cfg: RunnerConfig,
    images: Images,
    /// One lock per shape, so a shape is built once however many creates wait for it.
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Sealed copies of snapshots' RAM, by snapshot key (see [`Templates::shared_memory`]).
    shared: Mutex<HashMap<String, SharedMemory>>,
    /// Held while a sealed copy is made, so that creates arriving together wait for one copy
    /// instead of each making its own (and sharing no pages with the sandboxes after them).
    sealing: tokio::sync::Mutex<()>,
    /// Builds under way (see [`Templates::stop_builds`]).
    builds: Mutex<Builds>,
}

/// The builds under way, by their VM's name (with whether the VM is being started), and
/// whether this process is going.
#[derive(Default)]
struct Builds {
    stopping: bool,
    under_way: HashMap<String, (TemplateSnapshot, bool)>,
}

fn shutting_down() -> RunnerError {
    RunnerError::Unavailable("this runner is shutting down".into())
}

/// How long [`Templates::stop_builds`] waits for VMs being started.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A build's entry in [`Builds`], taken out when the build ends however it ends.
struct UnderWay<'a> {
    builds: &'a Mutex<Builds>,
    name: String,
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.builds.lock().unwrap_or_else(|p| p.into_inner()).under_way.remove(&self.name);
    }
}

/// A snapshot's RAM in a sealed memfd, and which RAM file (inode, modification time) it copies.
struct SharedMemory {
    template: String,
    source: (u64, i64, i64),
    fd: Arc<OwnedFd>,
}

impl Templates {
    pub fn new(cfg: &RunnerConfig, images: &Images) -> Self {
        Templates {
            cfg: cfg.clone(),
            images: images.clone(),
            building: Mutex::new(HashMap::new()),
            shared: Mutex::new(HashMap::new()),
            sealing: tokio::sync::Mutex::new(()),
            builds: Mutex::new(Builds::default()),
        }
    }

    /// Ends the builds under way, for a runner process that is going: a build's VM cannot be
    /// taken over by the next process (which builds again), so none is left running, nor its
    /// network or files. Builds asked for after this fail.
    pub async fn stop_builds(&self, vmm: &dyn Vmm) {
        let lock = || self.builds.lock().unwrap_or_else(|p| p.into_inner());
        lock().stopping = true;
        // A VM being started has no pid to find yet: wait until its start has returned (the
        // build then sees `stopping` and ends it itself).
        let since = std::time::Instant::now();
        while lock().under_way.values().any(|(_, starting)| *starting) && since.elapsed() < STOP_WAIT {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let under_way: Vec<(String, TemplateSnapshot)> =
            lock().under_way.drain().map(|(name, (snap, _))| (name, snap)).collect();
        for (name, snap) in under_way {
            if let Some(vm) = vmm.find(&name, &snap.run_dir) {
                if let Err(e) = vmm.destroy(&vm).await {
                    tracing::warn!(template = %snap.template, error = %e, "stopping a template build's VM");
                }
            }
            crate::net::remove_scratch(&name).await;
            let _ = std::fs::remove_dir_all(&snap.dir);
            let _ = std::fs::remove_file(&snap.boot_memory);
            tracing::info!(template = %snap.template, "template build stopped: the process is going");
        }
    }

    /// Enters `snap`'s build, VM `name`, in [`Builds`]; refused once the process is going.
    fn under_way(&self, name: &str, snap: &TemplateSnapshot) -> Result<UnderWay<'_>, RunnerError> {
        let mut b = self.builds.lock().unwrap_or_else(|p| p.into_inner());
        if b.stopping {
            return Err(shutting_down());
        }
        b.under_way.insert(name.to_string(), (snap.clone(), false));
        Ok(UnderWay { builds: &self.builds, name: name.to_string() })
    }

    /// Marks build `name` as starting its VM or not; an error once the process is going, so
    /// that a build starts no VM then, and ends one it just started.
    fn starting(&self, name: &str, starting: bool) -> Result<(), RunnerError> {
        let mut b = self.builds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = b.under_way.get_mut(name) {
            entry.1 = starting;
        }
        match b.stopping {
            true => Err(shutting_down()),
            false => Ok(()),
        }
    }

    /// The RAM of snapshot `snap` in a sealed memfd, made once per snapshot and runner process.
    /// Every sandbox made from the snapshot maps it copy-on-write: they share its pages until
    /// they write them, and none can change it (QEMU opens its RAM file read-write; the seals
    /// refuse the writes).
    pub async fn shared_memory(&self, snap: &TemplateSnapshot) -> Result<Arc<OwnedFd>, RunnerError> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&snap.memory_file)
            .map_err(|e| RunnerError::io("reading template memory", e))?;
        let source = (m.ino(), m.mtime(), m.mtime_nsec());
        let lock = || self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let cached = || lock().get(&snap.key).filter(|s| s.source == source).map(|s| s.fd.clone());
        if let Some(fd) = cached() {
            return Ok(fd);
        }
        let _sealing = self.sealing.lock().await;
        if let Some(fd) = cached() {
            return Ok(fd);
        }
        let (from, name) =
            (snap.memory_file.clone(), format!("{}{}", crate::memfile::TEMPLATE_MEMFD, snap.key));
        let fd = tokio::task::spawn_blocking(move || crate::sys::sealed_copy(&from, &name))
            .await
            .map_err(|e| RunnerError::io("sealing template memory", std::io::Error::other(e)))?
            .map_err(|e| RunnerError::io("sealing template memory", e))?;
        let fd = Arc::new(fd);
        let entry = SharedMemory { template: snap.template.clone(), source, fd: fd.clone() };
        lock().insert(snap.key.clone(), entry);
        Ok(fd)
    }

    /// The guest images of a template: a system template's root filesystem in the cache dir,
    /// or a user template's own disk, with the shared kernel and initramfs. `None` for a
    /// template this host does not have.
    pub fn images_for(&self, template: &str) -> Option<Images> {
        let rootfs = match cove_api::template::system_template(template) {
            Some(t) => Images::system_rootfs(&self.cfg.cache_dir, t),
            None => user_rootfs(&self.cfg.data_dir, template)?,
        };
        rootfs.exists().then(|| Images { rootfs, ..self.images.clone() })
    }

    /// Where a template's snapshots live: the system template's in the cache dir, shared by every
    /// cove process on the host; a user template's beside its disk in the data dir, which owns
    /// it.
    fn snapshots_dir(&self, template: &str) -> PathBuf {
        match user_rootfs(&self.cfg.data_dir, template) {
            Some(rootfs) => rootfs.with_file_name("snapshots"),
            None => self.cfg.cache_dir.join("templates"),
        }
    }

    /// The run directory of the VM that boots a snapshot: in the snapshot's own directory for the
    /// system template; for a user template, whose snapshot directory is deep in the data dir,
    /// a short path of its own (the QMP and agent sockets in it must fit a socket address).
    fn run_dir(&self, template: &str, key: &str) -> PathBuf {
        if !is_user_template(template) {
            return self.snapshots_dir(template).join(key).join("run");
        }
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        self.cfg.data_dir.join("tmpl-run").join(format!("{:012x}", h.finish() >> 16))
    }

    /// Where a template snapshot's RAM lives (tmpfs): shared for the system template; a user
    /// template's in the data dir's own directory, apart from sandboxes' RAM files (which
    /// recovery checks against sandbox records).
    fn shm_dir(&self, template: &str) -> PathBuf {
        if is_user_template(template) {
            self.cfg.sandbox_shm_dir().join("templates")
        } else {
            self.cfg.template_shm_dir()
        }
    }

    /// Disk size of a template's sandboxes, MiB.
    pub fn disk_mib(&self, template: &str) -> Option<u64> {
        self.images_for(template).map(|i| i.rootfs_size_mib())
    }

    fn snapshot(&self, template: &str, images: &Images, vcpus: u32, memory_mib: u64) -> TemplateSnapshot {
        let fingerprint = images.fingerprint();
        let inputs = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            fingerprint.hash(&mut h);
            h.finish()
        };
        let key = format!("{}-{vcpus}c-{memory_mib}m-{:012x}", slug(template), inputs >> 16);
        TemplateSnapshot {
            template: template.to_string(),
            dir: self.snapshots_dir(template).join(&key),
            memory_file: self.snapshots_dir(template).join(&key).join("memory"),
            boot_memory: self.shm_dir(template).join(format!("tmpl-{key}.mem")),
            run_dir: self.run_dir(template, &key),
            key,
            fingerprint,
            vcpus,
            memory_mib,
        }
    }

    /// A snapshot built by an earlier Cove, which kept its RAM on tmpfs only: moved to disk
    /// now, so that it is ready without a rebuild (which would replace the frozen disk its
    /// sandboxes' images are layered on). False when there is nothing to keep.
    fn keep_boot_memory(&self, s: &TemplateSnapshot) -> bool {
        let rest = TemplateSnapshot { memory_file: s.boot_memory.clone(), ..s.clone() };
        if !self.is_ready(&rest) {
            return false;
        }
        match move_to_disk(&s.boot_memory, &s.memory_file) {
            Ok(()) => {
                tracing::info!(template = %s.template, key = %s.key, "template RAM moved from tmpfs to disk");
                true
            }
            Err(e) => {
                tracing::warn!(template = %s.template, key = %s.key, error = %e, "template RAM not moved to disk");
                false
            }
        }
    }

    fn is_ready(&self, s: &TemplateSnapshot) -> bool {
        let want = Meta { fingerprint: s.fingerprint.clone(), vcpus: s.vcpus, memory_mib: s.memory_mib };
        let meta: Option<Meta> =
            std::fs::read(s.dir.join("meta.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        meta.as_ref() == Some(&want)
            && s.memory_file.exists()
            && s.state_file().exists()
            && s.overlay().exists()
    }

    /// The frozen disk layer of template snapshot `key` (whatever its version), which images
    /// made from it need.
    /// The versions (keys) whose frozen disk this host has: the system templates' in the cache
    /// dir, the user templates' in the data dir.
    pub fn versions(&self) -> Vec<String> {
        let user_dirs = std::fs::read_dir(self.cfg.data_dir.join("templates"))
            .into_iter()
            .flatten()
            .filter_map(|e| Some(e.ok()?.path().join("snapshots")));
        let mut keys: Vec<String> = std::iter::once(self.cfg.cache_dir.join("templates"))
            .chain(user_dirs)
            .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten())
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("disk.qcow2").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        keys.sort();
        keys
    }

    pub fn frozen_disk(&self, key: &str) -> PathBuf {
        // A user template's key starts with its id (`tpl-<hex>-…`).
        let template = key.splitn(3, '-').take(2).collect::<Vec<_>>().join("-");
        self.snapshots_dir(&template).join(key).join("disk.qcow2")
    }

    /// Returns the snapshot of this shape, booting and saving it first if needed.
    pub async fn get(
        &self,
        vmm: &dyn Vmm,
        template: &str,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<TemplateSnapshot, RunnerError> {
        let images =
            self.images_for(template).ok_or_else(|| RunnerError::UnknownTemplate(template.to_string()))?;
        let snap = self.snapshot(template, &images, vcpus, memory_mib);
        if self.is_ready(&snap) {
            return Ok(snap);
        }
        let lock = {
            let mut b = self.building.lock().unwrap_or_else(|p| p.into_inner());
            b.entry(snap.key.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        // Other cove processes on this host share the cache: take the shape's file lock too.
        let lock_path = self.snapshots_dir(template).join(format!("{}.lock", snap.key));
        if let Some(dir) = lock_path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| RunnerError::io("creating the template snapshot dir", e))?;
        }
        let lock_file =
            std::fs::File::create(&lock_path).map_err(|e| RunnerError::io("creating template lock", e))?;
        lock_when_free(&lock_file).await.map_err(|e| RunnerError::io("locking template", e))?;
        if self.is_ready(&snap) || self.keep_boot_memory(&snap) {
            return Ok(snap);
        }
        tracing::info!(template, vcpus, memory_mib, "building template snapshot (cold boot)");
        let started = std::time::Instant::now();
        self.build(vmm, &snap, &images).await?;
        tracing::info!(
            template,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "template snapshot ready"
        );
        drop(lock_file);
        Ok(snap)
    }

    /// Removes every snapshot of a template (all shapes and versions), for a template being
    /// deleted.
    pub async fn remove(&self, vmm: &dyn Vmm, template: &str) -> Result<(), RunnerError> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, s| s.template != template);
        let prefix = format!("{}-", slug(template));
        let Ok(entries) = std::fs::read_dir(self.snapshots_dir(template)) else { return Ok(()) };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_prefix(&prefix).map(|_| name.trim_end_matches(".lock")) else {
                continue;
            };
            let run_dir = self.run_dir(template, key);
            if let Some(stale) = vmm.find(&format!("tmpl-{key}"), &run_dir) {
                vmm.destroy(&stale).await?;
            }
            let _ = std::fs::remove_dir_all(entry.path());
            let _ = std::fs::remove_file(entry.path());
            let _ = std::fs::remove_dir_all(run_dir);
            let _ = std::fs::remove_file(self.shm_dir(template).join(format!("tmpl-{key}.mem")));
        }
        Ok(())
    }

    async fn build(
        &self,
        vmm: &dyn Vmm,
        snap: &TemplateSnapshot,
        images: &Images,
    ) -> Result<(), RunnerError> {
        let io = |what: &str, e| RunnerError::io(format!("{what} for template {}", snap.key), e);
        let name = format!("tmpl-{}", snap.key);
        let _under_way = self.under_way(&name, snap)?;
        // Leftovers of a build cut short (e.g. the server was killed): its VM, then its files.
        if let Some(stale) = vmm.find(&name, &snap.run_dir) {
            vmm.destroy(&stale).await?;
        }
        let _ = std::fs::remove_dir_all(&snap.dir);
        let _ = std::fs::remove_file(&snap.boot_memory);
        std::fs::create_dir_all(&snap.dir).map_err(|e| io("creating dir", e))?;
        if let Some(shm) = snap.boot_memory.parent() {
            std::fs::create_dir_all(shm).map_err(|e| io("creating the RAM dir", e))?;
        }
        let disk = snap.dir.join("disk.qcow2");
        qemu_img_overlay(&images.rootfs, &disk).await?;
        // The template VM has the NIC every sandbox has, on a network of its own that reaches
        // nothing.
        let netns = crate::net::scratch(&name).await?;
        let result = self.build_in(vmm, snap, &disk, netns).await;
        crate::net::remove_scratch(&name).await;
        result
    }

    async fn build_in(
        &self,
        vmm: &dyn Vmm,
        snap: &TemplateSnapshot,
        disk: &Path,
        netns: PathBuf,
    ) -> Result<(), RunnerError> {
        let io = |what: &str, e| RunnerError::io(format!("{what} for template {}", snap.key), e);
        let disk = disk.to_path_buf();
        let spec = VmSpec {
            name: format!("tmpl-{}", snap.key),
            vcpus: snap.vcpus,
            memory_mib: snap.memory_mib,
            kernel: self.images.kernel.clone(),
            initrd: self.images.initrd.clone(),
            cmdline: KERNEL_CMDLINE.to_string(),
            disk: disk.clone(),
            memory: cove_vmm::GuestMemory::Shared(snap.boot_memory.clone()),
            run_dir: snap.run_dir.clone(),
            overhead_mib: self.cfg.overhead_mib,
            netns,
        };
        self.starting(&spec.name, true)?;
        let started = vmm.start(&spec, &Boot::Fresh).await;
        let going = self.starting(&spec.name, false);
        let vm = started?;
        if let Err(e) = going {
            // The process began to go while this VM started: `stop_builds` waited for this.
            vmm.destroy(&vm).await?;
            return Err(e);
        }
        let steps = FirstBoot { template: &snap.template, started: std::time::Instant::now() };
        let result = async {
            let agent = AgentClient::connect_booting(&spec.agent_socket(), AGENT_WAIT_BOOT).await?;
            steps.done("the agent answered");
            // Page in the shell and the exec path once, so every clone starts warm.
            let warm = cove_api::process::ExecuteRequest {
                command: "true".into(),
                cwd: None,
                envs: None,
                timeout: Some(30),
            };
            // An image without a shell answers 400 here, which is fine: it runs no commands.
            match steps.within("the first command", agent.exec(&warm)).await? {
                Ok(_) => {}
                Err(crate::AgentError::Status { status, message, .. }) if status.is_client_error() => {
                    tracing::info!(template = %snap.template, %message, "commands cannot run in this template");
                }
                Err(e) => return Err(e.into()),
            }
            steps.done("the first command ran");
            if let Some(probe) = cove_api::template::system_template(&snap.template).and_then(|t| t.ready_probe) {
                let ready = cove_api::process::ExecuteRequest {
                    command: probe.into(),
                    cwd: None,
                    envs: None,
                    timeout: Some(READY_TIMEOUT_SECS),
                };
                let out = agent.exec(&ready).await?;
                if out.exit_code != 0 {
                    return Err(RunnerError::Image(format!(
                        "the template's service did not get ready (probe exited {}: {})",
                        out.exit_code,
                        out.stderr.trim()
                    )));
                }
                tracing::info!(template = %snap.template, "the template's service is ready");
            }
            // The agent drops this connection and goes back to waiting for a greeting. Parking
            // it proves it got there, and keeping the parked socket open during the save means
            // the guest sees no disconnect: every clone wakes up reading its port, so the first
            // bytes of its new host reach a fresh handshake.
            steps.within("leaving the session", agent.detach()).await??;
            drop(agent);
            let parked = AgentClient::park(&spec.agent_socket(), std::time::Duration::from_secs(10)).await?;
            steps.done("the agent parked");
            vmm.save(&vm, &snap.state_file()).await?;
            drop(parked);
            steps.done("saved");
            Ok::<(), RunnerError>(())
        }
        .await;
        vmm.destroy(&vm).await?;
        if let Err(e) = &result {
            // What the guest printed is the only account of a boot that went wrong.
            let console = std::fs::read(snap.run_dir.join("console.log")).unwrap_or_default();
            let text = String::from_utf8_lossy(&console);
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(CONSOLE_TAIL)..].join("\n");
            tracing::warn!(template = %snap.template, error = %e, console = %tail,
                "the template's first boot failed; its console ended with this");
        }
        result?;
        let _ = std::fs::remove_dir_all(&snap.run_dir);
        // The frozen layer is shared by every clone: nothing may write it again.
        let mut perms = std::fs::metadata(&disk).map_err(|e| io("stat disk", e))?.permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(&disk, perms).map_err(|e| io("freezing disk", e))?;
        qemu_img_overlay(&disk, &snap.overlay()).await?;
        move_to_disk(&snap.boot_memory, &snap.memory_file).map_err(|e| io("keeping the RAM on disk", e))?;
        let meta =
            Meta { fingerprint: snap.fingerprint.clone(), vcpus: snap.vcpus, memory_mib: snap.memory_mib };
        let bytes = serde_json::to_vec(&meta).map_err(|e| io("encoding meta", std::io::Error::other(e)))?;
        std::fs::write(snap.dir.join("meta.json"), bytes).map_err(|e| io("writing meta", e))?;
        Ok(())
    }
}

/// Copies the data of RAM file `from` (tmpfs) into a new sparse file `to` (written under a
/// temporary name, renamed whole), then removes `from`.
fn move_to_disk(from: &Path, to: &Path) -> std::io::Result<()> {
    let src = std::fs::File::open(from)?;
    let tmp = to.with_extension("partial");
    let dst = std::fs::File::create(&tmp)?;
    dst.set_len(src.metadata()?.len())?;
    crate::memfile::copy_data_between(&src, &dst)?;
    dst.sync_all()?;
    std::fs::rename(&tmp, to)?;
    std::fs::remove_file(from)
}

/// How long a step of a first boot with no limit of its own (the first command, leaving the
/// session) may take before the boot counts as failed: far more than either takes on a loaded
/// host, so that a stuck guest fails the build, naming the step, instead of holding it forever.
const STEP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A template's first boot, for its log: each step as it is done, with the time since the VM
/// started, so that a boot that is slow or stuck shows where.
struct FirstBoot<'a> {
    template: &'a str,
    started: std::time::Instant,
}

impl FirstBoot<'_> {
    fn done(&self, step: &str) {
        let elapsed_ms = self.started.elapsed().as_millis() as u64;
        tracing::info!(template = %self.template, elapsed_ms, "first boot: {step}");
    }

    /// `fut`, which is step `what`, unless it takes longer than [`STEP_WAIT`].
    async fn within<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, RunnerError> {
        tokio::time::timeout(STEP_WAIT, fut).await.map_err(|_| {
            let secs = STEP_WAIT.as_secs();
            crate::AgentError::Request(format!("{what} took over {secs} s at the first boot")).into()
        })
    }
}

/// How long a system template's service may take to get ready at its first boot.
const READY_TIMEOUT_SECS: u64 = 330;

/// Lines of a failed first boot's console put in the log.
const CONSOLE_TAIL: usize = 40;

/// Takes `file`'s exclusive lock once another process (sharing the cache) lets it go. Polled,
/// not a blocking `flock` on a blocking thread: a runtime waits for its blocking threads when
/// it shuts down, so a server asked to stop would hang until the other build finished.
async fn lock_when_free(file: &std::fs::File) -> std::io::Result<()> {
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// A template name as part of a file name.
fn slug(template: &str) -> String {
    template.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect()
}

/// The disk of user template `id` (`tpl-…`), whose files live in the data dir; `None` for a
/// name that is not a user template's id.
pub(crate) fn user_rootfs(data_dir: &Path, id: &str) -> Option<PathBuf> {
    is_user_template(id).then(|| data_dir.join("templates").join(id).join("rootfs.qcow2"))
}

/// User template ids are `tpl-` and alphanumerics: they name directories.
fn is_user_template(id: &str) -> bool {
    id.strip_prefix("tpl-").is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Creates an empty qcow2 overlay over `backing`.
pub async fn qemu_img_overlay(backing: &Path, path: &Path) -> Result<(), RunnerError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(path)
        .output()
        .await
        .map_err(|e| RunnerError::io("running qemu-img", e))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(RunnerError::io("qemu-img create", std::io::Error::other(msg)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot an earlier Cove left with its RAM on tmpfs only is kept, its RAM moved to
    /// disk (sparse, same bytes), rather than rebuilt; one that is not whole is not.
    #[test]
    fn a_snapshot_with_its_ram_on_tmpfs_only_is_kept() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let cfg = RunnerConfig::new(dir.path().join("cache"), dir.path().join("data"));
        let templates = Templates::new(&cfg, &Images::paths(&cfg.cache_dir));
        let snap_dir = dir.path().join("snap");
        std::fs::create_dir_all(&snap_dir).unwrap();
        let snap = TemplateSnapshot {
            template: "system/debian:bookworm".into(),
            key: "k1".into(),
            fingerprint: "f".into(),
            vcpus: 1,
            memory_mib: 4,
            memory_file: snap_dir.join("memory"),
            boot_memory: dir.path().join("tmpl-k1.mem"),
            dir: snap_dir.clone(),
            run_dir: dir.path().join("run"),
        };
        let boot = std::fs::File::create(&snap.boot_memory).unwrap();
        boot.set_len(4 << 20).unwrap();
        boot.write_all_at(b"guest page", 2 << 20).unwrap();
        assert!(!templates.keep_boot_memory(&snap), "kept without its meta, state and overlay");
        let meta = Meta { fingerprint: "f".into(), vcpus: 1, memory_mib: 4 };
        std::fs::write(snap_dir.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        std::fs::write(snap.state_file(), b"state").unwrap();
        std::fs::write(snap.overlay(), b"overlay").unwrap();
        assert!(!templates.is_ready(&snap));
        assert!(templates.keep_boot_memory(&snap));
        assert!(templates.is_ready(&snap));
        assert!(!snap.boot_memory.exists(), "the tmpfs copy stays");
        let kept = std::fs::File::open(&snap.memory_file).unwrap();
        assert_eq!(kept.metadata().unwrap().len(), 4 << 20);
        let mut buf = [0u8; 10];
        kept.read_exact_at(&mut buf, 2 << 20).unwrap();
        assert_eq!(&buf, b"guest page");
    }

    /// Creates that arrive together get one sealed copy of the template's RAM: were each to
    /// make its own, the sandboxes of the one the cache dropped would share no page with the
    /// ones after them.
    #[tokio::test]
    async fn concurrent_creates_share_one_sealed_copy() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RunnerConfig::new(dir.path().join("cache"), dir.path().join("data"));
        let templates = Templates::new(&cfg, &Images::paths(&cfg.cache_dir));
        let memory_file = dir.path().join("memory");
        std::fs::write(&memory_file, vec![7u8; 1 << 20]).unwrap();
        let snap = TemplateSnapshot {
            template: "system/debian:bookworm".into(),
            key: "k1".into(),
            fingerprint: String::new(),
            vcpus: 1,
            memory_mib: 1,
            dir: dir.path().to_path_buf(),
            memory_file: memory_file.clone(),
            boot_memory: dir.path().join("boot-memory"),
            run_dir: dir.path().join("run"),
        };
        let (a, b, c) = tokio::join!(
            templates.shared_memory(&snap),
            templates.shared_memory(&snap),
            templates.shared_memory(&snap)
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&b, &c), "one sealed copy for creates that came together");
        // A new RAM file (a rebuilt template) gets a copy of its own.
        std::fs::remove_file(&memory_file).unwrap();
        std::fs::write(&memory_file, vec![8u8; 1 << 20]).unwrap();
        let d = templates.shared_memory(&snap).await.unwrap();
        assert!(!Arc::ptr_eq(&a, &d));
    }
}
