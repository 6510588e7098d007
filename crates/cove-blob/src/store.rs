//! [`BlobStore`]: the one handle Cove stores blobs through, opened from a URL.
//!
//! It is deliberately small (put, get, exists, delete a prefix, list "directories") because that
//! is all images need, and every call goes through `object_store`'s `ObjectStore` trait so the
//! local and S3 backends cannot drift apart and tests can wrap the store to inject failures.
//!
//! Durability: a paused sandbox's image must survive a host crash once Cove has said it is
//! written. object_store's `LocalFileSystem` writes every object to a staging file and renames
//! it into place; since object_store 0.14 it can also fsync (`with_fsync`): the staging file
//! before the rename, the destination directory after it, and every directory it had to create.
//! The local backend turns that on, so a successful `put` (or multipart upload, which `pack_file`
//! uses) is durable and atomic, and we do not keep a second write path of our own.
//! S3 is durable when it answers.
//!
//! Credentials come from [`S3Options`] (by default the usual `AWS_*` environment variables) and
//! never appear in [`BlobStore::description`] or in `Debug` output.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::BlobError;

/// How to reach an S3-compatible store. [`S3Options::from_env`] fills it from the environment;
/// tests build it directly so that they need not touch process-wide state.
#[derive(Clone, Default, PartialEq)]
pub struct S3Options {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// `AWS_SESSION_TOKEN`, for temporary credentials.
    pub session_token: Option<String>,
    /// `AWS_REGION`; "us-east-1" when unset.
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL`: a non-AWS server (MinIO, Ceph, s3s, ...). Requests are then
    /// path-style (`http://host/bucket/key`), and plain http is allowed when the URL says so.
    pub endpoint_url: Option<String>,
}

impl S3Options {
    /// Reads `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`
    /// and `AWS_ENDPOINT_URL`; empty values count as unset.
    pub fn from_env() -> S3Options {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        S3Options {
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN"),
            region: var("AWS_REGION"),
            endpoint_url: var("AWS_ENDPOINT_URL"),
        }
    }
}

/// Secrets are never printed.
impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Options")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .field("session_token", &redacted(&self.session_token))
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .finish()
    }
}

/// A place to keep blobs: a local directory or an S3 bucket (with an optional key prefix).
/// Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
    description: Arc<str>,
    /// The directory of a local store, whose objects are plain files under it.
    local: Option<Arc<std::path::Path>>,
}

impl fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BlobStore").field(&self.description).finish()
    }
}

impl BlobStore {
    /// Opens a store from a URL, taking S3 settings from the environment
    /// ([`S3Options::from_env`]):
    ///
    /// - `file:///abs/dir` or `/abs/dir`: a local directory (created if missing); objects are
    ///   files under it, written atomically and fsynced.
    /// - `s3://bucket` or `s3://bucket/prefix`: an S3 bucket; keys are relative to the prefix.
    pub fn open(url: &str) -> Result<BlobStore, BlobError> {
        BlobStore::open_with(url, &S3Options::from_env())
    }

