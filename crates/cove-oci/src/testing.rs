//! For tests: a real registry on loopback (Debian's `docker-registry`, optionally behind
//! htpasswd basic auth) and images built here, layer by layer, and pushed to it.
//!
//! Needs the Debian packages `docker-registry` and `apache2-utils` (htpasswd); the test scripts
//! install them.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciImageIndex, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A registry serving plain HTTP on `127.0.0.1:<port>`; stopped when dropped.
pub struct Registry {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    auth: Option<(String, String)>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry; with `auth`, every request needs that username and password.
    pub fn start(auth: Option<(&str, &str)>) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: apt-get install docker-registry apache2-utils (scripts/test does)"
        );
        let dir = tempfile::Builder::new().prefix("cove-test-registry-").tempdir().expect("tempdir");
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = auth {
            let out =
                Command::new("htpasswd").args(["-nbB", user, password]).output().expect("running htpasswd");
            assert!(out.status.success(), "htpasswd: {}", String::from_utf8_lossy(&out.stderr));
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).expect("writing htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: cove-test\n    path: {}\n",
                file.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("writing registry config");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        let registry =
            Registry { addr, auth: auth.map(|(u, p)| (u.to_string(), p.to_string())), child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not listen on {}", registry.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    fn client(&self) -> (Client, RegistryAuth) {
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(vec![self.addr.clone()]),
            ..Default::default()
        });
        let auth = match &self.auth {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        (client, auth)
    }

    /// `<addr>/<repo>:<tag>`.
    pub fn uri(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    /// Pushes `image` as `<repo>:<tag>`; returns the manifest digest.
    pub async fn push(&self, repo_tag: &str, image: &Image) -> String {
        let reference: Reference = self.uri(repo_tag).parse().expect("reference");
        let (client, auth) = self.client();
        let layers: Vec<ImageLayer> = image
            .layers
            .iter()
            .map(|tar| {
                ImageLayer::new(gzip(tar), oci_client::manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE.into(), None)
            })
            .collect();
        let config = Config::new(
            serde_json::to_vec(&image.config_json()).expect("config json"),
            oci_client::manifest::IMAGE_CONFIG_MEDIA_TYPE.into(),
            None,
        );
        let manifest = OciImageManifest::build(&layers, &config, None);
        client.push(&reference, &layers, config, &auth, Some(manifest)).await.expect("pushing the image");
        client.fetch_manifest_digest(&reference, &auth).await.expect("manifest digest")
    }

    /// Pushes an index of images already pushed (by digest), each with its `os/arch`.
    pub async fn push_index(&self, repo_tag: &str, entries: &[(&str, &str)]) {
        let reference: Reference = self.uri(repo_tag).parse().expect("reference");
        let (client, auth) = self.client();
        let manifests: Vec<serde_json::Value> =
            futures::future::join_all(entries.iter().map(|(digest, platform)| {
                let by_digest = reference.clone_with_digest(digest.to_string());
                let (client, auth) = (&client, &auth);
                async move {
                    let (raw, _) = client
                        .pull_manifest_raw(&by_digest, auth, &[oci_client::manifest::OCI_IMAGE_MEDIA_TYPE])
                        .await
                        .expect("manifest");
                    let (os, arch) = platform.split_once('/').expect("os/arch");
                    serde_json::json!({
                        "mediaType": oci_client::manifest::OCI_IMAGE_MEDIA_TYPE,
                        "digest": digest,
                        "size": raw.len(),
                        "platform": {"os": os, "architecture": arch},
                    })
                }
            }))
            .await;
        let index: OciImageIndex = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
            "manifests": manifests,
        }))
        .expect("index");
        client.push_manifest_list(&reference, &auth, index).await.expect("pushing the index");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

/// An image: uncompressed layer tars and the runtime config.
#[derive(Default, Clone)]
pub struct Image {
    pub layers: Vec<Vec<u8>>,
    /// `linux/amd64` unless set.
    pub platform: Option<(String, String)>,
    pub env: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub working_dir: String,
    pub user: String,
    /// When set, the config's `diff_ids` are wrong (a corrupt image).
    pub wrong_diff_ids: bool,
}

