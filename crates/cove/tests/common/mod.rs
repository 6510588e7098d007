//! Shared harness for the real-VM tests: one `cove server` per test binary, started from the
//! real binary on a free port with its own data dir, and an organization per test so that tests
//! running in parallel never share a sandbox limit.
//!
//! The server uses the host's cache dir (`COVE_CACHE_DIR`, default /var/cache/cove), so the
//! template snapshot is booted once per host and shared; `cove setup` must have run. A missing
//! setup fails the tests: a skipped VM suite is not a passing one.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

pub struct TestServer {
    pub url: String,
    /// The Prometheus endpoint (`…/metrics`).
    pub metrics_url: String,
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
        Self::start_with(data_dir, extra_args, &[])
    }

    /// Like `start_in`, with extra environment variables for the server.
    pub fn start_with(data_dir: PathBuf, extra_args: &[&str], envs: &[(&str, &str)]) -> TestServer {
        Self::start_on(cache_dir(), data_dir, extra_args, envs)
    }

    /// Like `start_with`, on the cache directory `cache` instead of the tests' shared one.
    pub fn start_on(
        cache: PathBuf,
        data_dir: PathBuf,
        extra_args: &[&str],
        envs: &[(&str, &str)],
    ) -> TestServer {
        assert!(
            cache.join("initramfs/initramfs.cpio").exists(),
            "{} has no guest images: run `cove setup` (scripts/test does) before the VM tests",
            cache.display()
        );
        std::fs::create_dir_all(&data_dir).unwrap();
        let admin_key = format!("cove_test_{}", rand_hex());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cove"));
        cmd.arg("server")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--ssh-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--cache-dir")
            .arg(&cache)
            .args(database_url(&data_dir).map(|url| format!("--database-url={url}")))
            .args(extra_args)
            .env("COVE_BOOTSTRAP_API_KEY", &admin_key)
            .env("COVE_LOG", "info,cove_runner=debug")
            .envs(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
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
            let mut metrics = String::new();
            for line in lines.by_ref() {
                let line = line.unwrap_or_default();
                if let Some(url) = line.strip_prefix("cove metrics on ") {
                    metrics = url.trim().to_string();
                }
                if let Some(addr) = line.strip_prefix("cove listening on ") {
                    tx.send((addr.trim().to_string(), metrics, pid)).unwrap();
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
        let (url, metrics_url, pid) =
            rx.recv_timeout(Duration::from_secs(60)).expect("cove server did not start");
        TestServer { url, metrics_url, pid, data_dir, cache_dir: cache, admin_key }
    }

    /// Sends `signal` to the server and waits until it has exited.
    pub fn kill(&self, signal: i32) {
        // SAFETY: kill(2) with plain integers.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.pid as i32, signal);
        }
        self.wait_exit();
    }

    /// Waits until the server process has exited (e.g. killed itself at a fault point).
    pub fn wait_exit(&self) {
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
        let store = match database_url(&self.data_dir) {
            Some(url) => cove_store::Store::connect(&url).unwrap(),
            None => cove_store::Store::open(&self.data_dir.join("cove.db")).unwrap(),
        };
        let org = store.create_org(&format!("org-{}", rand_hex()), limit).unwrap();
        let key = cove_store::generate_key();
        store.add_key(&org.id, "test", &key).unwrap();
        Api { url: self.url.clone(), key, http: client(), data_dir: Some(self.data_dir.clone()) }
    }

    /// The value of one sample of the Prometheus endpoint, named with its labels exactly as
    /// the exposition writes them (e.g. `cove_sandboxes{state="running"}`); 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = client().get(&self.metrics_url).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap_or_else(|_| panic!("{series}: not a number: {v}")))
    }
}

/// The Postgres database of the server on `data_dir` when the tests run on Postgres
/// (`COVE_TEST_POSTGRES`, see `cove_store::testing`): made for the first server on a data
/// directory, and kept in it for the servers that restart there.
fn database_url(data_dir: &std::path::Path) -> Option<String> {
    let file = data_dir.join("test-database-url");
    if let Ok(url) = std::fs::read_to_string(&file) {
        return Some(url);
    }
    let url = cove_store::testing::fresh_postgres_database().expect("creating a test database")?;
    std::fs::create_dir_all(data_dir).unwrap();
    std::fs::write(&file, &url).unwrap();
    Some(url)
}

