//! The agent's end of the host channel: find the virtio-serial port, do the handshake, serve
//! HTTP/2 on it until the host goes away, and start over (after a restore the host is a new
//! process with a new connection).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::server::State;
use crate::sys;

/// How often the agent looks again when the host side of the port is not connected: soon at
/// first (a runner that restarts is back in moments), then less and less often, down to twice
/// a second. Each look (open, read, close: ~3 ms of guest time under TCG) costs the host: at
/// every 2 ms for good, a guest whose server was stopped kept ~20% of a host core busy, and
/// ~10% at every 50 ms.
pub(crate) const IDLE_POLL: (Duration, Duration) = (Duration::from_millis(2), Duration::from_millis(500));

/// The virtio-serial port as an async byte stream.
pub struct Port {
    /// Always set; an `Option` only to be registered anew (see [`Port::stale`]).
    fd: Option<AsyncFd<OwnedFd>>,
}

impl Port {
    pub(crate) fn open(path: &str) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        let fd: OwnedFd = file.into();
        sys::set_nonblocking(fd.as_fd())?;
        Ok(Port { fd: Some(sys::async_fd(fd)?) })
    }

    fn fd(&self) -> io::Result<&AsyncFd<OwnedFd>> {
        self.fd.as_ref().ok_or_else(|| io::Error::other("the port is not registered"))
    }

    /// Called when the port would block although its readiness says "closed". Tokio keeps a
    /// closed readiness for good once it has seen one, but a virtio port whose host went away
    /// (a restore, a runner restart) opens again when a host connects: left as it is, every
    /// poll would be ready at once and every read would block, a busy loop for the life of the
    /// guest. Registered anew, the descriptor is polled as it is now.
    fn stale(&mut self) -> io::Result<()> {
        if let Some(old) = self.fd.take() {
            self.fd = Some(sys::async_fd(old.into_inner())?);
        }
        Ok(())
    }
}

/// What one attempt at a read or write came to.
enum Attempt<T> {
    Done(io::Result<T>),
    /// It would block; `stale` when the readiness said closed.
    Blocked {
        stale: bool,
    },
}

