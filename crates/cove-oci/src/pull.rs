//! Pulling an image: its manifest (the linux/amd64 one of a list), its config, and its layers
//! into a cache shared by every pull, each verified against its digest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::config::ConfigFile;
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::{ImageConfig, OciError};

/// Layers fetched at once.
const PARALLEL_LAYERS: usize = 3;

#[derive(Debug, Clone)]
pub struct PullConfig {
    /// The layer cache: `<dir>/blobs/sha256/<hex>`.
    pub cache_dir: PathBuf,
    /// Registries (`host:port`) spoken to over plain HTTP; every other one over HTTPS.
    pub insecure: Vec<String>,
    /// Largest image accepted, as the sum of its compressed layers.
    pub max_bytes: u64,
}

/// How to authenticate to the registry. `Debug` never shows a secret.
#[derive(Clone, Default)]
pub enum Credentials {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username:?}, [redacted])"),
        }
    }
}

/// One layer in the cache.
#[derive(Debug, Clone)]
pub struct Layer {
    pub path: PathBuf,
    pub media_type: String,
    /// Digest of the uncompressed tar (`rootfs.diff_ids` of the config), checked on unpacking.
    pub diff_id: String,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct PulledImage {
    /// Digest of the image manifest used (the linux/amd64 one when the reference names a list).
    pub digest: String,
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
}

/// What a pull is doing, for progress reports.
#[derive(Debug, Clone)]
pub enum Progress {
    Manifest { digest: String, layers: usize, bytes: u64 },
    Layer { index: usize, digest: String, bytes: u64, cached: bool },
}

pub struct Puller {
    cfg: PullConfig,
}

impl Puller {
    pub fn new(cfg: PullConfig) -> Self {
        Puller { cfg }
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| OciError::Unusable(format!("unsupported digest {digest:?}")))?;
        Ok(self.cfg.cache_dir.join("blobs/sha256").join(hex))
    }

    /// Pulls `uri`'s manifest, config and layers (those not cached yet).
    pub async fn pull(
        &self,
        uri: &str,
        credentials: &Credentials,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PulledImage, OciError> {
        let reference: Reference =
            uri.trim().parse().map_err(|e: oci_client::ParseError| OciError::Reference(e.to_string()))?;
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.cfg.insecure.clone()),
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        });
        let auth = match credentials {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
        };
        let credentialed = !matches!(credentials, Credentials::Anonymous);
        let err = |e| registry_error(e, &reference, credentialed);

        let (manifest, mut digest) = client.pull_manifest(&reference, &auth).await.map_err(err)?;
        let manifest = match manifest {
            OciManifest::Image(m) => m,
            OciManifest::ImageIndex(index) => {
                let entry = index.manifests.iter().find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os.to_string() == "linux" && p.architecture.to_string() == "amd64")
                });
                let Some(entry) = entry else {
                    let found: Vec<String> = index
                        .manifests
                        .iter()
                        .filter_map(|m| m.platform.as_ref())
                        .map(|p| format!("{}/{}", p.os, p.architecture))
                        .collect();
                    return Err(OciError::Platform(format!(
                        "the image has no linux/amd64 variant (it has {})",
                        if found.is_empty() { "none".to_string() } else { found.join(", ") }
                    )));
                };
                let by_digest = reference.clone_with_digest(entry.digest.clone());
                let (m, d) = client.pull_image_manifest(&by_digest, &auth).await.map_err(err)?;
                digest = d;
                m
            }
        };
        let config = self.config(&client, &reference, &manifest, credentialed).await?;
        if config.os.to_string() != "linux" || config.architecture.to_string() != "amd64" {
            return Err(OciError::Platform(format!(
                "the image is for {}/{}, sandboxes run linux/amd64",
                config.os, config.architecture
            )));
        }
        if manifest.layers.is_empty() {
            return Err(OciError::Unusable("the image has no layers".into()));
        }
        let diff_ids = &config.rootfs.diff_ids;
        if diff_ids.len() != manifest.layers.len() {
            return Err(OciError::Corrupt(format!(
                "{} layers but {} diff_ids in the config",
                manifest.layers.len(),
                diff_ids.len()
            )));
        }
        let total: u64 = manifest.layers.iter().map(|l| l.size.max(0) as u64).sum();
        if total > self.cfg.max_bytes {
            return Err(OciError::TooLarge(format!(
                "the image's layers are {} MiB, more than the {} MiB allowed",
                total >> 20,
                self.cfg.max_bytes >> 20
            )));
        }
        progress(Progress::Manifest { digest: digest.clone(), layers: manifest.layers.len(), bytes: total });

        // Owned descriptors: a stream of borrowed ones makes the future too general to spawn.
        let descriptors: Vec<(usize, OciDescriptor, String)> = manifest
            .layers
            .iter()
            .cloned()
            .zip(diff_ids.iter().cloned())
            .enumerate()
            .map(|(i, (d, diff))| (i, d, diff))
            .collect();
        let (client, reference) = (&client, &reference);
        let layers: Vec<Layer> = futures::stream::iter(descriptors)
            .map(|(index, desc, diff_id)| async move {
                let (path, cached) = self.fetch_layer(client, reference, &desc, credentialed).await?;
                let size = desc.size.max(0) as u64;
                progress(Progress::Layer { index, digest: desc.digest.clone(), bytes: size, cached });
                Ok::<_, OciError>(Layer { path, media_type: desc.media_type, diff_id, size })
            })
            .buffered(PARALLEL_LAYERS)
            .try_collect()
            .await?;

        let runtime = config.config.unwrap_or_default();
        Ok(PulledImage {
            digest,
            config: ImageConfig {
                env: runtime.env.unwrap_or_default(),
                working_dir: runtime.working_dir.unwrap_or_default(),
                user: runtime.user.unwrap_or_default(),
                entrypoint: runtime.entrypoint,
                cmd: runtime.cmd,
            },
            layers,
        })
    }

    async fn config(
        &self,
        client: &Client,
        reference: &Reference,
        manifest: &OciImageManifest,
        credentialed: bool,
    ) -> Result<ConfigFile, OciError> {
        if manifest.config.size > 4 << 20 {
            return Err(OciError::Unusable("the image config is larger than 4 MiB".into()));
        }
        let mut bytes = Vec::new();
        client
            .pull_blob(reference, &manifest.config, &mut bytes)
            .await
            .map_err(|e| registry_error(e, reference, credentialed))?;
        serde_json::from_slice(&bytes).map_err(|e| OciError::Unusable(format!("the image config: {e}")))
    }

    /// The layer's file in the cache, downloaded (and its digest checked) unless it is there.
    async fn fetch_layer(
        &self,
        client: &Client,
        reference: &Reference,
        desc: &OciDescriptor,
        credentialed: bool,
    ) -> Result<(PathBuf, bool), OciError> {
        let path = self.blob_path(&desc.digest)?;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok((path, true));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        tokio::fs::create_dir_all(dir).await.map_err(|e| OciError::io("creating the layer cache", e))?;
        // A partial download never has the final name: a crash leaves only a `.partial` file,
        // removed by the next pull of the layer.
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        let file =
            tokio::fs::File::create(&partial).await.map_err(|e| OciError::io("creating a layer file", e))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let pulled = client.pull_blob(reference, desc, &mut out).await;
        if let Err(e) = pulled {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(registry_error(e, reference, credentialed));
        }
        use tokio::io::AsyncWriteExt;
        out.flush().await.map_err(|e| OciError::io("writing a layer", e))?;
        out.into_inner().sync_all().await.map_err(|e| OciError::io("writing a layer", e))?;
        tokio::fs::rename(&partial, &path).await.map_err(|e| OciError::io("storing a layer", e))?;
        Ok((path, false))
    }
}

