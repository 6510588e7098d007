//! Network namespaces: named ones (`ip netns`, so they outlive the runner and are found again
//! after a restart), and binding sockets inside them from a runner that itself stays in the
//! host namespace. A socket keeps the namespace it was created in, so a thread that enters the
//! namespace only to create a socket is enough; the socket then serves from anywhere.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sched::{setns, CloneFlags};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Runs `f` on a short-lived thread that has entered namespace `ns` (a path such as
/// `/run/netns/NAME`). Whatever sockets `f` creates belong to that namespace.
pub fn within<T, F>(ns: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let file = File::open(ns)?;
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| io::Error::other("thread in network namespace panicked"))?
}

/// A listening TCP socket inside namespace `ns`, ready for tokio.
pub fn tcp_listener(ns: &Path, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let std = within(ns, move || {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    tokio::net::TcpListener::from_std(std)
}

/// A bound UDP socket inside namespace `ns`, ready for tokio.
pub fn udp_socket(ns: &Path, addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let std = within(ns, move || {
        let s = std::net::UdpSocket::bind(addr)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })?;
    tokio::net::UdpSocket::from_std(std)
}

/// A TCP connection made from inside namespace `ns`.
pub async fn tcp_connect(ns: &Path, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let ns = ns.to_path_buf();
    let std = tokio::task::spawn_blocking(move || {
        within(&ns, move || {
            let s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
    })
    .await
    .map_err(io::Error::other)??;
    tokio::net::TcpStream::from_std(std)
}

/// Runs a command and fails with its stderr when it fails. `input` goes to its stdin.
pub async fn run(program: &str, args: &[&str], input: Option<&str>) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("{program}: {e}")))?;
    if let Some(text) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(text.as_bytes()).await?;
        drop(stdin);
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
