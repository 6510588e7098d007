//! One sandbox's VM on this host: its files, its QEMU process and its agent connection.
//!
//! Files: `<data>/sandboxes/<id>/disk.qcow2` (writable layer over the template's frozen one),
//! `<data>/sandboxes/<id>/vm.json` (which template snapshot it runs on),
//! `<data>/sandboxes/<id>/run/` (QMP and agent sockets, console log, pid file, saved state),
//! and the guest RAM at `<shm>/<id>.mem`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cove_blob::BlobStore;
use std::os::fd::AsRawFd;

use cove_vmm::{Boot, GuestMemory, VmHandle, VmSpec, Vmm};
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use crate::agent::{AgentClient, AgentError, Greeting};
use crate::fsserve::{FsHost, Sources};
use crate::image::{told_digest, CaptureStats, ImageManifest, IMAGE_FORMAT};
use crate::images::{Images, KERNEL_CMDLINE};
use crate::net::NetworkFinish;
use crate::template::TemplateSnapshot;
use crate::{RunnerConfig, RunnerError, VmRequest, AGENT_WAIT_BOOT, AGENT_WAIT_RESTORE};

/// How long the guest may take to apply its identity after a restore (generous: a loaded
/// 2-core host running TCG guests can stall a guest for seconds).
const IDENTITY_WAIT: Duration = Duration::from_secs(30);
/// How long a reconnect to a running guest may take.
const AGENT_WAIT_RECONNECT: Duration = Duration::from_secs(10);
/// How long the agent may take to park before a capture (it first finishes requests in flight).
const PARK_WAIT: Duration = Duration::from_secs(10);

/// `vm.json`: what a sandbox's VM was made from, needed to describe an image of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmMeta {
    template: String,
    template_key: String,
    vcpus: u32,
    memory_mib: u64,
}

/// Where a new VM's disk, RAM and device state come from.
pub enum Origin<'a> {
    /// A clone of a template snapshot (create), with the sealed memfd of its RAM.
    Template(&'a TemplateSnapshot, &'a std::os::fd::OwnedFd),
    /// An image in the blob store (resume of a paused sandbox, restore of a snapshot), with the
    /// sealed memfd of its RAM when that is shared (a named snapshot's: see `snapmem`).
    Image {
        store: &'a BlobStore,
        prefix: &'a str,
        manifest: &'a ImageManifest,
        memory: Option<&'a std::os::fd::OwnedFd>,
    },
}

impl Origin<'_> {
    /// What the guest had been told when its image was saved, if known.
    fn told(&self) -> Option<&str> {
        match self {
            Origin::Image { manifest, .. } => manifest.told.as_deref(),
            Origin::Template(..) => None,
        }
    }
}

pub struct SandboxVm {
    handle: VmHandle,
    dir: PathBuf,
    data_dir: PathBuf,
    /// The guest's RAM file: its tmpfs file ([`Memory::Shared`]), or `<dir>/memory`.
    memory_file: PathBuf,
    memory: Memory,
    agent: tokio::sync::Mutex<Option<AgentClient>>,
    /// The host end of the guest's mounts.
    pub fs: FsHost,
    /// The pieces of its RAM the guest touched from its restore until its agent answered (none
    /// for a boot, or a VM adopted from another runner process): what its next resume needs
    /// first. Filled in the background after the restore.
    resume_set: Arc<Mutex<Vec<u32>>>,
    /// What the guest has been told ([`told_digest`]), if known: recorded in its images.
    told: Option<String>,
}

/// A VM stopped by a capture: its state is stored, its agent parked on `socket`.
pub struct Captured {
    pub manifest: ImageManifest,
    pub stats: CaptureStats,
    socket: UnixStream,
}

/// How a VM's RAM is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Memory {
    /// Its RAM file on tmpfs, mapped shared: the file is the RAM (a cold resume, a boot).
    Shared,
    /// `<dir>/memory` mapped copy-on-write (a warm resume): the guest's RAM is that file and the
    /// pages it wrote since, which a capture writes back into the file.
    Own,
    /// Its template's or named snapshot's sealed memfd mapped copy-on-write (a create, a
    /// restore): those pages, shared with every sandbox cloned from the same until written, and
    /// the pages the guest wrote. A capture makes `<dir>/memory` from both.
    Template,
    /// The image's RAM served as the guest touches it (`lazymem`, a cold resume), mapped
    /// copy-on-write. A capture unpacks the image's RAM into `<dir>/memory` and writes the
    /// pages the guest wrote over it.
    Lazy,
}

impl Memory {
    /// How a VM holding its RAM so maps it (for `memfile`; a lazily served RAM must have been
    /// unpacked into the RAM file first to be written back).
    fn base(self) -> crate::memfile::Base {
        match self {
            Memory::Shared => crate::memfile::Base::Shared,
            Memory::Own => crate::memfile::Base::InPlace,
            Memory::Template => crate::memfile::Base::Template,
            Memory::Lazy => crate::memfile::Base::Lazy,
        }
    }
}

/// A sandbox's directory (disk, run files) and its RAM file on tmpfs. (A VM restored warm maps
/// `<dir>/memory` instead: see [`private_memory_file`].)
fn paths(cfg: &RunnerConfig, id: &str) -> (PathBuf, PathBuf) {
    (cfg.data_dir.join("sandboxes").join(id), cfg.sandbox_shm_dir().join(format!("{id}.mem")))
}

/// How a VM of `spec` (sandbox directory `dir`) holds its RAM, and its RAM file (for a VM made
/// from a template, the one a capture writes).
fn held(spec: &VmSpec, dir: &Path) -> (Memory, PathBuf) {
    match &spec.memory {
        GuestMemory::Shared(p) => (Memory::Shared, p.clone()),
        GuestMemory::Private(p) if *p == crate::lazymem::ram_path(dir) => {
            (Memory::Lazy, private_memory_file(dir))
        }
        GuestMemory::Private(p) => (Memory::Own, p.clone()),
        GuestMemory::PrivateFd(_) => (Memory::Template, private_memory_file(dir)),
    }
}

