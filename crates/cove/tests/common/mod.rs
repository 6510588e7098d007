//! Shared harness for the real-VM tests: one `cove server` per test binary, started from the
//! real binary on a free port with its own data dir, and an organization per test so that tests
//! running in parallel never share a sandbox limit.
//!
//! The server uses the host's cache dir (`COVE_CACHE_DIR`, default /var/cache/cove), so the
//! template snapshot is booted once per host and shared; `cove setup` must have run. A missing
//! setup fails the tests: a skipped VM suite is not a passing one.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

pub struct TestServer {
    pub url: String,
    /// Pid of the `cove server` process.
    pub pid: u32,
    pub data_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub admin_key: String,
}

static SERVER: OnceLock<TestServer> = OnceLock::new();

pub fn cache_dir() -> PathBuf {
    std::env::var("COVE_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/var/cache/cove"))
}

impl TestServer {
    pub fn shared() -> &'static TestServer {
        SERVER.get_or_init(|| TestServer::start(&[]))
    }

    /// Starts a server from the `cove` binary. It is spawned from a thread that lives as long
    /// as the test process, with PDEATHSIG, so the server ends with the tests.
    pub fn start(extra_args: &[&str]) -> TestServer {
        let data_dir = std::env::temp_dir().join(format!("cove-test-{}-{}", std::process::id(), rand_hex()));
        Self::start_in(data_dir, extra_args)
    }

    /// Starts a server on `data_dir` (a new one, or one an earlier server used).
    pub fn start_in(data_dir: PathBuf, extra_args: &[&str]) -> TestServer {
        let cache = cache_dir();
        assert!(
            cache.join("initramfs/initramfs.cpio").exists(),
            "{} has no guest images: run `cove setup` (scripts/test does) before the VM tests",
            cache.display()
        );
        std::fs::create_dir_all(&data_dir).unwrap();
        let admin_key = format!("cove_test_{}", rand_hex());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cove"));
        cmd.arg("server")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .arg("--cache-dir")
            .arg(&cache)
            .args(extra_args)
            .env("COVE_BOOTSTRAP_API_KEY", &admin_key)
            .env("COVE_LOG", "info,cove_runner=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(data_dir.join("server.log"))
                    .unwrap(),
            ));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            let mut child = cmd.spawn().expect("spawning cove server");
            let pid = child.id();
            let stdout = child.stdout.take().unwrap();
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let line = line.unwrap_or_default();
                if let Some(addr) = line.strip_prefix("cove listening on ") {
                    tx.send((addr.trim().to_string(), pid)).unwrap();
                    break;
                }
            }
            // Keep draining stdout, and keep this thread (the server's parent) alive.
            for _ in lines {}
            let _ = child.wait();
            loop {
                std::thread::park();
            }
        });
        let (url, pid) = rx.recv_timeout(Duration::from_secs(60)).expect("cove server did not start");
        TestServer { url, pid, data_dir, cache_dir: cache, admin_key }
    }

    /// Sends `signal` to the server and waits until it has exited.
    pub fn kill(&self, signal: i32) {
        // SAFETY: kill(2) with plain integers.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.pid as i32, signal);
        }
        for _ in 0..500 {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
            if stat.is_empty() || stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("cove server {} did not exit", self.pid);
    }

    /// A new organization with its own key (straight into the store, as an operator would).
    pub fn new_org(&self, limit: Option<u64>) -> Api {
        let store = cove_store::Store::open(&self.data_dir.join("cove.db")).unwrap();
        let org = store.create_org(&format!("org-{}", rand_hex()), limit).unwrap();
        let key = cove_store::generate_key();
        store.add_key(&org.id, "test", &key).unwrap();
        Api { url: self.url.clone(), key, http: client() }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

pub fn rand_hex() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{:x}{:x}", n, std::process::id())
}

/// A client bound to one organization's key.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub key: String,
    pub http: reqwest::Client,
}

pub struct Resp {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Api {
    pub async fn req(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Resp {
        let mut r = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        Self::finish(r).await
    }

    pub async fn raw(&self, r: reqwest::RequestBuilder) -> Resp {
        Self::finish(r.bearer_auth(&self.key)).await
    }

    async fn finish(r: reqwest::RequestBuilder) -> Resp {
        let resp = r.send().await.expect("request failed");
        let status = resp.status().as_u16();
        let content_type =
            resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = resp.bytes().await.expect("reading body").to_vec();
        Resp { status, body, content_type }
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.req(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.req(reqwest::Method::GET, path, None).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.req(reqwest::Method::DELETE, path, None).await
    }

    /// Creates a sandbox of the default template; panics unless 201.
    pub async fn create(&self, extra: Value) -> String {
        let mut body = json!({ "template_name": "system/debian:bookworm" });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let r = self.post("/v1/sandbox", body).await;
        assert_eq!(r.status, 201, "create failed: {}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// Runs a command; returns (exit_code, stdout, stderr).
    pub async fn exec(&self, id: &str, command: &str) -> (i64, String, String) {
        let r = self.post(&format!("/v1/sandbox/{id}/process/execute"), json!({ "command": command })).await;
        assert_eq!(r.status, 200, "exec failed: {}", r.text());
        let v = r.json();
        (
            v["exit_code"].as_i64().unwrap(),
            v["stdout"].as_str().unwrap().into(),
            v["stderr"].as_str().unwrap().into(),
        )
    }

    pub async fn fs(&self, id: &str, op: &str, body: Value) -> Resp {
        self.post(&format!("/v1/sandbox/{id}/filesystem/{op}"), body).await
    }
}

/// Field names of a 400 answer.
pub fn fields(r: &Resp) -> Vec<String> {
    assert_eq!(r.status, 400, "expected 400, got {}: {}", r.status, r.text());
    let v = r.json();
    assert!(v["message"].is_string(), "no message: {v}");
    v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors list: {v}"))
        .iter()
        .map(|e| e["field"].as_str().unwrap_or_default().to_string())
        .collect()
}

pub fn assert_field(r: &Resp, field: &str) {
    let f = fields(r);
    assert!(f.iter().any(|x| x == field), "expected field {field:?} in {f:?}: {}", r.text());
}
