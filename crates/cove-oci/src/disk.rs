//! A directory tree as a VM disk: `mke2fs -d` writes the ext4 image straight from the tree
//! (owners, modes, xattrs and hard links included; no loop mount), then `qemu-img` makes it
//! the qcow2 base that template snapshots layer over.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::OciError;

/// What went into a disk.
#[derive(Debug, Clone, Copy)]
pub struct DiskSize {
    /// The filesystem's size.
    pub size_mib: u64,
    /// Bytes of content in it.
    pub content_bytes: u64,
    pub inodes: u64,
}

/// Writes `root` as an ext4 filesystem with `free_mib` free beyond its content, into a qcow2
/// image at `out`.
pub async fn build(root: &Path, out: &Path, free_mib: u64) -> Result<DiskSize, OciError> {
    let tree = root.to_path_buf();
    let (content_bytes, inodes) = tokio::task::spawn_blocking(move || measure(&tree))
        .await
        .map_err(|e| OciError::io("measuring the tree", std::io::Error::other(e)))??;
    // Content rounded to blocks, plus a tenth for directories and metadata, the journal, and
    // what the user asked to have free.
    let size_mib = content_bytes.div_ceil(1 << 20) * 11 / 10 + 64 + free_mib;
    let raw = out.with_extension("ext4");
    let ext4 = tokio::process::Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-L", "cove-root", "-E", "root_owner=0:0", "-F", "-N"])
        .arg((inodes + inodes / 5 + 4096).to_string())
        .arg("-d")
        .arg(root)
        .arg(&raw)
        .arg(format!("{size_mib}M"))
        .output()
        .await;
    check("mke2fs", ext4)?;
    let qcow = tokio::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(out)
        .output()
        .await;
    let _ = tokio::fs::remove_file(&raw).await;
    check("qemu-img convert", qcow)?;
    Ok(DiskSize { size_mib, content_bytes, inodes })
}

fn check(what: &str, out: std::io::Result<std::process::Output>) -> Result<(), OciError> {
    let out = out.map_err(|e| OciError::io(format!("running {what}"), e))?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(OciError::io(what, std::io::Error::other(msg)))
}

/// Content bytes (each file rounded up to 4 KiB blocks) and entries of a tree.
fn measure(root: &Path) -> Result<(u64, u64), OciError> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| OciError::io("listing the tree", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| OciError::io("listing the tree", e))?;
            let m = entry.metadata().map_err(|e| OciError::io("measuring the tree", e))?;
            inodes += 1;
            bytes += m.size().div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}
