//! VM images: a stopped VM's device state, guest RAM and writable disk, packed into the blob
//! store under one prefix (see `cove_blob::image` for the compact, checksummed file format).
//!
//! A pause and a named snapshot both write one. `manifest.json` is written last: an image
//! without it is incomplete and is never restored, only deleted. An image depends on nothing
//! but its template's frozen disk layer, which is versioned and never deleted while Cove runs
//! (see docs/operations.md), so deleting one image can never break another or a sandbox.

use cove_blob::BlobStore;
pub use cove_blob::PackedFile;
use serde::{Deserialize, Serialize};

/// Bumped when the layout changes; older images are refused with a clear error.
/// Format 2: device states written by `xen-save-devices-state` (`cove_vmm::qemu::STATE_FORMAT`).
pub const IMAGE_FORMAT: u32 = 2;

/// Blob prefix under which images live: `images/<image id>/`.
pub const IMAGES_PREFIX: &str = "images";

/// A new, unique image prefix.
pub fn new_image_prefix(kind: &str) -> String {
    format!("{IMAGES_PREFIX}/{kind}-{}", hex::encode(rand::random::<[u8; 10]>()))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageManifest {
    pub format: u32,
    pub template: String,
    /// The template snapshot (version and shape) whose frozen disk layer backs `disk`.
    pub template_key: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub created_unix: i64,
    /// The VM's device set (`cove_vmm::qemu::device_set`): a saved device state restores only into the
    /// same set. Empty in images from before it was recorded.
    #[serde(default)]
    pub machine: String,
    /// The saving host's [`crate::HostInfo::compat`]: the image restores only where it is the
    /// same. Empty in images from before it was recorded.
    #[serde(default)]
    pub host: String,
    /// QEMU device state (migration stream without RAM).
    pub state: PackedFile,
    pub memory: PackedFile,
    pub disk: PackedFile,
    /// The guest's working set when it was saved: the indices (into `memory.chunks`) of the
    /// chunks whose pages it had touched, which a lazy resume loads first (`lazymem`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hot: Vec<u32>,
    /// Of those, the chunks the guest touched in its last resume until its agent answered
    /// (empty if it was not resumed since it booted): what a lazy resume needs before the rest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub first: Vec<u32>,
    /// What the guest had been told when it was saved ([`told_digest`] of its identity), if
    /// known: a resume that would tell it the same tells it only the clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub told: Option<String>,
}

/// A digest of what an identity tells a guest that stays with it (hostname, environment,
/// trusted CA, disk size), not the moment's clock and entropy: two identities with the same
/// digest leave a guest the same.
pub fn told_digest(identity: &cove_proto::Identity) -> String {
    use sha2::Digest;
    let lasting = cove_proto::Identity { unix_time_ns: 0, entropy_hex: String::new(), ..identity.clone() };
    // Serializing a struct of strings, numbers and a sorted map cannot fail.
    let json = serde_json::to_vec(&lasting).unwrap_or_default();
    hex::encode(sha2::Sha256::digest(json))
}

impl ImageManifest {
    /// Bytes the image occupies in the blob store.
    pub fn stored_bytes(&self) -> u64 {
        self.state.stored_bytes + self.memory.stored_bytes + self.disk.stored_bytes
    }
}

/// What a finished capture measured, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CaptureStats {
    /// vCPUs stopped and device state saved.
    pub save_ms: u64,
    /// RAM, disk and state packed and stored, manifest written.
    pub store_ms: u64,
    pub stored_bytes: u64,
    pub memory_data_bytes: u64,
}

/// Reads an image's manifest; `None` when the image is incomplete or absent.
pub async fn manifest(
    store: &BlobStore,
    prefix: &str,
) -> Result<Option<ImageManifest>, cove_blob::BlobError> {
    cove_blob::read_manifest(store, prefix).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_told_digest_is_what_stays_with_a_guest() {
        let id = cove_proto::Identity {
            hostname: "sbx-1".into(),
            env: [("A".to_string(), "1".to_string())].into(),
            unix_time_ns: 1,
            entropy_hex: "00".into(),
            trust_pem: Some("ca".into()),
            disk_bytes: Some(1 << 30),
        };
        let digest = told_digest(&id);
        let now = cove_proto::Identity { unix_time_ns: 2, entropy_hex: "ff".into(), ..id.clone() };
        assert_eq!(told_digest(&now), digest, "the clock and entropy of the moment do not count");
        let changed = [
            cove_proto::Identity { hostname: "sbx-2".into(), ..id.clone() },
            cove_proto::Identity { env: [("A".to_string(), "2".to_string())].into(), ..id.clone() },
            cove_proto::Identity { trust_pem: None, ..id.clone() },
            cove_proto::Identity { disk_bytes: Some(2 << 30), ..id.clone() },
        ];
        for c in &changed {
            assert_ne!(told_digest(c), digest, "{c:?}");
        }
    }
}
