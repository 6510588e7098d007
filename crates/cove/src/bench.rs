//! `cove bench`: latency through the real API, beside baselines measured in the same run.
//! `cove bench create`: create and exec, against a raw QEMU restore of the same template state
//! and the guest's own cost of spawning `/bin/sh`. `cove bench pause`: pause and resume of
//! sandboxes of several memory sizes with memory dirtied, warm (RAM file kept by the runner) and
//! cold (image served from the store as the guest touches it), against QEMU's own stop and restore on a shared file. `cove bench net`: guest downloads and connection setup to the test internet
//! through NAT, the egress tunnel (spliced TLS) and the TLS-terminating proxy (transforms).
//! `cove bench mount`: a bucket read through a mount in a guest against the guest's own GET of
//! the same object (see `bench/mount.rs`). `cove bench template`: an image converted into a
//! template disk against skopeo + umoci + mke2fs of the same image, and creates from a user
//! template against the system template (see `bench/template.rs`). `cove bench density`: idle
//! sandboxes added in steps, their host CPU and memory, and an exec beside them against the same
//! exec with none, and `cove bench idle` one idle sandbox of each template (see
//! `bench/density.rs`).
//! Each prints a table and writes JSON. Figures, not assertions: these machines are noisy.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use cove_runner::{Runner, RunnerConfig, SandboxHost};
use cove_server::{Core, CoreConfig};
use cove_store::Store;
use cove_vmm::{Accel, QemuVmm};
use serde_json::{json, Value};

mod cluster;
mod density;
mod mount;
mod pty;
mod remote;
mod soak;
mod template;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Which,
    #[arg(long, global = true, env = "COVE_CACHE_DIR", default_value = "/var/cache/cove")]
    cache_dir: PathBuf,
    /// Blob store for pause images (default: a local directory in the bench's temp data dir).
    #[arg(long, global = true, env = "COVE_BLOB_URL")]
    blob_url: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Which {
    /// Create and exec latency.
    Create(CreateArgs),
    /// Pause and resume latency, and bytes stored, per memory size.
    Pause(PauseArgs),
    /// Guest network throughput and connection setup: NAT, egress tunnel, TLS-terminating proxy.
    Net(NetArgs),
    /// Object-storage mount: sequential read, first byte and a 10,000-object listing, beside
    /// direct GETs of the same objects.
    Mount(mount::MountArgs),
    /// A ~200 MB image converted into a template disk, beside skopeo + umoci + mke2fs of the
    /// same image; create latency from it beside the system template.
    Template(template::TemplateArgs),
    /// Keystroke echo through a terminal's WebSocket, beside the agent and exec round trips.
    Pty(pty::PtyArgs),
    /// Idle sandboxes added in steps: host CPU and memory per idle sandbox, and an exec beside
    /// them against the same exec with none.
    Density(density::DensityArgs),
    /// One idle sandbox of each template: the host CPU each one's QEMU takes, beside the
    /// default template's.
    Idle(density::IdleArgs),
    /// Create, exec, pause and resume through a control plane that reaches the runner over the
    /// wire (as `cove server --runner` does), beside the same in process.
    Remote(remote::RemoteArgs),
    /// Create throughput with one and two (simulated) runners; resume on the same runner beside
    /// resume on another (real VMs).
    Cluster(cluster::ClusterArgs),
    /// Randomized pause/resume, snapshot/restore and stop/start cycles, with data on disk, in
    /// guest memory and in a process's memory checked after each.
    Soak(soak::SoakArgs),
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Sandboxes to create (and raw restores to make).
    #[arg(long, default_value_t = 20)]
    count: usize,
    /// Exec round trips to time.
    #[arg(long, default_value_t = 200)]
    execs: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results/create-exec.json")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct PauseArgs {
    /// Guest memory sizes to measure, MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [512u64, 1024, 2048])]
    sizes: Vec<u64>,
    /// Pause/resume cycles per size.
    #[arg(long, default_value_t = 5)]
    cycles: usize,
    /// Guest memory dirtied before the first pause, MiB: half random bytes, half text, in the
    /// guest's /dev/shm (which holds at most half of its memory). The same for every size, so
    /// that the sizes differ only in memory the guest has but does not use.
    #[arg(long, default_value_t = 192)]
    dirty_mib: u64,
    /// Cold resumes unpack the RAM before the guest runs (`cove server --eager-memory`), as a
    /// baseline for the lazy ones.
    #[arg(long)]
    eager_memory: bool,
    #[arg(long, default_value = "bench-results/pause-resume.json")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct NetArgs {
    /// Size of each throughput download, MiB.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// Throughput downloads per path.
    #[arg(long, default_value_t = 4)]
    runs: usize,
    /// Small requests per path for connection-setup latency.
    #[arg(long, default_value_t = 10)]
    requests: usize,
    #[arg(long, default_value = "bench-results/net.json")]
    out: PathBuf,
}

struct Stats {
    samples_ms: Vec<f64>,
}

