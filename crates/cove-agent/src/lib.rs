//! cove-agent: the guest side of a Cove sandbox.
//!
//! It is the guest's PID 1: in the initramfs it loads the kernel modules the VM needs, mounts
//! the root disk and switches into it; then it mounts the usual filesystems, reaps orphans, and
//! serves the host↔agent protocol (`cove-proto`) on the virtio-serial port, running commands
//! and doing filesystem work for the runner. Outside a VM (`--listen-unix PATH`) it serves the
//! same protocol on a Unix socket, which is how its tests run without booting anything.
//!
//! The binary (`main.rs`) only calls [`run`]; the library exists so that `fuzz/` can reach the
//! agent's parsers (see [`fuzzing`]).

mod channel;
mod exec;
mod fs;
pub mod fuzzing;
mod git;
mod init;
mod lsp;
mod mounts;
mod procs;
mod pty;
mod reaper;
mod reply;
mod server;
mod service;
#[allow(unsafe_code)]
mod sys;
mod tap;
mod user;

use std::sync::Arc;

/// The agent's `main`: boot (as PID 1), then serve the host until the VM ends.
pub fn run() {
    let args: Vec<String> = std::env::args().collect();
    let listen_unix = args.iter().position(|a| a == "--listen-unix").and_then(|i| args.get(i + 1)).cloned();
    if args.iter().any(|a| a == "--version") {
        println!("cove-agent {} protocol {}", env!("CARGO_PKG_VERSION"), cove_proto::PROTOCOL_VERSION);
        return;
    }
    let is_init = std::process::id() == 1;
    if is_init {
        if let Err(e) = init::early_boot() {
            // Nothing can serve the host without a root filesystem: say why on the console and
            // keep PID 1 alive so the kernel does not panic over it.
            eprintln!("cove-agent: boot failed: {e}");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cove-agent: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async move {
        let reaper = reaper::Reaper::start();
        let state = Arc::new(server::State::new(reaper, is_init));
        let result = match listen_unix {
            Some(path) => channel::serve_unix(&path, state).await,
            None => {
                // Opened at once, so that the host's park before a save is always answered.
                state.start_mount_client();
                state.start_service();
                channel::serve_port(state).await
            }
        };
        if let Err(e) = result {
            eprintln!("cove-agent: {e}");
            if !is_init {
                std::process::exit(1);
            }
        }
    });
}
