//! The seam between the control plane and a host: everything the control plane asks of the
//! machine its sandboxes run on. [`crate::Runner`] implements it with QEMU VMs on this machine;
//! the control plane's tests implement it in memory (`cove_server::sim`); a runner on another
//! machine will speak it over the wire.
//!
//! Requests are plain data. What carries credentials in plain (mount keys, header values to
//! inject) travels in one field, [`VmRequest::unsealed`], whose `Debug` never prints them.

use std::collections::BTreeMap;

use async_trait::async_trait;
use cove_api::sandbox::{MountConfig, NetworkPolicy};
use cove_api::template::TemplateProgress;

use crate::{AgentClient, BuiltTemplate, CaptureStats, ImageManifest, RunnerError, TemplateSource};

/// What the control plane asks for when it brings a sandbox's VM up (create, restore, resume,
/// start, adoption). Serialized as it is for a remote runner (credentials included: that
/// connection is TLS to a pinned certificate).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmRequest {
    pub id: String,
    pub template: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Size of the writable disk, MiB: at least the template's; a larger one is grown when the
    /// VM starts.
    pub disk_mib: u64,
    pub env: BTreeMap<String, String>,
    /// The parts of the sandbox that hold secrets, opened for the host: they stay in the
    /// host's memory and never enter the guest.
    pub unsealed: Unsealed,
}

/// A sandbox's settings that carry credentials in plain.
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Unsealed {
    /// Egress policy (header values to inject in plain); `None` is allow-all.
    pub network_policy: Option<NetworkPolicy>,
    /// Object-storage mounts, credentials in plain.
    pub mounts: Vec<MountConfig>,
}

impl std::fmt::Debug for Unsealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.mounts.iter().map(|m| m.id.as_str()).collect();
        f.debug_struct("Unsealed")
            .field("network_policy", &self.network_policy.as_ref().map(|_| "<redacted>"))
            .field("mounts", &ids)
            .finish()
    }
}

/// What happens to a VM once [`SandboxHost::capture`] has stored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCapture {
    /// It runs on (a snapshot).
    Continue,
    /// It ends and its RAM, disk and run files are removed (a pause; a snapshot with
    /// `kill_sandbox_after`).
    Release,
}

pub use cove_net::egress::lend::Loan;
pub use cove_net::egress::metadata::{ExecMetadata, MetadataSource, MountMetadata, SandboxMetadata};

/// Keeps a loan of credentials in force; dropping it returns them.
pub type LoanGuard = Box<dyn std::any::Any + Send + Sync>;

/// What a host offers sandboxes, and what a saved VM needs of a host to be restored there: a
/// cluster places by the first and checks the second before a resume lands on another host.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostInfo {
    /// vCPUs the host lends its sandboxes (they may be oversubscribed: placement weighs memory).
    pub vcpus: u32,
    /// Memory the host gives its sandboxes' VMs, MiB.
    pub memory_mib: u64,
    /// Most sandboxes (holding a VM) it takes at once; 0: as many as fit in its memory.
    #[serde(default)]
    pub max_sandboxes: u32,
    /// What a saved CPU and device state depends on besides the device set: the QEMU version,
    /// the accelerator and the CPU model (with KVM, the host CPU's flags). An image restores
    /// only on a host with the same.
    pub compat: String,
    /// The template versions it holds (the keys of the frozen disks that sandbox disks, and so
    /// images, are layered on): an image restores only where its version is.
    #[serde(default)]
    pub templates: Vec<String>,
}

/// A byte stream to a port of a guest.
pub trait GuestIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> GuestIo for T {}
pub type GuestStream = Box<dyn GuestIo>;

