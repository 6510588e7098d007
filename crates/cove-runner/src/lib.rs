//! The runner: the host side of sandboxes. It owns VM processes (through a [`Vmm`]), their
//! disks and memory files, the template snapshots they are cloned from, and the agent channel
//! into each guest. The control plane calls it in-process through [`SandboxHost`] (`host`), the
//! seam it shares with the control plane's simulated host; nothing here knows about HTTP
//! clients, organizations or API keys.

pub mod agent;
mod build;
pub mod fsserve;
pub mod host;
pub mod image;
pub mod images;
pub mod lazymem;
mod memfile;
pub mod net;
pub mod remote;
mod sandbox;
mod snapmem;
#[allow(unsafe_code)]
mod sys;
mod template;
mod trace;
mod warm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use agent::{AgentBody, AgentClient, AgentError};
pub use build::{BuiltTemplate, TemplateSource};
pub use cove_blob::{BlobError, BlobStore};
pub use cove_oci::{Credentials as RegistryCredentials, OciError};
pub use cove_vmm::VmmError;
use cove_vmm::{Accel, Vmm};
pub use host::{AfterCapture, GuestStream, HostInfo, SandboxHost, Unsealed, VmRequest};
pub use image::{CaptureStats, ImageManifest};
pub use images::Images;
pub use sandbox::fault_point;

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
    /// Where pause images and snapshots go: `file:///dir` or `s3://bucket/prefix`
    /// (see `cove_blob::BlobStore::open`). Default: `<data>/blobs`.
    pub blob_url: Option<String>,
    /// Resolver the egress proxy uses for allowed names; default: the host's first nameserver.
    pub egress_dns: Option<std::net::SocketAddr>,
    /// Extra CA certificates (PEM file) trusted for upstream TLS by the egress proxy, beside the
    /// host's roots (tests use a private root).
    pub egress_extra_ca: Option<PathBuf>,
    /// Registries (`host:port`) pulled from over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Largest image (compressed layers) a template may be made from.
    pub max_image_bytes: u64,
    /// vCPUs and memory (MiB) offered to sandboxes; default: the host's cores, and its memory
    /// less 2 GiB.
    pub capacity_vcpus: Option<u32>,
    pub capacity_memory_mib: Option<u64>,
    /// Most sandboxes this host takes at once (0 or `None`: as many as fit in its memory).
    pub capacity_sandboxes: Option<u32>,
    /// The program that serves a cold resume's RAM lazily (`<program> lazy-memory <dir>`: the
    /// cove binary, see `lazymem`). `None`: a cold resume unpacks the RAM before the guest runs.
    pub lazy_memory: Option<PathBuf>,
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
            blob_url: None,
            egress_dns: None,
            egress_extra_ca: None,
            insecure_registries: Vec::new(),
            max_image_bytes: 16 << 30,
            capacity_vcpus: None,
            capacity_memory_mib: None,
            capacity_sandboxes: None,
            lazy_memory: None,
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
    #[error("blob store: {0}")]
    Blob(#[from] cove_blob::BlobError),
    #[error("{0}")]
    Image(String),
    #[error("{0}")]
    Network(String),
    #[error(transparent)]
    Oci(#[from] cove_oci::OciError),
    /// Mount `index` of the request could not be attached: its endpoint, credentials or bucket.
    #[error("mount {index}: {source}")]
    Mount { index: usize, source: cove_mount::MountError },
    /// No host can take the VM, or the one holding it is not reachable (a cluster's placement);
    /// the message names no host detail beyond a runner's id.
    #[error("{0}")]
    Unavailable(String),
}

impl RunnerError {
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        RunnerError::Io(what.into(), e)
    }
}

/// Connects every mount of a new sandbox, so that a wrong endpoint, credentials or bucket is an
/// error before any VM starts.
async fn connect_mounts(mounts: &[cove_api::sandbox::MountConfig]) -> Result<fsserve::Sources, RunnerError> {
    let connected =
        futures::future::join_all(mounts.iter().enumerate().map(|(i, m)| connect_mount(m, i))).await;
    let sources = fsserve::Sources::default();
    for (m, source) in mounts.iter().zip(connected) {
        sources.insert(&m.id, Arc::new(source?));
    }
    Ok(sources)
}