impl Stats {
    fn new(mut d: Vec<Duration>) -> Stats {
        d.sort();
        Stats { samples_ms: d.iter().copied().map(ms).collect() }
    }
    fn pct(&self, p: f64) -> f64 {
        if self.samples_ms.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (self.samples_ms.len() - 1) as f64).round() as usize;
        self.samples_ms[i.min(self.samples_ms.len() - 1)]
    }
    fn json(&self) -> Value {
        json!({ "n": self.samples_ms.len(), "p50_ms": self.pct(50.0), "p95_ms": self.pct(95.0),
                "p99_ms": self.pct(99.0), "min_ms": self.pct(0.0), "max_ms": self.pct(100.0) })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// An in-process server on a temp data dir, and a client for it.
struct Bench {
    base: String,
    key: String,
    http: reqwest::Client,
    runner: Arc<Runner>,
    accel: String,
    data: tempfile::TempDir,
}

impl Bench {
    async fn start(
        cache_dir: &std::path::Path,
        blob_url: Option<String>,
        configure: impl FnOnce(&mut RunnerConfig),
    ) -> Result<Bench> {
        let data = tempfile::tempdir().context("temp data dir")?;
        let store = Arc::new(Store::open(&data.path().join("cove.db"))?);
        let org = store.create_org("bench", Some(1000))?;
        let key = cove_store::generate_key();
        store.add_key(&org.id, "bench", &key)?;
        let vmm = Arc::new(QemuVmm::new(Accel::Auto));
        let accel = format!("{:?}", vmm.accel).to_lowercase();
        let mut cfg = RunnerConfig::new(cache_dir.to_path_buf(), data.path().to_path_buf());
        cfg.blob_url = blob_url;
        cfg.lazy_memory = Some(std::env::current_exe()?);
        configure(&mut cfg);
        let runner = Arc::new(Runner::new(cfg, vmm).await?);
        let core = Arc::new(Core::new(
            store,
            runner.clone(),
            CoreConfig::local(1000),
            cove_store::sealed::Sealer::ephemeral(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(axum::serve(listener, cove_server::router(core)).into_future());
        Ok(Bench { base, key, http: reqwest::Client::new(), runner, accel, data })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        call(&self.http, &self.base, &self.key, method, path, body).await
    }

    /// A new sandbox of the default template; its id.
    async fn create_default(&self) -> Result<String> {
        let body = json!({"template_name": cove_api::sandbox::DEFAULT_TEMPLATE});
        let sbx = self.call(reqwest::Method::POST, "/v1/sandbox", Some(body)).await?;
        Ok(sbx["id"].as_str().context("no id")?.to_string())
    }

    /// Deletes every sandbox the bench still has.
    async fn delete_all(&self) {
        delete_all(&self.http, &self.base, &self.key).await
    }

    /// Creates a sandbox of `template` and waits for its first answer: an exec, or with
    /// `service` the template's service through the invoke route (`<id>.<domain>`, here a
    /// code interpreter cell or a desktop screenshot). Returns the time to the 201 and to that
    /// answer; deletes it.
    async fn create_until_answered(&self, template: &str, service: bool) -> Result<(Duration, Duration)> {
        let t0 = Instant::now();
        let sbx =
            self.call(reqwest::Method::POST, "/v1/sandbox", Some(json!({"template_name": template}))).await?;
        let created = t0.elapsed();
        let id = sbx["id"].as_str().context("no id")?.to_string();
        if service {
            let port = cove_api::template::system_template(template).and_then(|t| t.service_port);
            let request = if port == Some(cove_api::template::DESKTOP_PORT) {
                self.http.get(format!("{}/api/screenshot", self.base))
            } else {
                self.http.post(format!("{}/execute", self.base)).json(&json!({"code": "1 + 1"}))
            };
            let answer = request
                .header(reqwest::header::HOST, format!("{id}.localhost"))
                .bearer_auth(&self.key)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            let right = if port == Some(cove_api::template::DESKTOP_PORT) {
                answer.starts_with(b"\x89PNG")
            } else {
                serde_json::from_slice::<Value>(&answer).is_ok_and(|v| v["items"][0]["text"] == "2")
            };
            if !right {
                bail!(
                    "the service of {template} answered {}",
                    String::from_utf8_lossy(&answer[..answer.len().min(200)])
                );
            }
        } else {
            self.exec(&id, "true").await?;
        }
        let answered = t0.elapsed();
        self.call(reqwest::Method::DELETE, &format!("/v1/sandbox/{id}"), None).await.ok();
        Ok((created, answered))
    }

    async fn exec(&self, id: &str, command: &str) -> Result<Value> {
        let out = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/sandbox/{id}/process/execute"),
                Some(json!({"command": command})),
            )
            .await?;
        if out["exit_code"] != 0 {
            bail!("`{command}` failed: {out}");
        }
        Ok(out)
    }
}

fn write_json(out: &std::path::Path, result: &Value) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(result)? + "\n")?;
    println!("results written to {}", out.display());
    Ok(())
}

/// Bytes of the files under `dir` as allocated on disk.
fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// One API call to the control plane at `base`; its JSON answer, an error unless 2xx.
async fn call(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value> {
    let mut r = http.request(method, format!("{base}{path}")).bearer_auth(key);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("{status}: {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Deletes every sandbox the control plane at `base` lists.
async fn delete_all(http: &reqwest::Client, base: &str, key: &str) {
    let list = call(http, base, key, reqwest::Method::GET, "/v1/sandboxes?page-size=100", None).await;
    let Ok(list) = list else { return };
    for item in list["items"].as_array().into_iter().flatten() {
        if let Some(id) = item["id"].as_str() {
            let path = format!("/v1/sandbox/{id}");
            if let Err(e) = call(http, base, key, reqwest::Method::DELETE, &path, None).await {
                eprintln!("bench: deleting {id}: {e}");
            }
        }
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // The net bench's sandboxes reach the offline test internet, which this process serves.
    // So do the mount bench's (its S3 server runs there, reachable by host and guest alike).
    let internet =
        matches!(args.which, Which::Net(_) | Which::Mount(_)).then(cove_net::testing::Internet::shared);
    // The template bench pulls from a registry of its own on loopback.
    let registry = matches!(args.which, Which::Template(_)).then(|| cove_oci::testing::Registry::start(None));
    let result = rt.block_on(async {
        let bench = Bench::start(&args.cache_dir, args.blob_url.clone(), |cfg| {
            if let Some(internet) = internet {
                cfg.egress_dns = Some(SocketAddr::from((cove_net::testing::DNS_IP, 53)));
                cfg.egress_extra_ca = Some(internet.ca_path().to_path_buf());
            }
            cfg.insecure_registries.extend(registry.iter().map(|r| r.addr.clone()));
            if matches!(&args.which, Which::Pause(a) if a.eager_memory) {
                cfg.lazy_memory = None;
            }
            if let Which::Density(a) = &args.which {
                cfg.capacity_memory_mib = Some(a.capacity_memory_mib());
            }
        })
        .await?;
        let result = match &args.which {
            Which::Create(a) => create_exec(&bench, a).await,
            Which::Pause(a) => pause_resume(&bench, a).await,
            Which::Net(a) => match internet {
                Some(internet) => net(&bench, internet, a).await,
                None => unreachable!("the internet is built for the net bench"),
            },
            Which::Mount(a) => mount::mount(&bench, a, &args.cache_dir).await,
            Which::Pty(a) => pty::pty(&bench, a).await,
            Which::Density(a) => density::density(&bench, a).await,
            Which::Idle(a) => density::idle(&bench, a).await,
            Which::Soak(a) => soak::soak(&bench, a).await,
            Which::Remote(a) => remote::remote(&bench, a).await,
            Which::Cluster(a) => cluster::cluster(&bench, a, &args.cache_dir).await,
            Which::Template(a) => match &registry {
                Some(registry) => template::template(&bench, registry, a, &args.cache_dir).await,
                None => unreachable!("the registry is started for the template bench"),
            },
        };
        // VMs outlive the process that started them: a run cut short by an error must not
        // leave its sandboxes running.
        bench.delete_all().await;
        result
    });
    if internet.is_some() {
        cove_net::testing::Internet::cleanup();
    }
    result
}

async fn pause_resume(b: &Bench, args: &PauseArgs) -> Result<()> {
    let template = cove_api::sandbox::DEFAULT_TEMPLATE;
    let post = reqwest::Method::POST;
    let mut rows = Vec::new();
    println!("blob store: {}", b.runner.blobs().description());
    for &mem in &args.sizes {
        let t = Instant::now();
        b.runner.prepare_template(template, 1, mem).await?;
        println!("{mem} MiB: template snapshot ready ({:.1}s; 0 when cached)", t.elapsed().as_secs_f64());
        let (mut raw_save, mut raw_restore) = (Vec::new(), Vec::new());
        let sbx = b
            .call(
                post.clone(),
                "/v1/sandbox",
                Some(json!({"template_name": template, "memory": mem, "timeout": 3600})),
            )
            .await?;
        let id = sbx["id"].as_str().context("no id")?.to_string();
        // Dirty guest memory: tmpfs pages hold their data in guest RAM.
        let half = args.dirty_mib / 2;
        b.exec(
            &id,
            &format!(
                "head -c {half}M /dev/urandom > /dev/shm/random && yes 'cove bench page of text' | head -c {half}M > /dev/shm/text"
            ),
        )
        .await?;
        let (mut pause, mut resume, mut first_exec, mut stored) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut cold_resume, mut cold_first_exec) = (Vec::new(), Vec::new());
        let images = b.data.path().join("blobs/images");
        let warm = b.data.path().join("warm").join(&id);
        // Each cycle resumes twice: warm (the runner maps the RAM file it kept) and cold (that
        // file dropped first, as on another runner: the image is served from the store).
        for cycle in 0..args.cycles * 2 {
            if cycle % 2 == 0 {
                // The baseline in turn with the resumes, so that both see the machine as it is
                // then: its speed drifts by a fifth within minutes.
                let (s, r) = b.runner.raw_save_restore(template, 1, mem).await?;
                raw_save.push(s);
                raw_restore.push(r);
            }
            let t = Instant::now();
            b.call(post.clone(), &format!("/v1/sandbox/{id}/pause"), None).await?;
            pause.push(t.elapsed());
            if b.runner.blobs().description().starts_with("file://") {
                stored.push(disk_usage(&images));
            }
            // A RAM file on tmpfs (the first pause, or one after a cold resume) reaches the
            // warm entry in the background.
            let t = Instant::now();
            while !warm.join("memory").exists() && t.elapsed() < std::time::Duration::from_secs(30) {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let cold = cycle % 2 == 1;
            if cold {
                std::fs::remove_dir_all(&warm).context("dropping the warm image")?;
            }
            let t = Instant::now();
            b.call(post.clone(), &format!("/v1/sandbox/{id}/resume"), None).await?;
            let (resumed, exec_done) =
                if cold { (&mut cold_resume, &mut cold_first_exec) } else { (&mut resume, &mut first_exec) };
            resumed.push(t.elapsed());
            b.exec(&id, "true").await?;
            exec_done.push(t.elapsed());
            // Rewrite some memory between cycles, as a working guest would.
            b.exec(&id, &format!("head -c 16M /dev/urandom > /dev/shm/cycle # {cycle}")).await?;
        }
        // Restores of a named snapshot of it: the first unpacks the RAM (into the memfd the
        // runner then shares), the later ones map it as it is.
        let name = format!("bench-{id}");
        let snap = b
            .call(post.clone(), &format!("/v1/sandbox/{id}/snapshot/create"), Some(json!({"name": name})))
            .await?;
        let mut restores = Vec::new();
        for _ in 0..=args.cycles {
            let t = Instant::now();
            let restored =
                b.call(post.clone(), "/v1/snapshot/restore", Some(json!({"snapshot_name": name}))).await?;
            restores.push(t.elapsed());
            let rid = restored["id"].as_str().context("no id")?;
            b.call(reqwest::Method::DELETE, &format!("/v1/sandbox/{rid}"), None).await.ok();
        }
        let snap_id = snap["id"].as_str().context("no snapshot id")?;
        b.call(reqwest::Method::DELETE, &format!("/v1/snapshot/{snap_id}"), None).await.ok();
        let first_restore = restores.remove(0);
        let restore = Stats::new(restores);
        b.call(reqwest::Method::DELETE, &format!("/v1/sandbox/{id}"), None).await.ok();
        let (raw_save, raw_restore, pause, resume, first_exec) = (
            Stats::new(raw_save),
            Stats::new(raw_restore),
            Stats::new(pause),
            Stats::new(resume),
            Stats::new(first_exec),
        );
        let (cold_resume, cold_first_exec) = (Stats::new(cold_resume), Stats::new(cold_first_exec));
        let stored_bytes = stored.iter().copied().max().unwrap_or(0);
        println!();
        println!("{mem} MiB guest, {} MiB dirtied, {} cycles", args.dirty_mib, args.cycles);
        println!("{:<48} {:>9} {:>9}", "", "p50 ms", "p95 ms");
        let row = |name: &str, s: &Stats| println!("{name:<48} {:>9.1} {:>9.1}", s.pct(50.0), s.pct(95.0));
        row("raw QEMU save (stop + device state, shared RAM)", &raw_save);
        row("raw QEMU restore (-incoming + cont, RAM as it is)", &raw_restore);
        row("pause (POST /pause -> 201, stored, VM gone)", &pause);
        row("resume, warm (POST /resume -> 200 running)", &resume);
        row("resume, warm -> first exec done", &first_exec);
        let cold = if args.eager_memory { "RAM unpacked first" } else { "RAM served lazily" };
        row(&format!("resume, cold ({cold})"), &cold_resume);
        row("resume, cold -> first exec done", &cold_first_exec);
        println!("{:<48} {:>9.1}", "restore of a snapshot, first (RAM unpacked)", ms(first_restore));
        row("restore of a snapshot, later (RAM shared)", &restore);
        println!(
            "stored per pause: {:.1} MiB ({:.1}% of guest memory); pause/raw save = {:.1}x, resume/raw restore = {:.2}x, \
             warm/cold resume = {:.2}x, cold resume/raw restore = {:.2}x",
            stored_bytes as f64 / (1 << 20) as f64,
            100.0 * stored_bytes as f64 / (mem << 20) as f64,
            pause.pct(50.0) / raw_save.pct(50.0),
            resume.pct(50.0) / raw_restore.pct(50.0),
            resume.pct(50.0) / cold_resume.pct(50.0),
            cold_resume.pct(50.0) / raw_restore.pct(50.0),
        );
        println!();
        rows.push(json!({
            "memory_mib": mem,
            "dirtied_mib": args.dirty_mib,
            "raw_save": raw_save.json(),
            "raw_restore": raw_restore.json(),
            "pause": pause.json(),
            "resume": resume.json(),
            "resume_to_first_exec": first_exec.json(),
            "cold_resume": cold_resume.json(),
            "cold_resume_eager_memory": args.eager_memory,
            "cold_resume_to_first_exec": cold_first_exec.json(),
            "first_restore_ms": ms(first_restore),
            "restore": restore.json(),
            "stored_bytes": stored_bytes,
            "stored_fraction_of_memory": stored_bytes as f64 / (mem << 20) as f64,
            "ratios": {
                "pause_p50_over_raw_save_p50": pause.pct(50.0) / raw_save.pct(50.0),
                "resume_p50_over_raw_restore_p50": resume.pct(50.0) / raw_restore.pct(50.0),
                "warm_resume_p50_over_cold_resume_p50": resume.pct(50.0) / cold_resume.pct(50.0),
                "cold_resume_p50_over_raw_restore_p50": cold_resume.pct(50.0) / raw_restore.pct(50.0),
                "restore_p50_over_first_restore": restore.pct(50.0) / ms(first_restore),
            },
        }));
    }
    let result = json!({
        "benchmark": "pause-resume",
        "accel": b.accel,
        "blob_store": b.runner.blobs().description(),
        "sizes": rows,
        "at": chrono::Utc::now().to_rfc3339(),
    });
    write_json(&args.out, &result)
}

async fn create_exec(b: &Bench, args: &CreateArgs) -> Result<()> {
    let runner = &b.runner;
    let call = |method: reqwest::Method, path: String, body: Option<Value>| async move {
        b.call(method, &path, body).await
    };
    let (template, vcpus, mem) = (
        cove_api::sandbox::DEFAULT_TEMPLATE,
        cove_api::sandbox::DEFAULT_VCPU,
        cove_api::sandbox::DEFAULT_MEMORY_MIB,
    );
    let t = Instant::now();
    runner.prepare_template(template, vcpus, mem).await?;
    println!("template snapshot ready ({:.1}s; 0 when cached)", t.elapsed().as_secs_f64());

    println!("creating {} sandboxes, each beside a raw restore ...", args.count);
    let (mut raw, mut create, mut first_exec) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.count {
        raw.push(runner.raw_restore(template, vcpus, mem).await?);
        let t0 = Instant::now();
        let sbx = call(reqwest::Method::POST, "/v1/sandbox".into(), Some(json!({"template_name": template})))
            .await?;
        let t1 = Instant::now();
        let id = sbx["id"].as_str().context("no id")?.to_string();
        let out = call(
            reqwest::Method::POST,
            format!("/v1/sandbox/{id}/process/execute"),
            Some(json!({"command": "true"})),
        )
        .await?;
        let t2 = Instant::now();
        if out["exit_code"] != 0 {
            bail!("first exec failed: {out}");
        }
        create.push(t1 - t0);
        first_exec.push(t2 - t0);
        call(reqwest::Method::DELETE, format!("/v1/sandbox/{id}"), None).await.ok();
    }

    println!("timing {} exec round trips ...", args.execs);
    let sbx =
        call(reqwest::Method::POST, "/v1/sandbox".into(), Some(json!({"template_name": template}))).await?;
    let id = sbx["id"].as_str().context("no id")?.to_string();
    let exec_path = format!("/v1/sandbox/{id}/process/execute");
    for _ in 0..5 {
        call(reqwest::Method::POST, exec_path.clone(), Some(json!({"command": "true"}))).await?;
    }
    let (mut exec, mut channel) = (Vec::new(), Vec::new());
    for _ in 0..args.execs {
        let t = Instant::now();
        call(reqwest::Method::POST, exec_path.clone(), Some(json!({"command": "true"}))).await?;
        exec.push(t.elapsed());
        let t = Instant::now();
        call(reqwest::Method::GET, format!("/v1/sandbox/{id}/system/user-home-dir"), None).await?;
        channel.push(t.elapsed());
    }
    // The guest's own cost of one `/bin/sh -c true` (fork + exec + exit), timed inside it.
    let probe = "s=$(date +%s%N); for i in $(seq 50); do /bin/sh -c true; done; e=$(date +%s%N); echo $(( (e - s) / 50000 ))";
    let out = call(reqwest::Method::POST, exec_path.clone(), Some(json!({"command": probe}))).await?;
    let spawn_us: f64 = out["stdout"].as_str().unwrap_or("").trim().parse().unwrap_or(f64::NAN);
    call(reqwest::Method::DELETE, format!("/v1/sandbox/{id}"), None).await.ok();

    let services = service_templates(b, args.count.min(10)).await?;

    let (raw, create, first_exec, exec, channel) =
        (Stats::new(raw), Stats::new(create), Stats::new(first_exec), Stats::new(exec), Stats::new(channel));
    let spawn_ms = spawn_us / 1e3;
    println!();
    println!("{:<44} {:>9} {:>9} {:>9}", "", "p50 ms", "p95 ms", "p99 ms");
    let row = |name: &str, s: &Stats| {
        println!("{name:<44} {:>9.1} {:>9.1} {:>9.1}", s.pct(50.0), s.pct(95.0), s.pct(99.0))
    };
    row("raw restore (QEMU -incoming + cont on the template RAM)", &raw);
    row("create (POST /v1/sandbox -> 201 running)", &create);
    row("create -> first successful exec", &first_exec);
    row("exec round trip (`true`)", &exec);
    row("agent round trip (user-home-dir)", &channel);
    println!("{:<44} {:>9.1}", "guest spawn of /bin/sh -c true (in guest)", spawn_ms);
    println!();
    println!(
        "create p50 / raw restore p50 = {:.2}x; create->exec p50 / raw p50 = {:.2}x; exec p50 / guest spawn = {:.2}x",
        create.pct(50.0) / raw.pct(50.0),
        first_exec.pct(50.0) / raw.pct(50.0),
        exec.pct(50.0) / spawn_ms
    );

    let result = json!({
        "benchmark": "create-exec",
        "accel": b.accel,
        "template": template, "vcpu": vcpus, "memory_mib": mem,
        "raw_restore": raw.json(),
        "create": create.json(),
        "create_to_first_exec": first_exec.json(),
        "exec_round_trip": exec.json(),
        "agent_round_trip": channel.json(),
        "guest_sh_spawn_ms": spawn_ms,
        "service_templates": services,
        "ratios": {
            "create_p50_over_raw_p50": create.pct(50.0) / raw.pct(50.0),
            "create_to_exec_p50_over_raw_p50": first_exec.pct(50.0) / raw.pct(50.0),
            "exec_p50_over_guest_spawn": exec.pct(50.0) / spawn_ms,
        },
        "at": chrono::Utc::now().to_rfc3339(),
    });
    write_json(&args.out, &result)
}

/// Creates from each system template that runs a service, alternating with creates from the
/// default template: create (-> 201) and create -> first answer (the service's, through the
/// invoke route; the default template's first exec).
async fn service_templates(b: &Bench, count: usize) -> Result<Vec<Value>> {
    use cove_api::sandbox::{DEFAULT_MEMORY_MIB, DEFAULT_TEMPLATE, DEFAULT_VCPU};
    let mut rows = Vec::new();
    for t in cove_api::template::SYSTEM_TEMPLATES.iter().filter(|t| t.service_port.is_some()) {
        if b.runner.template_disk_mib(t.name).is_none() {
            println!("{}: not built (run `cove setup`), skipped", t.name);
            continue;
        }
        let started = Instant::now();
        b.runner.prepare_template(t.name, DEFAULT_VCPU, DEFAULT_MEMORY_MIB).await?;
        println!(
            "{}: template snapshot ready ({:.1}s; 0 when cached)",
            t.name,
            started.elapsed().as_secs_f64()
        );
        println!("creating {count} sandboxes of it, each beside one of {DEFAULT_TEMPLATE} ...");
        let (mut base, mut base_ready, mut own, mut own_ready) = (vec![], vec![], vec![], vec![]);
        for _ in 0..count {
            let (c, r) = b.create_until_answered(DEFAULT_TEMPLATE, false).await?;
            base.push(c);
            base_ready.push(r);
            let (c, r) = b.create_until_answered(t.name, true).await?;
            own.push(c);
            own_ready.push(r);
        }
        let (base, base_ready, own, own_ready) =
            (Stats::new(base), Stats::new(base_ready), Stats::new(own), Stats::new(own_ready));
        println!("{:<44} {:>9} {:>9}", "", "p50 ms", "p95 ms");
        for (name, s) in [
            (format!("create {DEFAULT_TEMPLATE}"), &base),
            ("  -> first exec".to_string(), &base_ready),
            (format!("create {}", t.name), &own),
            ("  -> first service answer".to_string(), &own_ready),
        ] {
            println!("{name:<44} {:>9.1} {:>9.1}", s.pct(50.0), s.pct(95.0));
        }
        println!(
            "{}: create p50 / {DEFAULT_TEMPLATE} create p50 = {:.2}x; first answer p50 / first exec p50 = {:.2}x",
            t.name,
            own.pct(50.0) / base.pct(50.0),
            own_ready.pct(50.0) / base_ready.pct(50.0)
        );
        rows.push(json!({
            "template": t.name,
            "create": own.json(), "create_to_first_service_answer": own_ready.json(),
            "default_template_create": base.json(), "default_template_create_to_first_exec": base_ready.json(),
            "ratios": {
                "create_p50_over_default_create_p50": own.pct(50.0) / base.pct(50.0),
                "first_answer_p50_over_default_first_exec_p50": own_ready.pct(50.0) / base_ready.pct(50.0),
            },
        }));
    }
    Ok(rows)
}

/// One way out of a guest to the test internet's web server on `api.allowed.test`.
struct NetPath {
    key: &'static str,
    name: &'static str,
    /// Network policy of its sandbox; `None` is allow-all (NAT).
    policy: Option<Value>,
    /// The web server as the guest addresses it.
    base: &'static str,
    /// Extra curl options.
    curl: String,
}

/// Where the bench puts the test root CA in NAT and tunnel guests (they see the server's own
/// certificate; the TLS-terminating path's guest trusts its sandbox CA through the system bundle).
const GUEST_TEST_CA: &str = "/tmp/cove-test-ca.pem";

/// Median of `v` (NaN when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Parses lines of whitespace-separated numbers (curl `-w` output).
fn number_rows(out: &Value) -> Result<Vec<Vec<f64>>> {
    out["stdout"]
        .as_str()
        .unwrap_or("")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split_whitespace()
                .map(|x| x.parse::<f64>().with_context(|| format!("bad curl output {l:?}")))
                .collect()
        })
        .collect()
}

async fn net(b: &Bench, internet: &cove_net::testing::Internet, args: &NetArgs) -> Result<()> {
    let post = reqwest::Method::POST;
    let tunnel = json!({"mode": "custom", "allow_domains": ["api.allowed.test"]});
    let terminating = json!({"mode": "custom", "allow_domains": ["api.allowed.test"],
        "transforms": [{"domain": "api.allowed.test", "inject_headers": {"x-bench": "1"}}]});
    let cacert = format!("--cacert {GUEST_TEST_CA}");
    let paths = [
        NetPath {
            key: "nat_http",
            name: "NAT http (192.88.99.10)",
            policy: None,
            base: "http://192.88.99.10",
            curl: String::new(),
        },
        NetPath {
            key: "nat_https",
            name: "NAT https (api.allowed.test)",
            policy: None,
            base: "https://api.allowed.test",
            curl: cacert.clone(),
        },
        NetPath {
            key: "tunnel",
            name: "tunnel (allow_domains, spliced TLS)",
            policy: Some(tunnel.clone()),
            base: "https://api.allowed.test",
            curl: cacert.clone(),
        },
        NetPath {
            key: "proxy_http",
            name: "HTTP proxy (allow_domains, port 80)",
            policy: Some(tunnel),
            base: "http://api.allowed.test",
            curl: String::new(),
        },
        NetPath {
            key: "terminating",
            name: "TLS-terminating (transforms)",
            policy: Some(terminating),
            base: "https://api.allowed.test",
            curl: String::new(),
        },
    ];
    let template = cove_api::sandbox::DEFAULT_TEMPLATE;
    let t = Instant::now();
    b.runner
        .prepare_template(template, cove_api::sandbox::DEFAULT_VCPU, cove_api::sandbox::DEFAULT_MEMORY_MIB)
        .await?;
    println!("template snapshot ready ({:.1}s; 0 when cached)", t.elapsed().as_secs_f64());

    // One sandbox per policy: NAT (shared by the http and https rows), tunnel, terminating.
    let mut sandboxes: Vec<(Option<Value>, String)> = Vec::new();
    for p in &paths {
        if sandboxes.iter().any(|(policy, _)| *policy == p.policy) {
            continue;
        }
        let mut body = json!({"template_name": template, "timeout": 3600});
        if let Some(policy) = &p.policy {
            body["network_policy"] = policy.clone();
        }
        let sbx = b.call(post.clone(), "/v1/sandbox", Some(body)).await?;
        let id = sbx["id"].as_str().context("no id")?.to_string();
        let r = b
            .http
            .post(format!("{}/v1/sandbox/{id}/filesystem/write-file", b.base))
            .query(&[("path", GUEST_TEST_CA)])
            .header("content-type", "application/octet-stream")
            .bearer_auth(&b.key)
            .body(internet.ca_pem().to_string())
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("writing the test CA into {id}: {}", r.text().await?);
        }
        sandboxes.push((p.policy.clone(), id));
    }
    let sandbox_of = |p: &NetPath| {
        sandboxes.iter().find(|(policy, _)| *policy == p.policy).map(|(_, id)| id.clone()).unwrap_or_default()
    };

    let bytes = args.mib << 20;
    let mut rows = Vec::new();
    for p in &paths {
        let id = sandbox_of(p);
        let exec_path = format!("/v1/sandbox/{id}/process/execute");
        let exec = |command: String, timeout: u64| {
            let path = &exec_path;
            async move {
                b.call(reqwest::Method::POST, path, Some(json!({"command": command, "timeout": timeout})))
                    .await
            }
        };
        // Which path the request really took: only the terminating proxy adds x-bench, and only
        // a tunnel or NAT guest accepts the test CA's own certificate.
        let out = exec(format!("curl -sS --fail {} {}/echo-headers", p.curl, p.base), 60).await?;
        if out["exit_code"] != 0 {
            bail!("{}: the guest cannot reach {}: {out}", p.name, p.base);
        }
        let seen: Value = serde_json::from_str(out["stdout"].as_str().unwrap_or("")).unwrap_or(Value::Null);
        let injected = seen["x-bench"] == "1";
        if injected != (p.key == "terminating") {
            bail!(
                "{}: x-bench header {} upstream: {seen}",
                p.name,
                if injected { "seen" } else { "not seen" }
            );
        }

        // Connection setup: small requests, each a new curl (so a new connection).
        let fmt = "%{time_namelookup} %{time_connect} %{time_appconnect} %{time_starttransfer}\\n";
        let cmd = format!(
            "curl -sS --fail -o /dev/null {curl} {base}/ >/dev/null; for i in $(seq {n}); do \
             curl -sS --fail -o /dev/null -w '{fmt}' {curl} {base}/ || exit 1; done",
            curl = p.curl,
            base = p.base,
            n = args.requests,
        );
        let out = exec(cmd, 300).await?;
        if out["exit_code"] != 0 {
            bail!("{}: small requests failed: {out}", p.name);
        }
        let setup = number_rows(&out)?;
        let col =
            |i: usize| median(setup.iter().map(|r| r.get(i).copied().unwrap_or(f64::NAN) * 1e3).collect());
        let (dns_ms, connect_ms, tls_ms, ttfb_ms) = (col(0), col(1), col(2), col(3));

        // Throughput: whole downloads of `bytes`.
        let mut mib_s = Vec::new();
        let mut http_version = String::new();
        for _ in 0..args.runs {
            let cmd = format!(
                "curl -sS --fail -o /dev/null -w '%{{size_download}} %{{time_total}} %{{http_version}}\\n' {} {}/bytes/{bytes}",
                p.curl, p.base
            );
            let out = exec(cmd, 600).await?;
            if out["exit_code"] != 0 {
                bail!("{}: download failed: {out}", p.name);
            }
            let line = out["stdout"].as_str().unwrap_or("").trim().to_string();
            let f: Vec<&str> = line.split_whitespace().collect();
            let (size, secs): (f64, f64) = match f.as_slice() {
                [s, t, v] => {
                    http_version = v.to_string();
                    (s.parse()?, t.parse()?)
                }
                _ => bail!("{}: bad curl output {line:?}", p.name),
            };
            if size as u64 != bytes {
                bail!("{}: downloaded {size} bytes, not {bytes}", p.name);
            }
            mib_s.push(size / secs / (1 << 20) as f64);
        }
        let best = mib_s.iter().copied().fold(f64::NAN, f64::max);
        let med = median(mib_s.clone());
        println!(
            "{}: {med:.1} MiB/s median, {best:.1} best (HTTP/{http_version}); time to first byte {ttfb_ms:.1} ms",
            p.name
        );
        rows.push(json!({
            "path": p.key, "name": p.name, "sandbox_id": id, "url": format!("{}/bytes/{bytes}", p.base),
            "http_version": http_version,
            "throughput_mib_s": { "runs": mib_s, "best": best, "median": med },
            "setup_ms_median": { "n": setup.len(), "namelookup": dns_ms, "connect": connect_ms,
                                  "appconnect": tls_ms, "starttransfer": ttfb_ms },
        }));
    }
    for (_, id) in &sandboxes {
        b.call(reqwest::Method::DELETE, &format!("/v1/sandbox/{id}"), None).await.ok();
    }

    let nat = rows.iter().find(|r| r["path"] == "nat_https").cloned().unwrap_or(Value::Null);
    let nat_med = nat["throughput_mib_s"]["median"].as_f64().unwrap_or(f64::NAN);
    let nat_ttfb = nat["setup_ms_median"]["starttransfer"].as_f64().unwrap_or(f64::NAN);
    println!();
    println!(
        "{} MiB downloads x{}, {} small requests per path; cumulative curl timers, medians",
        args.mib, args.runs, args.requests
    );
    println!(
        "{:<38} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "", "MiB/s md", "best", "vs NAT", "dns ms", "tcp ms", "tls ms", "ttfb ms", "vs NAT"
    );
    for r in rows.iter_mut() {
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let med = f(&r["throughput_mib_s"]["median"]);
        let ttfb = f(&r["setup_ms_median"]["starttransfer"]);
        println!(
            "{:<38} {:>8.1} {:>8.1} {:>7.0}% {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7.2}x",
            r["name"].as_str().unwrap_or(""),
            med,
            f(&r["throughput_mib_s"]["best"]),
            100.0 * med / nat_med,
            f(&r["setup_ms_median"]["namelookup"]),
            f(&r["setup_ms_median"]["connect"]),
            f(&r["setup_ms_median"]["appconnect"]),
            ttfb,
            ttfb / nat_ttfb,
        );
        r["vs_nat_https"] =
            json!({ "throughput_median": med / nat_med, "starttransfer_median": ttfb / nat_ttfb });
    }
    let mib_s_of = |key: &str| {
        rows.iter().find(|r| r["path"] == key).and_then(|r| r["throughput_mib_s"]["median"].as_f64())
    };
    let proxy_http_ratio =
        mib_s_of("proxy_http").unwrap_or(f64::NAN) / mib_s_of("nat_http").unwrap_or(f64::NAN);
    let tunnel_ratio = rows
        .iter()
        .find(|r| r["path"] == "tunnel")
        .and_then(|r| r["vs_nat_https"]["throughput_median"].as_f64())
        .unwrap_or(f64::NAN);
    println!();
    println!(
        "tunnel throughput = {:.0}% of NAT https (target >= 80%: {})",
        100.0 * tunnel_ratio,
        if tunnel_ratio >= 0.8 { "met" } else { "NOT met" }
    );
    println!(
        "HTTP proxy throughput = {:.0}% of NAT http (plain HTTP: no guest TLS cost in the way)",
        100.0 * proxy_http_ratio
    );
    let result = json!({
        "benchmark": "net",
        "accel": b.accel,
        "download_mib": args.mib,
        "runs": args.runs,
        "requests": args.requests,
        "paths": rows,
        "tunnel_over_nat_https_throughput": tunnel_ratio,
        "tunnel_target_met": tunnel_ratio >= 0.8,
        "proxy_http_over_nat_http_throughput": proxy_http_ratio,
        "at": chrono::Utc::now().to_rfc3339(),
    });
    write_json(&args.out, &result)
}