    /// [`BlobStore::open`] with explicit S3 settings (ignored for local stores).
    pub fn open_with(url: &str, s3: &S3Options) -> Result<BlobStore, BlobError> {
        let invalid = |reason: String| BlobError::InvalidUrl { url: url.to_string(), reason };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid("no bucket name".into()));
            }
            return open_s3(bucket, prefix.trim_matches('/'), s3).map_err(invalid);
        }
        let dir = url.strip_prefix("file://").unwrap_or(url);
        if !dir.starts_with('/') {
            return Err(invalid(
                "expected file:///absolute/path, /absolute/path or s3://bucket[/prefix]".into(),
            ));
        }
        let dir = dir.trim_end_matches('/');
        let dir = if dir.is_empty() { "/" } else { dir };
        std::fs::create_dir_all(dir).map_err(|e| invalid(format!("creating directory {dir}: {e}")))?;
        // LocalFileSystem fsyncs the directories it creates below the root, not the root's own
        // entry: make sure a freshly created root survives a crash too.
        for d in [Some(std::path::Path::new(dir)), std::path::Path::new(dir).parent()].into_iter().flatten() {
            std::fs::File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(|e| invalid(format!("syncing directory {}: {e}", d.display())))?;
        }
        let local = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| invalid(e.to_string()))?
            .with_fsync(true)
            // Deleting the last object of a "directory" removes the directory too, as on S3.
            .with_automatic_cleanup(true);
        let mut store = BlobStore::from_object_store(Arc::new(local), format!("file://{dir}"));
        store.local = Some(std::path::Path::new(dir).into());
        Ok(store)
    }

    /// Wraps any `ObjectStore` (tests use this to inject failures). `description` is what
    /// errors and logs call the store; it must not contain secrets.
    pub fn from_object_store(store: Arc<dyn ObjectStore>, description: impl Into<String>) -> BlobStore {
        BlobStore { inner: store, description: description.into().into(), local: None }
    }

    /// The file holding the object at `key`, for a local store (`None` for any other).
    pub fn local_file(&self, key: &str) -> Option<std::path::PathBuf> {
        let path = object_path(key).ok()?;
        Some(self.local.as_ref()?.join(path.as_ref()))
    }

    /// Where the store is, e.g. `file:///var/lib/cove/blobs` or
    /// `s3://bucket/prefix (endpoint http://127.0.0.1:9000, region us-east-1)`. Never credentials.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Writes `data` at `key`, replacing what was there. Durable when it returns.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), BlobError> {
        let path = object_path(key)?;
        self.inner.put(&path, PutPayload::from(data)).await.map_err(|e| self.error("put", key, e))?;
        Ok(())
    }

    /// The whole object at `key`; [`BlobError::NotFound`] when there is none.
    pub async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        let path = object_path(key)?;
        let result = self.inner.get(&path).await.map_err(|e| self.error("get", key, e))?;
        result.bytes().await.map_err(|e| self.error("get", key, e))
    }

    /// Whether an object exists at `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, BlobError> {
        let path = object_path(key)?;
        match self.inner.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error("head", key, e)),
        }
    }

    /// Deletes every object under `prefix/` and returns how many there were. An empty prefix
    /// is refused: wiping a whole store takes more than a typo.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64, BlobError> {
        let path = object_path(prefix)?;
        let locations = self.inner.list(Some(&path)).map_ok(|meta| meta.location).boxed();
        self.inner
            .delete_stream(locations)
            .try_fold(0u64, |n, _| async move { Ok(n + 1) })
            .await
            .map_err(|e| self.error("delete", prefix, e))
    }

    /// Names of the immediate "subdirectories" of `prefix` (the common prefixes of the keys
    /// under `prefix/`), sorted. An empty `prefix` lists the top level.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        let path = if prefix.trim_matches('/').is_empty() { None } else { Some(object_path(prefix)?) };
        let listing =
            self.inner.list_with_delimiter(path.as_ref()).await.map_err(|e| self.error("list", prefix, e))?;
        let mut names: Vec<String> =
            listing.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
        names.sort();
        Ok(names)
    }

    pub(crate) fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Maps an object_store error for `op` on `key`: "not found" becomes [`BlobError::NotFound`].
    pub(crate) fn error(&self, op: &'static str, key: &str, e: object_store::Error) -> BlobError {
        match e {
            object_store::Error::NotFound { .. } => BlobError::NotFound(key.to_string()),
            source => BlobError::Store {
                store: self.description.to_string(),
                op,
                key: key.to_string(),
                source: Box::new(source),
            },
        }
    }
}

/// Parses a key into an object path, refusing what would escape or be ambiguous ("", "..",
/// "a//b", control characters).
pub(crate) fn object_path(key: &str) -> Result<Path, BlobError> {
    let trimmed = key.trim_matches('/');
    if trimmed.is_empty() {
        return Err(BlobError::InvalidKey { key: key.to_string(), reason: "empty".into() });
    }
    Path::parse(trimmed).map_err(|e| BlobError::InvalidKey { key: key.to_string(), reason: e.to_string() })
}

