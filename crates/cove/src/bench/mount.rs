//! `cove bench mount`: a bucket mounted in a guest against the same object fetched directly, in
//! the same run. The S3 server (s3s-fs, public bucket) runs on the offline test internet, so the
//! guest can GET it itself through NAT exactly as the runner does for the mount.
//!
//! Rows: sequential read of a large object through the mount (cold caches: a fresh view on the
//! host, the guest's page cache dropped), the guest's own `curl` GET of it, and the host's GET;
//! first-byte latency (open + first 4 KiB read, cold); a listing of 10,000 objects through the
//! mount against the host's own listing.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use cove_blob::testing::{S3Server, BUCKET};
use serde_json::{json, Value};

use super::{median, write_json, Bench};

/// Where the S3 server listens: the test internet's own address.
const S3_IP: Ipv4Addr = cove_net::testing::INTERNET_SIDE_IP;
const S3_PORT: u16 = 9000;
const MOUNT_PATH: &str = "/data/bench";

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Size of the object read sequentially, MiB.
    #[arg(long, default_value_t = 100)]
    mib: u64,
    /// Objects in the listed directory.
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    /// Runs of each measurement.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The s3s-fs binary (default: the one `scripts/s3-server install` builds into the cache).
    #[arg(long, env = "COVE_S3S_FS")]
    s3s_fs: Option<PathBuf>,
    #[arg(long, default_value = "bench-results/mount.json")]
    out: PathBuf,
}

/// s3s-fs without credentials on the test internet, with the small objects the bench reads.
/// s3s-fs serves files as they are, but for an object it did not receive by PUT it hashes the
/// whole file for the ETag on every GET, ranged or not: the large object is PUT once the server
/// runs (see `upload`), the small ones are written directly.
fn start_server(binary: &Path, objects: usize) -> Result<S3Server> {
    let server =
        S3Server::start_anonymous_in(binary, cove_net::testing::NETNS, &format!("{S3_IP}:{S3_PORT}"))
            .map_err(anyhow::Error::msg)?;
    let bucket = server.bucket_dir();
    std::fs::create_dir_all(bucket.join("many"))?;
    std::fs::write(bucket.join("small.txt"), "first byte\n")?;
    for i in 0..objects {
        std::fs::write(bucket.join(format!("many/f{i:05}.txt")), format!("object {i}"))?;
    }
    Ok(server)
}

/// Incompressible, so no layer can cheat.
fn big_object(len: u64) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// PUTs the large object (unsigned: the bucket is public), so that the server keeps its ETag.
async fn upload(http: &reqwest::Client, url: &str, bytes: u64) -> Result<()> {
    let r = http.put(url).body(big_object(bytes)).send().await?;
    if !r.status().is_success() {
        bail!("PUT {url}: {} {}", r.status(), r.text().await.unwrap_or_default());
    }
    Ok(())
}

/// The numbers a guest command printed on its last line.
fn numbers(out: &Value) -> Result<Vec<f64>> {
    let line = out["stdout"].as_str().unwrap_or("").trim().lines().last().unwrap_or("").to_string();
    line.split_whitespace()
        .map(|x| x.parse::<f64>().with_context(|| format!("bad output {line:?}")))
        .collect()
}

