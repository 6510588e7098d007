//! `cove bench`: create and exec latency through the real API, beside baselines measured in the
//! same run (a raw QEMU restore of the same template state; the guest's own cost of spawning
//! `/bin/sh`). Prints a table and writes JSON. Figures, not assertions: these machines are noisy.

use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use cove_runner::{Runner, RunnerConfig};
use cove_server::{Core, CoreConfig};
use cove_store::Store;
use cove_vmm::{Accel, QemuVmm};
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Sandboxes to create (and raw restores to make).
    #[arg(long, default_value_t = 20)]
    count: usize,
    /// Exec round trips to time.
    #[arg(long, default_value_t = 200)]
    execs: usize,
    #[arg(long, env = "COVE_CACHE_DIR", default_value = "/var/cache/cove")]
    cache_dir: PathBuf,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results/create-exec.json")]
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

pub fn run(args: BenchArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(bench(args))
}

async fn bench(args: BenchArgs) -> Result<()> {
    let data = tempfile::tempdir().context("temp data dir")?;
    let store = Arc::new(Store::open(&data.path().join("cove.db"))?);
    let org = store.create_org("bench", Some(1000))?;
    let key = cove_store::generate_key();
    store.add_key(&org.id, "bench", &key)?;
    let vmm = Arc::new(QemuVmm::new(Accel::Auto));
    let accel = format!("{:?}", vmm.accel).to_lowercase();
    let runner =
        Arc::new(Runner::new(RunnerConfig::new(args.cache_dir.clone(), data.path().to_path_buf()), vmm)?);
    let core = Arc::new(Core {
        store,
        runner: runner.clone(),
        cfg: CoreConfig { default_sandbox_limit: 1000, runner_id: "local".into() },
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(axum::serve(listener, cove_server::router(core)).into_future());
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut r = http.request(method, format!("{base}{path}")).bearer_auth(&key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        async move {
            let resp = r.send().await?;
            let status = resp.status();
            let text = resp.text().await?;
            if !status.is_success() {
                bail!("{status}: {text}");
            }
            Ok::<Value, anyhow::Error>(serde_json::from_str(&text).unwrap_or(Value::Null))
        }
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
        "accel": accel,
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
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("results written to {}", args.out.display());
    Ok(())
}
