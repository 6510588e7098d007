//! `cove bench density`: how many idle sandboxes this host holds. Idle sandboxes are added in
//! steps; at each step the bench measures what they cost the host while doing nothing (CPU of
//! their QEMU processes over a window, their proportional memory, the host's available memory)
//! and the exec round trip of one more sandbox beside them, against the same round trip
//! measured before any idle sandbox existed. It stops at the first step whose exec p50 is over
//! `--max-ratio` times the unloaded one, when the host's available memory falls under
//! `--min-available-mib`, or at `--max`. Its runner declares the memory of every sandbox it
//! will add as its capacity (`cove server --capacity-memory-mib`): the host's memory is
//! overcommitted, as an operator would for idle sandboxes, since placement otherwise stops at
//! the memory the sandboxes were given, not the memory they use.
//!
//! `cove bench idle`: one sandbox of each template side by side, doing nothing, and what each
//! one's QEMU costs the host's CPU over a window, beside the default template's.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use cove_runner::SandboxHost;
use serde_json::json;

use super::{write_json, Bench, Stats};

#[derive(Args, Debug)]
pub struct DensityArgs {
    /// Idle sandboxes added per step.
    #[arg(long, default_value_t = 10)]
    step: usize,
    /// Most idle sandboxes to add.
    #[arg(long, default_value_t = 60)]
    max: usize,
    /// Memory of each idle sandbox, MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Seconds to let new sandboxes settle before measuring.
    #[arg(long, default_value_t = 5)]
    settle: u64,
    /// Seconds over which idle CPU is measured.
    #[arg(long, default_value_t = 10)]
    window: u64,
    /// Exec round trips timed at each step.
    #[arg(long, default_value_t = 40)]
    execs: usize,
    /// Stop once the exec p50 is over this multiple of the unloaded one.
    #[arg(long, default_value_t = 2.0)]
    max_ratio: f64,
    /// Stop before a step once the host's available memory is under this, MiB.
    #[arg(long, default_value_t = 2048)]
    min_available_mib: u64,
    #[arg(long, default_value = "bench-results/density.json")]
    out: PathBuf,
}

impl DensityArgs {
    /// The sandbox memory the bench's runner takes: every idle sandbox and the probe.
    pub fn capacity_memory_mib(&self) -> u64 {
        self.max as u64 * self.memory + cove_api::sandbox::DEFAULT_MEMORY_MIB
    }
}

