//! `cove bench`: latency through the real API, beside baselines measured in the same run.
//! `cove bench create`: create and exec, against a raw QEMU restore of the same template state
//! and the guest's own cost of spawning `/bin/sh`. `cove bench pause`: pause and resume of
//! sandboxes of several memory sizes with memory dirtied, against QEMU's own `x-ignore-shared`
//! stop and restore. Each prints a table and writes JSON. Figures, not assertions: these
//! machines are noisy.

use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use cove_runner::{Runner, RunnerConfig};
use cove_server::{Core, CoreConfig};
use cove_store::Store;
use cove_vmm::{Accel, QemuVmm};
use serde_json::{json, Value};

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
    #[arg(long, default_value = "bench-results/pause-resume.json")]
    out: PathBuf,
}

struct Stats {
    samples_ms: Vec<f64>,
}

impl Stats {
    fn new(mut d: Vec<Duration>) -> Stats {
        d.sort();
        Stats { samples_ms: d.iter().map(|d| d.as_secs_f64() * 1e3).collect() }
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
    async fn start(cache_dir: &std::path::Path, blob_url: Option<String>) -> Result<Bench> {
        let data = tempfile::tempdir().context("temp data dir")?;
        let store = Arc::new(Store::open(&data.path().join("cove.db"))?);
        let org = store.create_org("bench", Some(1000))?;
        let key = cove_store::generate_key();
        store.add_key(&org.id, "bench", &key)?;
        let vmm = Arc::new(QemuVmm::new(Accel::Auto));
        let accel = format!("{:?}", vmm.accel).to_lowercase();
        let mut cfg = RunnerConfig::new(cache_dir.to_path_buf(), data.path().to_path_buf());
        cfg.blob_url = blob_url;
        let runner = Arc::new(Runner::new(cfg, vmm).await?);
        let core = Arc::new(Core::new(store, runner.clone(), CoreConfig::local(1000)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(axum::serve(listener, cove_server::router(core)).into_future());
        Ok(Bench { base, key, http: reqwest::Client::new(), runner, accel, data })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut r = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.key);
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

    /// Deletes every sandbox the bench still has.
    async fn delete_all(&self) {
        let Ok(list) = self.call(reqwest::Method::GET, "/v1/sandboxes?page-size=100", None).await else {
            return;
        };
        for item in list["items"].as_array().into_iter().flatten() {
            if let Some(id) = item["id"].as_str() {
                if let Err(e) = self.call(reqwest::Method::DELETE, &format!("/v1/sandbox/{id}"), None).await {
                    eprintln!("bench: deleting {id}: {e}");
                }
            }
        }
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

pub fn run(args: BenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let bench = Bench::start(&args.cache_dir, args.blob_url.clone()).await?;
        let result = match &args.which {
            Which::Create(a) => create_exec(&bench, a).await,
            Which::Pause(a) => pause_resume(&bench, a).await,
        };
        // VMs outlive the process that started them: a run cut short by an error must not
        // leave its sandboxes running.
        bench.delete_all().await;
        result
    })
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
        for _ in 0..args.cycles {
            let (s, r) = b.runner.raw_save_restore(template, 1, mem).await?;
            raw_save.push(s);
            raw_restore.push(r);
        }
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
        let images = b.data.path().join("blobs/images");
        for cycle in 0..args.cycles {
            let t = Instant::now();
            b.call(post.clone(), &format!("/v1/sandbox/{id}/pause"), None).await?;
            pause.push(t.elapsed());
            if b.runner.blobs().description().starts_with("file://") {
                stored.push(disk_usage(&images));
            }
            let t = Instant::now();
            b.call(post.clone(), &format!("/v1/sandbox/{id}/resume"), None).await?;
            resume.push(t.elapsed());
            b.exec(&id, "true").await?;
            first_exec.push(t.elapsed());
            // Rewrite some memory between cycles, as a working guest would.
            b.exec(&id, &format!("head -c 16M /dev/urandom > /dev/shm/cycle # {cycle}")).await?;
        }
        b.call(reqwest::Method::DELETE, &format!("/v1/sandbox/{id}"), None).await.ok();
        let (raw_save, raw_restore, pause, resume, first_exec) = (
            Stats::new(raw_save),
            Stats::new(raw_restore),
            Stats::new(pause),
            Stats::new(resume),
            Stats::new(first_exec),
        );
        let stored_bytes = stored.iter().copied().max().unwrap_or(0);
        println!();
        println!("{mem} MiB guest, {} MiB dirtied, {} cycles", args.dirty_mib, args.cycles);
        println!("{:<48} {:>9} {:>9}", "", "p50 ms", "p95 ms");
        let row = |name: &str, s: &Stats| println!("{name:<48} {:>9.1} {:>9.1}", s.pct(50.0), s.pct(95.0));
        row("raw QEMU save (stop + device state, shared RAM)", &raw_save);
        row("raw QEMU restore (-incoming + cont, same file)", &raw_restore);
        row("pause (POST /pause -> 201, stored, VM gone)", &pause);
        row("resume (POST /resume -> 200 running)", &resume);
        row("resume -> first exec done", &first_exec);
        println!(
            "stored per pause: {:.1} MiB ({:.1}% of guest memory); pause/raw save = {:.1}x, resume/raw restore = {:.1}x",
            stored_bytes as f64 / (1 << 20) as f64,
            100.0 * stored_bytes as f64 / (mem << 20) as f64,
            pause.pct(50.0) / raw_save.pct(50.0),
            resume.pct(50.0) / raw_restore.pct(50.0),
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
            "stored_bytes": stored_bytes,
            "stored_fraction_of_memory": stored_bytes as f64 / (mem << 20) as f64,
            "ratios": {
                "pause_p50_over_raw_save_p50": pause.pct(50.0) / raw_save.pct(50.0),
                "resume_p50_over_raw_restore_p50": resume.pct(50.0) / raw_restore.pct(50.0),
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

    let (raw, create, first_exec, exec, channel) =
        (Stats::new(raw), Stats::new(create), Stats::new(first_exec), Stats::new(exec), Stats::new(channel));
    let spawn_ms = spawn_us / 1e3;
    println!();
    println!("{:<44} {:>9} {:>9} {:>9}", "", "p50 ms", "p95 ms", "p99 ms");
    let row = |name: &str, s: &Stats| {
        println!("{name:<44} {:>9.1} {:>9.1} {:>9.1}", s.pct(50.0), s.pct(95.0), s.pct(99.0))
    };
    row("raw restore (copy + QEMU -incoming + cont)", &raw);
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
        "ratios": {
            "create_p50_over_raw_p50": create.pct(50.0) / raw.pct(50.0),
            "create_to_exec_p50_over_raw_p50": first_exec.pct(50.0) / raw.pct(50.0),
            "exec_p50_over_guest_spawn": exec.pct(50.0) / spawn_ms,
        },
        "at": chrono::Utc::now().to_rfc3339(),
    });
    write_json(&args.out, &result)
}