/// `prefix/name`, or `name` when the prefix is empty.
pub(crate) fn join_key(prefix: &str, name: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

fn open_s3(bucket: &str, prefix: &str, opts: &S3Options) -> Result<BlobStore, String> {
    let (Some(key_id), Some(secret)) = (&opts.access_key_id, &opts.secret_access_key) else {
        return Err("S3 credentials missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into());
    };
    let region = opts.region.as_deref().unwrap_or("us-east-1");
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(region)
        .with_access_key_id(key_id)
        .with_secret_access_key(secret);
    if let Some(token) = &opts.session_token {
        builder = builder.with_token(token);
    }
    let mut description = format!("s3://{bucket}");
    if !prefix.is_empty() {
        description = format!("{description}/{prefix}");
    }
    match &opts.endpoint_url {
        Some(endpoint) => {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.starts_with("http://"));
            description = format!("{description} (endpoint {endpoint}, region {region})");
        }
        None => description = format!("{description} (region {region})"),
    }
    let s3 = builder.build().map_err(|e| e.to_string())?;
    let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
        Arc::new(s3)
    } else {
        let prefix = Path::parse(prefix).map_err(|e| format!("invalid prefix {prefix:?}: {e}"))?;
        Arc::new(PrefixStore::new(s3, prefix))
    };
    Ok(BlobStore::from_object_store(store, description))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&format!("file://{}/blobs", dir.path().display())).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn local_put_get_list_delete() {
        let (dir, store) = local();
        assert!(store.description().starts_with("file:///"));
        assert!(dir.path().join("blobs").is_dir());
        assert!(!store.exists("a/b").await.unwrap());
        assert!(matches!(store.get("a/b").await, Err(BlobError::NotFound(k)) if k == "a/b"));

        store.put("img/1/ram", Bytes::from_static(b"one")).await.unwrap();
        store.put("img/1/manifest.json", Bytes::from_static(b"{}")).await.unwrap();
        store.put("img/2/ram", Bytes::from_static(b"two")).await.unwrap();
        store.put("imgx/3/ram", Bytes::from_static(b"three")).await.unwrap();
        assert_eq!(store.get("img/1/ram").await.unwrap(), Bytes::from_static(b"one"));
        assert!(store.exists("img/2/ram").await.unwrap());
        assert_eq!(store.list_dirs("img").await.unwrap(), ["1", "2"]);
        assert_eq!(store.list_dirs("").await.unwrap(), ["img", "imgx"]);
        assert!(store.list_dirs("nothing/here").await.unwrap().is_empty());

        assert_eq!(store.delete_prefix("img/1").await.unwrap(), 2);
        assert_eq!(store.list_dirs("img").await.unwrap(), ["2"]);
        assert_eq!(store.delete_prefix("img").await.unwrap(), 1);
        assert_eq!(store.delete_prefix("img").await.unwrap(), 0);
        // "imgx" only shares a string prefix with "img": untouched.
        assert!(store.exists("imgx/3/ram").await.unwrap());
        // Objects live at root/key, and emptied directories are cleaned up.
        assert!(dir.path().join("blobs/imgx/3/ram").is_file());
        assert!(!dir.path().join("blobs/img").exists());
    }

    #[tokio::test]
    async fn bad_keys_and_urls() {
        let (_dir, store) = local();
        for key in ["", "/", "a//b", "../x", "a/../b"] {
            assert!(
                matches!(store.put(key, Bytes::new()).await, Err(BlobError::InvalidKey { .. })),
                "{key:?} accepted"
            );
        }
        assert!(matches!(store.delete_prefix("").await, Err(BlobError::InvalidKey { .. })));
        for url in ["relative/dir", "s3://", "http://x/y"] {
            assert!(matches!(BlobStore::open(url), Err(BlobError::InvalidUrl { .. })), "{url:?} accepted");
        }
        let no_creds = BlobStore::open_with("s3://bucket", &S3Options::default()).unwrap_err();
        assert!(no_creds.to_string().contains("AWS_ACCESS_KEY_ID"), "{no_creds}");
    }

    #[test]
    fn s3_description_has_no_secrets() {
        let opts = S3Options {
            access_key_id: Some("AKIDEXAMPLE".into()),
            secret_access_key: Some("very-secret".into()),
            endpoint_url: Some("http://127.0.0.1:9000".into()),
            ..S3Options::default()
        };
        let store = BlobStore::open_with("s3://bucket/some/prefix/", &opts).unwrap();
        assert_eq!(
            store.description(),
            "s3://bucket/some/prefix (endpoint http://127.0.0.1:9000, region us-east-1)"
        );
        let debug = format!("{opts:?} {store:?}");
        assert!(!debug.contains("very-secret"), "{debug}");
    }
}