pub async fn density(b: &Bench, args: &DensityArgs) -> Result<()> {
    let template = cove_api::sandbox::DEFAULT_TEMPLATE;
    let t = Instant::now();
    b.runner.prepare_template(template, 1, args.memory).await?;
    println!("template snapshot ready ({:.1}s; 0 when cached)", t.elapsed().as_secs_f64());
    let probe = create(b, template, cove_api::sandbox::DEFAULT_MEMORY_MIB).await?;
    let unloaded = exec_round_trips(b, &probe, args.execs).await?;
    let base_cpu = host_cpu_busy(Duration::from_secs(args.window)).await?;
    println!(
        "unloaded: exec p50 {:.1} ms (p99 {:.1}); host CPU busy {:.1}% of {} cores",
        unloaded.pct(50.0),
        unloaded.pct(99.0),
        base_cpu * 100.0,
        cores()
    );
    println!();
    println!(
        "{:>5} {:>12} {:>12} {:>13} {:>12} {:>11} {:>10} {:>9}",
        "idle", "CPU/idle %", "host busy %", "PSS/idle MiB", "avail GiB", "exec p50", "exec p99", "x unload"
    );
    let mut idle = Vec::new();
    let mut rows = Vec::new();
    let mut held = 0;
    while idle.len() < args.max {
        let available = mem_available().unwrap_or(0) >> 20;
        if available < args.min_available_mib {
            println!("stopped: the host has {available} MiB of memory available");
            break;
        }
        let want = (idle.len() + args.step).min(args.max);
        let mut failed = None;
        while idle.len() < want {
            match create(b, template, args.memory).await {
                Ok(id) => idle.push(id),
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(e) = failed {
            println!("creating idle sandbox {} failed: {e}", idle.len() + 1);
            break;
        }
        tokio::time::sleep(Duration::from_secs(args.settle)).await;
        let qemus = qemu_pids(b.data.path());
        anyhow::ensure!(
            qemus.len() > idle.len(),
            "found {} QEMU processes for {} sandboxes",
            qemus.len(),
            idle.len() + 1
        );
        let before: u64 = qemus.iter().filter_map(|&p| cpu_ticks(p)).sum();
        let window = Instant::now();
        let busy = host_cpu_busy(Duration::from_secs(args.window)).await?;
        let after: u64 = qemus.iter().filter_map(|&p| cpu_ticks(p)).sum();
        let secs = window.elapsed().as_secs_f64();
        // The probe's QEMU is among them; its share is an idle sandbox's too.
        let per_idle_cpu = (after - before) as f64 / ticks_per_second() / secs / qemus.len() as f64;
        let pss: u64 = qemus.iter().filter_map(|&p| pss_bytes(p)).sum();
        let per_idle_pss = pss as f64 / qemus.len() as f64;
        let available = mem_available().unwrap_or(0);
        let loaded = exec_round_trips(b, &probe, args.execs).await?;
        let ratio = loaded.pct(50.0) / unloaded.pct(50.0);
        println!(
            "{:>5} {:>12.2} {:>12.1} {:>13.0} {:>12.1} {:>11.1} {:>10.1} {:>8.2}x",
            idle.len(),
            per_idle_cpu * 100.0,
            busy * 100.0,
            per_idle_pss / (1 << 20) as f64,
            available as f64 / (1u64 << 30) as f64,
            loaded.pct(50.0),
            loaded.pct(99.0),
            ratio
        );
        rows.push(json!({
            "idle_sandboxes": idle.len(),
            "qemu_processes": qemus.len(),
            "cpu_per_idle_sandbox_fraction_of_core": per_idle_cpu,
            "host_cpu_busy_fraction": busy,
            "pss_per_sandbox_bytes": per_idle_pss,
            "host_mem_available_bytes": available,
            "exec": loaded.json(),
            "exec_p50_over_unloaded": ratio,
        }));
        if ratio > args.max_ratio {
            break;
        }
        held = idle.len();
    }
    println!();
    println!(
        "held {held} idle {} MiB sandboxes with the exec p50 at most {:.1}x its unloaded figure",
        args.memory, args.max_ratio
    );
    let result = json!({
        "benchmark": "density",
        "accel": b.accel,
        "cores": cores(),
        "idle_memory_mib": args.memory,
        "unloaded": { "exec": unloaded.json(), "host_cpu_busy_fraction": base_cpu },
        "steps": rows,
        "held": held,
        "max_ratio": args.max_ratio,
        "at": chrono::Utc::now().to_rfc3339(),
    });
    write_json(&args.out, &result)
}

#[derive(Args, Debug)]
pub struct IdleArgs {
    /// Templates to measure, one sandbox each (default: every system template).
    #[arg(long, value_delimiter = ',')]
    templates: Vec<String>,
    /// Seconds to let the sandboxes settle before measuring.
    #[arg(long, default_value_t = 40)]
    settle: u64,
    /// Seconds over which their CPU is measured.
    #[arg(long, default_value_t = 60)]
    window: u64,
    #[arg(long, default_value = "bench-results/idle.json")]
    out: PathBuf,
}

pub async fn idle(b: &Bench, args: &IdleArgs) -> Result<()> {
    let templates: Vec<String> = if args.templates.is_empty() {
        cove_api::template::SYSTEM_TEMPLATES.iter().map(|t| t.name.to_string()).collect()
    } else {
        args.templates.clone()
    };
    let memory = cove_api::sandbox::DEFAULT_MEMORY_MIB;
    let mut qemus = Vec::new();
    for template in &templates {
        let t = Instant::now();
        b.runner.prepare_template(template, 1, memory).await?;
        let id =
            create(b, template, memory).await.with_context(|| format!("creating a sandbox of {template}"))?;
        let pid = qemu_pids(b.data.path())
            .into_iter()
            .find(|&pid| cmdline(pid).contains(&id))
            .with_context(|| format!("no QEMU process names sandbox {id}"))?;
        println!(
            "{template}: sandbox {id} ({:.1}s, with its template snapshot when not cached)",
            t.elapsed().as_secs_f64()
        );
        qemus.push(pid);
    }
    println!("settling {} s, then measuring over {} s", args.settle, args.window);
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let before: Vec<Option<u64>> = qemus.iter().map(|&p| cpu_ticks(p)).collect();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.window)).await;
    let secs = window.elapsed().as_secs_f64();
    let mut cpus = Vec::new();
    for ((template, &pid), before) in templates.iter().zip(&qemus).zip(before) {
        let (Some(before), Some(after)) = (before, cpu_ticks(pid)) else {
            anyhow::bail!("the QEMU of the {template} sandbox ended during the measurement");
        };
        cpus.push((after - before) as f64 / ticks_per_second() / secs);
    }
    let baseline =
        templates.iter().zip(&cpus).find(|(t, _)| *t == cove_api::sandbox::DEFAULT_TEMPLATE).map(|(_, &c)| c);
    let mut rows = Vec::new();
    println!();
    println!("{:<34} {:>14} {:>10}", "template", "CPU % of core", "x default");
    for (template, &cpu) in templates.iter().zip(&cpus) {
        let ratio = baseline.map(|base| cpu / base);
        let shown = ratio.map_or_else(|| "-".to_string(), |r| format!("{r:.2}x"));
        println!("{template:<34} {:>14.2} {shown:>10}", cpu * 100.0);
        rows.push(json!({
            "template": template,
            "cpu_fraction_of_core": cpu,
            "over_default_template": ratio,
        }));
    }
    let result = json!({
        "benchmark": "idle",
        "accel": b.accel,
        "memory_mib": memory,
        "settle_secs": args.settle,
        "window_secs": secs,
        "sandboxes": rows,
        "at": chrono::Utc::now().to_rfc3339(),
    });
    write_json(&args.out, &result)
}

