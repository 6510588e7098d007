//! `cove`: the server, host setup, and a client for the API.

mod bench;
mod client;
mod cpio;
mod runner;
mod serve;
mod setup;
mod shell;
mod tls;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cove", version, about = "Self-hostable microVM sandboxes with a Leap0-compatible API")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Prepare this host: packages, guest kernel, system template, agent initramfs.
    Setup {
        #[arg(long, env = "COVE_CACHE_DIR", default_value = "/var/cache/cove")]
        cache_dir: PathBuf,
        /// Static cove-agent binary (default: found beside this binary).
        #[arg(long, env = "COVE_AGENT_BIN")]
        agent: Option<PathBuf>,
    },
    /// Run control plane and runner in one process (or a control plane only, for runners
    /// elsewhere: `--no-local-runner`). An option given twice takes the later value.
    #[command(args_override_self = true)]
    Server(Box<serve::ServerArgs>),
    /// Run this machine's sandboxes for a control plane on another machine.
    Runner(Box<runner::RunnerArgs>),
    /// Manage sandboxes through the API.
    #[command(subcommand)]
    Sandbox(client::SandboxCmd),
    /// Manage snapshots through the API.
    #[command(subcommand)]
    Snapshot(client::SnapshotCmd),
    /// Manage templates made from container images through the API.
    #[command(subcommand)]
    Template(client::TemplateCmd),
    /// Manage the API keys of your organization through the API.
    #[command(subcommand)]
    Keys(client::KeysCmd),
    /// Print the OpenAPI document of the API.
    Openapi,
    /// Measure create/exec and pause/resume latency beside raw QEMU baselines, and guest
    /// network paths against NAT; writes JSON.
    Bench(bench::BenchArgs),
    /// Serve a resumed VM's RAM from its image as the guest touches it (started by the runner;
    /// see `cove_runner::lazymem`).
    #[command(hide = true)]
    LazyMemory { sandbox_dir: PathBuf },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COVE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Cmd::Sandbox(_) | Cmd::Snapshot(_) | Cmd::Template(_) | Cmd::Keys(_) | Cmd::Openapi
    ) {
        // Client commands end quietly when the reader of their output goes away (`| head`),
        // like any Unix tool. Never for the server: a guest or client closing a socket must
        // not kill it.
        // SAFETY: setting a signal's disposition to the default has no memory effects.
        #[allow(unsafe_code)]
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Cmd::Setup { cache_dir, agent } => setup::run(&cache_dir, agent),
        Cmd::Server(args) => serve::run(*args),
        Cmd::Runner(args) => runner::run(*args),
        Cmd::Sandbox(cmd) => client::sandbox(cmd),
        Cmd::Snapshot(cmd) => client::snapshot(cmd),
        Cmd::Template(cmd) => client::template(cmd),
        Cmd::Keys(cmd) => client::keys(cmd),
        Cmd::Bench(args) => bench::run(args),
        Cmd::LazyMemory { sandbox_dir } => cove_runner::lazymem::serve(&sandbox_dir)
            .map_err(|e| anyhow::anyhow!("serving guest memory: {e}")),
        Cmd::Openapi => {
            print!("{}", cove_server::openapi_json());
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
