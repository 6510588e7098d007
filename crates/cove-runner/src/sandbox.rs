//! One sandbox's VM on this host: its files, its QEMU process and its agent connection.
//!
//! Files: `<data>/sandboxes/<id>/disk.qcow2` (writable layer over the template's frozen one),
//! `<data>/sandboxes/<id>/run/` (QMP and agent sockets, console log, pid file), and the guest
//! RAM at `<shm>/<id>.mem`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cove_vmm::{Boot, VmHandle, VmSpec, Vmm};
use hyper::Method;

use crate::agent::{AgentClient, AgentError, Greeting};
use crate::images::{Images, KERNEL_CMDLINE};
use crate::template::TemplateSnapshot;
use crate::{RunnerConfig, RunnerError, VmRequest, AGENT_WAIT_RESTORE};

/// How long the guest may take to apply its identity after a restore (generous: a loaded
/// 2-core host running TCG guests can stall a guest for seconds).
const IDENTITY_WAIT: Duration = Duration::from_secs(30);
/// How long a reconnect to a running guest may take.
const AGENT_WAIT_RECONNECT: Duration = Duration::from_secs(10);

pub struct SandboxVm {
    handle: VmHandle,
    dir: PathBuf,
    memory_file: PathBuf,
    agent: tokio::sync::Mutex<Option<AgentClient>>,
}

fn paths(cfg: &RunnerConfig, id: &str) -> (PathBuf, PathBuf) {
    (cfg.data_dir.join("sandboxes").join(id), cfg.sandbox_shm_dir().join(format!("{id}.mem")))
}

impl SandboxVm {
    pub async fn restore(
        cfg: &RunnerConfig,
        images: &Images,
        vmm: &dyn Vmm,
        tmpl: &TemplateSnapshot,
        req: &VmRequest,
    ) -> Result<SandboxVm, RunnerError> {
        let (dir, memory_file) = paths(cfg, &req.id);
        let result = Self::restore_inner(cfg, images, vmm, tmpl, req, &dir, &memory_file).await;
        if let Err(e) = &result {
            // The guest's console is the best clue to why; it goes with the files below.
            let console = std::fs::read(dir.join("run/console.log")).unwrap_or_default();
            let tail = String::from_utf8_lossy(&console[console.len().saturating_sub(4096)..]).into_owned();
            tracing::warn!(sandbox_id = %req.id, error = %e, console = %tail, "restore failed");
            let _ = Self::remove_leftovers(cfg, vmm, &req.id).await;
        }
        result
    }

    /// Copies the template's disk overlay and RAM into the sandbox's files and starts QEMU on
    /// them with the template's device state.
    async fn start_vm(
        cfg: &RunnerConfig,
        images: &Images,
        vmm: &dyn Vmm,
        tmpl: &TemplateSnapshot,
        id: &str,
        dir: &Path,
        memory_file: &Path,
    ) -> Result<(VmSpec, VmHandle, Option<Greeting>), RunnerError> {
        std::fs::create_dir_all(dir).map_err(|e| RunnerError::io("creating sandbox dir", e))?;
        let disk = dir.join("disk.qcow2");
        std::fs::copy(tmpl.overlay(), &disk).map_err(|e| RunnerError::io("creating disk overlay", e))?;
        // QEMU takes tens of milliseconds to start: copy the template's RAM meanwhile, into a
        // file already at its full size, and hand QEMU the state only once both are done.
        crate::memfile::create_sized(&tmpl.memory_file, memory_file)
            .map_err(|e| RunnerError::io("creating memory file", e))?;
        let (from, to) = (tmpl.memory_file.clone(), memory_file.to_path_buf());
        let copy = tokio::task::spawn_blocking(move || crate::memfile::copy_data(&from, &to));
        let spec = VmSpec {
            name: id.to_string(),
            vcpus: tmpl.vcpus,
            memory_mib: tmpl.memory_mib,
            kernel: images.kernel.clone(),
            initrd: images.initrd.clone(),
            cmdline: KERNEL_CMDLINE.to_string(),
            disk,
            memory_file: memory_file.to_path_buf(),
            run_dir: dir.join("run"),
            overhead_mib: cfg.overhead_mib,
        };
        let spawned = vmm.spawn(&spec, &Boot::Restore { state_file: tmpl.state_file() }).await;
        let copied =
            copy.await.map_err(|e| RunnerError::io("copying template memory", std::io::Error::other(e)));
        let handle = spawned?;
        // Greet the agent while the VM still waits for its state: the guest then resumes with
        // its host connected and the greeting queued, instead of first seeing the saved
        // connection vanish (which could cut the new one short).
        let greeting = AgentClient::greet(&spec.agent_socket()).await.ok();
        let restored = match copied {
            Ok(Ok(_)) => vmm.restore(&handle, &tmpl.state_file()).await.map_err(RunnerError::from),
            Ok(Err(e)) => Err(RunnerError::io("copying template memory", e)),
            Err(e) => Err(e),
        };
        if let Err(e) = restored {
            let _ = vmm.destroy(&handle).await;
            return Err(e);
        }
        Ok((spec, handle, greeting))
    }