/// Everything the metadata store of the server on `data_dir` holds, as bytes to search for
/// secrets: the SQLite files, or a dump of its Postgres database.
pub fn stored_metadata(data_dir: &std::path::Path) -> Vec<u8> {
    match database_url(data_dir) {
        Some(url) => {
            let out = Command::new("pg_dump").args(["--data-only", &url]).output().expect("running pg_dump");
            assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
            out.stdout
        }
        None => ["cove.db", "cove.db-wal"]
            .iter()
            .flat_map(|f| std::fs::read(data_dir.join(f)).unwrap_or_default())
            .collect(),
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

/// A `cove runner` process: its address and certificate fingerprint. Killed when dropped.
pub struct RunnerProcess {
    pub addr: String,
    pub fingerprint: String,
    pub data_dir: PathBuf,
    pub child: std::process::Child,
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cove runner` on `data_dir`, listening on `listen`, with `extra` arguments and `envs`,
/// in network namespace `netns` if given (entered with `nsenter`, which keeps the mount
/// namespace, so the sandbox namespaces it makes are everyone's); waits until it listens.
pub fn start_runner(
    data_dir: &Path,
    listen: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
    netns: Option<&str>,
) -> RunnerProcess {
    std::fs::create_dir_all(data_dir).unwrap();
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(data_dir.join("runner.log")).unwrap();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(env!("CARGO_BIN_EXE_cove"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_cove")),
    };
    let mut child = cmd
        .args(["runner", "--listen", listen])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--cache-dir")
        .arg(cache_dir())
        .args(extra)
        .env("COVE_LOG", "info,cove_runner=debug")
        .envs(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawning cove runner");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut fingerprint, mut addr) = (String::new(), String::new());
    for line in lines.by_ref() {
        let line = line.unwrap_or_default();
        if let Some(f) = line.strip_prefix("cove runner fingerprint ") {
            fingerprint = f.trim().to_string();
        }
        if let Some(a) = line.strip_prefix("cove runner listening on ") {
            addr = a.trim().to_string();
            break;
        }
    }
    assert!(
        !addr.is_empty() && fingerprint.len() == 64,
        "cove runner did not start: see {}/runner.log",
        data_dir.display()
    );
    std::thread::spawn(move || for _ in lines {});
    RunnerProcess { addr, fingerprint, data_dir: data_dir.to_path_buf(), child }
}

/// A name part unique in this host's test runs: time, process and a counter (two threads can
/// read the same clock value, which once made two organizations share a name).
pub fn rand_hex() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{:x}{:x}{:x}", n, std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A client bound to one organization's key.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub key: String,
    pub http: reqwest::Client,
    /// The server's data dir, whose log a 5xx answer is explained from.
    pub data_dir: Option<PathBuf>,
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
    /// The same key against `server` (a server started again), on a client of its own: the
    /// keep-alive connections of a killed server look open until read, and a request sent on
    /// one fails, even when the new server listens on the same address.
    pub fn on(&self, server: &TestServer) -> Api {
        Api {
            url: server.url.clone(),
            key: self.key.clone(),
            http: client(),
            data_dir: Some(server.data_dir.clone()),
        }
    }

    pub async fn req(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Resp {
        let mut r = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        self.finish(r).await
    }

    pub async fn raw(&self, r: reqwest::RequestBuilder) -> Resp {
        self.finish(r.bearer_auth(&self.key)).await
    }

    async fn finish(&self, r: reqwest::RequestBuilder) -> Resp {
        let resp = r.send().await.expect("request failed");
        let status = resp.status().as_u16();
        if status >= 500 {
            self.explain_failure(status);
        }
        let content_type =
            resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = resp.bytes().await.expect("reading body").to_vec();
        Resp { status, body, content_type }
    }

    /// Prints (into the test's captured output, shown if it fails) the server's last warnings:
    /// a client sees only a message, the reason is in the log, and CI keeps nothing else.
    fn explain_failure(&self, status: u16) {
        let Some(dir) = &self.data_dir else { return };
        let lines = server_log_lines(dir);
        let warnings: Vec<&String> =
            lines.iter().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
        let last = &warnings[warnings.len().saturating_sub(10)..];
        eprintln!("the server answered {status}; its last warnings:");
        for line in last {
            eprintln!("  {line}");
        }
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
        self.exec_for(id, command, 30).await
    }

    /// Runs a command that may take up to `timeout` seconds.
    pub async fn exec_for(&self, id: &str, command: &str, timeout: u64) -> (i64, String, String) {
        let body = json!({ "command": command, "timeout": timeout });
        let r = self.post(&format!("/v1/sandbox/{id}/process/execute"), body).await;
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

/// Pids of the QEMU processes of sandbox `id` (their command line names the VM `cove-<id>,`).
pub fn qemu_pids(id: &str) -> Vec<u32> {
    qemu_pids_naming(&format!("cove-{id},"))
}

/// Pids of the live QEMU processes whose command line contains `want`.
pub fn qemu_pids_naming(want: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'));
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("qemu-system") && cmdline.contains(want) && !zombie
        })
        .collect()
}

/// Names of the image directories in a server's local blob store.
pub fn stored_images(data_dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("blobs/images"))
        .map(|rd| rd.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect())
        .unwrap_or_default()
}

// ---- Helpers of the pause, stop/start and snapshot tests ----

/// How long a delete waits for a sandbox in a transition (409) to settle.
const SETTLE: Duration = Duration::from_secs(60);

/// Sends a delete until its answer is not `settling` (a sandbox in a transition, say an
/// auto-pause, answers 409: try again, as the message asks) or [`SETTLE`] has passed.
async fn once_settled<T>(mut send: impl AsyncFnMut() -> T, settling: impl Fn(&T) -> bool) -> T {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let r = send().await;
        if !settling(&r) || std::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sandboxes and snapshots a test made and has not deleted itself: deleted when this is dropped,
/// also when an assertion failed, from a thread of its own (a panicking async test cannot await).
pub struct Leftovers {
    api: Api,
    paths: std::sync::Mutex<Vec<String>>,
}

impl Leftovers {
    pub fn new(api: &Api) -> Leftovers {
        Leftovers { api: api.clone(), paths: std::sync::Mutex::new(Vec::new()) }
    }

    pub fn sandbox(&self, id: &str) {
        self.paths.lock().unwrap().push(format!("/v1/sandbox/{id}"));
    }

    pub fn snapshot(&self, id: &str) {
        self.paths.lock().unwrap().push(format!("/v1/snapshot/{id}"));
    }

    /// Forgets a path that is gone by other means (e.g. `kill_sandbox_after`).
    pub fn forget(&self, path: &str) {
        self.paths.lock().unwrap().retain(|p| p != path);
    }

    /// Deletes a sandbox now, once it has settled; panics unless 204.
    pub async fn delete_sandbox(&self, id: &str) {
        let path = format!("/v1/sandbox/{id}");
        let r = once_settled(async || self.api.delete(&path).await, |r| r.status == 409).await;
        assert_eq!(r.status, 204, "deleting sandbox {id}: {}", r.text());
        self.forget(&path);
    }

    /// Deletes a snapshot (id or name) now; panics unless 204.
    pub async fn delete_snapshot(&self, id: &str) {
        let path = format!("/v1/snapshot/{id}");
        let r = self.api.delete(&path).await;
        assert_eq!(r.status, 204, "deleting snapshot {id}: {}", r.text());
        self.forget(&path);
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let paths = std::mem::take(&mut *self.paths.lock().unwrap_or_else(|e| e.into_inner()));
        if paths.is_empty() {
            return;
        }
        let (url, key) = (self.api.url.clone(), self.api.key.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let http = client();
                for path in paths {
                    // A sandbox's 409 passes as it settles; a snapshot's (in use) does not.
                    let sandbox = path.starts_with("/v1/sandbox/");
                    let _ = once_settled(
                        async || http.delete(format!("{url}{path}")).bearer_auth(&key).send().await,
                        |r| sandbox && r.as_ref().is_ok_and(|r| r.status() == reqwest::StatusCode::CONFLICT),
                    )
                    .await;
                }
            });
        })
        .join();
    }
}

impl Api {
    /// Runs a shell command in the guest; panics unless it exits 0. Returns its stdout.
    pub async fn sh_ok(&self, id: &str, command: &str) -> String {
        let (code, out, err) = self.exec(id, command).await;
        assert_eq!(code, 0, "`{command}` in {id} exited {code}: {out}{err}");
        out
    }

    /// `POST /v1/sandbox/{id}/{action}` without a body (pause, resume, stop, start).
    pub async fn action(&self, id: &str, action: &str) -> Resp {
        self.req(reqwest::Method::POST, &format!("/v1/sandbox/{id}/{action}"), None).await
    }

    /// The sandbox's state as GET reports it; panics unless 200.
    pub async fn state_of(&self, id: &str) -> String {
        let r = self.get(&format!("/v1/sandbox/{id}")).await;
        assert_eq!(r.status, 200, "GET {id}: {}", r.text());
        r.json()["state"].as_str().unwrap().to_string()
    }

    /// `filesystem/write-file` with a raw body; panics unless 204.
    pub async fn put_file(&self, id: &str, path: &str, data: &[u8]) {
        let r = self
            .http
            .post(format!("{}/v1/sandbox/{id}/filesystem/write-file", self.url))
            .query(&[("path", path)])
            .header("content-type", "application/octet-stream")
            .body(data.to_vec());
        let r = self.raw(r).await;
        assert_eq!(r.status, 204, "write-file {path}: {}", r.text());
    }
}

/// The sandbox's guest RAM files under /dev/shm/cove (one level of subdirectories).
pub fn guest_ram_files(id: &str) -> Vec<PathBuf> {
    let name = format!("{id}.mem");
    std::fs::read_dir("/dev/shm/cove")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|d| std::fs::read_dir(d.path()).ok())
        .flatten()
        .flatten()
        .map(|f| f.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == name))
        .collect()
}

/// The server's log (`<data dir>/server.log`), lines without ANSI colour codes.
pub fn server_log_lines(data_dir: &std::path::Path) -> Vec<String> {
    let raw = std::fs::read_to_string(data_dir.join("server.log")).unwrap_or_default();
    raw.lines()
        .map(|line| {
            let mut out = String::with_capacity(line.len());
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                if c == '\u{1b}' {
                    // CSI: ESC [ parameters final-byte
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    out.push(c);
                }
            }
            out
        })
        .collect()
}

/// The file the guest counter (see `start_counter`) appends to.
pub const COUNTER_FILE: &str = "/home/user/counter.log";

/// Starts, in the guest, a process that keeps a counter in its memory only, increments it every
/// 100 ms and appends "<pid> <counter>" to `COUNTER_FILE`; detached (own session), so it outlives
/// the exec. Returns its pid once it has written its first line.
pub async fn start_counter(api: &Api, id: &str) -> u32 {
    let script = format!(
        "import os, time\nn = 0\nf = open('{COUNTER_FILE}', 'a', buffering=1)\nwhile True:\n    \
         n += 1\n    f.write('%d %d\\n' % (os.getpid(), n))\n    time.sleep(0.1)\n"
    );
    let out = api
        .sh_ok(id, &format!("setsid nohup python3 -c \"{script}\" >/dev/null 2>&1 </dev/null & echo $!"))
        .await;
    let pid: u32 = out.trim().parse().unwrap_or_else(|_| panic!("no pid: {out:?}"));
    for _ in 0..100 {
        if !counter_lines(api, id).await.is_empty() {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the guest counter {pid} wrote nothing");
}

/// The complete lines of `COUNTER_FILE` as (pid, counter).
pub async fn counter_lines(api: &Api, id: &str) -> Vec<(u32, u64)> {
    let out = api.sh_ok(id, &format!("cat {COUNTER_FILE} 2>/dev/null || true")).await;
    let complete = match out.rfind('\n') {
        Some(i) => &out[..=i],
        None => "",
    };
    complete
        .lines()
        .map(|l| {
            let (p, n) = l.split_once(' ').unwrap_or_else(|| panic!("bad counter line {l:?}"));
            (
                p.parse().unwrap_or_else(|_| panic!("bad line {l:?}")),
                n.parse().unwrap_or_else(|_| panic!("bad line {l:?}")),
            )
        })
        .collect()
}

/// Asserts that every counter line comes from `pid` and counts 1, 2, 3... with no gap and no
/// repeat (a restarted process or a lost memory state would start over). Returns the last count.
pub fn assert_counts_on(lines: &[(u32, u64)], pid: u32) -> u64 {
    assert!(!lines.is_empty(), "no counter lines");
    for (i, (p, n)) in lines.iter().enumerate() {
        assert_eq!(*p, pid, "line {} comes from pid {p}, not {pid}", i + 1);
        assert_eq!(*n, i as u64 + 1, "line {} counts {n}: lines {:?}", i + 1, &lines[i.saturating_sub(3)..]);
    }
    lines.len() as u64
}

/// Waits (up to ~30 s) until the guest counter has counted beyond `past`; returns its lines.
pub async fn counter_beyond(api: &Api, id: &str, past: u64) -> Vec<(u32, u64)> {
    for _ in 0..150 {
        let lines = counter_lines(api, id).await;
        if lines.last().is_some_and(|(_, n)| *n > past) {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the guest counter of {id} did not go beyond {past}");
}

/// Asserts that the guest's clock is within 3 s of the host's.
pub async fn assert_guest_clock(api: &Api, id: &str) {
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let before = now();
    let out = api.sh_ok(id, "date +%s").await;
    let after = now();
    let guest: i64 = out.trim().parse().unwrap_or_else(|_| panic!("date said {out:?}"));
    assert!(
        before - 3 <= guest && guest <= after + 3,
        "guest clock of {id} is {guest}, host was {before}..{after}"
    );
}

/// Waits (up to 10 s) until `cond` holds, for effects the server completes after answering
/// (such as deleting a spent pause image); panics with `what` otherwise.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("still not true after 10 s: {what}");
}

/// Starts a guest process holding a marker string that exists nowhere else, so a scan of the
/// guest's memory that finds it proves the scan sees the guest's data. Returns the marker.
pub async fn hold_marker(api: &Api, id: &str) -> String {
    let marker = format!("cove-marker-{}", rand_hex());
    // Named apart from the marker, which must be in the process's memory only.
    let ready = format!("held-{}.ready", rand_hex());
    let (code, out, err) = api
        .exec(
            id,
            &format!(
                "setsid nohup python3 -c \"import time; m = 'x-{marker}'[2:]; open('/tmp/{ready}', 'w'); time.sleep(3600)\" \
                 >/dev/null 2>&1 </dev/null & for i in $(seq 150); do [ -e /tmp/{ready} ] && exit 0; sleep 0.2; done; exit 1"
            ),
        )
        .await;
    assert_eq!(code, 0, "{out}{err}");
    marker
}

/// Host time now, in seconds since the epoch (the guest's clock is set from the host's).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Counts the places in the guest that hold `pattern` (a grep pattern): files anything could
/// have written since `since` (host seconds since the epoch) and process environments, plus
/// the mount table. Returns (exit code, output): the names of files that hold it, then the
/// count of environment and mount-table lines; "0" alone means nowhere.
///
/// The file scan covers every file changed since `since` anywhere but `/proc`, `/sys`, `/dev`
/// and `skip` (a mount of the test's own), and every file of the trees a guest writes at
/// run time whatever their times. Grepping the whole 1.2 GB disk instead takes minutes on a
/// slow TCG guest; files of the template image older than the test cannot hold its secrets.
pub async fn guest_scan(api: &Api, id: &str, pattern: &str, since: u64, skip: &str) -> (i64, String) {
    // Ten minutes' margin for a guest clock that lags the host's.
    let since = since.saturating_sub(600);
    let cmd = format!(
        "sudo -n find / \\( -path /proc -o -path /sys -o -path /dev -o -path '{skip}' \\) -prune \
           -o -type f -newermt @{since} -print0 | sudo -n xargs -0 -r grep -ls -e '{pattern}'; \
         sudo -n grep -rls -e '{pattern}' /etc /run /tmp /var /home /root /dev/shm 2>/dev/null; \
         sudo -n cat /proc/mounts /proc/*/environ 2>/dev/null | grep -c -e '{pattern}'"
    );
    let (code, out, err) = api.exec_for(id, &cmd, 600).await;
    (code, format!("{out}{err}"))
}

/// Whether a file holds `needle`; on a hit, prints the bytes around it (to tell where it came
/// from).
pub fn file_contains(path: &std::path::Path, needle: &[u8]) -> bool {
    let found = find_in_file(path, needle);
    if let Some(context) = &found {
        eprintln!("{} found in {}: {context}", String::from_utf8_lossy(needle), path.display());
    }
    found.is_some()
}

/// Whether the guest of sandbox `id` holds `needle` in its RAM, read through its QEMU's mapping
/// of it (`/proc/<pid>/mem`): what the guest sees, whether that RAM is a file of its own or its
/// template's pages mapped copy-on-write and the pages it wrote.
pub fn guest_memory_contains(id: &str, needle: &[u8]) -> bool {
    use std::io::{Read, Seek};
    let pids = qemu_pids(id);
    assert_eq!(pids.len(), 1, "one QEMU for {id}");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", pids[0])).unwrap();
    // Guest RAM: the large file mapping of its RAM file or of its template's memfd.
    let (start, end) = maps
        .lines()
        .filter(|l| l.contains(id) || l.contains("/memfd:cove-tmpl-"))
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        })
        .max_by_key(|(a, b)| b - a)
        .unwrap_or_else(|| panic!("no guest RAM mapping in QEMU of {id}"));
    let mut mem = std::fs::File::open(format!("/proc/{}/mem", pids[0])).unwrap();
    mem.seek(std::io::SeekFrom::Start(start)).unwrap();
    let found = find_in(mem.take(end - start), needle);
    if let Some(context) = &found {
        eprintln!("{} found in the memory of {id}: {context}", String::from_utf8_lossy(needle));
    }
    found.is_some()
}

/// Scans a file for `needle` in windows, so a 1 GiB RAM file never sits in memory whole.
fn find_in_file(path: &std::path::Path, needle: &[u8]) -> Option<String> {
    find_in(std::fs::File::open(path).unwrap(), needle)
}

fn find_in(mut f: impl std::io::Read, needle: &[u8]) -> Option<String> {
    let finder = memchr::memmem::Finder::new(needle);
    let mut buf = vec![0u8; 8 << 20];
    let mut carry = 0;
    loop {
        let n = f.read(&mut buf[carry..]).unwrap();
        if n == 0 {
            return None;
        }
        let end = carry + n;
        if let Some(at) = finder.find(&buf[..end]) {
            let around = &buf[at.saturating_sub(300)..(at + needle.len() + 300).min(end)];
            return Some(String::from_utf8_lossy(around).escape_debug().to_string());
        }
        carry = needle.len().min(end) - 1;
        buf.copy_within(end - carry..end, 0);
    }
}

/// GETs `path` from port `port` of sandbox `id` through the invoke route of the server at
/// `server_url` (`<id>-<port>.localhost`, resolved to loopback), until it answers `want` (a
/// guest server may still be starting) or ~10 s pass; the last answer's body.
pub async fn invoke_until(
    api: &Api,
    server_url: &str,
    id: &str,
    port: u16,
    path: &str,
    want: &str,
) -> String {
    let server_port = server_url.rsplit(':').next().unwrap_or_default();
    let host = format!("{id}-{port}.localhost:{server_port}");
    let mut body = String::new();
    for _ in 0..50 {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10", "--resolve", &format!("{host}:127.0.0.1")])
            .args(["-H", &format!("Authorization: Bearer {}", api.key)])
            .arg(format!("http://{host}{path}"))
            .output()
            .unwrap();
        body = String::from_utf8_lossy(&out.stdout).into_owned();
        if body == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    body
}

/// The mapping of a sandbox's QEMU of the RAM it was cloned from (`/memfd:cove-tmpl-…`: its
/// template's or named snapshot's): its start-end range and the kB of it that are resident and
/// mapped by another process too (`Shared_Clean` and `Shared_Dirty`: a memfd's pages count as
/// dirty).
pub fn cloned_ram_mapping(pid: u32) -> (String, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut lines = smaps.lines().skip_while(|l| !l.contains("/memfd:cove-tmpl-"));
    let head =
        lines.next().unwrap_or_else(|| panic!("QEMU {pid} does not map a template's or snapshot's RAM"));
    let kb = |l: &str| l.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap();
    let shared = lines
        .take_while(|l| !l.starts_with("VmFlags"))
        .filter_map(|l| l.strip_prefix("Shared_Clean:").or_else(|| l.strip_prefix("Shared_Dirty:")))
        .map(kb)
        .sum();
    (head.split_whitespace().next().unwrap().to_string(), shared)
}
