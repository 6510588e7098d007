//! A real S3 server for tests: s3s-fs (crates.io), installed by `scripts/s3-server install`,
//! started on a free port with its own root directory and credentials. Used by this crate's
//! S3 tests and by the VM tests that run Cove on an S3 blob store.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::{BlobStore, S3Options};

pub const ACCESS_KEY: &str = "cove-test-access";
pub const SECRET_KEY: &str = "cove-test-secret-0123456789";
pub const BUCKET: &str = "cove-test";

pub fn s3s_fs_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("COVE_S3S_FS") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("COVE_CACHE_DIR").unwrap_or_else(|| "/var/cache/cove".into());
    let path = Path::new(&cache).join("tools/bin/s3s-fs");
    assert!(
        path.is_file(),
        "the S3 test server {} is missing: run `scripts/s3-server install` (or set COVE_S3S_FS)",
        path.display()
    );
    path
}

/// A running s3s-fs, killed when dropped.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub root: tempfile::TempDir,
}

impl S3Server {
    /// A server that requires requests signed with [`ACCESS_KEY`]/[`SECRET_KEY`].
    pub fn start() -> S3Server {
        let auth = ["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY];
        Self::spawn(&s3s_fs_binary(), None, "127.0.0.1:0", &auth).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`S3Server::start`], on `listen` (`ip:port`), e.g. an address that other network
    /// namespaces reach.
    pub fn start_on(listen: &str) -> S3Server {
        let auth = ["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY];
        Self::spawn(&s3s_fs_binary(), None, listen, &auth).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A server without credentials: it serves unsigned requests (a public bucket) and refuses
    /// signed ones.
    pub fn start_anonymous() -> S3Server {
        Self::spawn(&s3s_fs_binary(), None, "127.0.0.1:0", &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `binary` without credentials inside network namespace `netns`, on `listen` (`ip:port`):
    /// e.g. on the test internet, where the host and guests alike reach it.
    pub fn start_anonymous_in(binary: &Path, netns: &str, listen: &str) -> Result<S3Server, String> {
        Self::spawn(binary, Some(netns), listen, &[])
    }

    fn spawn(binary: &Path, netns: Option<&str>, listen: &str, auth: &[&str]) -> Result<S3Server, String> {
        let (host, port) = listen.rsplit_once(':').ok_or_else(|| format!("{listen:?} is not ip:port"))?;
        let root = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        // s3s-fs keeps each bucket as a directory under its root.
        std::fs::create_dir(root.path().join(BUCKET)).map_err(|e| format!("bucket dir: {e}"))?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        // Port 0: the kernel picks a free port, and the server logs the address it bound.
        let mut child = cmd
            .args(["--host", host, "--port", port])
            .args(auth)
            .arg(root.path())
            .env("RUST_LOG", "s3s_fs=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;

        // Read its log on a thread (which keeps draining it afterwards, so the server never
        // blocks on a full pipe) until it says where it listens.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("server is running at http://") {
                    let url = line[at + "server is running at ".len()..].trim().to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url);
                    }
                }
            }
        });
        let endpoint = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} did not report its address within 20 s", binary.display()));
            }
        };
        Ok(S3Server { child, endpoint, root })
    }

    /// The directory of bucket [`BUCKET`]: a file written under it is an object.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(BUCKET)
    }

    pub fn options(&self, secret: &str) -> S3Options {
        S3Options {
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(secret.into()),
            endpoint_url: Some(self.endpoint.clone()),
            ..S3Options::default()
        }
    }

    pub fn store(&self, prefix: &str) -> BlobStore {
        BlobStore::open_with(&format!("s3://{BUCKET}/{prefix}"), &self.options(SECRET_KEY)).unwrap()
    }

    /// Where the server keeps the object `key` of the test bucket.
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