/// The RAM file a warm resume maps copy-on-write, on disk in the sandbox's directory.
fn private_memory_file(dir: &Path) -> PathBuf {
    dir.join(crate::warm::MEMORY)
}

fn spec(
    cfg: &RunnerConfig,
    images: &Images,
    id: &str,
    vcpus: u32,
    memory_mib: u64,
    memory: GuestMemory,
) -> VmSpec {
    let dir = paths(cfg, id).0;
    VmSpec {
        name: id.to_string(),
        vcpus,
        memory_mib,
        kernel: images.kernel.clone(),
        initrd: images.initrd.clone(),
        cmdline: KERNEL_CMDLINE.to_string(),
        disk: dir.join("disk.qcow2"),
        memory,
        run_dir: dir.join("run"),
        overhead_mib: cfg.overhead_mib,
        netns: cove_net::netns::path(&cove_net::topology::ns_name(id)),
    }
}

/// What a guest is told after a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Told {
    /// Everything: a machine new to this host or to this sandbox (a clone of a template or a
    /// snapshot, a resume from an image that may come from another runner).
    All,
    /// The clock and fresh entropy only: the same machine going on, on the runner that ran it
    /// (a warm resume, a VM running on after a snapshot), whose hostname, trusted CA and disk
    /// have not changed. Writing those files again costs the guest more than the rest.
    ClockOnly,
}

fn identity(req: &VmRequest, data_dir: &Path, told: Told) -> cove_proto::Identity {
    let mut env = req.env.clone();
    crate::net::Network::guest_env(&mut env);
    let all = told == Told::All;
    let (unix_time_ns, entropy) = crate::agent::host_clock();
    cove_proto::Identity {
        hostname: if all { req.id.clone() } else { String::new() },
        env,
        trust_pem: if all { crate::net::trust_pem(data_dir, &req.id) } else { None },
        unix_time_ns,
        entropy_hex: hex::encode(entropy),
        disk_bytes: all.then_some(req.disk_mib << 20),
    }
}

/// Grows the VM's disk to the sandbox's size when it is smaller (a new sandbox that asked for
/// more than its template's disk). The guest grows its filesystem when it gets its identity.
async fn grow_disk(vmm: &dyn Vmm, vm: &VmHandle, disk: &Path, mib: u64) -> Result<(), RunnerError> {
    let have = crate::images::qcow2_virtual_size(disk).ok_or_else(|| {
        RunnerError::io("reading the disk's size", std::io::Error::other("not a qcow2 disk"))
    })?;
    if mib << 20 > have {
        vmm.resize_disk(vm, mib << 20).await?;
    }
    Ok(())
}

/// Has the guest mount `m` (a no-op if it has it at that path already: sent after every
/// restore, so a guest restored from an image has every mount of its sandbox).
pub async fn guest_mount(agent: &AgentClient, m: &cove_api::sandbox::MountConfig) -> Result<(), RunnerError> {
    agent.mount(&m.id, &m.mount_path).await?;
    Ok(())
}

pub async fn guest_unmount(agent: &AgentClient, mount_id: &str) -> Result<(), RunnerError> {
    agent.unmount(mount_id).await?;
    Ok(())
}

async fn guest_mounts(agent: &AgentClient, req: &VmRequest) -> Result<(), RunnerError> {
    for m in &req.unsealed.mounts {
        guest_mount(agent, m).await?;
    }
    Ok(())
}

/// Gives the guest its identity: hostname, environment, the host's clock, fresh entropy, the
/// egress CA to trust. Sent after every restore and resume, so that the clock is right and
/// clones differ.
pub async fn apply_identity(
    agent: &AgentClient,
    req: &VmRequest,
    data_dir: &Path,
    told: Told,
) -> Result<(), RunnerError> {
    tokio::time::timeout(IDENTITY_WAIT, agent.set_identity(&identity(req, data_dir, told)))
        .await
        .map_err(|_| AgentError::Request("the guest did not accept its identity in time".into()))??;
    Ok(())
}

fn write_meta(dir: &Path, meta: &VmMeta) -> Result<(), RunnerError> {
    let bytes = serde_json::to_vec(meta)
        .map_err(|e| RunnerError::io("encoding vm.json", std::io::Error::other(e)))?;
    std::fs::write(dir.join("vm.json"), bytes).map_err(|e| RunnerError::io("writing vm.json", e))
}

fn io_join<T>(r: Result<std::io::Result<T>, tokio::task::JoinError>, what: &str) -> Result<T, RunnerError> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(RunnerError::io(what, e)),
        Err(e) => Err(RunnerError::io(what, std::io::Error::other(e))),
    }
}

/// A VM started from its origin (see `SandboxVm::start_vm`).
struct Started {
    spec: VmSpec,
    handle: VmHandle,
    greeting: Option<Greeting>,
    fs: Option<UnixStream>,
    /// The check of every chunk of a RAM served lazily, under way while the guest runs: every
    /// chunk the guest reads is checked as it is decoded, and this one tells of a damaged chunk
    /// anywhere before the resume answers, so that the sandbox stays paused rather than fail
    /// later when its guest touches it.
    checked: Option<crate::lazymem::Served>,
}

/// Waits for `checked` (see [`Started::checked`]), if there is one.
async fn memory_checked(checked: Option<crate::lazymem::Served>) -> Result<(), RunnerError> {
    match checked {
        Some(ram) => ram.checked().await,
        None => Ok(()),
    }
}

