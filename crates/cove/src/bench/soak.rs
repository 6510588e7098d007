//! `cove bench soak`: randomized lifecycle cycles with the sandbox's data checked after each.
//!
//! One sandbox (512 MiB) holds three kinds of data whose SHA-256 the bench knows:
//! - on disk: `/home/user/soak/disk.bin`;
//! - in guest memory only: `/dev/shm/soak.bin` (tmpfs);
//! - in a process's memory: a Python daemon holding random bytes, which writes their hash to
//!   `/dev/shm/soak.daemon` when sent SIGUSR1.
//!
//! Every cycle rewrites the disk and tmpfs files with new random content (random sizes up to 2
//! MiB), then does one operation chosen at random: pause then resume (explicitly, or by the next
//! request), snapshot then restore into a new sandbox (which the soak goes on with; the old
//! sandbox and the snapshot are deleted), or stop then start. Then it checks all three. After a
//! stop, what lived in memory is gone by design: the bench checks that the daemon and the tmpfs
//! file are gone, then sets them up again. A mismatch is counted and reported, not fatal.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use cove_runner::SandboxHost;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};

use super::{write_json, Bench, Stats};

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Lifecycle cycles to run.
    #[arg(long, default_value_t = 1000)]
    cycles: usize,
    /// Seed of the random choices (the same seed, the same sequence of operations).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value = "bench-results/soak.json")]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    PauseResume,
    PauseResumeByRequest,
    SnapshotRestore,
    StopStart,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::PauseResume => "pause, resume",
            Op::PauseResumeByRequest => "pause (next request resumes)",
            Op::SnapshotRestore => "snapshot, restore",
            Op::StopStart => "stop, start",
        }
    }
}

/// The daemon: holds 4 MiB of random bytes; SIGUSR1 writes their SHA-256 (and its own at start).
const DAEMON: &str = r#"
import hashlib, os, signal, time
data = os.urandom(4 << 20)
def report(*_):
    with open('/dev/shm/soak.daemon.tmp', 'w') as f:
        f.write(hashlib.sha256(data).hexdigest())
    os.rename('/dev/shm/soak.daemon.tmp', '/dev/shm/soak.daemon')
signal.signal(signal.SIGUSR1, report)
report()
while True:
    time.sleep(3600)
"#;

/// What the bench expects of the guest.
struct Expected {
    disk: String,
    shm: String,
    daemon: String,
}

