//! Templates from container images: pull, unpack into a staging tree, add what the agent reads
//! at boot (`cove_proto::image::CONFIG_PATH`), and write the tree as the template's disk.
//!
//! Files: `<data>/templates/<id>/rootfs.qcow2` once built. Everything else (`staging/`, the
//! `.ext4` and `.tmp` files) is scratch that a build removes when it ends, and that
//! `SandboxHost::remove_template` removes after a crash.

use std::path::{Path, PathBuf};

use cove_api::template::TemplateProgress;
use cove_oci::unpack::Budget;
use cove_oci::{Credentials, ImageConfig, OciError, Progress};

use crate::{Runner, RunnerError};

/// What a template is made from.
#[derive(Debug, Clone)]
pub struct TemplateSource {
    /// The template's id (`tpl-…`): names its files and its snapshots.
    pub id: String,
    pub uri: String,
    /// Held in memory for the pull only.
    pub credentials: Credentials,
    /// Free space the disk gets beyond the image's content.
    pub free_mib: u64,
}

/// A converted image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BuiltTemplate {
    pub digest: String,
    pub config: ImageConfig,
    /// Size of the disk, MiB.
    pub disk_mib: u64,
    /// Bytes the image's files hold.
    pub content_bytes: u64,
}

/// Most bytes and entries one image may unpack to.
const UNPACK_BUDGET: Budget = Budget { bytes: 32 << 30, entries: 4_000_000 };

impl Runner {
    fn template_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("templates").join(id)
    }

    /// Pulls the image and writes the template's disk. Progress goes to the log and to
    /// `progress`.
    pub(crate) async fn build(
        &self,
        src: &TemplateSource,
        progress: &(dyn Fn(&TemplateProgress) + Send + Sync),
    ) -> Result<BuiltTemplate, RunnerError> {
        let rootfs = crate::template::user_rootfs(&self.cfg.data_dir, &src.id)
            .ok_or_else(|| RunnerError::UnknownTemplate(src.id.clone()))?;
        let dir = self.template_dir(&src.id);
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let staging = dir.join("staging");
        tokio::fs::create_dir_all(&staging)
            .await
            .map_err(|e| RunnerError::io("creating the template dir", e))?;
        let result = self.build_in(src, &dir, &staging, &rootfs, progress).await;
        let _ = tokio::fs::remove_dir_all(&staging).await;
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        result
    }

    async fn build_in(
        &self,
        src: &TemplateSource,
        dir: &Path,
        staging: &Path,
        rootfs: &Path,
        report: &(dyn Fn(&TemplateProgress) + Send + Sync),
    ) -> Result<BuiltTemplate, RunnerError> {
        let started = std::time::Instant::now();
        let id = src.id.as_str();
        let state = std::sync::Mutex::new(TemplateProgress { stage: "pulling".into(), ..Default::default() });
        let stage = |f: &dyn Fn(&mut TemplateProgress)| {
            let mut p = state.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut p);
            report(&p);
        };
        stage(&|_| {});
        let on_pull = |p: Progress| match p {
            Progress::Manifest { digest, layers, bytes } => {
                tracing::info!(template = id, %digest, layers, mib = bytes >> 20, "pulling image");
                stage(&|s| (s.layers_total, s.bytes_total) = (layers, bytes));
            }
            Progress::Layer { index, digest, bytes, cached } => {
                tracing::info!(template = id, layer = index + 1, %digest, mib = bytes >> 20, cached, "layer ready");
                stage(&|s| {
                    s.layers_done += 1;
                    s.bytes_done += bytes;
                });
            }
        };
        let image = self.puller.pull(&src.uri, &src.credentials, &on_pull).await?;
        stage(&|s| s.stage = "unpacking".into());
        let pulled_ms = started.elapsed().as_millis() as u64;

        let (root, layers) = (staging.to_path_buf(), image.layers.clone());
        let content_bytes = tokio::task::spawn_blocking(move || {
            cove_oci::unpack::apply_layers(&root, &layers, UNPACK_BUDGET)
        })
        .await
        .map_err(|e| RunnerError::io("unpacking", std::io::Error::other(e)))??;
        check_usable(staging)?;
        write_guest_config(staging, &image.config)?;
        crate::fault_point("template.unpacked");
        let unpacked_ms = started.elapsed().as_millis() as u64;
        tracing::info!(template = id, mib = content_bytes >> 20, "layers applied; writing the disk");
        stage(&|s| s.stage = "writing the disk".into());

        let tmp = dir.join("rootfs.qcow2.tmp");
        let size = cove_oci::disk::build(staging, &tmp, src.free_mib).await?;
        tokio::fs::rename(&tmp, rootfs).await.map_err(|e| RunnerError::io("storing the template disk", e))?;
        tracing::info!(
            template = id,
            disk_mib = size.size_mib,
            pulled_ms,
            unpacked_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "template disk ready"
        );
        Ok(BuiltTemplate {
            digest: image.digest,
            config: image.config,
            disk_mib: size.size_mib,
            content_bytes,
        })
    }

    /// Removes a user template's disk and every snapshot made of it (its sandboxes are gone:
    /// the control plane refuses the delete otherwise).
    pub(crate) async fn remove_built(&self, id: &str) -> Result<(), RunnerError> {
        if crate::template::user_rootfs(&self.cfg.data_dir, id).is_none() {
            return Err(RunnerError::UnknownTemplate(id.to_string()));
        }
        self.templates.remove(self.vmm.as_ref(), id).await?;
        match tokio::fs::remove_dir_all(self.template_dir(id)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(RunnerError::io("removing the template", e))
            }
            _ => Ok(()),
        }
    }
}

