//! `cove bench cluster`: what a second runner buys, in two parts.
//!
//! 1. Create throughput with one runner and with two, through the API, from concurrent clients.
//!    The runners are simulated hosts (`cove_server::sim`) reached over the wire (HTTP/2 on TLS
//!    over loopback, as registered runners are), each bringing one VM up at a time in
//!    `--boot-ms`: this measures the control plane's placement and its fan-out, not QEMU.
//! 2. Real VMs: the resume of a paused sandbox on the runner it was paused on, beside its resume
//!    on another runner (a second runner in this process, its own data directory, the same
//!    image store), alternating, in one run.

use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use cove_runner::{Runner, RunnerConfig, SandboxHost};
use cove_server::cluster::Cluster;
use cove_server::{Core, CoreConfig};
use cove_vmm::{Accel, QemuVmm};
use serde_json::json;

use super::{write_json, Bench, Stats};

#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// Sandboxes created per runner count (simulated hosts).
    #[arg(long, default_value_t = 200)]
    creates: usize,
    /// Clients creating at once.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// How long a simulated host takes to bring one VM up (it brings up one at a time).
    #[arg(long, default_value_t = 20)]
    boot_ms: u64,
    /// Real sandboxes paused and resumed on each side (same runner, other runner).
    #[arg(long, default_value_t = 5)]
    resumes: usize,
    #[arg(long, default_value = "bench-results/cluster.json")]
    out: PathBuf,
}

pub async fn cluster(b: &Bench, args: &ClusterArgs, cache_dir: &std::path::Path) -> Result<()> {
    println!(
        "create throughput: {} creates from {} clients, simulated runners taking {} ms per VM ...",
        args.creates, args.clients, args.boot_ms
    );
    let mut throughput = serde_json::Map::new();
    let mut per_second = Vec::new();
    for runners in [1usize, 2] {
        let (rate, spread) = create_throughput(runners, args).await?;
        println!("  {runners} runner(s): {rate:.1} creates/s, placed {spread:?}");
        per_second.push(rate);
        throughput.insert(format!("{runners}_runners"), json!({ "creates_per_s": rate, "placed": spread }));
    }
    let scale = per_second[1] / per_second[0];
    println!("  2 runners / 1 runner: {scale:.2}x");

    println!("resume: {} sandboxes each on the same runner and on another ...", args.resumes);
    let other = other_runner(b, cache_dir).await?;
    let (mut same, mut moved) = (Vec::new(), Vec::new());
    for _ in 0..args.resumes {
        same.push(paused_then_resumed(b, b).await?);
        moved.push(paused_then_resumed(b, &other).await?);
    }
    other.delete_all().await;
    let (same, moved) = (Stats::new(same), Stats::new(moved));
    let ratio = moved.pct(50.0) / same.pct(50.0);
    println!();
    println!("{:<34} {:>12} {:>14} {:>8}", "p50 ms", "same runner", "other runner", "ratio");
    println!(
        "{:<34} {:>12.1} {:>14.1} {:>7.2}x",
        "resume (first exec)",
        same.pct(50.0),
        moved.pct(50.0),
        ratio
    );
    let result = json!({
        "benchmark": "cluster",
        "accel": b.accel,
        "create_throughput": {
            "simulated_boot_ms": args.boot_ms,
            "clients": args.clients,
            "creates": args.creates,
            "results": throughput,
            "two_over_one": scale,
        },
        "resume": { "same_runner": same.json(), "other_runner": moved.json(), "p50_ratio": ratio },
        "at": chrono::Utc::now().to_rfc3339(),
    });
    write_json(&args.out, &result)
}