/// Everything the control plane asks of a host. Calls about one sandbox never overlap when
/// they change its VM (the control plane holds the sandbox's lock); guest calls may run
/// concurrently with each other.
///
/// Errors are [`RunnerError`]s; the control plane logs them whole and answers clients with
/// a message that names no host detail.
#[async_trait]
pub trait SandboxHost: Send + Sync + 'static {
    /// What this host offers and restores (see [`HostInfo`]).
    fn info(&self) -> HostInfo;

    /// Whether an image saved elsewhere can be restored here (its device set, its CPU and QEMU,
    /// the template version its disk is layered on); the error says what differs.
    async fn can_restore(&self, manifest: &ImageManifest) -> Result<(), RunnerError>;

    // --- Templates -------------------------------------------------------------------------

    /// Writable disk size of a template's sandboxes, MiB; `None` for a template this host
    /// does not have.
    fn template_disk_mib(&self, template: &str) -> Option<u64>;

    /// When a system template's root filesystem was built; `None` when this host does not
    /// have it.
    fn system_template_built_at(&self, template: &str) -> Option<std::time::SystemTime>;

    /// Boots and snapshots a template shape ahead of the first sandbox that needs it.
    async fn prepare_template(&self, template: &str, vcpus: u32, memory_mib: u64) -> Result<(), RunnerError>;

    /// Pulls a container image and makes it a template's disk, reporting progress.
    async fn build_template(
        &self,
        source: &TemplateSource,
        progress: &(dyn for<'p> Fn(&'p TemplateProgress) + Send + Sync),
    ) -> Result<BuiltTemplate, RunnerError>;

    /// Removes a user template's disk and snapshots.
    async fn remove_template(&self, id: &str) -> Result<(), RunnerError>;

    // --- Bringing a VM up ------------------------------------------------------------------

    /// A new VM from the template's snapshot, its mounts connected first (an error names the
    /// mount), its identity given.
    async fn create(&self, req: &VmRequest) -> Result<(), RunnerError>;

    /// A VM restored from an image: the resume of a paused sandbox, or a new sandbox from a
    /// snapshot.
    async fn create_from_image(&self, req: &VmRequest, image: &str) -> Result<(), RunnerError>;

    /// A stopped sandbox booted afresh on its kept disk.
    async fn boot(&self, req: &VmRequest) -> Result<(), RunnerError>;

    // --- Capturing and ending --------------------------------------------------------------

    /// Stores a running VM (memory, CPU, disk) as an image, then runs it on or releases it. If
    /// storing fails the VM keeps running and the error is returned.
    async fn capture(
        &self,
        req: &VmRequest,
        image: &str,
        after: AfterCapture,
    ) -> Result<(ImageManifest, CaptureStats), RunnerError>;

    /// Ends a running VM for good, the guest synced first; its disk stays.
    async fn stop(&self, id: &str) -> Result<(), RunnerError>;

    /// Ends the VM of `id` if one runs, keeping its disk.
    async fn end_vm(&self, id: &str) -> Result<(), RunnerError>;

    /// Ends the VM and removes everything the sandbox has on the host.
    async fn destroy(&self, id: &str) -> Result<(), RunnerError>;

    // --- After a restart -------------------------------------------------------------------

    /// Takes over the VMs of `sandboxes` that still run. Returns the ids whose VM is gone.
    async fn adopt(&self, sandboxes: &[VmRequest]) -> Vec<String>;

    /// Runs again an adopted VM that a crash left stopped in the middle of a capture.
    async fn run_again(&self, id: &str) -> Result<(), RunnerError>;

    /// Ids of every sandbox with anything on this host (files, memory, network), adopted or
    /// not: what recovery compares with its records to find orphans.
    async fn sandboxes_on_host(&self) -> Vec<String>;

    // --- The guest -------------------------------------------------------------------------

    /// The agent of a sandbox's VM (reconnected if its channel dropped).
    async fn agent(&self, id: &str) -> Result<AgentClient, RunnerError>;

    /// Gives a running guest its identity again (clock, entropy).
    async fn reidentify(&self, req: &VmRequest) -> Result<(), RunnerError>;

    /// A connection to a TCP port of the guest. Nothing listening is an `Io` error of kind
    /// `ConnectionRefused`.
    async fn connect_guest(&self, id: &str, port: u16) -> Result<GuestStream, RunnerError>;

    // --- Mounts and network ----------------------------------------------------------------

    /// Connects a mount's source without attaching it (a sandbox that is not running).
    async fn check_mount(&self, mount: &MountConfig) -> Result<(), RunnerError>;

    async fn add_mount(&self, id: &str, mount: &MountConfig) -> Result<(), RunnerError>;

    /// Changes a mount's source; `remount` (anything but its credentials changed) mounts it
    /// anew in the guest.
    async fn update_mount(&self, id: &str, mount: &MountConfig, remount: bool) -> Result<(), RunnerError>;

    async fn remove_mount(&self, id: &str, mount_id: &str) -> Result<(), RunnerError>;

    /// Replaces the egress policy of a running sandbox; flows the new one forbids are cut.
    async fn set_network_policy(&self, id: &str, policy: Option<&NetworkPolicy>) -> Result<(), RunnerError>;

    /// Where the metadata service of this host's sandboxes (`http://169.254.169.254` in the
    /// guest) gets its answers: the control plane's records. Set once, at start-up.
    fn set_metadata_source(&self, source: std::sync::Arc<dyn MetadataSource>);

    /// Who to tell when the host restarted under a running control plane (a remote runner's
    /// process was replaced): its VMs run on, but it knows none of them until they are adopted
    /// again. A host in this process never restarts alone, hence the default.
    fn set_restart_listener(&self, _listener: std::sync::Arc<dyn Fn() + Send + Sync>) {}

    /// Lends credentials to a running sandbox's credential proxy, for as long as the answer is
    /// kept (`cove_net::egress::lend`): the guest's git reaches the remote through it and never
    /// sees them.
    async fn lend_credentials(&self, id: &str, loan: Loan) -> Result<LoanGuard, RunnerError>;

    // --- Images ----------------------------------------------------------------------------

    /// An image's manifest; `None` when it is incomplete or absent, an error only when the
    /// store could not answer.
    async fn find_image(&self, image: &str) -> Result<Option<ImageManifest>, RunnerError>;

    async fn delete_image(&self, image: &str) -> Result<(), RunnerError>;

    /// Every image in the store, complete or not (garbage collection after a crash).
    async fn stored_images(&self) -> Result<Vec<String>, RunnerError>;
}