pub async fn soak(b: &Bench, args: &SoakArgs) -> Result<()> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let memory = 512;
    b.runner.prepare_template(cove_api::sandbox::DEFAULT_TEMPLATE, 1, memory).await?;
    let sbx = b.call(Method::POST, "/v1/sandbox", Some(json!({"template_name": cove_api::sandbox::DEFAULT_TEMPLATE, "memory": memory, "timeout": 28_800}))).await?;
    let mut id = sbx["id"].as_str().context("no id")?.to_string();
    b.exec(&id, &format!("mkdir -p /home/user/soak && cat > /home/user/soak/daemon.py <<'PY'\n{DAEMON}\nPY"))
        .await?;
    let mut want = Expected { disk: String::new(), shm: String::new(), daemon: start_daemon(b, &id).await? };
    println!("soak: {} cycles, seed {seed}, sandbox {id}", args.cycles);

    let (mut done, mut checks, mut mismatches) = (BTreeMap::<Op, usize>::new(), 0usize, Vec::new());
    let mut times: BTreeMap<Op, Vec<Duration>> = BTreeMap::new();
    let started = Instant::now();
    for cycle in 1..=args.cycles {
        want.disk = write_random(b, &id, "/home/user/soak/disk.bin", rng.gen_range(1..=2 << 20)).await?;
        want.shm = write_random(b, &id, "/dev/shm/soak.bin", rng.gen_range(1..=2 << 20)).await?;
        let op = match rng.gen_range(0..10) {
            0..=3 => Op::PauseResume,
            4..=5 => Op::PauseResumeByRequest,
            6..=8 => Op::SnapshotRestore,
            _ => Op::StopStart,
        };
        let t = Instant::now();
        let memory_kept = match op {
            Op::PauseResume | Op::PauseResumeByRequest => {
                b.call(Method::POST, &format!("/v1/sandbox/{id}/pause"), None).await?;
                if op == Op::PauseResume {
                    b.call(Method::POST, &format!("/v1/sandbox/{id}/resume"), None).await?;
                }
                true
            }
            Op::SnapshotRestore => {
                let name = format!("soak-{seed}-{cycle}");
                let snap = b
                    .call(
                        Method::POST,
                        &format!("/v1/sandbox/{id}/snapshot/create"),
                        Some(json!({"name": name})),
                    )
                    .await?;
                let restored = b
                    .call(
                        Method::POST,
                        "/v1/snapshot/restore",
                        Some(json!({"snapshot_name": name, "timeout": 28_800})),
                    )
                    .await?;
                let new_id = restored["id"].as_str().context("no id")?.to_string();
                b.call(Method::DELETE, &format!("/v1/sandbox/{id}"), None).await?;
                let snap_id = snap["id"].as_str().context("no snapshot id")?;
                b.call(Method::DELETE, &format!("/v1/snapshot/{snap_id}"), None).await?;
                id = new_id;
                true
            }
            Op::StopStart => {
                b.call(Method::POST, &format!("/v1/sandbox/{id}/stop"), None).await?;
                b.call(Method::POST, &format!("/v1/sandbox/{id}/start"), None).await?;
                false
            }
        };
        times.entry(op).or_default().push(t.elapsed());
        *done.entry(op).or_default() += 1;

        let mut check = |what: &str, got: String, expected: &str| {
            checks += 1;
            if got != expected {
                eprintln!("soak: cycle {cycle} ({}): {what}: expected {expected:?}, got {got:?}", op.name());
                mismatches.push(json!({"cycle": cycle, "op": op.name(), "what": what,
                    "expected": expected, "got": got}));
            }
        };
        check("disk file", sha256_of(b, &id, "/home/user/soak/disk.bin").await?, &want.disk);
        if memory_kept {
            check("tmpfs file", sha256_of(b, &id, "/dev/shm/soak.bin").await?, &want.shm);
            check("daemon memory", daemon_hash(b, &id).await?, &want.daemon);
        } else {
            // A stopped sandbox boots afresh: memory is gone, as it should be.
            check("tmpfs file after stop", sha256_of(b, &id, "/dev/shm/soak.bin").await?, "missing");
            check("daemon after stop", daemon_alive(b, &id).await?, "gone");
            want.daemon = start_daemon(b, &id).await?;
        }
        if cycle % 50 == 0 || cycle == args.cycles {
            println!(
                "soak: {cycle}/{} cycles, {checks} checks, {} mismatches, {:.0}s",
                args.cycles,
                mismatches.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    b.call(Method::DELETE, &format!("/v1/sandbox/{id}"), None).await.ok();

    println!();
    println!("{:<28} {:>7} {:>9} {:>9}", "operation", "count", "p50 ms", "p95 ms");
    let mut ops = serde_json::Map::new();
    for (op, d) in times {
        let s = Stats::new(d);
        println!("{:<28} {:>7} {:>9.0} {:>9.0}", op.name(), done[&op], s.pct(50.0), s.pct(95.0));
        ops.insert(op.name().into(), json!({"count": done[&op], "latency": s.json()}));
    }
    println!("{checks} checks, {} mismatches", mismatches.len());
    write_json(
        &args.out,
        &json!({
            "benchmark": "soak", "accel": b.accel, "seed": seed, "cycles": args.cycles,
            "checks": checks, "mismatches": mismatches, "operations": ops,
            "elapsed_s": started.elapsed().as_secs_f64(), "at": chrono::Utc::now().to_rfc3339(),
        }),
    )?;
    if !mismatches.is_empty() {
        bail!("{} of {checks} checks did not match", mismatches.len());
    }
    Ok(())
}

/// Writes `bytes` random bytes to `path` in the guest; returns their SHA-256.
async fn write_random(b: &Bench, id: &str, path: &str, bytes: u32) -> Result<String> {
    let out = b
        .exec(
            id,
            &format!("head -c {bytes} /dev/urandom | tee {path}.tmp | sha256sum && mv {path}.tmp {path}"),
        )
        .await?;
    first_word(&out)
}

/// SHA-256 of a guest file, or `missing`.
async fn sha256_of(b: &Bench, id: &str, path: &str) -> Result<String> {
    let out = b.exec(id, &format!("if [ -e {path} ]; then sha256sum {path}; else echo missing; fi")).await?;
    first_word(&out)
}

async fn start_daemon(b: &Bench, id: &str) -> Result<String> {
    b.exec(id, "rm -f /dev/shm/soak.daemon; nohup python3 /home/user/soak/daemon.py >/dev/null 2>&1 & echo $! > /dev/shm/soak.pid")
        .await?;
    for _ in 0..600 {
        let out = b.exec(id, "cat /dev/shm/soak.daemon 2>/dev/null || true").await?;
        let hash = out["stdout"].as_str().unwrap_or("").trim().to_string();
        if hash.len() == 64 {
            return Ok(hash);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the soak daemon did not start")
}

/// Asks the daemon for the hash of what it holds.
async fn daemon_hash(b: &Bench, id: &str) -> Result<String> {
    let out = b
        .exec(
            id,
            "rm -f /dev/shm/soak.daemon; kill -USR1 $(cat /dev/shm/soak.pid) 2>/dev/null || { echo dead; exit 0; }; \
             for i in $(seq 100); do [ -e /dev/shm/soak.daemon ] && break; sleep 0.1; done; \
             cat /dev/shm/soak.daemon 2>/dev/null || echo no-answer",
        )
        .await?;
    first_word(&out)
}

/// `alive` when the daemon's process still runs, else `gone`.
async fn daemon_alive(b: &Bench, id: &str) -> Result<String> {
    let out = b.exec(id, "pgrep -f 'soak/daemon[.]py' >/dev/null && echo alive || echo gone").await?;
    first_word(&out)
}

fn first_word(out: &Value) -> Result<String> {
    out["stdout"]
        .as_str()
        .and_then(|s| s.split_whitespace().next())
        .map(str::to_string)
        .with_context(|| format!("no output: {out}"))
}
