//! `cove runner`: this machine's sandboxes, served to a control plane on another machine over
//! HTTP/2 on TLS. With `--control-plane` it registers there and renews its lease (see
//! `cove_runner::remote::lease`); without, a control plane is pointed at it (`cove server
//! --runner`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use crate::serve::{local_runner, prepare_system_templates, HostArgs};

#[derive(Args, Debug)]
pub struct RunnerArgs {
    /// Address control planes connect to.
    #[arg(long, env = "COVE_RUNNER_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Sandbox disks, this runner's certificate (`runner-tls/`) and token (`runner-token`).
    #[arg(long, env = "COVE_DATA_DIR", default_value = "/var/lib/cove-runner")]
    data_dir: PathBuf,
    /// The control plane to register with (`http(s)://host:port`), renewing a lease there
    /// every few seconds; with `--token-file`.
    #[arg(long, env = "COVE_CONTROL_PLANE", requires = "token_file")]
    control_plane: Option<String>,
    /// The cluster's token (the control plane's `<data dir>/cluster-token`): leases are signed
    /// with it, and control planes present it here. Without `--control-plane`, this runner
    /// makes its own (`<data dir>/runner-token`).
    #[arg(long, env = "COVE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Where control planes reach this runner (`host:port`). Default: the listen address.
    #[arg(long, env = "COVE_ADVERTISE")]
    advertise: Option<String>,
    #[command(flatten)]
    host: HostArgs,
}

pub fn run(args: RunnerArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(serve(args))
}

async fn serve(args: RunnerArgs) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let identity = cove_runner::remote::Identity::load_or_make(&args.data_dir.join("runner-tls"))
        .context("the runner's TLS certificate")?;
    let token_file = args.token_file.clone().unwrap_or_else(|| args.data_dir.join("runner-token"));
    let token = token(&token_file)?;
    let runner = local_runner(&args.host, &args.data_dir).await?;
    if !args.host.no_prepare {
        prepare_system_templates(runner.clone());
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let bound = listener.local_addr()?;
    println!("cove runner fingerprint {}", identity.fingerprint());
    println!("cove runner token in {}", token_file.display());
    println!("cove runner listening on {bound}");
    if let Some(url) = &args.control_plane {
        let address = match &args.advertise {
            Some(a) => a.clone(),
            None if bound.ip().is_unspecified() => {
                anyhow::bail!(
                    "--advertise is needed: the runner listens on {bound}, which control planes cannot dial"
                )
            }
            None => bound.to_string(),
        };
        let (id, fingerprint) =
            (cove_server::cluster::runner_id(&identity.fingerprint()), identity.fingerprint());
        println!("cove runner {id} registering with {url}");
        // What the runner says of itself is read at each renewal: its template versions change.
        let host = runner.clone();
        let lease = move || {
            use cove_runner::SandboxHost;
            let info = host.info();
            cove_store::RunnerLease {
                id: id.clone(),
                address: address.clone(),
                fingerprint: fingerprint.clone(),
                vcpus: info.vcpus,
                memory_mib: info.memory_mib,
                max_sandboxes: info.max_sandboxes,
                compat: info.compat,
                templates: info.templates,
            }
        };
        tokio::spawn(renew_lease(url.trim_end_matches('/').to_string(), token.clone(), lease));
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let serving = runner.clone();
    tokio::select! {
        r = cove_runner::remote::serve(listener, &identity, serving, token) => r.context("serving")?,
        _ = crate::serve::wait_for_signal() => {
            tracing::info!("runner shutting down; sandbox VMs keep running and are adopted at next start");
        }
    }
    runner.stop_template_builds().await;
    Ok(())
}

/// The token in `path`, made (random, 0600) on first start.
pub fn token(path: &Path) -> Result<String> {
    if let Ok(t) = std::fs::read_to_string(path) {
        return Ok(t.trim().to_string());
    }
    let t = hex::encode(rand::random::<[u8; 32]>());
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| writeln!(f, "{t}"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(t)
}

/// Renews this runner's lease with the control plane at `url`, a third of a lease apart, for
/// as long as the runner runs. Failures are logged when they start and when they end.
async fn renew_lease(url: String, token: String, lease: impl Fn() -> cove_store::RunnerLease) {
    use cove_runner::remote::lease as wire;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    let mut every = cove_server::cluster::LEASE / 3;
    let mut failing = false;
    loop {
        let body = serde_json::to_vec(&lease()).expect("a lease serializes");
        let sent = client
            .post(format!("{url}{}", wire::PATH))
            .header(reqwest::header::AUTHORIZATION, wire::sign(&token, cove_store::now_ms(), &body))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .and_then(|r| r.error_for_status());
        let sent = match sent {
            Ok(r) => r.json::<serde_json::Value>().await,
            Err(e) => Err(e),
        };
        if let Some(ms) = sent.as_ref().ok().and_then(|v| v["lease_ms"].as_u64()) {
            every = std::time::Duration::from_millis(ms / 3).max(std::time::Duration::from_millis(100));
        }
        match sent {
            Ok(_) if failing => {
                tracing::info!(control_plane = %url, "lease renewed again");
                failing = false;
            }
            Ok(_) => {}
            Err(e) if !failing => {
                tracing::warn!(control_plane = %url, error = %e, "renewing the lease failed; retrying");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(every).await;
    }
}