impl SandboxVm {
    /// Makes the sandbox's VM from `origin` and gives the guest its identity. On failure every
    /// file and process of the attempt is gone.
    pub async fn create(
        cfg: &RunnerConfig,
        images: &Images,
        vmm: &dyn Vmm,
        origin: Origin<'_>,
        req: &VmRequest,
        sources: Sources,
        network: &mut NetworkFinish,
    ) -> Result<SandboxVm, RunnerError> {
        let result = Self::create_inner(cfg, images, vmm, origin, req, sources, network).await;
        if let Err(e) = &result {
            // Nothing of the network may still be in the making when the caller removes it.
            let _ = network.wait().await;
            Self::log_failure(cfg, &req.id, e, "restore failed");
            let _ = Self::remove_leftovers(cfg, vmm, &req.id).await;
        }
        result
    }

    fn log_failure(cfg: &RunnerConfig, id: &str, e: &RunnerError, what: &str) {
        // The guest's console is the best clue to why; it goes with the files.
        let (dir, _) = paths(cfg, id);
        let console = std::fs::read(dir.join("run/console.log")).unwrap_or_default();
        let tail = String::from_utf8_lossy(&console[console.len().saturating_sub(4096)..]).into_owned();
        tracing::warn!(sandbox_id = %id, error = %e, console = %tail, "{what}");
    }