/// Connects mount `m` (number `index` of its request) now, so that what is wrong with it is
/// an error naming it.
async fn connect_mount(
    m: &cove_api::sandbox::MountConfig,
    index: usize,
) -> Result<fsserve::S3Source, RunnerError> {
    fsserve::S3Source::connect(fsserve::mount_spec(m))
        .await
        .map_err(|source| RunnerError::Mount { index, source })
}

/// The mounts of a sandbox that runs again (resume, restore, start, adoption): connected at the
/// first request, so an endpoint that is down makes reads fail, not the sandbox.
fn lazy_mounts(mounts: &[cove_api::sandbox::MountConfig]) -> fsserve::Sources {
    let sources = fsserve::Sources::default();
    for m in mounts {
        sources.insert(&m.id, Arc::new(fsserve::S3Source::lazy(fsserve::mount_spec(m))));
    }
    sources
}

pub struct Runner {
    cfg: RunnerConfig,
    vmm: Arc<dyn Vmm>,
    images: Images,
    templates: template::Templates,
    puller: cove_oci::Puller,
    blobs: BlobStore,
    net: net::Network,
    vms: Mutex<HashMap<String, Arc<sandbox::SandboxVm>>>,
    /// Named snapshots' RAM, shared by the sandboxes restored from them.
    snapshots: snapmem::SnapshotMemory,
    info: HostInfo,
}

/// What this host offers (see [`RunnerConfig::capacity_vcpus`]) and what its saved VMs need.
fn host_info(cfg: &RunnerConfig) -> HostInfo {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let total_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024);
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "qemu unknown".into());
    let accel = cfg.accel.resolve();
    let cpu = match accel {
        // `-cpu host`: the guest saw this CPU's features, and a restore needs them all.
        Accel::Kvm => {
            let flags = std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|c| c.lines().find(|l| l.starts_with("flags")).map(str::to_string))
                .unwrap_or_default();
            use sha2::Digest;
            format!("host {}", &hex::encode(sha2::Sha256::digest(flags.as_bytes()))[..16])
        }
        _ => "max".into(),
    };
    HostInfo {
        vcpus: cfg.capacity_vcpus.unwrap_or(cores),
        memory_mib: cfg.capacity_memory_mib.unwrap_or(total_mib.saturating_sub(2048)),
        max_sandboxes: cfg.capacity_sandboxes.unwrap_or(0),
        compat: format!("{qemu}; {accel:?}; cpu {cpu}"),
        templates: Vec::new(),
    }
}

impl Runner {
    pub fn config(&self) -> &RunnerConfig {
        &self.cfg
    }

    pub async fn new(cfg: RunnerConfig, vmm: Arc<dyn Vmm>) -> Result<Runner, RunnerError> {
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
        let url = match &cfg.blob_url {
            Some(u) => u.clone(),
            None => format!("file://{}", cfg.data_dir.join("blobs").display()),
        };
        let blobs = BlobStore::open(&url)?;
        let mut egress = cove_net::egress::EgressConfig::from_host(cfg.egress_extra_ca.as_deref())
            .map_err(|e| RunnerError::Network(format!("egress configuration: {e:#}")))?;
        if let Some(dns) = cfg.egress_dns {
            egress.upstream_dns = dns;
        }
        let net = net::Network::new(&cfg.data_dir, egress).await?;
        let puller = cove_oci::Puller::new(cove_oci::PullConfig {
            cache_dir: cfg.cache_dir.join("oci"),
            insecure: cfg.insecure_registries.clone(),
            max_bytes: cfg.max_image_bytes,
        });
        let info = host_info(&cfg);
        let runner = Runner {
            cfg,
            vmm,
            images,
            templates,
            puller,
            blobs,
            net,
            vms: Mutex::new(HashMap::new()),
            snapshots: snapmem::SnapshotMemory::default(),
            info,
        };
        runner.drop_stale_warm().await;
        Ok(runner)
    }

