//! The guest images `cove setup` leaves in the cache directory.

use std::path::{Path, PathBuf};

use crate::RunnerError;

/// Kernel command line of every guest.
///
/// `mitigations=off`: inside a sandbox the user is root (passwordless sudo), so the guest
/// kernel's Spectre/Meltdown defences protect nothing, while under TCG they are expensive
/// (page-table isolation flushes QEMU's software TLB on every system call). They do not guard
/// the host: that boundary is the VM itself.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 loglevel=4 rdinit=/init 8250.nr_uarts=1 \
    i8042.noaux i8042.nokbd i8042.nopnp tsc=reliable random.trust_cpu=on mitigations=off";

#[derive(Debug, Clone)]
pub struct Images {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
}

impl Images {
    /// The kernel, the initramfs and the default system template's root filesystem.
    pub fn paths(cache_dir: &Path) -> Images {
        Images {
            kernel: cache_dir.join("kernel/vmlinuz"),
            initrd: cache_dir.join("initramfs/initramfs.cpio"),
            rootfs: cache_dir.join("rootfs/rootfs.qcow2"),
        }
    }

    /// Where `cove setup` leaves a system template's root filesystem.
    pub fn system_rootfs(cache_dir: &Path, t: &cove_api::template::SystemTemplate) -> PathBuf {
        cache_dir.join(t.rootfs_dir).join("rootfs.qcow2")
    }

    pub fn locate(cache_dir: &Path) -> Result<Images, RunnerError> {
        let images = Images::paths(cache_dir);
        for p in [&images.kernel, &images.initrd, &images.rootfs] {
            if !p.exists() {
                return Err(RunnerError::ImagesMissing(p.display().to_string()));
            }
        }
        Ok(images)
    }

    /// A fingerprint of the inputs (files and kernel command line): template snapshots made
    /// from other inputs are stale.
    pub fn fingerprint(&self) -> String {
        let files = [&self.kernel, &self.initrd, &self.rootfs]
            .iter()
            .map(|p| {
                let m = std::fs::metadata(p).ok();
                let mtime = m
                    .as_ref()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                format!("{}:{}:{}", p.display(), m.map_or(0, |m| m.len()), mtime)
            })
            .collect::<Vec<_>>()
            .join("|");
        format!(
            "{files}|{KERNEL_CMDLINE}|{}|state {}",
            cove_vmm::qemu::device_set(),
            cove_vmm::qemu::STATE_FORMAT
        )
    }

    /// Virtual size of the root disk.
    pub fn rootfs_size_mib(&self) -> u64 {
        qcow2_virtual_size(&self.rootfs).unwrap_or(0) >> 20
    }
}

/// Virtual size in bytes of a qcow2 disk, read from its header.
pub fn qcow2_virtual_size(path: &std::path::Path) -> Option<u64> {
    use std::io::Read;
    let mut header = [0u8; 32];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header)).ok()?;
    if &header[..4] != b"QFI\xfb" {
        return None;
    }
    Some(u64::from_be_bytes(header[24..32].try_into().ok()?))
}
