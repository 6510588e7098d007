//! `cove bench template`: how long an image takes to become a template disk, beside the usual
//! tools doing the same work in the same run, and how fast sandboxes start from a user
//! template beside the system template.
//!
//! The image (`--mib`, made of this host's own `/usr` files in four layers, so it compresses
//! like real software) is pushed to a local registry (Debian's docker-registry). Cove's side is
//! `Runner::build_template` with a cold layer cache: pull, unpack, `mke2fs -d`, qcow2. The
//! baseline is `skopeo copy` + `umoci unpack` + `mke2fs -d` + `qemu-img convert` of the same
//! image. Create latency is `POST /v1/sandbox` from each template, interleaved.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use cove_oci::testing::{Image, Layer, Registry};
use cove_runner::SandboxHost;
use serde_json::{json, Value};

use super::{median, write_json, Bench, Stats};

#[derive(Args, Debug)]
pub struct TemplateArgs {
    /// Uncompressed size of the image, MiB.
    #[arg(long, default_value_t = 200)]
    mib: u64,
    /// Conversions of each kind (Cove, baseline) to time.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Sandboxes created from each template.
    #[arg(long, default_value_t = 10)]
    creates: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results/template.json")]
    out: PathBuf,
}

/// Host files under `/usr` adding up to about `mib`, as four layers (and busybox as /bin/sh).
fn host_image(mib: u64) -> Result<Image> {
    let mut files: Vec<(PathBuf, u64)> = Vec::new();
    let mut total = 0u64;
    for root in ["/usr/lib", "/usr/share", "/usr/bin"] {
        for e in walkdir::WalkDir::new(root).sort_by_file_name().into_iter().filter_map(|e| e.ok()) {
            if total >= mib << 20 {
                break;
            }
            let Ok(m) = e.metadata() else { continue };
            if e.file_type().is_dir() {
                files.push((e.path().to_path_buf(), 0));
            } else if e.file_type().is_file() && m.len() < (16 << 20) {
                total += m.len();
                files.push((e.path().to_path_buf(), m.len()));
            }
        }
    }
    if total < mib << 20 {
        bail!("this host has only {} MiB of files under /usr", total >> 20);
    }
    let busybox = std::fs::read("/bin/busybox").context("/bin/busybox (apt-get install busybox-static)")?;
    let quarter = total / 4 + 1;
    let mut layers = Vec::new();
    let mut layer = Layer::default().dir("bin", 0o755, (0, 0)).file("bin/busybox", &busybox, 0o755, (0, 0));
    layer = layer.symlink("bin/sh", "busybox");
    let mut in_layer = 0u64;
    for (path, len) in files {
        let rel = path.to_string_lossy().trim_start_matches('/').to_string();
        layer =
            if path.is_dir() { layer.dir(&rel, 0o755, (0, 0)) } else { layer.host_file(&rel, &path, 0o644) };
        in_layer += len;
        if in_layer >= quarter {
            layers.push(std::mem::take(&mut layer).finish());
            in_layer = 0;
        }
    }
    layers.push(layer.finish());
    Ok(Image { layers, env: vec!["PATH=/bin".into()], ..Default::default() })
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd.get_program(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// skopeo copy + umoci unpack + mke2fs -d + qemu-img convert; returns (total, pull+unpack).
fn baseline(uri: &str, work: &Path) -> Result<(Duration, Duration)> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    let layout = work.join("oci");
    let t = Instant::now();
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{uri}"))
        .arg(format!("oci:{}:bench", layout.display())))?;
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:bench", layout.display()))
        .arg(work.join("bundle")))?;
    let unpacked = t.elapsed();
    let rootfs = work.join("bundle/rootfs");
    let used_mib = super::disk_usage(&rootfs) >> 20;
    let size = used_mib * 11 / 10 + 64 + cove_api::template::DEFAULT_FREE_MIB;
    let raw = work.join("disk.ext4");
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-E", "root_owner=0:0", "-F", "-d"])
        .arg(&rootfs)
        .arg(&raw)
        .arg(format!("{size}M")))?;
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(work.join("disk.qcow2")))?;
    let total = t.elapsed();
    let _ = std::fs::remove_dir_all(work);
    Ok((total, unpacked))
}

