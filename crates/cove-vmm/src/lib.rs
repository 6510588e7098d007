//! VM backends. One trait, [`Vmm`], with QEMU as the implementation; a VM is a process that
//! outlives the runner that started it, found again by its run directory.

pub mod cgroup;
pub mod qemu;
mod qmp;
#[allow(unsafe_code)]
mod sys;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

pub use cgroup::Cgroup;
pub use qemu::QemuVmm;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("starting QEMU: {0}")]
    Spawn(String),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

impl VmmError {
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        VmmError::Io(what.into(), e)
    }
}

/// How guest instructions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when the CPU shows hardware virtualisation (vmx/svm), TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    /// Resolves `Auto` by looking at the host CPU. Nested PVM hosts expose /dev/kvm without
    /// vmx/svm; unmodified guests crawl there, so they get TCG.
    pub fn resolve(self) -> Accel {
        match self {
            Accel::Auto => {
                let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
                let hw = cpuinfo
                    .lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
                if hw && Path::new("/dev/kvm").exists() {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
            other => other,
        }
    }

    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "auto" => Some(Accel::Auto),
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

/// Everything needed to run one VM. The same spec must be used to save and restore a state.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Unique name (the sandbox id); also names the cgroup.
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// Writable qcow2 disk.
    pub disk: PathBuf,
    /// Where guest RAM comes from.
    pub memory: GuestMemory,
    /// Sockets, logs and the pid file live here.
    pub run_dir: PathBuf,
    /// Extra host memory allowed beyond guest RAM for QEMU itself.
    pub overhead_mib: u64,
    /// The network namespace QEMU runs in (a path such as `/run/netns/NAME`); its `tap0`
    /// backs the guest's only NIC. Every VM has the NIC, so device states stay compatible.
    pub netns: PathBuf,
}

/// Guest RAM: a file QEMU maps, shared (it is the RAM) or copy-on-write (it stays as it was and
/// the guest's writes stay in QEMU's memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMemory {
    /// A file on tmpfs, mapped shared.
    Shared(PathBuf),
    /// A file mapped copy-on-write.
    Private(PathBuf),
    /// An open file of the caller's (a sealed memfd, which QEMU cannot write), inherited by
    /// QEMU and mapped copy-on-write. Several VMs share its pages until they write them.
    PrivateFd(std::os::fd::RawFd),
}

impl VmSpec {
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }
}

/// How a VM begins.
#[derive(Debug, Clone)]
pub enum Boot {
    /// Cold boot of kernel and initrd.
    Fresh,
    /// Resume a state saved by [`Vmm::save`]; `memory_file` already holds that state's RAM.
    Restore { state_file: PathBuf },
}

/// A running (or stopped) VM process.
#[derive(Debug, Clone)]
pub struct VmHandle {
    pub pid: u32,
    pub run_dir: PathBuf,
    pub name: String,
}

#[async_trait]
pub trait Vmm: Send + Sync {
    /// Starts the VM process. With `Boot::Fresh` the guest runs at once; with `Boot::Restore`
    /// the process waits, with its RAM file mapped, until [`Vmm::restore`] feeds it the state.
    async fn spawn(&self, spec: &VmSpec, boot: &Boot) -> Result<VmHandle, VmmError>;
    /// Loads a saved device state into a VM spawned for restore, and runs it.
    async fn restore(&self, vm: &VmHandle, state_file: &Path) -> Result<(), VmmError>;
    /// `spawn`, then `restore` when restoring; returns once the vCPUs run.
    async fn start(&self, spec: &VmSpec, boot: &Boot) -> Result<VmHandle, VmmError> {
        let vm = self.spawn(spec, boot).await?;
        if let Boot::Restore { state_file } = boot {
            if let Err(e) = self.restore(&vm, state_file).await {
                let _ = self.destroy(&vm).await;
                return Err(e);
            }
        }
        Ok(vm)
    }
    /// Stops the vCPUs and writes the device state (not RAM) to `state_file`. The VM stays
    /// stopped, its disk flushed and released; the caller destroys it or resumes it.
    async fn save(&self, vm: &VmHandle, state_file: &Path) -> Result<(), VmmError>;
    /// Resumes vCPUs stopped by `save`.
    async fn resume(&self, vm: &VmHandle) -> Result<(), VmmError>;
    /// Grows the running VM's root disk to `bytes`; the guest is told its disk changed size.
    async fn resize_disk(&self, vm: &VmHandle, bytes: u64) -> Result<(), VmmError>;
    /// Ends the VM process and waits until it is gone.
    async fn destroy(&self, vm: &VmHandle) -> Result<(), VmmError>;
    /// Finds a VM started earlier (by this or a previous runner process) from its run dir.
    fn find(&self, name: &str, run_dir: &Path) -> Option<VmHandle>;
}