/// An image the agent cannot make a system of is refused before it is written as a disk.
fn check_usable(root: &Path) -> Result<(), RunnerError> {
    let entries =
        std::fs::read_dir(root).map_err(|e| RunnerError::io("reading the unpacked image", e))?.count();
    if entries == 0 {
        return Err(OciError::Unusable("the image has no files".into()).into());
    }
    for dir in ["etc", "proc", "sys", "dev", "run", "tmp"] {
        let p = root.join(dir);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            // A symlink or file where the agent mounts or writes would be followed out of the
            // image or fail at boot.
            Ok(_) => {
                return Err(OciError::Unusable(format!("/{dir} in the image is not a directory")).into());
            }
            Err(_) => {
                let mode = if dir == "tmp" { 0o1777 } else { 0o755 };
                std::fs::create_dir(&p).map_err(|e| RunnerError::io("creating a system directory", e))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| RunnerError::io("creating a system directory", e))?;
            }
        }
    }
    Ok(())
}

/// Writes the image config where the agent reads it at boot.
fn write_guest_config(root: &Path, config: &ImageConfig) -> Result<(), RunnerError> {
    let rel = cove_proto::image::CONFIG_PATH.trim_start_matches('/');
    let path = root.join(rel);
    let io = |e| RunnerError::io("writing the image config", e);
    // `/etc` is a real directory (check_usable); `cove` below it is the converter's own.
    let dir = path.parent().unwrap_or(root);
    let _ = std::fs::remove_file(dir);
    std::fs::create_dir_all(dir).map_err(io)?;
    let _ = std::fs::remove_file(&path);
    let bytes = serde_json::to_vec_pretty(config).map_err(|e| io(std::io::Error::other(e)))?;
    std::fs::write(&path, bytes).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_directories_safely() {
        let data = Path::new("/data");
        assert!(crate::template::user_rootfs(data, "tpl-0123abcd").is_some());
        for bad in ["tpl-", "tpl-../x", "system/debian:bookworm", "tpl-a/b", "x"] {
            assert!(crate::template::user_rootfs(data, bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn unusable_roots_are_refused_and_system_dirs_made() {
        let t = tempfile::tempdir().unwrap();
        assert!(check_usable(t.path()).is_err(), "empty image");
        std::fs::write(t.path().join("app"), b"x").unwrap();
        check_usable(t.path()).unwrap();
        for d in ["etc", "proc", "sys", "dev", "run", "tmp"] {
            assert!(t.path().join(d).is_dir(), "{d}");
        }
        write_guest_config(t.path(), &ImageConfig { user: "1000".into(), ..Default::default() }).unwrap();
        let back: ImageConfig =
            serde_json::from_slice(&std::fs::read(t.path().join("etc/cove/image.json")).unwrap()).unwrap();
        assert_eq!(back.user, "1000");

        let bad = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/", bad.path().join("proc")).unwrap();
        assert!(check_usable(bad.path()).is_err());
    }
}
