//! A simulated host: [`SandboxHost`] in memory, for the control plane's tests. It needs no root,
//! no QEMU and no network, and runs a sandbox's whole life in milliseconds.
//!
//! What it keeps is split the way a real machine splits it: [`Machine`] is what outlives the
//! control plane (VM processes, disks, the image store), and a [`SimHost`] is one control-plane
//! process's view of it (the VMs it has adopted, the faults planned for it). A crash is a
//! request's task dropped mid-call; [`SimHost::restarted`] is the next process on the same
//! machine, which must recover.
//!
//! Faults: every call that changes something passes named points, `"<call>"` on entry and
//! `"<call>.done"` once its effect is in place; a VM being brought up passes
//! `"<call>.started"` (its process there, its guest not answering yet), a capture passes
//! `"capture.saved"` (VM stopped, image partial) and `"capture.stored"` (image complete, VM
//! still stopped). [`SimHost::fail_at`] makes the next pass through a
//! point an error: on entry, nothing is done; at `"capture.saved"`, the partial image is
//! removed and the VM runs on, as the contract of [`SandboxHost`] says (an error after an
//! effect is in place is not something a host reports). [`SimHost::crash_at`] makes any point
//! hang forever, as a process killed there would, and signals the test. [`SimHost::passed`] lists the points passed, so a test can run
//! an action once and then break it at every step it takes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use cove_api::sandbox::{MountConfig, NetworkPolicy, DEFAULT_TEMPLATE};
use cove_api::template::TemplateProgress;
use cove_runner::image::{ImageManifest, PackedFile, IMAGES_PREFIX};
use cove_runner::{
    AfterCapture, AgentClient, BuiltTemplate, CaptureStats, GuestStream, RunnerError, SandboxHost,
    TemplateSource, VmRequest,
};

pub mod guest;
use guest::{Disk, Guest};

/// Writable disk of the system template, MiB.
pub const SYSTEM_DISK_MIB: u64 = 2048;

/// A VM process on the simulated machine.
struct Vm {
    guest: guest::Shared,
    /// Its vCPUs run (a capture stops them until it runs the VM on or ends it).
    running: bool,
    policy: Option<NetworkPolicy>,
    /// The agent session, and what ends it.
    agent: Option<(AgentClient, tokio_util::sync::CancellationToken)>,
}

impl Vm {
    /// The guest stops answering: its session ends, requests in flight with it.
    fn cut(&mut self) {
        if let Some((_, ends)) = self.agent.take() {
            ends.cancel();
        }
    }
}

struct Image {
    guest: Guest,
    manifest: ImageManifest,
    /// Its manifest is written: it can be restored.
    complete: bool,
}

/// What outlives a control-plane process.
#[derive(Default)]
pub struct Machine {
    vms: HashMap<String, Vm>,
    /// Disks of sandboxes without a VM (stopped ones; a running VM's disk is in its guest).
    disks: HashMap<String, Disk>,
    /// The image store: shared by machines of one cluster ([`SimHost::beside`]).
    images: Arc<Mutex<BTreeMap<String, Image>>>,
    /// Templates and their disks.
    templates: HashMap<String, (u64, Disk)>,
}

/// What a test sees of the machine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Census {
    /// VMs by sandbox id, with whether their vCPUs run.
    pub vms: BTreeMap<String, bool>,
    pub disks: BTreeSet<String>,
    /// Images by prefix, with whether they are complete.
    pub images: BTreeMap<String, bool>,
}

enum Fault {
    Fail,
    Crash(Arc<tokio::sync::Notify>),
}

pub struct SimHost {
    machine: Arc<Mutex<Machine>>,
    adopted: Mutex<HashSet<String>>,
    faults: Mutex<HashMap<String, Fault>>,
    passed: Mutex<Vec<String>>,
    /// Credentials lent and not returned: (sandbox, `host:port/path/`).
    loans: Arc<Mutex<Vec<(String, String)>>>,
    /// Every loan made.
    lent: Mutex<Vec<(String, String)>>,
    info: Mutex<cove_runner::HostInfo>,
    /// How long bringing a VM up takes, one at a time (a host's boot work): zero unless a
    /// benchmark sets it.
    bring_up_time: Mutex<std::time::Duration>,
    bringing_up: tokio::sync::Semaphore,
}

