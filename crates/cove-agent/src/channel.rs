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
        Self::registered(file.into())
    }

    /// The port open on `fd`, made non-blocking and registered with the runtime (of which this
    /// must be called from within).
    fn registered(fd: OwnedFd) -> io::Result<Self> {
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

/// Serves the host on the port for good. The greeting is read on a thread of its own with
/// blocking calls (see [`Blocking`]); each connection it opens is served on the runtime.
pub async fn serve_port(state: Arc<State>) -> io::Result<()> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || greet_on_port(&runtime, &state)).await.map_err(io::Error::other)
}

fn greet_on_port(runtime: &tokio::runtime::Handle, state: &Arc<State>) -> ! {
    // Open before any greeting, so that it is open in every snapshot of this guest.
    if let Err(e) = sys::entropy_pool() {
        eprintln!("cove-agent: opening /dev/urandom: {e}");
    }
    let path = loop {
        match find_port() {
            Ok(p) => break p,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let mut idle = IDLE_POLL.0;
    loop {
        let mut port = match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => Blocking(f.into()),
            Err(e) => {
                eprintln!("cove-agent: opening {path}: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match runtime.block_on(handshake(&mut port, &|told| state.clone().tell(told))) {
            Ok(true) => {
                idle = IDLE_POLL.0;
                let state = state.clone();
                let served = runtime.spawn(async move {
                    match Port::registered(port.0) {
                        Ok(port) => serve_connection(port, state).await,
                        Err(e) => eprintln!("cove-agent: serving {}: {e}", cove_proto::PORT_NAME),
                    }
                });
                if let Err(e) = runtime.block_on(served) {
                    eprintln!("cove-agent: the session on {} ended in a panic: {e}", cove_proto::PORT_NAME);
                }
            }
            // Host not connected (reads give EOF): look again shortly.
            Ok(false) => {
                std::thread::sleep(idle);
                idle = (idle * 2).min(IDLE_POLL.1);
            }
            Err(e) => {
                eprintln!("cove-agent: handshake: {e}");
                std::thread::sleep(idle);
                idle = (idle * 2).min(IDLE_POLL.1);
            }
        }
    }
}

/// The port, read and written with blocking calls, for the greeting. An agent waiting for its
/// host (parked before a snapshot, say) waits in a plain thread's `read`: the first bytes of a
/// restored guest's host wake that thread directly, with no event loop and worker wake-ups in
/// between. Under emulation every path a restored guest runs is translated afresh, and those
/// wake-ups were about a fifth of what a resumed guest ran before it answered.
struct Blocking(OwnedFd);

impl AsyncRead for Blocking {
    fn poll_read(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            match sys::read(self.0.as_fd(), buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Blocking {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            match sys::write(self.0.as_fd(), data) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return Poll::Ready(r),
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

pub async fn serve_unix(path: &str, state: Arc<State>) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            if let Ok(true) = handshake(&mut stream, &|told| state.clone().tell(told)).await {
                serve_connection(stream, state).await;
            }
        });
    }
}

/// What a greeting brings the guest, applied before the greeting is answered.
pub enum Told {
    /// The host's clock and fresh entropy ([`cove_proto::CLOCK_VERSION`]).
    Clock(u128, Vec<u8>),
    /// Everything a new or moved guest is told ([`cove_proto::IDENTITY_VERSION`]).
    Identity(Box<cove_proto::Identity>),
}

/// Applies what a greeting told.
type Tell<'a> = &'a (dyn Fn(Told) -> futures::future::BoxFuture<'static, io::Result<()>> + Sync);

/// Reads lines until a valid HELLO, answers READY. Returns Ok(false) on EOF.
///
/// A HELLO of [`cove_proto::CLOCK_VERSION`] or [`cove_proto::IDENTITY_VERSION`] is answered
/// only once `tell` has applied the `COVE-CLOCK` line, or the `COVE-IDENTITY` header and JSON,
/// that follow it.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, tell: Tell<'_>) -> io::Result<bool> {
    let mut line = Vec::with_capacity(cove_proto::MAX_HANDSHAKE_LINE);
    // A greeting waiting for what it promised: its version and nonce.
    let mut waiting: Option<(u32, String)> = None;
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
        let told = if let Some(start) = text.find(cove_proto::CLOCK) {
            Some((cove_proto::CLOCK_VERSION, "setting the clock", read_clock(&text[start..])))
        } else if let Some(start) = text.find(cove_proto::IDENTITY) {
            Some((
                cove_proto::IDENTITY_VERSION,
                "applying the identity",
                read_identity(stream, &text[start..]).await?,
            ))
        } else {
            None
        };
        if let Some((version, what, told)) = told {
            let Some((_, nonce)) = waiting.take_if(|(v, _)| *v == version) else {
                continue;
            };
            let applied = match told {
                Ok(told) => tell(told).await,
                Err(e) => Err(e),
            };
            match applied {
                Ok(()) => {
                    let ready = cove_proto::ready_line_of(version, &nonce);
                    stream.write_all(ready.as_bytes()).await?;
                    return Ok(true);
                }
                Err(e) => {
                    let msg = cove_proto::error_line(&format!("{what}: {e}"));
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
            cove_proto::CLOCK_VERSION | cove_proto::IDENTITY_VERSION => {
                waiting = Some((version, nonce.to_string()))
            }
            _ => {
                stream.write_all(cove_proto::unsupported_line(version).as_bytes()).await?;
            }
        }
    }
}

fn read_clock(line: &str) -> io::Result<Told> {
    let (time, entropy) =
        cove_proto::parse_clock(line).ok_or_else(|| io::Error::other("malformed clock line"))?;
    Ok(Told::Clock(time, entropy))
}

/// Reads the identity JSON that the `COVE-IDENTITY` header `line` announces. A malformed one is
/// an `Ok(Err)`: the greeting is refused, the connection goes on.
async fn read_identity<S: AsyncRead + Unpin>(stream: &mut S, line: &str) -> io::Result<io::Result<Told>> {
    let Some(len) = cove_proto::parse_identity_header(line) else {
        return Ok(Err(io::Error::other("malformed identity header")));
    };
    let mut json = vec![0u8; len];
    stream.read_exact(&mut json).await?;
    Ok(serde_json::from_slice(&json).map(|id| Told::Identity(Box::new(id))).map_err(io::Error::other))
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
        let (answer, session, told) = told_by(input.as_bytes(), fail_clock).await;
        let clocks = told
            .into_iter()
            .map(|t| match t {
                Told::Clock(time, entropy) => (time, entropy),
                Told::Identity(_) => panic!("an identity where a clock was expected"),
            })
            .collect();
        (answer, session, clocks)
    }

    /// As `handshake_of`, with everything the greetings told.
    async fn told_by(input: &[u8], fail: bool) -> (String, bool, Vec<Told>) {
        let (mut host, mut guest) = tokio::io::duplex(1 << 16);
        host.write_all(input).await.unwrap();
        drop(host.shutdown().await);
        let told = Arc::new(Mutex::new(Vec::new()));
        let session = handshake(&mut guest, &|t| {
            told.lock().unwrap().push(t);
            Box::pin(async move {
                if fail {
                    Err(io::Error::other("EPERM"))
                } else {
                    Ok(())
                }
            })
        })
        .await
        .unwrap();
        drop(guest);
        let mut answer = String::new();
        let mut reader = tokio::io::BufReader::new(host);
        while reader.read_line(&mut answer).await.unwrap() > 0 {}
        let told = std::mem::take(&mut *told.lock().unwrap());
        (answer, session, told)
    }

    /// The port's greeting is read with blocking calls off the runtime: a clock greeting over a
    /// socket pair is answered, and the host's bytes after the greeting stay unread for the
    /// session that follows.
    #[test]
    fn a_greeting_read_with_blocking_calls_is_answered() {
        use std::io::{BufRead, Write};
        let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut guest = Blocking(guest.into());
        let mut writer = host.try_clone().unwrap();
        let host_side = std::thread::spawn(move || {
            writer.write_all(cove_proto::hello_line_of(cove_proto::CLOCK_VERSION, 7).as_bytes()).unwrap();
            writer.write_all(cove_proto::clock_line(5, &[1, 2]).as_bytes()).unwrap();
            let mut answer = String::new();
            std::io::BufReader::new(&host).read_line(&mut answer).unwrap();
            // What comes after the answer (HTTP/2, in the agent) is the session's.
            writer.write_all(b"after").unwrap();
            answer
        });
        let told = Mutex::new(Vec::new());
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let session = runtime
            .block_on(handshake(&mut guest, &|t| {
                told.lock().unwrap().push(t);
                Box::pin(async { Ok(()) })
            }))
            .unwrap();
        assert!(session);
        assert_eq!(
            host_side.join().unwrap(),
            cove_proto::ready_line_of(cove_proto::CLOCK_VERSION, &format!("{:016x}", 7))
        );
        assert!(matches!(told.lock().unwrap().as_slice(), [Told::Clock(5, e)] if e == &[1, 2]));
        let mut rest = [0u8; 5];
        runtime.block_on(guest.read_exact(&mut rest)).unwrap();
        assert_eq!(&rest, b"after");
    }

    #[tokio::test]
    async fn an_identity_greeting_is_answered_once_its_identity_is_applied() {
        let id = cove_proto::Identity {
            hostname: "sbx-7".into(),
            trust_pem: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
            disk_bytes: Some(1 << 30),
            ..cove_proto::Identity::default()
        };
        let message = cove_proto::identity_message(&id).unwrap();
        let hello = cove_proto::hello_line_of(cove_proto::IDENTITY_VERSION, 3);
        let input = [b"stale\n".as_slice(), hello.as_bytes(), &message].concat();
        let (answer, session, told) = told_by(&input, false).await;
        assert_eq!(answer, cove_proto::ready_line_of(3, "0000000000000003"));
        assert!(session);
        match told.as_slice() {
            [Told::Identity(got)] => {
                assert_eq!(
                    (&got.hostname, &got.trust_pem, got.disk_bytes),
                    (&id.hostname, &id.trust_pem, id.disk_bytes)
                )
            }
            _ => panic!("told {} things", told.len()),
        }

        // One that cannot be applied, or read, is refused and is no session; an identity
        // without its greeting, or after a clock greeting, is skipped whole.
        let (answer, session, _) = told_by(&input, true).await;
        assert_eq!(answer, "COVE-ERROR applying the identity: EPERM\n");
        assert!(!session);
        let bad = [hello.as_bytes(), b"COVE-IDENTITY 2\n{]"].concat();
        let (answer, session, told) = told_by(&bad, false).await;
        assert!(answer.starts_with("COVE-ERROR applying the identity: "), "{answer}");
        assert!(!session && told.is_empty());
        let clock_hello = cove_proto::hello_line_of(cove_proto::CLOCK_VERSION, 4);
        let input = [
            message.as_slice(),
            clock_hello.as_bytes(),
            &message,
            cove_proto::clock_line(9, &[1]).as_bytes(),
        ]
        .concat();
        let (answer, session, told) = told_by(&input, false).await;
        assert_eq!(answer, cove_proto::ready_line_of(2, "0000000000000004"));
        assert!(session);
        assert!(matches!(told.as_slice(), [Told::Clock(9, _)]));
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
        let (answer, session, _) = handshake_of(&cove_proto::hello_line_of(4, 1), false).await;
        assert_eq!(answer, "COVE-ERROR unsupported protocol 4\n");
        assert!(!session);
    }
}