    /// Lays out the sandbox's disk and RAM from `origin` and starts QEMU on them with the
    /// origin's device state. QEMU takes tens of milliseconds to start, so the RAM is filled
    /// and the `network` finished meanwhile, the RAM into a file already at its full size, and
    /// QEMU gets the state only once all are done. The guest is greeted before it runs; the
    /// greeting brings it the clock (a warm resume) or `identity` if given (anything else), once
    /// it runs and its disk has the sandbox's size. A RAM served lazily is checked whole while
    /// the guest runs (see [`Started::checked`]).
    #[allow(clippy::too_many_arguments)]
    async fn start_vm(
        cfg: &RunnerConfig,
        images: &Images,
        vmm: &dyn Vmm,
        origin: &Origin<'_>,
        id: &str,
        network: &mut NetworkFinish,
        identity: Option<&cove_proto::Identity>,
    ) -> Result<Started, RunnerError> {
        let meta = match origin {
            Origin::Template(t, _) => VmMeta {
                template: t.template.clone(),
                template_key: t.key.clone(),
                vcpus: t.vcpus,
                memory_mib: t.memory_mib,
            },
            Origin::Image { manifest, .. } => VmMeta {
                template: manifest.template.clone(),
                template_key: manifest.template_key.clone(),
                vcpus: manifest.vcpus,
                memory_mib: manifest.memory_mib,
            },
        };
        let dir = paths(cfg, id).0;
        let state_file = dir.join("run").join(crate::warm::STATE);
        std::fs::create_dir_all(dir.join("run")).map_err(|e| RunnerError::io("creating sandbox dir", e))?;
        // A resume of the image this runner paused last finds its files here, RAM on disk.
        let warm = match origin {
            Origin::Image { prefix, memory: None, .. } => crate::warm::take(
                cfg,
                id,
                prefix,
                &private_memory_file(&dir),
                &dir.join(crate::warm::DISK),
                &state_file,
            ),
            Origin::Template(..) | Origin::Image { memory: Some(_), .. } => false,
        };
        // A cold resume serves the image's RAM as the guest touches it, if it can; the disk is
        // unpacked meanwhile.
        let lazy = match (origin, &cfg.lazy_memory) {
            (Origin::Image { store, prefix, manifest, memory: None }, Some(helper)) if !warm => {
                let table = crate::lazymem::LazyTable {
                    image: prefix.to_string(),
                    file: manifest.memory.clone(),
                    hot: manifest.hot.clone(),
                    first: manifest.first.clone(),
                };
                let disk = dir.join("disk.qcow2");
                let t0 = Instant::now();
                let ms = || t0.elapsed().as_millis() as u64;
                let ((disk, disk_ms), (ram, ram_ms)) = tokio::join!(
                    async { (cove_blob::unpack_file(store, prefix, &manifest.disk, &disk).await, ms()) },
                    async { (crate::lazymem::prepare(store, prefix, table, &dir, helper).await, ms()) },
                );
                tracing::debug!(disk_ms, ram_ms, "disk unpacked and RAM served");
                disk?;
                ram.inspect_err(|e| {
                    tracing::warn!(sandbox_id = %id, error = %e, "guest memory not served lazily; unpacking it");
                })
                .ok()
            }
            _ => None,
        };
        let memory = match origin {
            Origin::Template(_, fd) | Origin::Image { memory: Some(fd), .. } => {
                GuestMemory::PrivateFd(fd.as_raw_fd())
            }
            Origin::Image { .. } if warm => GuestMemory::Private(private_memory_file(&dir)),
            Origin::Image { .. } => match &lazy {
                Some(ram) => GuestMemory::Private(ram.path.clone()),
                None => GuestMemory::Shared(paths(cfg, id).1),
            },
        };
        let spec = spec(cfg, images, id, meta.vcpus, meta.memory_mib, memory);
        write_meta(&dir, &meta)?;
        let (state_file, fill) = match origin {
            Origin::Image { .. } if warm => {
                tracing::debug!(sandbox_id = %id, "resuming from the warm image: RAM mapped, nothing unpacked");
                (state_file, tokio::spawn(async { Ok(()) }))
            }
            Origin::Template(t, _) => {
                // The template's RAM is mapped as it is: nothing to copy.
                std::fs::copy(t.overlay(), &spec.disk)
                    .map_err(|e| RunnerError::io("creating disk overlay", e))?;
                (t.state_file(), tokio::spawn(async { Ok(()) }))
            }
            Origin::Image { store, prefix, manifest, memory } if memory.is_some() || lazy.is_some() => {
                // The RAM is the snapshot's shared memfd, or the image's served lazily, mapped as
                // it is: only the disk and the device state are unpacked, the latter while QEMU
                // starts.
                if memory.is_some() {
                    cove_blob::unpack_file(store, prefix, &manifest.disk, &spec.disk).await?;
                    tracing::debug!(sandbox_id = %id, "restoring a snapshot onto its shared RAM");
                } else {
                    tracing::debug!(sandbox_id = %id, "resuming with the image's RAM served lazily");
                }
                let (store, prefix, state, dest) =
                    ((*store).clone(), prefix.to_string(), manifest.state.clone(), state_file.clone());
                let fill = tokio::spawn(async move {
                    cove_blob::unpack_file(&store, &prefix, &state, &dest).await?;
                    Ok::<(), RunnerError>(())
                });
                (state_file, fill)
            }
            Origin::Image { store, prefix, manifest, .. } => {
                // QEMU opens the disk when it starts: that one comes first. Device state and RAM
                // are needed only at the restore, so they are filled while QEMU starts.
                cove_blob::unpack_file(store, prefix, &manifest.disk, &spec.disk).await?;
                let shm_file = paths(cfg, id).1;
                let f = std::fs::File::create(&shm_file)
                    .map_err(|e| RunnerError::io("creating memory file", e))?;
                f.set_len(manifest.memory.size).map_err(|e| RunnerError::io("sizing memory file", e))?;
                let (store, prefix, memory, dest) =
                    ((*store).clone(), prefix.to_string(), manifest.memory.clone(), shm_file);
                let (state, state_dest) = (manifest.state.clone(), state_file.clone());
                let fill = tokio::spawn(async move {
                    let (m, s) = tokio::join!(
                        cove_blob::unpack_file(&store, &prefix, &memory, &dest),
                        cove_blob::unpack_file(&store, &prefix, &state, &state_dest),
                    );
                    m?;
                    s?;
                    Ok::<(), RunnerError>(())
                });
                (state_file, fill)
            }
        };
        let t0 = Instant::now();
        let spawned = vmm.spawn(&spec, &Boot::Restore { state_file: state_file.clone() }).await;
        let spawn_ms = t0.elapsed().as_millis() as u64;
        let (filled, networked) = tokio::join!(fill, network.wait());
        let filled = filled
            .map_err(|e| RunnerError::io("filling guest memory", std::io::Error::other(e)))
            .and_then(|f| f.and(networked));
        let handle = match spawned {
            Ok(h) => h,
            Err(e) => return Err(e.into()),
        };
        // Greet the agent while the VM still waits for its state: the guest then resumes with
        // its host connected and the greeting queued, instead of first seeing the saved
        // connection vanish (which could cut the new one short). A warm resume is the same
        // machine going on: the greeting brings it the clock, and nothing else need be said.
        let socket = spec.agent_socket();
        // So is a resume from an image saved after the guest was told what it would be told
        // now: checking what it has would cost the guest just restored under emulation ~10 ms.
        let told_before = origin.told();
        let has_identity =
            warm || (told_before.is_some() && told_before == identity.map(told_digest).as_deref());
        let greeting = if has_identity {
            AgentClient::greet_with_clock(&socket).await
        } else if identity.and_then(cove_proto::identity_message).is_some() {
            AgentClient::greet_with_identity(&socket).await
        } else {
            AgentClient::greet(&socket).await
        };
        let mut greeting = greeting.ok();
        let fs = crate::fsserve::greet(&spec.run_dir.join("fs.sock")).await.ok();
        tracing::debug!(
            spawn_ms,
            filled_ms = t0.elapsed().as_millis() as u64,
            "QEMU started and memory filled"
        );
        if matches!(origin, Origin::Image { .. }) {
            fault_point("restore.unpacked");
        }
        let restored = match filled {
            Ok(()) => vmm.restore(&handle, &state_file).await.map_err(RunnerError::from),
            Err(e) => Err(e),
        };
        // The guest waits for its disk to have the size the identity says.
        let grown = match (restored, identity.and_then(|i| i.disk_bytes)) {
            (Ok(()), Some(bytes)) => grow_disk(vmm, &handle, &spec.disk, bytes >> 20).await,
            (restored, _) => restored,
        };
        if let Err(e) = grown {
            let _ = vmm.destroy(&handle).await;
            // A damaged chunk the guest touched ended its QEMU: the check names it.
            return Err(memory_checked(lazy).await.err().unwrap_or(e));
        }
        if let Some(g) = greeting.as_mut() {
            let sent = match identity {
                Some(identity) => g.send_clock().await.and(g.send_identity(identity).await),
                None => g.send_clock().await,
            };
            if sent.is_err() {
                // Connecting afresh below tells the guest everything instead.
                greeting = None;
            }
        }
        // Served lazily, the RAM is checked whole while the guest runs.
        Ok(Started { spec, handle, greeting, fs, checked: lazy })
    }