    /// Drops the warm entries whose image is gone: resumed on another runner, or its sandbox
    /// deleted while this runner was away.
    async fn drop_stale_warm(&self) {
        // RAM files a crash left on their way to a warm entry.
        for f in std::fs::read_dir(self.cfg.sandbox_shm_dir()).into_iter().flatten().flatten() {
            if f.file_name().to_string_lossy().ends_with(".mem.warming") {
                let _ = std::fs::remove_file(f.path());
            }
        }
        for (id, prefix) in warm::sweep(&self.cfg) {
            if let Ok(None) = self.find_image(&prefix).await {
                warm::drop_entry(&self.cfg, &id);
                // And the namespace parked with it. No VM of this runner's runs there (a resume
                // here would have taken the entry), but another runner's on this host may: the
                // sandbox's, resumed there under the same namespace name.
                if let Err(e) = self.net.release(&id).await {
                    tracing::warn!(sandbox_id = %id, error = %e, "removing a paused sandbox's network");
                }
            }
        }
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Makes the sandbox's network and its VM from `origin`; the network is finished while
    /// QEMU starts.
    async fn create_vm(
        &self,
        req: &VmRequest,
        origin: sandbox::Origin<'_>,
        sources: fsserve::Sources,
    ) -> Result<(), RunnerError> {
        let mut network = self.net.start(&req.id, req.unsealed.network_policy.as_ref()).await?;
        let vm = sandbox::SandboxVm::create(
            &self.cfg,
            &self.images,
            self.vmm.as_ref(),
            origin,
            req,
            sources,
            &mut network,
        )
        .await;
        self.started(req, vm).await
    }

    /// Registers a VM that started, or takes its network down again if it did not.
    async fn started(
        &self,
        req: &VmRequest,
        vm: Result<sandbox::SandboxVm, RunnerError>,
    ) -> Result<(), RunnerError> {
        match vm {
            Ok(vm) => {
                self.lock().insert(req.id.clone(), Arc::new(vm));
                Ok(())
            }
            Err(e) => {
                if let Err(ne) = self.net.down(&req.id).await {
                    tracing::warn!(sandbox_id = %req.id, error = %ne, "removing the network of a failed start");
                }
                Err(e)
            }
        }
    }

    /// Reads the manifest of the image at `prefix`; an error if it is incomplete or absent.
    pub async fn image(&self, prefix: &str) -> Result<ImageManifest, RunnerError> {
        self.find_image(prefix)
            .await?
            .ok_or_else(|| RunnerError::Image(format!("image {prefix} is incomplete or missing")))
    }

    /// Benchmark baseline for pause and resume: a VM cloned from the template is saved the way
    /// QEMU does it at best (`stop` + device state) and a new QEMU is restored from that state,
    /// nothing copied or stored. Its RAM is the template's, mapped again: the restored guest is
    /// timed, not used.
    /// Returns (save, restore) durations; the VM is destroyed.
    pub async fn raw_save_restore(
        &self,
        template: &str,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<(Duration, Duration), RunnerError> {
        let (snapshot, memory) = self.clone_source(template, vcpus, memory_mib).await?;
        let origin = sandbox::Origin::Template(&snapshot, &memory);
        sandbox::raw_save_restore(&self.cfg, &self.images, self.vmm.as_ref(), origin).await
    }

    fn vm(&self, id: &str) -> Result<Arc<sandbox::SandboxVm>, RunnerError> {
        self.lock().get(id).cloned().ok_or_else(|| RunnerError::NoVm(id.to_string()))
    }

    /// For a process that is going: ends the template builds under way, their VMs, networks
    /// and files (sandbox VMs keep running, to be adopted at the next start).
    pub async fn stop_template_builds(&self) {
        self.templates.stop_builds(self.vmm.as_ref()).await;
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
        let (snapshot, memory) = self.clone_source(template, vcpus, memory_mib).await?;
        sandbox::raw_restore(
            &self.cfg,
            &self.images,
            self.vmm.as_ref(),
            sandbox::Origin::Template(&snapshot, &memory),
        )
        .await
    }

    /// What a VM of this shape is cloned from: the template snapshot (built first if needed) and
    /// the sealed memfd of its RAM.
    async fn clone_source(
        &self,
        template: &str,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<(template::TemplateSnapshot, Arc<std::os::fd::OwnedFd>), RunnerError> {
        let snapshot = self.templates.get(self.vmm.as_ref(), template, vcpus, memory_mib).await?;
        let memory = self.templates.shared_memory(&snapshot).await?;
        Ok((snapshot, memory))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<sandbox::SandboxVm>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl SandboxHost for Runner {
    fn info(&self) -> HostInfo {
        HostInfo { templates: self.templates.versions(), ..self.info.clone() }
    }

    async fn can_restore(&self, manifest: &ImageManifest) -> Result<(), RunnerError> {
        if !manifest.template_key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(RunnerError::Image("the image names a malformed template key".into()));
        }
        let template_disk = self.templates.frozen_disk(&manifest.template_key);
        sandbox::restorable(manifest, &template_disk, &self.info.compat)
    }

    /// Writable disk size of a template's sandboxes, in MiB.
    fn template_disk_mib(&self, template: &str) -> Option<u64> {
        self.templates.disk_mib(template)
    }

    /// When a system template's root filesystem was built (`cove setup`).
    fn system_template_built_at(&self, template: &str) -> Option<std::time::SystemTime> {
        let images = self.templates.images_for(template)?;
        std::fs::metadata(&images.rootfs).and_then(|m| m.modified()).ok()
    }

    /// Boots and snapshots a template shape ahead of the first sandbox that needs it.
    async fn prepare_template(&self, template: &str, vcpus: u32, memory_mib: u64) -> Result<(), RunnerError> {
        self.templates.get(self.vmm.as_ref(), template, vcpus, memory_mib).await.map(|_| ())
    }

    /// Creates the sandbox's VM from the template snapshot and gives the guest its identity.
    async fn create(&self, req: &VmRequest) -> Result<(), RunnerError> {
        let (snapshot, memory) = self.clone_source(&req.template, req.vcpus, req.memory_mib).await?;
        let origin = sandbox::Origin::Template(&snapshot, &memory);
        let sources = connect_mounts(&req.unsealed.mounts).await?;
        self.create_vm(req, origin, sources).await
    }

    /// Creates sandbox `req.id`'s VM from an image: the resume of a paused sandbox, or a new
    /// sandbox restored from a snapshot (vCPUs and memory come from the image).
    async fn create_from_image(&self, req: &VmRequest, prefix: &str) -> Result<(), RunnerError> {
        let manifest = self.image(prefix).await?;
        self.can_restore(&manifest).await?;
        // A named snapshot's restores share its RAM; a pause image's one resume has its own.
        let shared = match snapmem::is_snapshot(prefix) {
            true => Some(self.snapshots.get(&self.blobs, prefix, &manifest.memory).await?),
            false => None,
        };
        let origin = sandbox::Origin::Image {
            store: &self.blobs,
            prefix,
            manifest: &manifest,
            memory: shared.as_deref(),
        };
        self.create_vm(req, origin, lazy_mounts(&req.unsealed.mounts)).await
    }

    /// Boots a stopped sandbox afresh on its kept disk.
    async fn boot(&self, req: &VmRequest) -> Result<(), RunnerError> {
        // Its template snapshot need not exist any more; its frozen disk layer must.
        self.net.up(&req.id, req.unsealed.network_policy.as_ref()).await?;
        let sources = lazy_mounts(&req.unsealed.mounts);
        let vm = sandbox::SandboxVm::boot(&self.cfg, &self.images, self.vmm.as_ref(), req, sources).await;
        self.started(req, vm).await
    }

    /// Stores a running VM as an image under `prefix`, then runs it on or releases it. If
    /// storing fails the VM keeps running and the error is returned.
    async fn capture(
        &self,
        req: &VmRequest,
        prefix: &str,
        after: AfterCapture,
    ) -> Result<(ImageManifest, CaptureStats), RunnerError> {
        let vm = self.vm(&req.id)?;
        let captured = vm.capture(self.vmm.as_ref(), &self.blobs, prefix, req, &self.info.compat).await?;
        let (manifest, stats) = (captured.manifest.clone(), captured.stats);
        match after {
            AfterCapture::Continue => vm.carry_on(self.vmm.as_ref(), captured, req).await?,
            AfterCapture::Release => {
                drop(captured);
                self.lock().remove(&req.id);
                if vm.release(&self.cfg, self.vmm.as_ref(), prefix).await? {
                    self.net.park(&req.id);
                } else {
                    self.net.down(&req.id).await?;
                }
            }
        }
        Ok((manifest, stats))
    }

    async fn build_template(
        &self,
        source: &TemplateSource,
        progress: &(dyn for<'p> Fn(&'p cove_api::template::TemplateProgress) + Send + Sync),
    ) -> Result<BuiltTemplate, RunnerError> {
        self.build(source, progress).await
    }

    async fn remove_template(&self, id: &str) -> Result<(), RunnerError> {
        self.remove_built(id).await
    }

    /// Ends a running VM for good, keeping only its disk (the guest syncs first).
    async fn stop(&self, id: &str) -> Result<(), RunnerError> {
        let vm = self.lock().remove(id);
        match vm {
            Some(vm) => vm.stop(self.vmm.as_ref()).await?,
            None => self.end_vm(id).await?,
        }
        self.net.down(id).await
    }

    /// Ends the VM of `id` if one runs (adopted or not) and removes its run files and RAM,
    /// keeping its disk.
    async fn end_vm(&self, id: &str) -> Result<(), RunnerError> {
        self.lock().remove(id);
        sandbox::end_vm_of(&self.cfg, self.vmm.as_ref(), id).await?;
        sandbox::remove_runtime(&self.cfg, id);
        self.net.down(id).await
    }

    /// Ends the VM and removes every file, socket and cgroup of the sandbox.
    async fn destroy(&self, id: &str) -> Result<(), RunnerError> {
        warm::drop_entry(&self.cfg, id);
        let vm = self.lock().remove(id);
        match vm {
            Some(vm) => vm.destroy(self.vmm.as_ref()).await?,
            None => sandbox::SandboxVm::remove_leftovers(&self.cfg, self.vmm.as_ref(), id).await?,
        }
        self.net.remove(id).await
    }

    /// After a restart: adopts the VMs of `sandboxes` that are still running and binds their
    /// egress listeners again. Returns the ids whose VM is gone.
    async fn adopt(&self, sandboxes: &[VmRequest]) -> Vec<String> {
        let mut lost = Vec::new();
        for req in sandboxes {
            match sandbox::SandboxVm::adopt(
                &self.cfg,
                self.vmm.as_ref(),
                &req.id,
                lazy_mounts(&req.unsealed.mounts),
            ) {
                Some(vm) => {
                    // The guest sees the old connection end and resends what it waits for.
                    if let Err(e) = vm.fs.connect(Duration::from_secs(2)).await {
                        tracing::warn!(sandbox_id = %req.id, error = %e, "mounts of the sandbox not served");
                    }
                    if let Err(e) = self.net.reattach(&req.id, req.unsealed.network_policy.as_ref()).await {
                        tracing::warn!(sandbox_id = %req.id, error = %e, "sandbox network not restored");
                    }
                    self.lock().insert(req.id.clone(), Arc::new(vm));
                }
                None => lost.push(req.id.clone()),
            }
        }
        lost
    }

    /// Runs again an adopted VM that a crash left stopped in the middle of a capture.
    async fn run_again(&self, id: &str) -> Result<(), RunnerError> {
        self.vm(id)?.run_again(self.vmm.as_ref()).await
    }

    /// Sandboxes with files on this host (directories, RAM files) or a network made by this
    /// data dir (e.g. a namespace made just before the VM's files).
    async fn sandboxes_on_host(&self) -> Vec<String> {
        let names = |dir: PathBuf| -> Vec<String> {
            std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
                })
                .unwrap_or_default()
        };
        let mut ids = names(self.cfg.data_dir.join("sandboxes"));
        ids.extend(
            names(self.cfg.sandbox_shm_dir()).iter().filter_map(|f| f.strip_suffix(".mem")).map(String::from),
        );
        ids.extend(self.net.owned());
        ids.sort();
        ids.dedup();
        ids
    }

    /// The agent of a sandbox's VM, reconnecting if the channel dropped.
    async fn agent(&self, id: &str) -> Result<AgentClient, RunnerError> {
        self.vm(id)?.agent().await
    }

    /// Gives a running guest its identity again (clock, entropy; hostname and environment
    /// unchanged), e.g. for a VM whose resume a crash interrupted.
    async fn reidentify(&self, req: &VmRequest) -> Result<(), RunnerError> {
        let agent = self.vm(&req.id)?.agent().await?;
        sandbox::apply_identity(&agent, req, &self.cfg.data_dir, sandbox::Told::All).await
    }

    /// A TCP connection to `port` of the sandbox's guest, made inside its network namespace
    /// (the invoke route and presigned URLs).
    async fn connect_guest(&self, id: &str, port: u16) -> Result<GuestStream, RunnerError> {
        self.vm(id)?;
        let ns = cove_net::netns::path(&cove_net::topology::ns_name(id));
        let addr = std::net::SocketAddr::from((cove_net::addr::GUEST_IP, port));
        let stream = cove_net::netns::tcp_connect(&ns, addr)
            .await
            .map_err(|e| RunnerError::io(format!("connecting to port {port} of the sandbox"), e))?;
        Ok(Box::new(stream))
    }

    /// Checks that a mount can be attached (endpoint, credentials, bucket), attaching nothing:
    /// for a sandbox that is not running.
    async fn check_mount(&self, mount: &cove_api::sandbox::MountConfig) -> Result<(), RunnerError> {
        connect_mount(mount, 0).await.map(drop)
    }

    /// Attaches a mount to a running sandbox: connected first (so a wrong endpoint, credentials
    /// or bucket is an error and nothing changes), then mounted by the guest.
    async fn add_mount(&self, id: &str, mount: &cove_api::sandbox::MountConfig) -> Result<(), RunnerError> {
        let vm = self.vm(id)?;
        let source = connect_mount(mount, 0).await?;
        vm.fs.sources.insert(&mount.id, Arc::new(source));
        let mounted = async { sandbox::guest_mount(&vm.agent().await?, mount).await }.await;
        if mounted.is_err() {
            vm.fs.sources.remove(&mount.id);
        }
        mounted
    }

    /// Changes a mount of a running sandbox. The new settings are connected first; the guest
    /// mounts it anew when `remount` (anything but the credentials changed), so that no cached
    /// entry or page of the old view survives.
    async fn update_mount(
        &self,
        id: &str,
        mount: &cove_api::sandbox::MountConfig,
        remount: bool,
    ) -> Result<(), RunnerError> {
        let vm = self.vm(id)?;
        let source = connect_mount(mount, 0).await?;
        let agent = vm.agent().await?;
        if remount {
            sandbox::guest_unmount(&agent, &mount.id).await?;
        }
        vm.fs.sources.insert(&mount.id, Arc::new(source));
        if remount {
            sandbox::guest_mount(&agent, mount).await?;
        }
        Ok(())
    }

    /// Detaches a mount from a running sandbox: the guest unmounts it and its path goes away.
    async fn remove_mount(&self, id: &str, mount_id: &str) -> Result<(), RunnerError> {
        let vm = self.vm(id)?;
        sandbox::guest_unmount(&vm.agent().await?, mount_id).await?;
        vm.fs.sources.remove(mount_id);
        Ok(())
    }

    /// Replaces the egress policy of a running sandbox; flows the new policy forbids are cut.
    async fn set_network_policy(
        &self,
        id: &str,
        policy: Option<&cove_api::sandbox::NetworkPolicy>,
    ) -> Result<(), RunnerError> {
        self.vm(id)?;
        self.net.set_policy(id, policy).await
    }

    fn set_metadata_source(&self, source: Arc<dyn host::MetadataSource>) {
        self.net.set_metadata_source(source);
    }

    async fn lend_credentials(&self, id: &str, loan: host::Loan) -> Result<host::LoanGuard, RunnerError> {
        self.vm(id)?;
        self.net.lend(id, loan).map(|g| Box::new(g) as host::LoanGuard)
    }

    /// The manifest of the image at `prefix`, `None` when the image is incomplete or absent; an
    /// error only when the store could not answer.
    async fn find_image(&self, prefix: &str) -> Result<Option<ImageManifest>, RunnerError> {
        Ok(image::manifest(&self.blobs, prefix).await?)
    }

    /// Deletes an image (complete or not).
    async fn delete_image(&self, prefix: &str) -> Result<(), RunnerError> {
        self.snapshots.forget(prefix);
        self.blobs.delete_prefix(prefix).await?;
        Ok(())
    }

    /// Image prefixes present in the blob store (for garbage collection after a crash).
    async fn stored_images(&self) -> Result<Vec<String>, RunnerError> {
        let dirs = self.blobs.list_dirs(image::IMAGES_PREFIX).await?;
        Ok(dirs.into_iter().map(|d| format!("{}/{d}", image::IMAGES_PREFIX)).collect())
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