pub async fn mount(b: &Bench, args: &MountArgs, cache_dir: &Path) -> Result<()> {
    let binary = args.s3s_fs.clone().unwrap_or_else(|| cache_dir.join("tools/bin/s3s-fs"));
    if !binary.exists() {
        bail!("{} not found: run `scripts/s3-server install` (or pass --s3s-fs)", binary.display());
    }
    let t = Instant::now();
    let server = start_server(&binary, args.objects)?;
    println!(
        "S3 server ready with {} MiB + {} objects ({:.1}s)",
        args.mib,
        args.objects,
        t.elapsed().as_secs_f64()
    );
    let bytes = args.mib << 20;
    let object_url = format!("{}/{BUCKET}/big.bin", server.endpoint);
    upload(&b.http, &object_url, bytes).await?;

    // Host: one plain GET of the whole object (what any S3 client on the host gets).
    let mut host_get = Vec::new();
    for _ in 0..args.runs {
        let t = Instant::now();
        let mut resp = b.http.get(&object_url).send().await?.error_for_status()?;
        let mut got = 0u64;
        while let Some(chunk) = resp.chunk().await? {
            got += chunk.len() as u64;
        }
        if got != bytes {
            bail!("host GET returned {got} bytes, not {bytes}");
        }
        host_get.push(bytes as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64);
    }
    // Host: the listing the runner makes for the mount (same code, no guest).
    let spec = cove_mount::MountSpec {
        bucket: BUCKET.into(),
        endpoint: server.endpoint.clone(),
        prefix: String::new(),
        region: None,
        credentials: None,
    };
    let mut host_list_ms = Vec::new();
    for _ in 0..args.runs {
        let view = cove_mount::S3View::connect(spec.clone()).await?;
        let t = Instant::now();
        let n = view.list("many").await?.len();
        host_list_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if n != args.objects {
            bail!("host listing found {n} objects, not {}", args.objects);
        }
    }

    let template = cove_api::sandbox::DEFAULT_TEMPLATE;
    let mount = json!({"type": "object-storage", "bucket": BUCKET, "mount_path": MOUNT_PATH,
        "endpoint": server.endpoint.clone()});
    let sbx = b
        .call(
            reqwest::Method::POST,
            "/v1/sandbox",
            Some(json!({"template_name": template, "timeout": 3600, "mounts": [mount]})),
        )
        .await?;
    let id = sbx["id"].as_str().context("no sandbox id")?.to_string();
    let mount_id = sbx["mounts"][0]["id"].as_str().context("no mount id")?.to_string();
    // Cold caches before each mount run: a fresh view on the host (an update that changes
    // nothing but is applied, so the runner connects a new view with empty caches), and the
    // guest's page cache dropped.
    let cold = || async {
        b.call(
            reqwest::Method::PATCH,
            &format!("/v1/sandbox/{id}/mounts/{mount_id}"),
            Some(json!({"access_key_id": "", "secret_access_key": ""})),
        )
        .await?;
        b.exec(&id, "sync; echo 3 | sudo -n tee /proc/sys/vm/drop_caches >/dev/null").await?;
        Ok::<_, anyhow::Error>(())
    };

    let mut guest_get = Vec::new();
    let mut mount_read = Vec::new();
    let mut first_byte_ms = Vec::new();
    let mut guest_get_ttfb_ms = Vec::new();
    let mut mount_list_ms = Vec::new();
    for run in 0..args.runs {
        // The guest's own GET of the object, through NAT to the same server.
        let out = b
            .exec(
                &id,
                &format!(
                    "curl -sS --fail -o /dev/null -w '%{{size_download}} %{{time_starttransfer}} %{{time_total}}\\n' {object_url}"
                ),
            )
            .await?;
        match numbers(&out)?.as_slice() {
            [size, ttfb, total] if *size as u64 == bytes => {
                guest_get.push(size / total / (1 << 20) as f64);
                guest_get_ttfb_ms.push(ttfb * 1e3);
            }
            other => bail!("guest GET: unexpected {other:?}"),
        }

        // The same object through the mount, sequentially in 1 MiB reads, cold.
        cold().await?;
        let read = "python3 -c \"
import time
t = time.monotonic(); n = 0
with open('/data/bench/big.bin', 'rb', buffering=0) as f:
    while True:
        b = f.read(1 << 20)
        if not b: break
        n += len(b)
print(n, time.monotonic() - t)\"";
        match numbers(&b.exec(&id, read).await?)?.as_slice() {
            [size, secs] if *size as u64 == bytes => mount_read.push(size / secs / (1 << 20) as f64),
            other => bail!("mount read: unexpected {other:?}"),
        }

        // First byte: open and read 4 KiB of a file never read, caches cold.
        cold().await?;
        let first = "python3 -c \"
import time
t = time.monotonic()
with open('/data/bench/small.txt', 'rb', buffering=0) as f: f.read(4096)
print(time.monotonic() - t)\"";
        match numbers(&b.exec(&id, first).await?)?.as_slice() {
            [secs] => first_byte_ms.push(secs * 1e3),
            other => bail!("first byte: unexpected {other:?}"),
        }

        // Listing 10,000 objects, cold.
        cold().await?;
        let list = "python3 -c \"
import os, time
t = time.monotonic(); n = len(os.listdir('/data/bench/many'))
print(n, time.monotonic() - t)\"";
        match numbers(&b.exec(&id, list).await?)?.as_slice() {
            [n, secs] if *n as usize == args.objects => mount_list_ms.push(secs * 1e3),
            other => bail!("listing: unexpected {other:?}"),
        }
        println!(
            "run {}: mount {:.1} MiB/s, guest GET {:.1} MiB/s, first byte {:.1} ms, list {:.0} ms",
            run + 1,
            mount_read[run],
            guest_get[run],
            first_byte_ms[run],
            mount_list_ms[run]
        );
    }
    b.call(reqwest::Method::DELETE, &format!("/v1/sandbox/{id}"), None).await.ok();

    let (m, g, h) = (median(mount_read.clone()), median(guest_get.clone()), median(host_get.clone()));
    let (lm, lh) = (median(mount_list_ms.clone()), median(host_list_ms.clone()));
    println!();
    println!(
        "{} MiB object, {} objects listed, {} runs; medians, cold caches",
        args.mib, args.objects, args.runs
    );
    println!("{:<44} {:>10} {:>10}", "", "MiB/s", "vs mount");
    println!("{:<44} {m:>10.1} {:>9.0}%", "guest: sequential read through the mount", 100.0);
    println!("{:<44} {g:>10.1} {:>9.0}%", "guest: direct GET (curl, NAT)", 100.0 * g / m);
    println!("{:<44} {h:>10.1} {:>9.0}%", "host: direct GET", 100.0 * h / m);
    println!(
        "first byte through the mount {:.1} ms (guest direct GET time to first byte {:.1} ms)",
        median(first_byte_ms.clone()),
        median(guest_get_ttfb_ms.clone())
    );
    println!(
        "listing {} objects: mount {lm:.0} ms, host S3 listing {lh:.0} ms ({:.2}x)",
        args.objects,
        lm / lh
    );
    let ratio = m / g;
    println!(
        "mount throughput = {:.0}% of the guest's direct GET, {:.0}% of the host's (target >= 50%: {})",
        100.0 * ratio,
        100.0 * m / h,
        if ratio >= 0.5 { "met" } else { "NOT met" }
    );
    let result = json!({
        "benchmark": "mount",
        "accel": b.accel,
        "object_mib": args.mib,
        "objects_listed": args.objects,
        "runs": args.runs,
        "mount_read_mib_s": { "runs": mount_read, "median": m },
        "guest_direct_get_mib_s": { "runs": guest_get, "median": g },
        "host_direct_get_mib_s": { "runs": host_get, "median": h },
        "mount_first_byte_ms": { "runs": first_byte_ms, "median": median(first_byte_ms.clone()) },
        "guest_direct_get_ttfb_ms": { "runs": guest_get_ttfb_ms, "median": median(guest_get_ttfb_ms.clone()) },
        "mount_list_ms": { "runs": mount_list_ms, "median": lm },
        "host_list_ms": { "runs": host_list_ms, "median": lh },
        "mount_over_guest_direct_get": ratio,
        "mount_over_host_direct_get": m / h,
        "target_met": ratio >= 0.5,
        "at": chrono::Utc::now().to_rfc3339(),
    });
    write_json(&args.out, &result)
}