    async fn create_inner(
        cfg: &RunnerConfig,
        images: &Images,
        vmm: &dyn Vmm,
        origin: Origin<'_>,
        req: &VmRequest,
        sources: Sources,
        network: &mut NetworkFinish,
    ) -> Result<SandboxVm, RunnerError> {
        let t0 = Instant::now();
        let told_all = identity(req, &cfg.data_dir, Told::All);
        let Started { spec, handle, greeting, fs, checked } =
            Self::start_vm(cfg, images, vmm, &origin, &req.id, network, Some(&told_all)).await?;
        let attached = async {
            let t_vm = t0.elapsed();
            let clock_only = greeting.as_ref().is_some_and(|g| !g.tells_identity());
            let dir = paths(cfg, &req.id).0;
            let (memory, memory_file) = held(&spec, &dir);
            let mut vm = SandboxVm {
                handle,
                dir,
                data_dir: cfg.data_dir.clone(),
                memory_file,
                memory,
                agent: tokio::sync::Mutex::new(None),
                fs: FsHost::new(&spec.run_dir, sources),
                resume_set: Default::default(),
                // What it had when its image was saved, unless told afresh (below).
                told: origin.told().map(str::to_string),
            };
            match fs {
                Some(stream) => vm.fs.serve(stream).await,
                None => vm
                    .fs
                    .connect(AGENT_WAIT_RECONNECT)
                    .await
                    .map_err(|e| RunnerError::io("connecting to the VM's fs port", e))?,
            }
            let greeted = match greeting {
                Some(g) => {
                    tokio::time::timeout(AGENT_WAIT_RESTORE, g.finish_told()).await.ok().and_then(Result::ok)
                }
                None => None,
            };
            let (agent, told_in_greeting) = match greeted {
                Some(a) => a,
                None => (AgentClient::connect(&spec.agent_socket(), AGENT_WAIT_RESTORE).await?, false),
            };
            let t_agent = t0.elapsed();
            if told_in_greeting && !clock_only {
                vm.told = Some(told_digest(&told_all));
            }
            vm.record_resume_set(req.memory_mib << 20);
            // The greeting brought the guest what it needs, unless its agent predates that: a warm
            // resume is the same machine going on, on the runner that ran it, and needs the clock
            // and entropy only; anything else, everything.
            if !told_in_greeting {
                grow_disk(vmm, &vm.handle, &spec.disk, req.disk_mib).await?;
                let told = if memory == Memory::Own { Told::ClockOnly } else { Told::All };
                apply_identity(&agent, req, &cfg.data_dir, told).await?;
                if told == Told::All {
                    vm.told = Some(told_digest(&told_all));
                }
            }
            guest_mounts(&agent, req).await?;
            tracing::debug!(
                vm_ms = t_vm.as_millis() as u64,
                agent_ms = t_agent.as_millis() as u64,
                identity_ms = t0.elapsed().as_millis() as u64,
                told_in_greeting,
                clock_only,
                "sandbox VM restored"
            );
            *vm.agent.lock().await = Some(agent);
            Ok::<_, RunnerError>(vm)
        };
        // The resume answers only once the RAM has passed the check. A damaged chunk that the
        // guest touched ends its QEMU, and the attach would wait long for the agent before it
        // failed: whichever ends first, a failed check is the answer.
        let (mut attached, mut checked) = (std::pin::pin!(attached), std::pin::pin!(memory_checked(checked)));
        tokio::select! {
            attached = &mut attached => checked.await.and(attached),
            passed = &mut checked => passed.and(attached.await),
        }
    }

    /// Reads, in the background, which pieces of its RAM the guest has touched by now (see
    /// `resume_set`). A VM that has gone meanwhile leaves the set empty.
    fn record_resume_set(&self, len: u64) {
        let (pid, file, base, set) =
            (self.handle.pid, self.memory_file.clone(), self.memory.base(), self.resume_set.clone());
        tokio::task::spawn_blocking(move || match crate::memfile::touched(pid, len, &file, base) {
            Ok(touched) => *set.lock().unwrap_or_else(|p| p.into_inner()) = touched,
            Err(e) => tracing::debug!(pid, error = %e, "the pages a restore touched not read"),
        });
    }

    /// Boots a fresh VM on the disk a stopped sandbox kept (no memory state: processes are
    /// gone, files stay).
    pub async fn boot(
        cfg: &RunnerConfig,
        images: &Images,
        vmm: &dyn Vmm,
        req: &VmRequest,
        sources: Sources,
    ) -> Result<SandboxVm, RunnerError> {
        let (dir, memory_file) = paths(cfg, &req.id);
        let spec =
            spec(cfg, images, &req.id, req.vcpus, req.memory_mib, GuestMemory::Shared(memory_file.clone()));
        if !spec.disk.exists() {
            return Err(RunnerError::Image(format!("sandbox {} has no disk on this host", req.id)));
        }
        let result = async {
            let _ = std::fs::remove_dir_all(&spec.run_dir);
            let _ = std::fs::remove_file(private_memory_file(&dir));
            std::fs::create_dir_all(&spec.run_dir).map_err(|e| RunnerError::io("creating run dir", e))?;
            let f = std::fs::File::create(&memory_file)
                .map_err(|e| RunnerError::io("creating memory file", e))?;
            f.set_len(req.memory_mib << 20).map_err(|e| RunnerError::io("sizing memory file", e))?;
            let handle = vmm.start(&spec, &Boot::Fresh).await?;
            let vm = SandboxVm {
                handle,
                dir: dir.clone(),
                data_dir: cfg.data_dir.clone(),
                memory_file: memory_file.clone(),
                memory: Memory::Shared,
                agent: tokio::sync::Mutex::new(None),
                fs: FsHost::new(&spec.run_dir, sources),
                resume_set: Default::default(),
                told: Some(told_digest(&identity(req, &cfg.data_dir, Told::All))),
            };
            let ready = async {
                vm.fs
                    .connect(AGENT_WAIT_RECONNECT)
                    .await
                    .map_err(|e| RunnerError::io("connecting to the VM's fs port", e))?;
                let agent = AgentClient::connect_booting(&spec.agent_socket(), AGENT_WAIT_BOOT).await?;
                grow_disk(vmm, &vm.handle, &spec.disk, req.disk_mib).await?;
                apply_identity(&agent, req, &cfg.data_dir, Told::All).await?;
                guest_mounts(&agent, req).await?;
                Ok::<_, RunnerError>(agent)
            };
            let agent = match ready.await {
                Ok(a) => a,
                Err(e) => {
                    let _ = vmm.destroy(&vm.handle).await;
                    return Err(e);
                }
            };
            *vm.agent.lock().await = Some(agent);
            Ok(vm)
        }
        .await;
        if let Err(e) = &result {
            Self::log_failure(cfg, &req.id, e, "boot failed");
            // The disk is the sandbox's data: keep it, drop the rest.
            let _ = std::fs::remove_dir_all(&spec.run_dir);
            let _ = std::fs::remove_file(&memory_file);
        }
        result
    }