impl AsyncRead for Port {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let attempt = {
                let mut guard = ready!(this.fd()?.poll_read_ready(cx))?;
                let stale = guard.ready().is_read_closed();
                let unfilled = buf.initialize_unfilled();
                match guard.try_io(|fd| sys::read(fd.get_ref().as_fd(), unfilled)) {
                    Ok(r) => Attempt::Done(r),
                    Err(_would_block) => Attempt::Blocked { stale },
                }
            };
            match attempt {
                Attempt::Done(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Attempt::Done(Err(e)) => return Poll::Ready(Err(e)),
                Attempt::Blocked { stale: true } => this.stale()?,
                Attempt::Blocked { stale: false } => {}
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let attempt = {
                let mut guard = ready!(this.fd()?.poll_write_ready(cx))?;
                let stale = guard.ready().is_write_closed();
                match guard.try_io(|fd| sys::write(fd.get_ref().as_fd(), data)) {
                    Ok(r) => Attempt::Done(r),
                    Err(_would_block) => Attempt::Blocked { stale },
                }
            };
            match attempt {
                Attempt::Done(r) => return Poll::Ready(r),
                Attempt::Blocked { stale: true } => this.stale()?,
                Attempt::Blocked { stale: false } => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Finds the device node of the port named `cove.agent` (there is no udev to make the
/// /dev/virtio-ports symlink).
fn find_port() -> io::Result<String> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports")? {
        let entry = entry?;
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == cove_proto::PORT_NAME {
            return Ok(format!("/dev/{}", entry.file_name().to_string_lossy()));
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, "virtio-serial port cove.agent not found"))
}

pub async fn serve_port(state: Arc<State>) -> io::Result<()> {
    let path = loop {
        match find_port() {
            Ok(p) => break p,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let mut idle = IDLE_POLL.0;
    loop {
        let mut port = match Port::open(&path) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("cove-agent: opening {path}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match handshake(&mut port, &|t, e| state.set_clock(t, e)).await {
            Ok(true) => {
                idle = IDLE_POLL.0;
                serve_connection(port, state.clone()).await;
            }
            // Host not connected (reads give EOF): look again shortly.
            Ok(false) => {
                tokio::time::sleep(idle).await;
                idle = (idle * 2).min(IDLE_POLL.1);
            }
            Err(e) => {
                eprintln!("cove-agent: handshake: {e}");
                tokio::time::sleep(idle).await;
                idle = (idle * 2).min(IDLE_POLL.1);
            }
        }
    }
}

pub async fn serve_unix(path: &str, state: Arc<State>) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            if let Ok(true) = handshake(&mut stream, &|t, e| state.set_clock(t, e)).await {
                serve_connection(stream, state).await;
            }
        });
    }
}

/// Reads lines until a valid HELLO, answers READY. Returns Ok(false) on EOF.
///
/// A HELLO of [`cove_proto::CLOCK_VERSION`] is answered only once `set_clock` has applied the
/// `COVE-CLOCK` line that follows it.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    set_clock: &(dyn Fn(u128, &[u8]) -> io::Result<()> + Sync),
) -> io::Result<bool> {
    let mut line = Vec::with_capacity(cove_proto::MAX_HANDSHAKE_LINE);
    // The nonce of a clock greeting waiting for its clock line.
    let mut clock_for: Option<String> = None;
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Ok(false);
        }
        if byte[0] != b'\n' {
            if line.len() < cove_proto::MAX_HANDSHAKE_LINE {
                line.push(byte[0]);
            }
            continue;
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        line.clear();
        // Stale bytes from an earlier connection may precede the greeting: skip to it.
        if let Some(start) = text.find(cove_proto::PARK) {
            if let Some((cove_proto::PROTOCOL_VERSION, nonce)) =
                cove_proto::parse_handshake(&text[start..], cove_proto::PARK)
            {
                // A snapshot is about to be taken: acknowledge and keep reading greetings.
                stream.write_all(cove_proto::parked_line(nonce).as_bytes()).await?;
            }
            continue;
        }
        if let Some(start) = text.find(cove_proto::CLOCK) {
            let Some(nonce) = clock_for.take() else {
                continue;
            };
            let applied = match cove_proto::parse_clock(&text[start..]) {
                Some((time, entropy)) => set_clock(time, &entropy),
                None => Err(io::Error::other("malformed clock line")),
            };
            match applied {
                Ok(()) => {
                    let ready = cove_proto::ready_line_of(cove_proto::CLOCK_VERSION, &nonce);
                    stream.write_all(ready.as_bytes()).await?;
                    return Ok(true);
                }
                Err(e) => {
                    let msg = cove_proto::error_line(&format!("setting the clock: {e}"));
                    stream.write_all(msg.as_bytes()).await?;
                    continue;
                }
            }
        }
        let Some(start) = text.find(cove_proto::HELLO) else {
            continue;
        };
        let Some((version, nonce)) = cove_proto::parse_handshake(&text[start..], cove_proto::HELLO) else {
            continue;
        };
        match version {
            cove_proto::PROTOCOL_VERSION => {
                stream.write_all(cove_proto::ready_line(nonce).as_bytes()).await?;
                return Ok(true);
            }
            cove_proto::CLOCK_VERSION => clock_for = Some(nonce.to_string()),
            _ => {
                stream.write_all(cove_proto::unsupported_line(version).as_bytes()).await?;
            }
        }
    }
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, state: Arc<State>) {
    let (detach_tx, mut detach_rx) = tokio::sync::mpsc::channel::<()>(1);
    let detached = tokio_util::sync::CancellationToken::new();
    let service = {
        let (state, detached) = (state.clone(), detached.clone());
        hyper::service::service_fn(move |req| {
            let state = state.clone();
            let (detach_tx, detached) = (detach_tx.clone(), detached.clone());
            async move { Ok::<_, std::convert::Infallible>(state.handle(req, detach_tx, detached).await) }
        })
    };
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .max_concurrent_streams(1024);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                if !e.to_string().contains("connection closed") {
                    eprintln!("cove-agent: connection ended: {e}");
                }
            }
        }
        _ = detach_rx.recv() => {
            // Streams that would outlive the connection (terminals) end first.
            detached.cancel();
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
    detached.cancel();
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::AsyncBufReadExt;

    use super::*;

    /// Runs the handshake over an in-memory pipe fed `input`; returns what it answered, whether
    /// it ended in a session, and the clocks it set.
    async fn handshake_of(input: &str, fail_clock: bool) -> (String, bool, Vec<(u128, Vec<u8>)>) {
        let (mut host, mut guest) = tokio::io::duplex(4096);
        host.write_all(input.as_bytes()).await.unwrap();
        drop(host.shutdown().await);
        let set = Mutex::new(Vec::new());
        let session = handshake(&mut guest, &|t, e| {
            set.lock().unwrap().push((t, e.to_vec()));
            if fail_clock {
                Err(io::Error::other("EPERM"))
            } else {
                Ok(())
            }
        })
        .await
        .unwrap();
        drop(guest);
        let mut answer = String::new();
        let mut reader = tokio::io::BufReader::new(host);
        while reader.read_line(&mut answer).await.unwrap() > 0 {}
        (answer, session, set.into_inner().unwrap())
    }

    #[tokio::test]
    async fn a_clock_greeting_is_answered_once_its_clock_is_set() {
        let input = format!(
            "stale bytes\n{}{}",
            cove_proto::hello_line_of(cove_proto::CLOCK_VERSION, 5),
            cove_proto::clock_line(42, &[1, 2])
        );
        let (answer, session, set) = handshake_of(&input, false).await;
        assert_eq!(answer, cove_proto::ready_line_of(2, "0000000000000005"));
        assert!(session);
        assert_eq!(set, vec![(42, vec![1, 2])]);

        // A plain greeting sets nothing; a clock line without its greeting is ignored.
        let input = format!("{}{}", cove_proto::clock_line(7, &[]), cove_proto::hello_line(6));
        let (answer, session, set) = handshake_of(&input, false).await;
        assert_eq!(answer, cove_proto::ready_line("0000000000000006"));
        assert!(session);
        assert!(set.is_empty());
    }

    #[tokio::test]
    async fn a_clock_that_cannot_be_set_or_read_is_an_error_not_a_session() {
        let input = format!("{}{}", cove_proto::hello_line_of(2, 1), cove_proto::clock_line(1, &[9]));
        let (answer, session, _) = handshake_of(&input, true).await;
        assert_eq!(answer, "COVE-ERROR setting the clock: EPERM\n");
        assert!(!session);
        let input = format!("{}COVE-CLOCK soon 00\n", cove_proto::hello_line_of(2, 1));
        let (answer, session, set) = handshake_of(&input, false).await;
        assert_eq!(answer, "COVE-ERROR setting the clock: malformed clock line\n");
        assert!(!session && set.is_empty());
        // A version it does not speak is refused by name.
        let (answer, session, _) = handshake_of(&cove_proto::hello_line_of(3, 1), false).await;
        assert_eq!(answer, "COVE-ERROR unsupported protocol 3\n");
        assert!(!session);
    }
}
