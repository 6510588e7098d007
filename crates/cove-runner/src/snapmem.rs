//! Snapshots' RAM, shared between the sandboxes restored from them.
//!
//! The first restore of a named snapshot on this runner unpacks the image's RAM into a sealed
//! memfd; it and every later restore map that memfd copy-on-write, as creates map their
//! template's (see `template::Templates::shared_memory`). A restore then unpacks only the disk
//! and device state, and the pages no guest has written are held once, whatever the number of
//! sandboxes. The memfd is named like a template's ([`crate::memfile::TEMPLATE_MEMFD`]`snap-…`),
//! so a capture, an adoption after a restart and a VM's accounting treat both alike.
//!
//! The runner keeps the memfds of the [`KEPT`] snapshots restored last (and drops one when its
//! image is deleted here). A VM holds its own reference (QEMU inherits the fd at start), so
//! dropping one here never affects a sandbox.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use cove_blob::{BlobStore, PackedFile};

use crate::RunnerError;

/// Snapshots whose RAM stays ready in memory.
const KEPT: usize = 8;

#[derive(Default)]
pub struct SnapshotMemory {
    /// (image prefix, sealed memfd), the most recently used last.
    kept: Mutex<Vec<(String, Arc<OwnedFd>)>>,
    /// Held while a memfd is made, so that restores arriving together make one.
    making: tokio::sync::Mutex<()>,
}

/// Whether the image at `prefix` is a named snapshot's (`images/snap-…`), which restores clone,
/// rather than a pause image, which one resume takes and which is then deleted.
pub fn is_snapshot(prefix: &str) -> bool {
    prefix.rsplit('/').next().is_some_and(|name| name.starts_with("snap-"))
}

impl SnapshotMemory {
    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<(String, Arc<OwnedFd>)>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached(&self, prefix: &str) -> Option<Arc<OwnedFd>> {
        let mut kept = self.kept();
        let at = kept.iter().position(|(p, _)| p == prefix)?;
        let entry = kept.remove(at);
        let fd = entry.1.clone();
        kept.push(entry);
        Some(fd)
    }

    /// The sealed memfd holding the RAM (`memory`) of the snapshot image at `prefix`, unpacked
    /// from `store` on first use.
    pub async fn get(
        &self,
        store: &BlobStore,
        prefix: &str,
        memory: &PackedFile,
    ) -> Result<Arc<OwnedFd>, RunnerError> {
        if let Some(fd) = self.cached(prefix) {
            return Ok(fd);
        }
        let _making = self.making.lock().await;
        if let Some(fd) = self.cached(prefix) {
            return Ok(fd);
        }
        let image = prefix.rsplit('/').next().unwrap_or(prefix);
        let name = format!("{}{image}", crate::memfile::TEMPLATE_MEMFD);
        let fd =
            crate::sys::sealable_memfd(&name).map_err(|e| RunnerError::io("making snapshot memory", e))?;
        // The blob codec writes a path: the memfd's own, in this process.
        let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        cove_blob::unpack_file(store, prefix, memory, &path).await?;
        // Sealing may wait for the kernel (see `sys::seal`): not on the runtime's threads.
        let fd = tokio::task::spawn_blocking(move || crate::sys::seal(&fd).map(|()| fd))
            .await
            .map_err(|e| RunnerError::io("sealing snapshot memory", std::io::Error::other(e)))?
            .map_err(|e| RunnerError::io("sealing snapshot memory", e))?;
        let fd = Arc::new(fd);
        let mut kept = self.kept();
        kept.push((prefix.to_string(), fd.clone()));
        if kept.len() > KEPT {
            kept.remove(0);
        }
        Ok(fd)
    }

    /// Drops the memfd of the image at `prefix` (deleted), if kept.
    pub fn forget(&self, prefix: &str) {
        self.kept().retain(|(p, _)| p != prefix);
    }

    /// Image prefixes whose RAM is kept, the most recently used last.
    #[cfg(test)]
    fn prefixes(&self) -> Vec<String> {
        self.kept().iter().map(|(p, _)| p.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn only_snapshot_images_are_shared() {
        assert!(is_snapshot("images/snap-0123abcd"));
        assert!(!is_snapshot("images/pause-0123abcd"));
        assert!(!is_snapshot("images/x-snap-1"));
    }

    /// A snapshot image's RAM comes out of the store once, sealed, with the image's bytes; later
    /// calls get the same memfd, and the least recently used beyond [`KEPT`] are dropped.
    #[tokio::test]
    async fn a_snapshot_is_unpacked_once_into_a_sealed_memfd() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&format!("file://{}", tmp.path().join("blobs").display())).unwrap();
        let ram = tmp.path().join("ram");
        let f = std::fs::File::create(&ram).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"guest memory", 3 << 20).unwrap();
        let prefix = "images/snap-test";
        let packed = cove_blob::pack_file(&store, prefix, "memory", &ram).await.unwrap();

        let memory = SnapshotMemory::default();
        let (a, b) = tokio::join!(memory.get(&store, prefix, &packed), memory.get(&store, prefix, &packed));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(Arc::ptr_eq(&a, &b), "two restores made two copies");
        let copy = std::fs::File::from(a.try_clone().unwrap());
        assert_eq!(copy.metadata().unwrap().len(), 8 << 20);
        let mut buf = [0u8; 12];
        copy.read_exact_at(&mut buf, 3 << 20).unwrap();
        assert_eq!(&buf, b"guest memory");
        let err = copy.write_all_at(b"x", 0).expect_err("a snapshot's memfd took a write");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));

        // Others push it out once it is the least recently used of more than KEPT.
        for i in 0..KEPT {
            let other = format!("images/snap-other{i}");
            let other_packed = cove_blob::pack_file(&store, &other, "memory", &ram).await.unwrap();
            memory.get(&store, &other, &other_packed).await.unwrap();
            if i == 0 {
                // Used again: now the most recent.
                memory.get(&store, prefix, &packed).await.unwrap();
            }
        }
        let kept = memory.prefixes();
        assert_eq!(kept.len(), KEPT);
        assert!(kept.contains(&prefix.to_string()), "{kept:?}");
        assert!(!kept.contains(&"images/snap-other0".to_string()), "{kept:?}");
        memory.forget(prefix);
        assert!(!memory.prefixes().contains(&prefix.to_string()));
    }
}
