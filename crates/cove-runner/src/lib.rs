//! The runner: the host side of sandboxes. It owns VM processes (through a [`Vmm`]), their
//! disks and memory files, the template snapshots they are cloned from, and the agent channel
//! into each guest. The control plane calls it in-process; nothing here knows about HTTP
//! clients, organizations or API keys.

pub mod agent;
pub mod images;
mod memfile;
mod sandbox;
#[allow(unsafe_code)]
mod sys;
mod template;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use agent::{AgentBody, AgentClient, AgentError};
use cove_vmm::{Accel, Vmm, VmmError};
pub use images::Images;

/// How long a restored guest has to answer the handshake.
const AGENT_WAIT_RESTORE: Duration = Duration::from_secs(20);
/// How long a cold-booted guest has (TCG boots take seconds).
const AGENT_WAIT_BOOT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Kernel, rootfs and initramfs built by `cove setup`.
    pub cache_dir: PathBuf,
    /// Sandbox disks and runtime files. (Template snapshots are derived, so they live in the
    /// cache dir, shared by every cove process on the host.)
    pub data_dir: PathBuf,
    /// Guest memory files (must be on tmpfs for speed): `templates/` is shared by every cove
    /// process on the host; each data dir has its own subdirectory for its sandboxes.
    pub shm_dir: PathBuf,
    pub accel: Accel,
    /// Host memory allowed to each QEMU beyond guest RAM.
    pub overhead_mib: u64,
}

impl RunnerConfig {
    /// Where this data dir's sandboxes keep their RAM: a subdirectory named by a hash of the data
    /// dir, so that a server can tell its own leftovers from another server's sandboxes.
    pub fn sandbox_shm_dir(&self) -> PathBuf {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::fs::canonicalize(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone()).hash(&mut h);
        self.shm_dir.join(format!("{:016x}", h.finish()))
    }

    pub fn template_shm_dir(&self) -> PathBuf {
        self.shm_dir.join("templates")
    }

    pub fn new(cache_dir: PathBuf, data_dir: PathBuf) -> Self {
        RunnerConfig {
            cache_dir,
            shm_dir: PathBuf::from("/dev/shm/cove"),
            data_dir,
            accel: Accel::Auto,
            overhead_mib: 384,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("unknown template {0:?}")]
    UnknownTemplate(String),
    #[error("guest images missing: {0} (run `cove setup`)")]
    ImagesMissing(String),
    #[error("sandbox {0} has no VM on this runner")]
    NoVm(String),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

impl RunnerError {
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        RunnerError::Io(what.into(), e)
    }
}

/// What the control plane asks for when it creates a sandbox.
#[derive(Debug, Clone)]
pub struct VmRequest {
    pub id: String,
    pub template: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub env: BTreeMap<String, String>,
}

pub struct Runner {
    cfg: RunnerConfig,
    vmm: Arc<dyn Vmm>,
    images: Images,
    templates: template::Templates,
    vms: Mutex<HashMap<String, Arc<sandbox::SandboxVm>>>,
}

impl Runner {
    pub fn new(cfg: RunnerConfig, vmm: Arc<dyn Vmm>) -> Result<Runner, RunnerError> {
        let images = Images::locate(&cfg.cache_dir)?;
        let dirs = [
            (cfg.data_dir.join("sandboxes"), &cfg.data_dir),
            (cfg.cache_dir.join("templates"), &cfg.cache_dir),
            (cfg.sandbox_shm_dir(), &cfg.shm_dir),
            (cfg.template_shm_dir(), &cfg.shm_dir),
        ];
        for (dir, root) in dirs {
            std::fs::create_dir_all(&dir)
                .map_err(|e| RunnerError::io(format!("creating {}", dir.display()), e))?;
            // QEMU runs as an unprivileged user and must reach its disk and sockets in here.
            ensure_traversable(&dir, root)?;
        }
        let templates = template::Templates::new(&cfg, &images);
        Ok(Runner { cfg, vmm, images, templates, vms: Mutex::new(HashMap::new()) })
    }

    /// Writable disk size of a template's sandboxes, in MiB.
    pub fn template_disk_mib(&self, template: &str) -> Option<u64> {
        (template == images::SYSTEM_TEMPLATE).then(|| self.images.rootfs_size_mib())
    }