pub async fn template(b: &Bench, registry: &Registry, args: &TemplateArgs, cache_dir: &Path) -> Result<()> {
    for tool in ["skopeo", "umoci"] {
        if which(tool).is_none() {
            bail!("{tool} is needed for the baseline: apt-get install skopeo umoci");
        }
    }
    println!("building a {} MiB image from this host's /usr files ...", args.mib);
    let image = host_image(args.mib)?;
    let layer_mib: u64 = image.layers.iter().map(|l| l.len() as u64).sum::<u64>() >> 20;
    registry.push("bench/app:1", &image).await;
    let uri = registry.uri("bench/app:1");
    println!("pushed {uri}: {} layers, {layer_mib} MiB uncompressed", image.layers.len());
    let layer_cache = cache_dir.join("oci/blobs/sha256");
    let work = b.data.path().join("baseline");

    let (mut cove, mut base, mut base_unpack) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        // Cold: the image's layers leave the cache before each conversion.
        let src = cove_runner::TemplateSource {
            id: format!("tpl-bench{run}"),
            uri: uri.clone(),
            credentials: Default::default(),
            free_mib: cove_api::template::DEFAULT_FREE_MIB,
        };
        let t = Instant::now();
        let built = b.runner.build_template(&src, &|_| {}).await?;
        cove.push(t.elapsed());
        b.runner.remove_template(&src.id).await?;
        for entry in std::fs::read_dir(&layer_cache).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        let (total, unpacked) = baseline(&uri, &work)?;
        base.push(total);
        base_unpack.push(unpacked);
        println!(
            "  run {}: cove {:.1}s (disk {} MiB), baseline {:.1}s",
            run + 1,
            cove[run].as_secs_f64(),
            built.disk_mib,
            total.as_secs_f64()
        );
    }

    println!("uploading it as a template (with its first boot) ...");
    let t = Instant::now();
    let tpl =
        b.call(reqwest::Method::POST, "/v1/template", Some(json!({"name": "bench", "uri": uri}))).await?;
    let upload = t.elapsed();
    let system = cove_api::sandbox::DEFAULT_TEMPLATE;
    b.runner
        .prepare_template(system, cove_api::sandbox::DEFAULT_VCPU, cove_api::sandbox::DEFAULT_MEMORY_MIB)
        .await?;
    println!("creating {} sandboxes from each template, interleaved ...", args.creates);
    let (mut from_user, mut from_system) = (Vec::new(), Vec::new());
    for _ in 0..args.creates {
        for (name, into) in [("bench", &mut from_user), (system, &mut from_system)] {
            let t = Instant::now();
            let sbx =
                b.call(reqwest::Method::POST, "/v1/sandbox", Some(json!({"template_name": name}))).await?;
            into.push(t.elapsed());
            let id = sbx["id"].as_str().context("no id")?;
            b.call(reqwest::Method::DELETE, &format!("/v1/sandbox/{id}"), None).await.ok();
        }
    }
    if let Some(id) = tpl["id"].as_str() {
        b.call(reqwest::Method::DELETE, &format!("/v1/template/{id}"), None).await.ok();
    }

    let secs = |v: &[Duration]| median(v.iter().map(|d| d.as_secs_f64()).collect());
    let (cove_s, base_s) = (secs(&cove), secs(&base));
    let (user, sys) = (Stats::new(from_user), Stats::new(from_system));
    let result: Value = json!({
        "accel": b.accel,
        "image": {"uncompressed_mib": layer_mib, "layers": image.layers.len()},
        "conversion": {
            "runs": args.runs,
            "cove_median_s": cove_s,
            "baseline_median_s": base_s,
            "baseline_pull_unpack_median_s": secs(&base_unpack),
            "ratio_cove_to_baseline": cove_s / base_s,
            "baseline": "skopeo copy + umoci unpack + mke2fs -d + qemu-img convert",
        },
        "upload_with_first_boot_s": upload.as_secs_f64(),
        "create": {
            "user_template": user.json(),
            "system_template": sys.json(),
            "ratio_p50_user_to_system": user.pct(50.0) / sys.pct(50.0),
        },
    });
    println!("\nconversion of a {layer_mib} MiB image (median of {}):", args.runs);
    println!("  cove (pull + unpack + mke2fs -d + qcow2)        {cove_s:>7.2} s");
    println!(
        "  skopeo + umoci + mke2fs -d + qemu-img convert   {base_s:>7.2} s   cove/baseline {:.2}",
        cove_s / base_s
    );
    println!("upload with first boot: {:.1} s", upload.as_secs_f64());
    println!(
        "create p50: user template {:.0} ms, system template {:.0} ms, ratio {:.2}",
        user.pct(50.0),
        sys.pct(50.0),
        user.pct(50.0) / sys.pct(50.0)
    );
    write_json(&args.out, &result)
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}
