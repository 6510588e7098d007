//! One sandbox's VM on this host: its files, its QEMU process and its agent connection.
//!
//! Files: `<data>/sandboxes/<id>/disk.qcow2` (writable layer over the template's frozen one),
//! `<data>/sandboxes/<id>/run/` (QMP and agent sockets, console log, pid file), and the guest
//! RAM at `<shm>/<id>.mem`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cove_vmm::{Boot, VmHandle, VmSpec, Vmm};
use hyper::Method;

use crate::agent::AgentClient;
use crate::images::{Images, KERNEL_CMDLINE};
use crate::template::TemplateSnapshot;
use crate::{RunnerConfig, RunnerError, VmRequest, AGENT_WAIT_RESTORE};

/// How long a reconnect to a running guest may take.
const AGENT_WAIT_RECONNECT: Duration = Duration::from_secs(10);

pub struct SandboxVm {
    handle: VmHandle,
    dir: PathBuf,
    memory_file: PathBuf,
    agent: tokio::sync::Mutex<Option<AgentClient>>,
}

fn paths(cfg: &RunnerConfig, id: &str) -> (PathBuf, PathBuf) {
    (
        cfg.data_dir.join("sandboxes").join(id),
        cfg.shm_dir.join(format!("{id}.mem")),
    )
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
        if result.is_err() {
            let _ = Self::remove_leftovers(cfg, vmm, &req.id).await;
        }
        result
    }

    async fn restore_inner(
        cfg: &RunnerConfig,
        images: &Images,
        vmm: &dyn Vmm,
        tmpl: &TemplateSnapshot,
        req: &VmRequest,
        dir: &PathBuf,
        memory_file: &PathBuf,
    ) -> Result<SandboxVm, RunnerError> {
        std::fs::create_dir_all(dir).map_err(|e| RunnerError::io("creating sandbox dir", e))?;
        let disk = dir.join("disk.qcow2");
        std::fs::copy(tmpl.overlay(), &disk)
            .map_err(|e| RunnerError::io("creating disk overlay", e))?;
        copy_sparse(&tmpl.memory_file, memory_file).await?;
        let spec = VmSpec {
            name: req.id.clone(),
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            kernel: images.kernel.clone(),
            initrd: images.initrd.clone(),
            cmdline: KERNEL_CMDLINE.to_string(),
            disk,
            memory_file: memory_file.clone(),
            run_dir: dir.join("run"),
            overhead_mib: cfg.overhead_mib,
        };
        let handle = vmm
            .start(
                &spec,
                &Boot::Restore {
                    state_file: tmpl.state_file(),
                },
            )
            .await?;
        let vm = SandboxVm {
            handle,
            dir: dir.clone(),
            memory_file: memory_file.clone(),
            agent: tokio::sync::Mutex::new(None),
        };
        let agent = AgentClient::connect(&spec.agent_socket(), AGENT_WAIT_RESTORE).await?;
        let identity = cove_proto::Identity {
            hostname: req.id.clone(),
            env: req.env.clone(),
            unix_time_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            entropy_hex: hex::encode(rand::random::<[u8; 32]>()),
        };
        agent
            .call_raw(Method::POST, cove_proto::routes::IDENTITY, Some(&identity))
            .await?;
        *vm.agent.lock().await = Some(agent);
        Ok(vm)
    }

    /// Takes over a VM left running by an earlier runner process.
    pub fn adopt(cfg: &RunnerConfig, vmm: &dyn Vmm, id: &str) -> Option<SandboxVm> {
        let (dir, memory_file) = paths(cfg, id);
        let handle = vmm.find(id, &dir.join("run"))?;
        Some(SandboxVm {
            handle,
            dir,
            memory_file,
            agent: tokio::sync::Mutex::new(None),
        })
    }

    pub async fn agent(&self) -> Result<AgentClient, RunnerError> {
        let mut slot = self.agent.lock().await;
        if let Some(a) = slot.as_ref().filter(|a| !a.is_closed()) {
            return Ok(a.clone());
        }
        let a = AgentClient::connect(
            &self.handle.run_dir.join("agent.sock"),
            AGENT_WAIT_RECONNECT,
        )
        .await?;
        *slot = Some(a.clone());
        Ok(a)
    }

    pub async fn destroy(&self, vmm: &dyn Vmm) -> Result<(), RunnerError> {
        vmm.destroy(&self.handle).await?;
        remove_files(&self.dir, &self.memory_file)
    }

    /// Cleans up after a sandbox whose VM this runner does not hold (e.g. after a crash).
    pub async fn remove_leftovers(
        cfg: &RunnerConfig,
        vmm: &dyn Vmm,
        id: &str,
    ) -> Result<(), RunnerError> {
        let (dir, memory_file) = paths(cfg, id);
        if let Some(handle) = vmm.find(id, &dir.join("run")) {
            vmm.destroy(&handle).await?;
        }
        let _ = cove_vmm::Cgroup::locate(&format!("sbx-{id}")).remove();
        remove_files(&dir, &memory_file)
    }
}

fn remove_files(dir: &PathBuf, memory_file: &PathBuf) -> Result<(), RunnerError> {
    for r in [
        std::fs::remove_dir_all(dir),
        std::fs::remove_file(memory_file),
    ] {
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RunnerError::io("removing sandbox files", e)),
        }
    }
    Ok(())
}

/// Copies a guest memory file, skipping holes (most of a fresh guest's RAM was never touched).
async fn copy_sparse(from: &PathBuf, to: &PathBuf) -> Result<(), RunnerError> {
    let out = tokio::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .output()
        .await
        .map_err(|e| RunnerError::io("running cp", e))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(RunnerError::io(
            "copying template memory",
            std::io::Error::other(msg),
        ));
    }
    Ok(())
}