impl Image {
    pub fn config_json(&self) -> serde_json::Value {
        let (os, arch) = self.platform.clone().unwrap_or(("linux".into(), "amd64".into()));
        let diff_ids: Vec<String> = self
            .layers
            .iter()
            .map(|l| {
                let data: &[u8] = if self.wrong_diff_ids { b"not the layer" } else { l };
                format!("sha256:{}", hex::encode(Sha256::digest(data)))
            })
            .collect();
        serde_json::json!({
            "architecture": arch,
            "os": os,
            "config": {
                "Env": self.env,
                "Entrypoint": self.entrypoint,
                "Cmd": self.cmd,
                "WorkingDir": self.working_dir,
                "User": self.user,
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
    }
}

/// Writes one layer's tar.
pub struct Layer {
    b: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Layer { b: tar::Builder::new(Vec::new()) }
    }
}

impl Layer {
    fn header(kind: tar::EntryType, mode: u32, owner: (u64, u64), size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h
    }

    pub fn dir(mut self, path: &str, mode: u32, owner: (u64, u64)) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, owner, 0);
        self.b.append_data(&mut h, path, std::io::empty()).expect("tar dir");
        self
    }

    pub fn file(mut self, path: &str, data: &[u8], mode: u32, owner: (u64, u64)) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, owner, data.len() as u64);
        self.b.append_data(&mut h, path, data).expect("tar file");
        self
    }

    /// A file with extended attributes (PAX `SCHILY.xattr.*` records, as Docker writes them).
    pub fn file_with_xattrs(mut self, path: &str, data: &[u8], mode: u32, xattrs: &[(&str, &[u8])]) -> Self {
        let records: Vec<(String, &[u8])> =
            xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
        self.b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v))).expect("tar pax");
        self.file(path, data, mode, (0, 0))
    }

    /// A host file's content at `path`.
    pub fn host_file(self, path: &str, host: &Path, mode: u32) -> Self {
        let data = std::fs::read(host).unwrap_or_else(|e| panic!("reading {}: {e}", host.display()));
        self.file(path, &data, mode, (0, 0))
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, (0, 0), 0);
        self.b.append_link(&mut h, path, target).expect("tar symlink");
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, (0, 0), 0);
        self.b.append_link(&mut h, path, target).expect("tar hard link");
        self
    }

    /// Deletes `path` of the layers below.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let wh = if dir.is_empty() { format!(".wh.{name}") } else { format!("{dir}/.wh.{name}") };
        self.file(&wh, b"", 0o644, (0, 0))
    }

    /// Hides what the layers below put in `dir`.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644, (0, 0))
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().expect("tar")
    }
}

/// Host programs (names on the PATH, or absolute paths) and every shared library they load, as
/// files of a layer: a small glibc userland made of this machine's Debian binaries.
pub fn host_programs(mut layer: Layer, programs: &[&str]) -> Layer {
    let mut files: BTreeMap<String, ()> = BTreeMap::new();
    for p in programs {
        let path = which(p);
        files.insert(path.clone(), ());
        let out = Command::new("ldd").arg(&path).output().expect("running ldd");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let lib = line.split("=>").last().unwrap_or("").split_whitespace().next().unwrap_or("");
            if lib.starts_with('/') {
                files.insert(lib.to_string(), ());
            }
        }
    }
    for f in files.keys() {
        let real = std::fs::canonicalize(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        use std::os::unix::fs::PermissionsExt;
        let mode =
            std::fs::metadata(&real).unwrap_or_else(|e| panic!("{f}: {e}")).permissions().mode() & 0o7777;
        layer = layer.host_file(f.trim_start_matches('/'), &real, mode);
    }
    layer
}

fn which(program: &str) -> String {
    if program.starts_with('/') {
        assert!(Path::new(program).exists(), "{program} is not installed on this host");
        return program.to_string();
    }
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let p = format!("{dir}/{program}");
        if Path::new(&p).exists() {
            return p;
        }
    }
    panic!("{program} is not installed on this host")
}