    /// Takes over a VM left running by an earlier runner process.
    pub fn adopt(cfg: &RunnerConfig, vmm: &dyn Vmm, id: &str, sources: Sources) -> Option<SandboxVm> {
        let (dir, shm_file) = paths(cfg, id);
        let handle = vmm.find(id, &dir.join("run"))?;
        let memory = if crate::lazymem::is_lazy(&dir) {
            Memory::Lazy
        } else if crate::memfile::maps_template(handle.pid) {
            Memory::Template
        } else if private_memory_file(&dir).exists() {
            Memory::Own
        } else {
            Memory::Shared
        };
        Some(SandboxVm {
            fs: FsHost::new(&dir.join("run"), sources),
            handle,
            memory_file: if memory == Memory::Shared { shm_file } else { private_memory_file(&dir) },
            memory,
            dir,
            data_dir: cfg.data_dir.clone(),
            agent: tokio::sync::Mutex::new(None),
            resume_set: Default::default(),
            told: None,
        })
    }

    pub async fn agent(&self) -> Result<AgentClient, RunnerError> {
        let mut slot = self.agent.lock().await;
        if let Some(a) = slot.as_ref().filter(|a| !a.is_closed()) {
            return Ok(a.clone());
        }
        let a = AgentClient::reconnect(&self.handle.run_dir.join("agent.sock"), AGENT_WAIT_RECONNECT).await?;
        *slot = Some(a.clone());
        Ok(a)
    }

    /// Stops the VM and stores its device state, RAM and disk as an image under `prefix`. The
    /// VM stays stopped with its agent parked: the caller either `release`s it (pause) or
    /// `carry_on`s (snapshot). If storing fails, the VM runs again before the error returns.
    pub async fn capture(
        &self,
        vmm: &dyn Vmm,
        store: &BlobStore,
        prefix: &str,
        req: &VmRequest,
        compat: &str,
    ) -> Result<Captured, RunnerError> {
        let meta: VmMeta = std::fs::read(self.dir.join("vm.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| RunnerError::Image(format!("sandbox {} has no readable vm.json", req.id)))?;
        let t0 = Instant::now();
        // Hold the agent slot for the whole capture: nobody opens a session meanwhile.
        let mut slot = self.agent.lock().await;
        if let Some(a) = slot.take() {
            // The agent finishes requests in flight, then waits for a new host. Parking it
            // proves it got there; the parked socket stays open through the save, so the
            // saved guest has not seen a disconnect and its next host is a fresh handshake.
            let _ = a.detach().await;
        }
        let socket = AgentClient::park(&self.handle.run_dir.join("agent.sock"), PARK_WAIT).await?;
        // The mounts' channel too: the saved guest then holds no half-delivered answer (what it
        // still waits for, it asks again of the next host).
        if let Err(e) = self.fs.park(PARK_WAIT).await {
            tracing::warn!(sandbox_id = %req.id, error = %e, "fs channel not parked; saving anyway");
        }
        let state_file = self.handle.run_dir.join("state.bin");
        if let Err(e) = vmm.save(&self.handle, &state_file).await {
            // `save` may have stopped the vCPUs before it failed.
            let _ = vmm.resume(&self.handle).await;
            self.fs.unpark().await;
            if let Ok(a) = Self::greet_parked(socket).await {
                *slot = Some(a);
            }
            return Err(e.into());
        }
        let save_ms = t0.elapsed().as_millis() as u64;
        fault_point("capture.saved");
        let stored = async {
            if self.memory == Memory::Lazy {
                // The image's RAM first; the pages the guest wrote go over it.
                let now = crate::lazymem::unpack(&self.dir, &self.memory_file).await?;
                tracing::debug!(sandbox_id = %req.id, unpacked_now = now, "guest memory from the image");
            }
            let base = self.memory.base();
            // What the guest wrote since its RAM was mapped is in QEMU's copy-on-write pages;
            // what it touched at all is its working set.
            let (pid, len, file) = (self.handle.pid, meta.memory_mib << 20, self.memory_file.clone());
            let back = io_join(
                tokio::task::spawn_blocking(move || crate::memfile::write_back(pid, len, &file, base)).await,
                "writing back guest memory",
            )?;
            tracing::debug!(
                sandbox_id = %req.id,
                written = back.written,
                touched_mib = back.touched.len(),
                "guest memory written back"
            );
            let disk = self.dir.join("disk.qcow2");
            let (state, memory, disk) = tokio::join!(
                cove_blob::pack_file(store, prefix, "state", &state_file),
                cove_blob::pack_file(store, prefix, "memory", &self.memory_file),
                cove_blob::pack_file(store, prefix, "disk", &disk),
            );
            let memory = memory?;
            let manifest = ImageManifest {
                format: IMAGE_FORMAT,
                template: meta.template.clone(),
                template_key: meta.template_key.clone(),
                vcpus: meta.vcpus,
                memory_mib: meta.memory_mib,
                created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64),
                machine: cove_vmm::qemu::device_set(),
                host: compat.to_string(),
                state: state?,
                hot: hot_chunks(&memory.chunks, &back.touched),
                first: hot_chunks(&memory.chunks, &self.resume_set.lock().unwrap_or_else(|p| p.into_inner())),
                memory,
                disk: disk?,
                told: self.told.clone(),
            };
            fault_point("capture.packed");
            cove_blob::write_manifest(store, prefix, &manifest).await?;
            Ok::<_, RunnerError>(manifest)
        }
        .await;
        let manifest = match stored {
            Ok(m) => m,
            Err(e) => {
                let _ = store.delete_prefix(prefix).await;
                let resumed = vmm.resume(&self.handle).await;
                self.fs.unpark().await;
                match Self::greet_parked(socket).await {
                    Ok(a) => {
                        let _ = apply_identity(&a, req, &self.data_dir, Told::ClockOnly).await;
                        *slot = Some(a);
                    }
                    Err(ge) => {
                        tracing::warn!(sandbox_id = %req.id, error = %ge, "reconnecting after a failed capture")
                    }
                }
                if let Err(re) = resumed {
                    tracing::error!(sandbox_id = %req.id, error = %re, "VM did not run again after a failed capture");
                }
                return Err(e);
            }
        };
        fault_point("capture.stored");
        let stats = CaptureStats {
            save_ms,
            store_ms: t0.elapsed().as_millis() as u64 - save_ms,
            stored_bytes: manifest.stored_bytes(),
            memory_data_bytes: manifest.memory.data_bytes,
        };
        Ok(Captured { manifest, stats, socket })
    }

    async fn greet_parked(socket: UnixStream) -> Result<AgentClient, RunnerError> {
        let greeting = AgentClient::greet_on(socket).await?;
        Ok(tokio::time::timeout(AGENT_WAIT_RECONNECT, greeting.finish())
            .await
            .map_err(|_| AgentError::Connect("no answer to the greeting after a capture".into()))??)
    }

    /// Runs a captured VM again (after a snapshot): vCPUs, a new agent session on the parked
    /// socket, and the clock set again (it stood still while the VM was stopped).
    pub async fn carry_on(
        &self,
        vmm: &dyn Vmm,
        captured: Captured,
        req: &VmRequest,
    ) -> Result<(), RunnerError> {
        vmm.resume(&self.handle).await?;
        self.fs.unpark().await;
        if matches!(self.memory, Memory::Template | Memory::Lazy) {
            // The capture made a RAM file from the pages QEMU maps (a template's, or the
            // image's); QEMU still maps those.
            let _ = std::fs::remove_file(&self.memory_file);
        }
        let agent = Self::greet_parked(captured.socket).await?;
        apply_identity(&agent, req, &self.data_dir, Told::ClockOnly).await?;
        *self.agent.lock().await = Some(agent);
        Ok(())
    }

    /// Runs again a VM that an earlier runner process left stopped in a capture (recovery).
    pub async fn run_again(&self, vmm: &dyn Vmm) -> Result<(), RunnerError> {
        vmm.resume(&self.handle).await?;
        Ok(())
    }

    /// Stops a running VM for good, keeping only its disk: the guest flushes its filesystems
    /// first, so nothing written before the stop is lost.
    pub async fn stop(&self, vmm: &dyn Vmm) -> Result<(), RunnerError> {
        if let Ok(agent) = self.agent().await {
            let sync = cove_api::process::ExecuteRequest {
                command: "sync".into(),
                cwd: None,
                envs: None,
                timeout: Some(60),
            };
            if let Err(e) = agent.exec(&sync).await {
                tracing::warn!(error = %e, "guest sync before stop failed; QEMU still flushes its own caches");
            }
        }
        vmm.destroy(&self.handle).await?;
        let _ = std::fs::remove_dir_all(self.dir.join("run"));
        crate::lazymem::remove(&self.dir);
        match std::fs::remove_file(&self.memory_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(RunnerError::io("removing guest memory", e))
            }
            _ => Ok(()),
        }
    }

