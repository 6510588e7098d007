//! `cove runner`: this machine's sandboxes, served to a control plane on another machine
//! (`cove server --runner`) over HTTP/2 on TLS.

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
    let token_file = args.data_dir.join("runner-token");
    let token = token(&token_file)?;
    let runner = local_runner(&args.host, &args.data_dir).await?;
    if !args.host.no_prepare {
        prepare_system_templates(runner.clone());
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("cove runner fingerprint {}", identity.fingerprint());
    println!("cove runner token in {}", token_file.display());
    println!("cove runner listening on {}", listener.local_addr()?);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tokio::select! {
        r = cove_runner::remote::serve(listener, &identity, runner, token) => r.context("serving")?,
        _ = crate::serve::wait_for_signal() => {
            tracing::info!("runner shutting down; sandbox VMs keep running and are adopted at next start");
        }
    }
    Ok(())
}

/// The token in `path`, made (random, 0600) on first start.
fn token(path: &Path) -> Result<String> {
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