async fn create(b: &Bench, template: &str, memory: u64) -> Result<String> {
    let body = json!({"template_name": template, "memory": memory, "timeout": 3600});
    let sbx = b.call(reqwest::Method::POST, "/v1/sandbox", Some(body)).await?;
    Ok(sbx["id"].as_str().context("no id")?.to_string())
}

async fn exec_round_trips(b: &Bench, id: &str, n: usize) -> Result<Stats> {
    b.exec(id, "true").await?;
    let mut d = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        b.exec(id, "true").await?;
        d.push(t.elapsed());
    }
    Ok(Stats::new(d))
}

/// The QEMU processes of this bench's sandboxes: those whose command line names its data dir.
/// (Their process names are the sandboxes', `-name …,process=`: the program is told by argv[0].)
fn qemu_pids(data: &Path) -> Vec<u32> {
    let needle = data.to_string_lossy().into_owned();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let cmdline = cmdline(pid);
            let program = cmdline.split('\0').next().unwrap_or_default();
            program.rsplit('/').next().is_some_and(|p| p.starts_with("qemu-system"))
                && cmdline.contains(&needle)
        })
        .collect()
}

/// A process's arguments, NUL-separated ("" once it has ended).
fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).into_owned()
}

/// User and system CPU ticks of a process, all its threads.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) ends with ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn pss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kib_field(&text, "Pss:")
}

fn mem_available() -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemAvailable:")
}

/// A `Name:   123 kB` line's value, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    Some(line[name.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024)
}

/// The fraction of all cores busy over `window`, from /proc/stat.
async fn host_cpu_busy(window: Duration) -> Result<f64> {
    let read = || -> Result<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let line = stat.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        // idle and iowait are the 4th and 5th figures.
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Ok((v.iter().sum(), idle))
    };
    let (total0, idle0) = read()?;
    tokio::time::sleep(window).await;
    let (total1, idle1) = read()?;
    let total = (total1 - total0).max(1) as f64;
    Ok(1.0 - (idle1 - idle0) as f64 / total)
}

/// Clock ticks of /proc/<pid>/stat: USER_HZ, which the kernel's ABI fixes at 100 on x86.
fn ticks_per_second() -> f64 {
    100.0
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kib_fields_parse() {
        let text = "Rss:              123456 kB\nPss:               4096 kB\n";
        assert_eq!(kib_field(text, "Pss:"), Some(4096 * 1024));
        assert_eq!(kib_field(text, "Swap:"), None);
    }

    #[test]
    fn own_cpu_ticks_are_read() {
        assert!(cpu_ticks(std::process::id()).is_some());
    }
}