/// The registry client's errors, as what the user can do about them.
fn registry_error(e: OciDistributionError, reference: &Reference, credentialed: bool) -> OciError {
    use OciDistributionError as E;
    let refused = || if credentialed { OciError::Unauthorized } else { OciError::CredentialsRequired };
    match e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => refused(),
        E::ImageManifestNotFoundError(_) => OciError::NotFound(reference.whole()),
        E::ServerError { code: 401 | 403, .. } => refused(),
        E::ServerError { code: 404, .. } => OciError::NotFound(reference.whole()),
        E::RegistryError { envelope, .. } => {
            use oci_client::errors::OciErrorCode as C;
            let has = |codes: &[C]| envelope.errors.iter().any(|e| codes.contains(&e.code));
            if has(&[C::Unauthorized, C::Denied]) {
                refused()
            } else if has(&[C::ManifestUnknown, C::NameUnknown, C::NotFound, C::BlobUnknown]) {
                OciError::NotFound(reference.whole())
            } else {
                let messages: Vec<&str> = envelope.errors.iter().map(|e| e.message.as_str()).collect();
                OciError::Registry(messages.join("; "))
            }
        }
        E::RequestError(r) if r.is_connect() || r.is_timeout() => {
            OciError::Unreachable(reference.resolve_registry().to_string())
        }
        E::DigestError(d) => OciError::Corrupt(d.to_string()),
        E::ManifestParsingError(m) => OciError::Unusable(format!("the manifest: {m}")),
        E::UnsupportedMediaTypeError(m) | E::IncompatibleLayerMediaTypeError(m) => {
            OciError::Unusable(format!("unsupported media type {m}"))
        }
        E::IoError(io) => OciError::io("pulling", io),
        other => OciError::Registry(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_debug_hides_the_password() {
        let c = Credentials::Basic { username: "u".into(), password: "hunter2".into() };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn only_sha256_digests_name_cache_files() {
        let p = Puller::new(PullConfig { cache_dir: "/c".into(), insecure: vec![], max_bytes: 1 });
        let hex = "ab".repeat(32);
        assert_eq!(
            p.blob_path(&format!("sha256:{hex}")).unwrap(),
            PathBuf::from(format!("/c/blobs/sha256/{hex}"))
        );
        for bad in ["sha256:../../etc", "sha512:ab", &format!("sha256:{}", "g".repeat(64))] {
            assert!(p.blob_path(bad).is_err(), "{bad}");
        }
    }
}