    /// Boots and snapshots a template shape ahead of the first sandbox that needs it.
    pub async fn prepare_template(
        &self,
        template: &str,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<(), RunnerError> {
        self.templates.get(self.vmm.as_ref(), template, vcpus, memory_mib).await.map(|_| ())
    }

    /// Creates the sandbox's VM from the template snapshot and gives the guest its identity.
    pub async fn create(&self, req: &VmRequest) -> Result<(), RunnerError> {
        let snapshot =
            self.templates.get(self.vmm.as_ref(), &req.template, req.vcpus, req.memory_mib).await?;
        let vm =
            sandbox::SandboxVm::restore(&self.cfg, &self.images, self.vmm.as_ref(), &snapshot, req).await?;
        self.lock().insert(req.id.clone(), Arc::new(vm));
        Ok(())
    }

    /// Benchmark baseline: restores the template snapshot the way `create` does (copy of its RAM
    /// file and disk overlay, QEMU `-incoming`, `cont`) but with no control plane, no agent
    /// handshake and no identity; returns the time until the vCPUs run. The VM is destroyed.
    pub async fn raw_restore(
        &self,
        template: &str,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<Duration, RunnerError> {
        let snapshot = self.templates.get(self.vmm.as_ref(), template, vcpus, memory_mib).await?;
        sandbox::raw_restore(&self.cfg, &self.images, self.vmm.as_ref(), &snapshot).await
    }

    /// The agent of a sandbox's VM, reconnecting if the channel dropped.
    pub async fn agent(&self, id: &str) -> Result<AgentClient, RunnerError> {
        let vm = self.lock().get(id).cloned().ok_or_else(|| RunnerError::NoVm(id.to_string()))?;
        vm.agent().await
    }

    /// Ends the VM and removes every file, socket and cgroup of the sandbox.
    pub async fn destroy(&self, id: &str) -> Result<(), RunnerError> {
        let vm = self.lock().remove(id);
        match vm {
            Some(vm) => vm.destroy(self.vmm.as_ref()).await,
            None => sandbox::SandboxVm::remove_leftovers(&self.cfg, self.vmm.as_ref(), id).await,
        }
    }

    /// After a restart: adopts the VMs of `ids` that are still running. Returns the ids whose
    /// VM is gone.
    pub fn recover(&self, ids: &[String]) -> Vec<String> {
        let mut lost = Vec::new();
        for id in ids {
            match sandbox::SandboxVm::adopt(&self.cfg, self.vmm.as_ref(), id) {
                Some(vm) => {
                    self.lock().insert(id.clone(), Arc::new(vm));
                }
                None => lost.push(id.clone()),
            }
        }
        lost
    }

    /// Ids of the sandboxes with files on this host: directories and RAM files (used to find
    /// orphans after a crash).
    pub fn sandbox_ids_on_host(&self) -> Vec<String> {
        let names = |dir: PathBuf| -> Vec<String> {
            std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
                })
                .unwrap_or_default()
        };
        let mut ids = names(self.cfg.data_dir.join("sandboxes"));
        for f in names(self.cfg.sandbox_shm_dir()) {
            if let Some(id) = f.strip_suffix(".mem") {
                if !ids.iter().any(|i| i == id) {
                    ids.push(id.to_string());
                }
            }
        }
        ids
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<sandbox::SandboxVm>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Makes `dir` and its ancestors up to `root` (Cove's own directories) searchable by other
/// users, adding only the x bit, so the unprivileged QEMU can open files below them by path.
/// Ancestors above `root` are not Cove's to change: one that others cannot search is an error.
fn ensure_traversable(dir: &std::path::Path, root: &std::path::Path) -> Result<(), RunnerError> {
    use std::os::unix::fs::PermissionsExt;
    let mut ours = true;
    for d in dir.ancestors() {
        let meta = std::fs::metadata(d).map_err(|e| RunnerError::io(format!("stat {}", d.display()), e))?;
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            if !ours {
                let msg =
                    format!("{} is not searchable by other users (chmod o+x), which QEMU needs", d.display());
                return Err(RunnerError::io("checking directory permissions", std::io::Error::other(msg)));
            }
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011))
                .map_err(|e| RunnerError::io(format!("making {} searchable", d.display()), e))?;
        }
        if d == root {
            ours = false;
        }
    }
    Ok(())
}