/// What a simulated machine offers unless a test says otherwise: more than any test asks.
fn default_info() -> cove_runner::HostInfo {
    cove_runner::HostInfo {
        vcpus: 64,
        memory_mib: 1 << 20,
        max_sandboxes: 0,
        compat: "sim".into(),
        templates: Vec::new(),
    }
}

impl Default for SimHost {
    fn default() -> Self {
        SimHost::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The error a failed point gives: worded like a real host's, host path and QEMU output
/// included, so that tests can check none of it reaches a client.
pub fn simulated_error(point: &str) -> RunnerError {
    RunnerError::io(
        format!("step {point}"),
        std::io::Error::other("/var/lib/cove/sandboxes/sbx-0/qemu.log: QEMU said: no"),
    )
}

impl SimHost {
    /// A machine with the system template and nothing else.
    pub fn new() -> SimHost {
        let mut machine = Machine::default();
        let disk = Guest::template_disk(&Default::default());
        machine.templates.insert(DEFAULT_TEMPLATE.to_string(), (SYSTEM_DISK_MIB, disk));
        SimHost::on(Arc::new(Mutex::new(machine)))
    }

    fn on(machine: Arc<Mutex<Machine>>) -> SimHost {
        SimHost {
            machine,
            adopted: Mutex::default(),
            faults: Mutex::default(),
            passed: Mutex::default(),
            loans: Arc::default(),
            lent: Mutex::default(),
            info: Mutex::new(default_info()),
            bring_up_time: Mutex::default(),
            bringing_up: tokio::sync::Semaphore::new(1),
        }
    }

    /// Another machine of the same cluster: its own VMs and disks, the same templates, and the
    /// same image store (a bucket both reach).
    pub fn beside(&self) -> SimHost {
        let m = lock(&self.machine);
        let machine =
            Machine { images: m.images.clone(), templates: m.templates.clone(), ..Default::default() };
        SimHost::on(Arc::new(Mutex::new(machine)))
    }

    /// Makes every VM bring-up take `d`, one at a time, as a real host's boot work would.
    pub fn set_bring_up_time(&self, d: std::time::Duration) {
        *lock(&self.bring_up_time) = d;
    }

    /// What this machine reports of itself from now on (capacity, CPU and QEMU).
    pub fn set_info(&self, info: cove_runner::HostInfo) {
        *lock(&self.info) = info;
    }

    fn images(&self) -> Arc<Mutex<BTreeMap<String, Image>>> {
        lock(&self.machine).images.clone()
    }

    /// The next control-plane process on this machine: it shares the VMs, disks and images,
    /// has adopted nothing, and has no faults planned.
    pub fn restarted(&self) -> SimHost {
        SimHost::on(self.machine.clone())
    }

    /// The machine rebooted: every VM is gone (its disk stays).
    pub fn power_cycle(&self) {
        let mut m = lock(&self.machine);
        let vms: Vec<(String, Vm)> = m.vms.drain().collect();
        for (id, mut vm) in vms {
            vm.cut();
            let disk = lock(&vm.guest).disk.clone();
            m.disks.insert(id, disk);
        }
    }

    /// The next pass through `point` fails with [`simulated_error`].
    pub fn fail_at(&self, point: &str) {
        lock(&self.faults).insert(point.to_string(), Fault::Fail);
    }

    /// The next pass through `point` never returns; the answer is notified when it is reached.
    pub fn crash_at(&self, point: &str) -> Arc<tokio::sync::Notify> {
        let reached = Arc::new(tokio::sync::Notify::new());
        lock(&self.faults).insert(point.to_string(), Fault::Crash(reached.clone()));
        reached
    }

    /// The points passed so far, in order; the list is emptied.
    pub fn passed(&self) -> Vec<String> {
        std::mem::take(&mut lock(&self.passed))
    }

    pub fn census(&self) -> Census {
        let images = lock(&self.images()).iter().map(|(k, i)| (k.clone(), i.complete)).collect();
        let m = lock(&self.machine);
        Census {
            vms: m.vms.iter().map(|(id, vm)| (id.clone(), vm.running)).collect(),
            disks: m.disks.keys().cloned().collect(),
            images,
        }
    }

    /// The guest of a sandbox's VM, to look inside it (`None` without a VM).
    pub fn guest(&self, id: &str) -> Option<Guest> {
        lock(&self.machine).vms.get(id).map(|vm| lock(&vm.guest).clone())
    }

    /// The egress policy a sandbox's VM has.
    pub fn policy(&self, id: &str) -> Option<Option<NetworkPolicy>> {
        lock(&self.machine).vms.get(id).map(|vm| vm.policy.clone())
    }

    /// Credentials lent and not yet returned: (sandbox, `host:port/path/`).
    pub fn loans(&self) -> Vec<(String, String)> {
        lock(&self.loans).clone()
    }

    /// Every loan of credentials made, returned or not.
    pub fn lent(&self) -> Vec<(String, String)> {
        lock(&self.lent).clone()
    }

    async fn point(&self, name: &str) -> Result<(), RunnerError> {
        lock(&self.passed).push(name.to_string());
        let fault = lock(&self.faults).remove(name);
        match fault {
            None => Ok(()),
            Some(Fault::Fail) => Err(simulated_error(name)),
            Some(Fault::Crash(reached)) => {
                reached.notify_one();
                std::future::pending().await
            }
        }
    }

    /// Runs `f` on the adopted VM of `id`.
    fn with_vm<T>(&self, id: &str, f: impl FnOnce(&mut Vm) -> T) -> Result<T, RunnerError> {
        if !lock(&self.adopted).contains(id) {
            return Err(RunnerError::NoVm(id.to_string()));
        }
        let mut m = lock(&self.machine);
        m.vms.get_mut(id).map(f).ok_or_else(|| RunnerError::NoVm(id.to_string()))
    }

    /// Brings a VM up for `req` with `guest`, in two steps a crash can come between: its
    /// process starts (`"<call>.started"`: there, not answering), then it runs with its
    /// identity.
    async fn bring_up(&self, call: &str, req: &VmRequest, guest: Guest) -> Result<(), RunnerError> {
        let cost = *lock(&self.bring_up_time);
        if !cost.is_zero() {
            let _busy = self.bringing_up.acquire().await;
            tokio::time::sleep(cost).await;
        }
        self.start(req, guest)?;
        self.point(&format!("{call}.started")).await?;
        self.with_vm(&req.id, |vm| vm.running = true)?;
        self.point(&format!("{call}.done")).await
    }

    /// Starts a VM process for `req` with `guest` and gives it its identity; it does not run
    /// yet.
    fn start(&self, req: &VmRequest, mut guest: Guest) -> Result<(), RunnerError> {
        guest.env = req.env.clone();
        guest.hostname = req.id.clone();
        guest.mounts = req.unsealed.mounts.iter().map(|m| (m.id.clone(), m.mount_path.clone())).collect();
        let mut m = lock(&self.machine);
        if m.vms.contains_key(&req.id) {
            return Err(RunnerError::Image(format!("sandbox {} has a VM already", req.id)));
        }
        m.disks.remove(&req.id);
        let vm = Vm {
            guest: Arc::new(Mutex::new(guest)),
            running: false,
            policy: req.unsealed.network_policy.clone(),
            agent: None,
        };
        m.vms.insert(req.id.clone(), vm);
        lock(&self.adopted).insert(req.id.clone());
        Ok(())
    }

    /// Ends the VM of `id`, keeping its disk when `keep_disk`.
    fn end(&self, id: &str, keep_disk: bool) {
        lock(&self.adopted).remove(id);
        let mut m = lock(&self.machine);
        if let Some(mut vm) = m.vms.remove(id) {
            vm.cut();
            if keep_disk {
                let disk = lock(&vm.guest).disk.clone();
                m.disks.insert(id.to_string(), disk);
            }
        }
        if !keep_disk {
            m.disks.remove(id);
        }
    }
}

fn packed(name: &str, size: u64) -> PackedFile {
    PackedFile { name: name.into(), size, stored_bytes: size, data_bytes: size, chunks: Vec::new() }
}

#[async_trait]
impl SandboxHost for SimHost {
    fn info(&self) -> cove_runner::HostInfo {
        lock(&self.info).clone()
    }

    async fn can_restore(&self, manifest: &ImageManifest) -> Result<(), RunnerError> {
        let compat = lock(&self.info).compat.clone();
        if manifest.host != compat {
            return Err(RunnerError::Image(format!(
                "this image was saved on a host with another CPU or QEMU ({:?}; this host has {compat:?})",
                manifest.host
            )));
        }
        if !lock(&self.machine).templates.contains_key(&manifest.template) {
            return Err(RunnerError::UnknownTemplate(manifest.template.clone()));
        }
        Ok(())
    }

    fn template_disk_mib(&self, template: &str) -> Option<u64> {
        lock(&self.machine).templates.get(template).map(|t| t.0)
    }

    fn system_template_built_at(&self, template: &str) -> Option<std::time::SystemTime> {
        lock(&self.machine).templates.contains_key(template).then_some(std::time::UNIX_EPOCH)
    }

    async fn prepare_template(
        &self,
        template: &str,
        _vcpus: u32,
        _memory_mib: u64,
    ) -> Result<(), RunnerError> {
        self.point("prepare_template").await?;
        if !lock(&self.machine).templates.contains_key(template) {
            return Err(RunnerError::UnknownTemplate(template.to_string()));
        }
        self.point("prepare_template.done").await
    }

    async fn build_template(
        &self,
        source: &TemplateSource,
        progress: &(dyn for<'p> Fn(&'p TemplateProgress) + Send + Sync),
    ) -> Result<BuiltTemplate, RunnerError> {
        self.point("build_template").await?;
        progress(&TemplateProgress { stage: "pulling".into(), ..Default::default() });
        if source.uri.contains("missing") {
            return Err(cove_runner::OciError::NotFound(source.uri.clone()).into());
        }
        let config = cove_proto::image::ImageConfig {
            env: vec!["SIM=1".into()],
            working_dir: "/srv".into(),
            ..Default::default()
        };
        let disk_mib = 256 + source.free_mib;
        let disk = Guest::template_disk(&config);
        lock(&self.machine).templates.insert(source.id.clone(), (disk_mib, disk));
        let digest = format!("sha256:{}", hex::encode(source.uri.as_bytes()));
        self.point("build_template.done").await?;
        Ok(BuiltTemplate { digest, config, disk_mib, content_bytes: 1 << 20 })
    }

    async fn remove_template(&self, id: &str) -> Result<(), RunnerError> {
        self.point("remove_template").await?;
        lock(&self.machine).templates.remove(id).ok_or_else(|| RunnerError::UnknownTemplate(id.into()))?;
        self.point("remove_template.done").await
    }

    async fn create(&self, req: &VmRequest) -> Result<(), RunnerError> {
        self.point("create").await?;
        let disk = lock(&self.machine).templates.get(&req.template).map(|t| t.1.clone());
        let disk = disk.ok_or_else(|| RunnerError::UnknownTemplate(req.template.clone()))?;
        self.bring_up("create", req, Guest::booted(disk)).await
    }

    async fn create_from_image(&self, req: &VmRequest, image: &str) -> Result<(), RunnerError> {
        self.point("create_from_image").await?;
        let guest = match lock(&self.images()).get(image) {
            Some(i) if i.complete => i.guest.clone(),
            _ => return Err(RunnerError::Image(format!("image {image} is incomplete or missing"))),
        };
        self.bring_up("create_from_image", req, guest).await
    }

    async fn boot(&self, req: &VmRequest) -> Result<(), RunnerError> {
        self.point("boot").await?;
        let disk = lock(&self.machine).disks.get(&req.id).cloned();
        let disk = disk.ok_or_else(|| RunnerError::Image(format!("sandbox {} has no disk", req.id)))?;
        self.bring_up("boot", req, Guest::booted(disk)).await
    }

    async fn capture(
        &self,
        req: &VmRequest,
        image: &str,
        after: AfterCapture,
    ) -> Result<(ImageManifest, CaptureStats), RunnerError> {
        let guest = self.with_vm(&req.id, |vm| vm.guest.clone())?;
        self.point("capture").await?;
        self.with_vm(&req.id, |vm| {
            vm.running = false;
            vm.cut();
        })?;
        let snapshot = lock(&guest).clone();
        let bytes: u64 = snapshot.disk.files.values().map(|f| f.len() as u64).sum();
        let manifest = ImageManifest {
            format: 1,
            template: req.template.clone(),
            template_key: format!("sim-{}", req.template.replace('/', "-")),
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            created_unix: chrono::Utc::now().timestamp(),
            machine: "sim".into(),
            host: lock(&self.info).compat.clone(),
            state: packed("state", 1),
            memory: packed("memory", 1),
            disk: packed("disk", bytes),
            hot: Vec::new(),
            first: Vec::new(),
            told: None,
        };
        let stored = Image { guest: snapshot, manifest: manifest.clone(), complete: false };
        lock(&self.images()).insert(image.to_string(), stored);
        if let Err(e) = self.point("capture.saved").await {
            // A store that failed: the partial image is removed and the VM runs on.
            lock(&self.images()).remove(image);
            self.with_vm(&req.id, |vm| vm.running = true)?;
            return Err(e);
        }
        if let Some(i) = lock(&self.images()).get_mut(image) {
            i.complete = true;
        }
        self.point("capture.stored").await?;
        match after {
            AfterCapture::Continue => self.with_vm(&req.id, |vm| vm.running = true)?,
            AfterCapture::Release => self.end(&req.id, false),
        }
        self.point("capture.done").await?;
        let stats = CaptureStats { stored_bytes: manifest.stored_bytes(), ..Default::default() };
        Ok((manifest, stats))
    }

    async fn stop(&self, id: &str) -> Result<(), RunnerError> {
        self.point("stop").await?;
        self.end(id, true);
        self.point("stop.done").await
    }

    async fn end_vm(&self, id: &str) -> Result<(), RunnerError> {
        self.point("end_vm").await?;
        self.end(id, true);
        self.point("end_vm.done").await
    }

    async fn destroy(&self, id: &str) -> Result<(), RunnerError> {
        self.point("destroy").await?;
        self.end(id, false);
        self.point("destroy.done").await
    }

    async fn adopt(&self, sandboxes: &[VmRequest]) -> Vec<String> {
        let m = lock(&self.machine);
        let mut adopted = lock(&self.adopted);
        let mut lost = Vec::new();
        for req in sandboxes {
            if m.vms.contains_key(&req.id) {
                adopted.insert(req.id.clone());
            } else {
                lost.push(req.id.clone());
            }
        }
        lost
    }

    async fn run_again(&self, id: &str) -> Result<(), RunnerError> {
        self.point("run_again").await?;
        self.with_vm(id, |vm| vm.running = true)?;
        self.point("run_again.done").await
    }

    async fn sandboxes_on_host(&self) -> Vec<String> {
        let m = lock(&self.machine);
        let ids: BTreeSet<&String> = m.vms.keys().chain(m.disks.keys()).collect();
        ids.into_iter().cloned().collect()
    }

    async fn agent(&self, id: &str) -> Result<AgentClient, RunnerError> {
        let (guest, cached, running) =
            self.with_vm(id, |vm| (vm.guest.clone(), vm.agent.as_ref().map(|a| a.0.clone()), vm.running))?;
        if !running {
            return Err(cove_runner::AgentError::Connect("the guest does not answer".into()).into());
        }
        if let Some(agent) = cached.filter(|a| !a.is_closed()) {
            return Ok(agent);
        }
        let ends = tokio_util::sync::CancellationToken::new();
        let agent = guest::connect(guest, ends.clone()).await?;
        self.with_vm(id, |vm| {
            vm.cut();
            vm.agent = Some((agent.clone(), ends));
        })?;
        Ok(agent)
    }

    async fn reidentify(&self, req: &VmRequest) -> Result<(), RunnerError> {
        self.point("reidentify").await?;
        let (guest, running) = self.with_vm(&req.id, |vm| (vm.guest.clone(), vm.running))?;
        if !running {
            return Err(cove_runner::AgentError::Connect("the guest does not answer".into()).into());
        }
        lock(&guest).env = req.env.clone();
        Ok(())
    }

    async fn connect_guest(&self, id: &str, port: u16) -> Result<GuestStream, RunnerError> {
        self.with_vm(id, |_| ())?;
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        Err(RunnerError::io(format!("connecting to port {port} of the sandbox"), refused))
    }

    async fn check_mount(&self, _mount: &MountConfig) -> Result<(), RunnerError> {
        self.point("check_mount").await
    }

    async fn add_mount(&self, id: &str, mount: &MountConfig) -> Result<(), RunnerError> {
        self.point("add_mount").await?;
        let guest = self.with_vm(id, |vm| vm.guest.clone())?;
        lock(&guest).mounts.insert(mount.id.clone(), mount.mount_path.clone());
        self.point("add_mount.done").await
    }

    async fn update_mount(&self, id: &str, mount: &MountConfig, _remount: bool) -> Result<(), RunnerError> {
        self.point("update_mount").await?;
        let guest = self.with_vm(id, |vm| vm.guest.clone())?;
        lock(&guest).mounts.insert(mount.id.clone(), mount.mount_path.clone());
        self.point("update_mount.done").await
    }

    async fn remove_mount(&self, id: &str, mount_id: &str) -> Result<(), RunnerError> {
        self.point("remove_mount").await?;
        let guest = self.with_vm(id, |vm| vm.guest.clone())?;
        lock(&guest).mounts.remove(mount_id);
        self.point("remove_mount.done").await
    }

    async fn set_network_policy(&self, id: &str, policy: Option<&NetworkPolicy>) -> Result<(), RunnerError> {
        self.point("set_network_policy").await?;
        self.with_vm(id, |vm| vm.policy = policy.cloned())?;
        self.point("set_network_policy.done").await
    }

    /// The simulated host has no guest network to serve metadata on; the real one's is tested
    /// in `crates/cove/tests/metadata.rs`.
    fn set_metadata_source(&self, _source: Arc<dyn cove_runner::host::MetadataSource>) {}

    async fn lend_credentials(
        &self,
        id: &str,
        loan: cove_runner::host::Loan,
    ) -> Result<cove_runner::host::LoanGuard, RunnerError> {
        self.with_vm(id, |_| ())?;
        struct Returned(Arc<Mutex<Vec<(String, String)>>>, (String, String));
        impl Drop for Returned {
            fn drop(&mut self) {
                let mut loans = lock(&self.0);
                if let Some(i) = loans.iter().position(|l| *l == self.1) {
                    loans.remove(i);
                }
            }
        }
        let entry = (id.to_string(), format!("{}:{}{}", loan.host, loan.port, loan.path_prefix));
        lock(&self.loans).push(entry.clone());
        lock(&self.lent).push(entry.clone());
        Ok(Box::new(Returned(self.loans.clone(), entry)))
    }

    async fn find_image(&self, image: &str) -> Result<Option<ImageManifest>, RunnerError> {
        Ok(lock(&self.images()).get(image).filter(|i| i.complete).map(|i| i.manifest.clone()))
    }

    async fn delete_image(&self, image: &str) -> Result<(), RunnerError> {
        self.point("delete_image").await?;
        lock(&self.images()).remove(image);
        self.point("delete_image.done").await
    }

    async fn stored_images(&self) -> Result<Vec<String>, RunnerError> {
        Ok(lock(&self.images()).keys().filter(|k| k.starts_with(IMAGES_PREFIX)).cloned().collect())
    }
}