/// A control plane with `runners` simulated runners over the wire; creates per second from
/// `args.clients` clients, and how many landed on each runner.
async fn create_throughput(runners: usize, args: &ClusterArgs) -> Result<(f64, Vec<usize>)> {
    let data = tempfile::tempdir().context("temp data dir")?;
    let store = Arc::new(cove_store::Store::open(&data.path().join("cove.db"))?);
    let org = store.create_org("bench", Some(1_000_000))?;
    let key = cove_store::generate_key();
    store.add_key(&org.id, "bench", &key)?;
    let cluster = Cluster::new(store.clone());
    for i in 0..runners {
        let sim = Arc::new(cove_server::sim::SimHost::new());
        sim.set_bring_up_time(Duration::from_millis(args.boot_ms));
        let wired = cove_runner::remote::over_loopback(sim)
            .await
            .map_err(|e| anyhow::anyhow!("serving a simulated runner: {e}"))?;
        cluster.join(&format!("runner-{i}"), wired);
    }
    let mut cfg = CoreConfig::local(1_000_000);
    cfg.runner_id = String::new();
    let core =
        Arc::new(Core::clustered(store.clone(), cluster, cfg, cove_store::sealed::Sealer::ephemeral()));
    let plane = serve(core, key, data).await?;

    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        let (plane, next, total) = (plane.clone(), next.clone(), args.creates);
        clients.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let body = json!({"template_name": cove_api::sandbox::DEFAULT_TEMPLATE});
                plane.call(reqwest::Method::POST, "/v1/sandbox", Some(body)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for c in clients {
        c.await??;
    }
    let rate = args.creates as f64 / started.elapsed().as_secs_f64();
    let mut spread = vec![0; runners];
    for (runner, load) in store.runner_loads()? {
        if let Some(i) = runner.strip_prefix("runner-").and_then(|i| i.parse::<usize>().ok()) {
            spread[i] = load.sandboxes as usize;
        }
    }
    Ok((rate, spread))
}

/// A control plane on a runner of its own (another data directory, the bench's image store),
/// sharing the bench's store: it resumes the bench's paused sandboxes on its runner.
async fn other_runner(b: &Bench, cache_dir: &std::path::Path) -> Result<Arc<Plane>> {
    let data = tempfile::tempdir().context("temp data dir")?;
    let mut cfg = RunnerConfig::new(cache_dir.to_path_buf(), data.path().to_path_buf());
    cfg.blob_url = Some(
        b.runner
            .config()
            .blob_url
            .clone()
            .unwrap_or_else(|| format!("file://{}", b.runner.config().data_dir.join("blobs").display())),
    );
    cfg.lazy_memory = b.runner.config().lazy_memory.clone();
    let runner = Arc::new(Runner::new(cfg, Arc::new(QemuVmm::new(Accel::Auto))).await?);
    let store = Arc::new(cove_store::Store::open(&b.data.path().join("cove.db"))?);
    let cluster = Cluster::single(store.clone(), "other", runner as Arc<dyn SandboxHost>);
    let mut cfg = CoreConfig::local(1000);
    cfg.runner_id = "other".into();
    let core = Arc::new(Core::clustered(store, cluster, cfg, cove_store::sealed::Sealer::ephemeral()));
    core.serve_metadata();
    serve(core, b.key.clone(), data).await
}

/// A control plane served on loopback, with what the bench calls it with.
#[derive(Clone)]
struct Plane {
    base: String,
    key: String,
    http: reqwest::Client,
    _data: Arc<tempfile::TempDir>,
}

async fn serve(core: Arc<Core>, key: String, data: tempfile::TempDir) -> Result<Arc<Plane>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(axum::serve(listener, cove_server::router(core)).into_future());
    Ok(Arc::new(Plane { base, key, http: reqwest::Client::new(), _data: Arc::new(data) }))
}

impl Plane {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        super::call(&self.http, &self.base, &self.key, method, path, body).await
    }

    async fn delete_all(&self) {
        super::delete_all(&self.http, &self.base, &self.key).await
    }
}

/// Creates a sandbox on the bench's runner, pauses it, and times its resume (the first exec)
/// through `resumer`: the bench itself (the same runner) or the other runner's plane.
async fn paused_then_resumed(b: &Bench, resumer: &impl Resumer) -> Result<Duration> {
    let post = reqwest::Method::POST;
    let id = b.create_default().await?;
    b.exec(&id, "true").await?;
    b.call(post, &format!("/v1/sandbox/{id}/pause"), None).await?;
    let t = Instant::now();
    resumer.exec_true(&id).await?;
    let took = t.elapsed();
    resumer.delete(&id).await?;
    Ok(took)
}

trait Resumer {
    async fn exec_true(&self, id: &str) -> Result<()>;
    async fn delete(&self, id: &str) -> Result<()>;
}

impl Resumer for Bench {
    async fn exec_true(&self, id: &str) -> Result<()> {
        self.exec(id, "true").await.map(drop)
    }
    async fn delete(&self, id: &str) -> Result<()> {
        self.call(reqwest::Method::DELETE, &format!("/v1/sandbox/{id}"), None).await.map(drop)
    }
}

impl Resumer for Arc<Plane> {
    async fn exec_true(&self, id: &str) -> Result<()> {
        let r = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/sandbox/{id}/process/execute"),
                Some(json!({"command": "true"})),
            )
            .await?;
        anyhow::ensure!(r["exit_code"] == 0, "exec in {id}: {r}");
        Ok(())
    }
    async fn delete(&self, id: &str) -> Result<()> {
        self.call(reqwest::Method::DELETE, &format!("/v1/sandbox/{id}"), None).await.map(drop)
    }
}
