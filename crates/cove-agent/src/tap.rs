//! The output of a terminal session or background process: the last bytes kept for readers
//! that come later, every new chunk sent to the readers attached, and an end. A reader that
//! cannot keep up loses chunks and is told how many.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::reply::Body;

/// Chunks a reader may fall behind before it loses some.
const LAG: usize = 1024;

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output, or a terminal's output.
    Out,
    Err,
}

#[derive(Debug, Clone)]
pub struct Chunk {
    pub stream: Stream,
    pub data: Bytes,
}

/// What a reader is given, in order: chunks (the kept ones first), notices of chunks lost,
/// and the end.
pub enum Event {
    Chunk(Chunk),
    Dropped(u64),
    End,
}

pub struct Tap {
    limit: usize,
    inner: Mutex<Inner>,
    /// Cancelled once the last chunk has been pushed.
    ended: CancellationToken,
}

struct Inner {
    kept: VecDeque<Chunk>,
    kept_bytes: usize,
    live: broadcast::Sender<Chunk>,
}

impl Tap {
    /// A tap that keeps the last `limit` bytes.
    pub fn new(limit: usize) -> Tap {
        let inner = Inner { kept: VecDeque::new(), kept_bytes: 0, live: broadcast::channel(LAG).0 };
        Tap { limit, inner: Mutex::new(inner), ended: CancellationToken::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, stream: Stream, data: Bytes) {
        let chunk = Chunk { stream, data };
        let mut inner = self.lock();
        inner.kept_bytes += chunk.data.len();
        inner.kept.push_back(chunk.clone());
        while inner.kept_bytes > self.limit {
            let excess = inner.kept_bytes - self.limit;
            let Some(first) = inner.kept.front_mut() else { break };
            if first.data.len() <= excess {
                inner.kept_bytes -= first.data.len();
                inner.kept.pop_front();
            } else {
                first.data = first.data.slice(excess..);
                inner.kept_bytes -= excess;
            }
        }
        let _ = inner.live.send(chunk);
    }

    /// No more chunks will come.
    pub fn end(&self) {
        self.ended.cancel();
    }

    pub fn has_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// A body that streams the tap to one reader: `encode` turns each event into bytes (or
    /// nothing). With `follow` false it ends after the kept chunks. It fails when `detached` is
    /// cancelled (the host is going away), so that the host can tell that from the end.
    pub fn body(
        self: &Arc<Self>,
        follow: bool,
        detached: CancellationToken,
        encode: impl FnMut(Event) -> Option<Bytes> + Send + 'static,
    ) -> Body {
        let (kept, live) = {
            let inner = self.lock();
            (inner.kept.iter().cloned().collect::<Vec<_>>(), inner.live.subscribe())
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(relay(self.clone(), kept, follow.then_some(live), tx, detached, encode));
        let frames = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        StreamBody::new(frames).boxed()
    }
}

type Sent = Result<Frame<Bytes>, io::Error>;

/// Sends what an event was encoded to, if anything; false once the reader is gone.
async fn send(tx: &tokio::sync::mpsc::Sender<Sent>, bytes: Option<Bytes>) -> bool {
    match bytes {
        Some(b) if !b.is_empty() => tx.send(Ok(Frame::data(b))).await.is_ok(),
        _ => true,
    }
}

async fn relay(
    tap: Arc<Tap>,
    kept: Vec<Chunk>,
    live: Option<broadcast::Receiver<Chunk>>,
    tx: tokio::sync::mpsc::Sender<Sent>,
    detached: CancellationToken,
    mut encode: impl FnMut(Event) -> Option<Bytes>,
) {
    for chunk in kept {
        if !send(&tx, encode(Event::Chunk(chunk))).await {
            return;
        }
    }
    if let Some(mut live) = live {
        loop {
            let event = tokio::select! {
                biased;
                _ = detached.cancelled() => {
                    let gone = io::Error::new(io::ErrorKind::ConnectionAborted, "the host detached");
                    let _ = tx.send(Err(gone)).await;
                    return;
                }
                _ = tx.closed() => return,
                chunk = live.recv() => match chunk {
                    Ok(c) => Event::Chunk(c),
                    Err(broadcast::error::RecvError::Lagged(n)) => Event::Dropped(n),
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                // Ended, and `live` has given all it had.
                _ = tap.ended.cancelled(), if live.is_empty() => break,
            };
            if !send(&tx, encode(event)).await {
                return;
            }
        }
    }
    send(&tx, encode(Event::End)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_bytes_across_chunks() {
        let tap = Tap::new(5);
        tap.push(Stream::Out, Bytes::from_static(b"abc"));
        tap.push(Stream::Err, Bytes::from_static(b"defg"));
        let inner = tap.lock();
        let kept: Vec<(Stream, &[u8])> = inner.kept.iter().map(|c| (c.stream, c.data.as_ref())).collect();
        assert_eq!(kept, vec![(Stream::Out, b"c".as_slice()), (Stream::Err, b"defg".as_slice())]);
        assert_eq!(inner.kept_bytes, 5);
    }

    /// A reader that falls behind a flood is told how much it lost, then gets the rest and
    /// the end; a reader attached later gets only what is kept.
    #[tokio::test]
    async fn a_slow_reader_is_told_what_it_lost() {
        let tap = Arc::new(Tap::new(4096));
        let body = tap.body(true, CancellationToken::new(), |e| match e {
            Event::Chunk(c) => Some(c.data),
            Event::Dropped(n) => Some(Bytes::from(format!("[dropped {n}]"))),
            Event::End => Some(Bytes::from_static(b"[end]")),
        });
        // Let the relay subscribe and send the (empty) kept output before the flood.
        tokio::task::yield_now().await;
        for i in 0..3000 {
            tap.push(Stream::Out, Bytes::from(format!("{:04}", i % 10_000)));
        }
        tap.end();
        let all = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
        assert!(all.contains("[dropped "), "{}", &all[..200.min(all.len())]);
        assert!(all.ends_with("2999[end]"), "{}", &all[all.len().saturating_sub(200)..]);
        let later = tap.body(true, CancellationToken::new(), |e| match e {
            Event::Chunk(c) => Some(c.data),
            _ => None,
        });
        let kept = later.collect().await.unwrap().to_bytes();
        assert_eq!(kept.len(), 4096);
        assert!(kept.ends_with(b"2999"));
    }
}
