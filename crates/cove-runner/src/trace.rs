//! Test hook: with `COVE_CHANNEL_TRACE` naming a file, every byte this process sends into a guest
//! (the agent's HTTP/2 stream, the mounts' answers) is appended to it, so that tests can check
//! what reached the guest, e.g. that no credential did. Unset in production: no cost then.

use std::io::Write;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

fn file() -> Option<&'static Mutex<std::fs::File>> {
    static FILE: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::var_os("COVE_CHANNEL_TRACE")?;
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&path);
        match f {
            Ok(f) => Some(Mutex::new(f)),
            Err(e) => {
                tracing::warn!(path = ?path, error = %e, "COVE_CHANNEL_TRACE not writable");
                None
            }
        }
    })
    .as_ref()
}

/// Records bytes sent to a guest (when tracing is on).
pub fn record(bytes: &[u8]) {
    if let Some(f) = file() {
        let _ = f.lock().unwrap_or_else(|p| p.into_inner()).write_all(bytes);
    }
}

/// A stream whose written bytes are recorded.
pub struct Traced<S>(pub S);

impl<S: AsyncRead + Unpin> AsyncRead for Traced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Traced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.0).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            record(&buf[..*n]);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
