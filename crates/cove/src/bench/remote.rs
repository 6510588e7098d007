//! `cove bench remote`: what the runner wire protocol costs. One runner, two control planes:
//! the bench's own (the runner in its process) and a second that reaches the same runner
//! through `cove_runner::remote` (HTTP/2 on TLS over loopback, as `cove server --runner` does).
//! Create, exec round trip, pause and resume are timed on both, alternating, in one run.

use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use cove_server::{Core, CoreConfig};
use serde_json::json;

use super::{write_json, Bench, Stats};

#[derive(Args, Debug)]
pub struct RemoteArgs {
    /// Sandboxes to create on each control plane (each also paused and resumed once).
    #[arg(long, default_value_t = 5)]
    count: usize,
    /// Exec round trips per sandbox.
    #[arg(long, default_value_t = 40)]
    execs: usize,
    #[arg(long, default_value = "bench-results/remote.json")]
    out: PathBuf,
}

#[derive(Default)]
struct Times {
    create: Vec<Duration>,
    exec: Vec<Duration>,
    pause: Vec<Duration>,
    resume: Vec<Duration>,
}

pub async fn remote(b: &Bench, args: &RemoteArgs) -> Result<()> {
    let wired = wired_plane(b).await?;
    let (mut local, mut remote) = (Times::default(), Times::default());
    println!("{} sandboxes per control plane, {} exec round trips each ...", args.count, args.execs);
    for _ in 0..args.count {
        for (plane, times) in [(b, &mut local), (&wired, &mut remote)] {
            one_sandbox(plane, args.execs, times).await?;
        }
    }
    wired.delete_all().await;

    println!();
    println!("{:<28} {:>12} {:>12} {:>8}", "p50 ms", "in process", "over wire", "ratio");
    let mut rows = serde_json::Map::new();
    for (name, l, r) in [
        ("create (to 201)", local.create, remote.create),
        ("exec round trip (`true`)", local.exec, remote.exec),
        ("pause", local.pause, remote.pause),
        ("resume (first exec)", local.resume, remote.resume),
    ] {
        let (l, r) = (Stats::new(l), Stats::new(r));
        let ratio = r.pct(50.0) / l.pct(50.0);
        println!("{name:<28} {:>12.1} {:>12.1} {:>7.2}x", l.pct(50.0), r.pct(50.0), ratio);
        rows.insert(
            name.into(),
            json!({ "in_process": l.json(), "over_wire": r.json(), "p50_ratio": ratio }),
        );
    }
    let result = json!({
        "benchmark": "remote",
        "accel": b.accel,
        "transport": "HTTP/2 on TLS over loopback",
        "results": rows,
        "at": chrono::Utc::now().to_rfc3339(),
    });
    write_json(&args.out, &result)
}

/// A second control plane on its own store, whose host is the bench's runner served over the
/// wire on loopback.
async fn wired_plane(b: &Bench) -> Result<Bench> {
    let host = cove_runner::remote::over_loopback(b.runner.clone())
        .await
        .map_err(|e| anyhow::anyhow!("serving the runner over loopback: {e}"))?;
    let data = tempfile::tempdir().context("temp data dir")?;
    let store = Arc::new(cove_store::Store::open(&data.path().join("cove.db"))?);
    let org = store.create_org("bench", Some(1000))?;
    let key = cove_store::generate_key();
    store.add_key(&org.id, "bench", &key)?;
    let mut cfg = CoreConfig::local(1000);
    cfg.runner_id = "remote".into();
    let core = Arc::new(Core::new(store, host, cfg, cove_store::sealed::Sealer::ephemeral()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(axum::serve(listener, cove_server::router(core)).into_future());
    Ok(Bench {
        base,
        key,
        http: reqwest::Client::new(),
        runner: b.runner.clone(),
        accel: b.accel.clone(),
        data,
    })
}

/// Create, `execs` round trips, pause, resume (its first exec), delete; each timed.
async fn one_sandbox(b: &Bench, execs: usize, times: &mut Times) -> Result<()> {
    let post = reqwest::Method::POST;
    let t = Instant::now();
    let id = b.create_default().await?;
    times.create.push(t.elapsed());
    for _ in 0..execs {
        let t = Instant::now();
        b.exec(&id, "true").await?;
        times.exec.push(t.elapsed());
    }
    let t = Instant::now();
    b.call(post.clone(), &format!("/v1/sandbox/{id}/pause"), None).await?;
    times.pause.push(t.elapsed());
    let t = Instant::now();
    b.exec(&id, "true").await?;
    times.resume.push(t.elapsed());
    b.call(reqwest::Method::DELETE, &format!("/v1/sandbox/{id}"), None).await?;
    Ok(())
}