    pub async fn destroy(&self, vmm: &dyn Vmm) -> Result<(), RunnerError> {
        vmm.destroy(&self.handle).await?;
        remove_files(&self.dir, &self.memory_file)
    }

    /// Ends a VM just paused into image `prefix`, keeping its RAM, disk and device state as the
    /// warm entry of that image (see `warm`), then removes the rest. Keeping them is an
    /// optimisation: if it fails the image is whole anyway, and a resume unpacks it. A RAM file
    /// on tmpfs is copied to disk in the background (moved aside first, so that nothing else
    /// writes it meanwhile): the pause does not wait for it. Returns whether the entry was
    /// kept (its RAM may still be on its way to the disk).
    pub async fn release(
        &self,
        cfg: &RunnerConfig,
        vmm: &dyn Vmm,
        prefix: &str,
    ) -> Result<bool, RunnerError> {
        vmm.destroy(&self.handle).await?;
        let id = &self.handle.name;
        let (disk, state) = (self.dir.join(crate::warm::DISK), self.handle.run_dir.join(crate::warm::STATE));
        let kept = crate::warm::begin(cfg, id, &disk, &state).and_then(|partial| {
            if self.memory != Memory::Shared {
                // On disk: the file the capture wrote.
                return partial.finish(cfg, id, prefix, &self.memory_file, false);
            }
            let aside = self.memory_file.with_extension("mem.warming");
            std::fs::rename(&self.memory_file, &aside)?;
            let (cfg, id, prefix) = (cfg.clone(), id.clone(), prefix.to_string());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = partial.finish(&cfg, &id, &prefix, &aside, true) {
                    tracing::warn!(sandbox_id = %id, error = %e, "paused sandbox's RAM not kept warm");
                }
            });
            Ok(())
        });
        if let Err(e) = &kept {
            tracing::warn!(sandbox_id = %id, error = %e, "paused sandbox's files not kept warm");
        }
        remove_files(&self.dir, &self.memory_file)?;
        Ok(kept.is_ok())
    }

    /// Cleans up after a sandbox whose VM this runner does not hold (e.g. after a crash).
    pub async fn remove_leftovers(cfg: &RunnerConfig, vmm: &dyn Vmm, id: &str) -> Result<(), RunnerError> {
        let (dir, memory_file) = paths(cfg, id);
        end_vm_of(cfg, vmm, id).await?;
        remove_files(&dir, &memory_file)
    }
}