    async fn restore_inner(
        cfg: &RunnerConfig,
        images: &Images,
        vmm: &dyn Vmm,
        tmpl: &TemplateSnapshot,
        req: &VmRequest,
        dir: &Path,
        memory_file: &Path,
    ) -> Result<SandboxVm, RunnerError> {
        let t0 = std::time::Instant::now();
        let (spec, handle, greeting) =
            Self::start_vm(cfg, images, vmm, tmpl, &req.id, dir, memory_file).await?;
        let t_vm = t0.elapsed();
        let vm = SandboxVm {
            handle,
            dir: dir.to_path_buf(),
            memory_file: memory_file.to_path_buf(),
            agent: tokio::sync::Mutex::new(None),
        };
        let greeted = match greeting {
            Some(g) => tokio::time::timeout(AGENT_WAIT_RESTORE, g.finish()).await.ok().and_then(Result::ok),
            None => None,
        };
        let agent = match greeted {
            Some(a) => a,
            None => AgentClient::connect(&spec.agent_socket(), AGENT_WAIT_RESTORE).await?,
        };
        let t_agent = t0.elapsed();
        let identity = cove_proto::Identity {
            hostname: req.id.clone(),
            env: req.env.clone(),
            unix_time_ns: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
            entropy_hex: hex::encode(rand::random::<[u8; 32]>()),
        };
        tokio::time::timeout(
            IDENTITY_WAIT,
            agent.call_raw(Method::POST, cove_proto::routes::IDENTITY, Some(&identity)),
        )
        .await
        .map_err(|_| AgentError::Request("the guest did not accept its identity in time".into()))??;
        tracing::debug!(
            vm_ms = t_vm.as_millis() as u64,
            agent_ms = t_agent.as_millis() as u64,
            identity_ms = t0.elapsed().as_millis() as u64,
            "sandbox VM restored"
        );
        *vm.agent.lock().await = Some(agent);
        Ok(vm)
    }

    /// Takes over a VM left running by an earlier runner process.
    pub fn adopt(cfg: &RunnerConfig, vmm: &dyn Vmm, id: &str) -> Option<SandboxVm> {
        let (dir, memory_file) = paths(cfg, id);
        let handle = vmm.find(id, &dir.join("run"))?;
        Some(SandboxVm { handle, dir, memory_file, agent: tokio::sync::Mutex::new(None) })
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

    pub async fn destroy(&self, vmm: &dyn Vmm) -> Result<(), RunnerError> {
        vmm.destroy(&self.handle).await?;
        remove_files(&self.dir, &self.memory_file)
    }

    /// Cleans up after a sandbox whose VM this runner does not hold (e.g. after a crash).
    pub async fn remove_leftovers(cfg: &RunnerConfig, vmm: &dyn Vmm, id: &str) -> Result<(), RunnerError> {
        let (dir, memory_file) = paths(cfg, id);
        if let Some(handle) = vmm.find(id, &dir.join("run")) {
            vmm.destroy(&handle).await?;
        }
        let _ = cove_vmm::Cgroup::locate(id).remove();
        remove_files(&dir, &memory_file)
    }
}

/// See `Runner::raw_restore`.
pub async fn raw_restore(
    cfg: &RunnerConfig,
    images: &Images,
    vmm: &dyn Vmm,
    tmpl: &TemplateSnapshot,
) -> Result<Duration, RunnerError> {
    let id = format!("raw-{}", hex::encode(rand::random::<[u8; 6]>()));
    let (dir, memory_file) = paths(cfg, &id);
    let started = std::time::Instant::now();
    let result = SandboxVm::start_vm(cfg, images, vmm, tmpl, &id, &dir, &memory_file).await;
    let elapsed = started.elapsed();
    let _ = SandboxVm::remove_leftovers(cfg, vmm, &id).await;
    result.map(|_| elapsed)
}

fn remove_files(dir: &Path, memory_file: &Path) -> Result<(), RunnerError> {
    for r in [std::fs::remove_dir_all(dir), std::fs::remove_file(memory_file)] {
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RunnerError::io("removing sandbox files", e)),
        }
    }
    Ok(())
}