/// Ends the VM of sandbox `id` if one runs, and removes its cgroup.
pub async fn end_vm_of(cfg: &RunnerConfig, vmm: &dyn Vmm, id: &str) -> Result<(), RunnerError> {
    let (dir, _) = paths(cfg, id);
    if let Some(handle) = vmm.find(id, &dir.join("run")) {
        vmm.destroy(&handle).await?;
    }
    let _ = cove_vmm::Cgroup::locate(id).remove();
    Ok(())
}

/// Removes what a stopped sandbox does not keep: run dir and RAM.
pub fn remove_runtime(cfg: &RunnerConfig, id: &str) {
    let (dir, memory_file) = paths(cfg, id);
    let _ = std::fs::remove_dir_all(dir.join("run"));
    let _ = std::fs::remove_file(memory_file);
    let _ = std::fs::remove_file(private_memory_file(&dir));
    crate::lazymem::remove(&dir);
}

/// See `Runner::raw_restore`.
pub async fn raw_restore(
    cfg: &RunnerConfig,
    images: &Images,
    vmm: &dyn Vmm,
    origin: Origin<'_>,
) -> Result<Duration, RunnerError> {
    let id = format!("raw-{}", hex::encode(rand::random::<[u8; 6]>()));
    crate::net::scratch(&id).await?;
    let started = Instant::now();
    let result = SandboxVm::start_vm(cfg, images, vmm, &origin, &id, &mut NetworkFinish::done(), None).await;
    let elapsed = started.elapsed();
    let _ = SandboxVm::remove_leftovers(cfg, vmm, &id).await;
    crate::net::remove_scratch(&id).await;
    result.map(|_| elapsed)
}

/// See `Runner::raw_save_restore`.
pub async fn raw_save_restore(
    cfg: &RunnerConfig,
    images: &Images,
    vmm: &dyn Vmm,
    origin: Origin<'_>,
) -> Result<(Duration, Duration), RunnerError> {
    let id = format!("raw-{}", hex::encode(rand::random::<[u8; 6]>()));
    crate::net::scratch(&id).await?;
    let result = async {
        let Started { spec, handle, .. } =
            SandboxVm::start_vm(cfg, images, vmm, &origin, &id, &mut NetworkFinish::done(), None).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let state_file = spec.run_dir.join("raw-state.bin");
        let t = Instant::now();
        vmm.save(&handle, &state_file).await?;
        let save = t.elapsed();
        vmm.destroy(&handle).await?;
        // The RAM file stays where it was: the new QEMU maps it as it is.
        let t = Instant::now();
        let handle = vmm.start(&spec, &Boot::Restore { state_file }).await?;
        let restore = t.elapsed();
        vmm.destroy(&handle).await?;
        Ok((save, restore))
    }
    .await;
    let _ = SandboxVm::remove_leftovers(cfg, vmm, &id).await;
    crate::net::remove_scratch(&id).await;
    result
}

fn remove_files(dir: &Path, memory_file: &Path) -> Result<(), RunnerError> {
    crate::lazymem::remove(dir);
    for r in [std::fs::remove_dir_all(dir), std::fs::remove_file(memory_file)] {
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RunnerError::io("removing sandbox files", e)),
        }
    }
    Ok(())
}

/// Crash-test hook: when `COVE_FAULT` names this point, the process kills itself with SIGKILL
/// right here, exactly like `kill -9` from outside. Unset in production.
pub fn fault_point(name: &str) {
    if fault_injected(name) {
        tracing::error!(point = name, "COVE_FAULT: killing this process");
        crate::sys::kill_self();
    }
}

/// Whether `COVE_FAULT` names `name`: for a failure that a test has the process act out
/// without dying (see [`fault_point`]), so that a recovery path runs on a real VM. Unset in
/// production.
pub fn fault_injected(name: &str) -> bool {
    std::env::var("COVE_FAULT").is_ok_and(|v| v.split(',').any(|p| p == name))
}

/// Whether `manifest`'s image can be restored on this host, whose [`crate::HostInfo::compat`]
/// is `compat` and where its template version's frozen disk is `template_disk`.
pub fn restorable(manifest: &ImageManifest, template_disk: &Path, compat: &str) -> Result<(), RunnerError> {
    if manifest.format != IMAGE_FORMAT {
        return Err(RunnerError::Image(format!(
            "image format {} is not supported (this Cove reads format {IMAGE_FORMAT})",
            manifest.format
        )));
    }
    let machine = cove_vmm::qemu::device_set();
    if manifest.machine != machine {
        return Err(RunnerError::Image(format!(
            "this image was saved from a VM with another device set ({:?}; this Cove runs {:?}) \
             and cannot be restored",
            manifest.machine, machine
        )));
    }
    if !manifest.host.is_empty() && manifest.host != compat {
        return Err(RunnerError::Image(format!(
            "this image was saved on a host with another CPU or QEMU ({:?}; this host has {:?}) \
             and cannot be restored here",
            manifest.host, compat
        )));
    }
    if !template_disk.exists() {
        return Err(RunnerError::Image(format!(
            "the template version {} this image was made from is not on this host",
            manifest.template_key
        )));
    }
    Ok(())
}

/// The chunks of `chunks` (a packed RAM file's) that hold any of the `touched` 1 MiB pieces of
/// the file, as indices: the working set a lazy resume loads first.
fn hot_chunks(chunks: &[cove_blob::Chunk], touched: &[u32]) -> Vec<u32> {
    let mut hot = Vec::new();
    let mut i = 0;
    for &piece in touched {
        let at = u64::from(piece) * cove_blob::CHUNK_SIZE;
        while i < chunks.len() && chunks[i].offset < at {
            i += 1;
        }
        if chunks.get(i).is_some_and(|c| c.offset == at) {
            hot.push(i as u32);
        }
    }
    hot
}
