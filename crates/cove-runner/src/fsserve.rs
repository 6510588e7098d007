//! The host end of the `cove.fs` port: the guest's FUSE server sends stat/list/read requests
//! for its mounts, and this answers each from the mount's source (an S3 view holding the
//! credentials), concurrently, read-only. Nothing but entries and file bytes goes back.
//!
//! Frames and the hello/park protocol are described in `cove_proto::fs`. A VM's guest can only
//! name the mounts of its own sandbox: the sources are per VM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use cove_proto::fs::{self as wire, Entry, Kind, Op, Reply, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// A request the source has not answered by then gets EIO (the guest's reader sees an I/O
/// error instead of hanging on an endpoint that stopped answering).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests of one VM answered at once; the guest's further frames wait in the port.
const MAX_IN_FLIGHT: usize = 64;

/// What a mount shows: paths are relative to the mount's root ("" is the root).
#[async_trait]
pub trait FsSource: Send + Sync {
    async fn stat(&self, path: &str) -> Result<Entry, i32>;
    async fn list(&self, path: &str) -> Result<Vec<Entry>, i32>;
    async fn read(&self, path: &str, offset: u64, len: u32) -> Result<Vec<u8>, i32>;
}

/// The mounts of one sandbox, by mount id; changed while the VM runs (add, update, delete).
#[derive(Clone, Default)]
pub struct Sources(Arc<RwLock<HashMap<String, Arc<dyn FsSource>>>>);

impl Sources {
    pub fn insert(&self, id: &str, source: Arc<dyn FsSource>) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), source);
    }

    pub fn remove(&self, id: &str) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    fn get(&self, id: &str) -> Option<Arc<dyn FsSource>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }
}

/// One VM's fs port: its sources and the connection to its `fs.sock`.
pub struct FsHost {
    socket: PathBuf,
    pub sources: Sources,
    conn: tokio::sync::Mutex<Option<FsConn>>,
}

impl FsHost {
    pub fn new(run_dir: &Path, sources: Sources) -> FsHost {
        FsHost { socket: run_dir.join("fs.sock"), sources, conn: Default::default() }
    }

    /// Serves a connection already greeted by [`greet`].
    pub async fn serve(&self, stream: UnixStream) {
        let conn = serve(stream, self.sources.clone());
        *self.conn.lock().await = Some(conn);
    }

    /// Connects to the VM's port anew (a booted VM, or one adopted from an earlier runner:
    /// its guest sees the old connection end and resends what it waits for after the hello).
    pub async fn connect(&self, wait: Duration) -> std::io::Result<()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match greet(&self.socket).await {
                Ok(s) => {
                    self.serve(s).await;
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Parks the guest's client before the VM is saved: when this returns Ok, the guest has
    /// read every answer sent so far, so the saved guest holds no half-delivered frame.
    pub async fn park(&self, wait: Duration) -> Result<(), String> {
        let Some(conn) = self.conn.lock().await.clone() else { return Ok(()) };
        conn.park(wait).await
    }

    /// Greets the guest again after a park, when the VM carries on (a snapshot, a failed
    /// capture): it resends what it still waits for.
    pub async fn unpark(&self) {
        if let Some(conn) = self.conn.lock().await.clone() {
            conn.unpark().await;
        }
    }
}

/// Connects to a VM's `fs.sock` and queues the hello. Done before a restored VM runs (like the
/// agent's greeting), so the guest resumes with a host already there.
pub async fn greet(socket: &Path) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket).await?;
    stream.write_all(&hello_frame()).await?;
    Ok(stream)
}

fn hello_frame() -> Vec<u8> {
    let hello = Reply {
        hello: Some(format!("{:016x}", rand::random::<u64>())),
        protocol: wire::FS_PROTOCOL,
        ..Default::default()
    };
    wire::encode(&hello, &[])
}

/// Control of one connection.
#[derive(Clone)]
struct FsConn {
    ctl: mpsc::Sender<Ctl>,
}

enum Ctl {
    Park(oneshot::Sender<()>),
    Unpark,
}

impl FsConn {
    async fn park(&self, wait: Duration) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.ctl.send(Ctl::Park(tx)).await.map_err(|_| "fs connection gone".to_string())?;
        tokio::time::timeout(wait, rx)
            .await
            .map_err(|_| "the guest did not park its fs client".to_string())?
            .map_err(|_| "fs connection gone".to_string())
    }

    async fn unpark(&self) {
        let _ = self.ctl.send(Ctl::Unpark).await;
    }
}

type Parking = Arc<std::sync::Mutex<Option<(String, oneshot::Sender<()>)>>>;

/// Answers requests on `stream` until the VM goes away. While parked, answers computed are
/// dropped: the guest resends their requests after the next hello.
fn serve(stream: UnixStream, sources: Sources) -> FsConn {
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Ctl>(4);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT);
    let parking: Parking = Default::default();
    let parking_w = parking.clone();
    let writer = tokio::spawn(async move {
        let mut parked = false;
        loop {
            tokio::select! {
                frame = rx.recv() => {
                    let Some(frame) = frame else { break };
                    if !parked {
                        crate::trace::record(&frame);
                        if wr.write_all(&frame).await.is_err() {
                            break;
                        }
                    }
                }
                ctl = ctl_rx.recv() => match ctl {
                    Some(Ctl::Park(done)) => {
                        let nonce = format!("{:016x}", rand::random::<u64>());
                        *parking_w.lock().unwrap_or_else(|p| p.into_inner()) = Some((nonce.clone(), done));
                        parked = true;
                        let park = Reply { park: Some(nonce), ..Default::default() };
                        if wr.write_all(&wire::encode(&park, &[])).await.is_err() {
                            break;
                        }
                    }
                    Some(Ctl::Unpark) => {
                        parked = false;
                        if wr.write_all(&hello_frame()).await.is_err() {
                            break;
                        }
                    }
                    None => {}
                },
            }
        }
    });
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut buf = Vec::with_capacity(64 << 10);
        let mut chunk = vec![0u8; 64 << 10];
        'conn: loop {
            let n = match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            loop {
                let header = match wire::decode(&mut buf) {
                    Ok(Some((header, _))) => header,
                    Ok(None) => break,
                    Err(e) => {
                        // A guest that breaks framing loses its mounts' answers, nothing else.
                        tracing::warn!("fs port: {e}; closing the connection");
                        break 'conn;
                    }
                };
                let Ok(req) = serde_json::from_slice::<Request>(&header) else {
                    tracing::debug!("fs port: unreadable request");
                    continue;
                };
                if req.op == Op::Parked {
                    let mut slot = parking.lock().unwrap_or_else(|p| p.into_inner());
                    if slot.as_ref().is_some_and(|(n, _)| *n == req.path) {
                        if let Some((_, done)) = slot.take() {
                            let _ = done.send(());
                        }
                    }
                    continue;
                }
                let Ok(permit) = permits.clone().acquire_owned().await else { break 'conn };
                let (sources, tx) = (sources.clone(), tx.clone());
                tokio::spawn(async move {
                    let frame = answer(&sources, req).await;
                    let _ = tx.send(frame).await;
                    drop(permit);
                });
            }
        }
        drop(tx);
        writer.abort();
    });
    FsConn { ctl: ctl_tx }
}

async fn answer(sources: &Sources, req: Request) -> Vec<u8> {
    let mut reply = Reply { id: req.id, ..Default::default() };
    let Some(src) = sources.get(&req.mount) else {
        reply.errno = libc::ENOENT;
        return wire::encode(&reply, &[]);
    };
    let mut data = Vec::new();
    let work = async {
        match req.op {
            Op::Stat => src.stat(&req.path).await.map(|e| reply.entry = Some(e)),
            Op::List => src.list(&req.path).await.map(|e| reply.entries = Some(e)),
            Op::Read => src.read(&req.path, req.offset, req.len.min(wire::MAX_READ)).await.map(|d| data = d),
            Op::Parked => Err(libc::EINVAL),
        }
    };
    let result = tokio::time::timeout(REQUEST_TIMEOUT, work).await.unwrap_or(Err(libc::EIO));
    if let Err(errno) = result {
        reply.errno = errno;
        data.clear();
    }
    wire::encode(&reply, &data)
}

/// The S3 settings of a mount, credentials included (they live only in the runner's memory).
pub fn mount_spec(m: &cove_api::sandbox::MountConfig) -> cove_mount::MountSpec {
    cove_mount::MountSpec {
        bucket: m.bucket.clone(),
        endpoint: m.endpoint.clone(),
        prefix: m.prefix.clone(),
        region: None,
        credentials: m.access_key_id.clone().zip(m.secret_access_key.clone()),
    }
}

/// How often a mount whose endpoint could not be reached is tried again.
const RECONNECT_EVERY: Duration = Duration::from_secs(5);

/// A bucket (or a prefix of one) through `cove_mount::S3View`. A mount that could not connect
/// (its endpoint down when the sandbox resumed) answers EIO and tries again at most every few
/// seconds, so reads work again once the endpoint does.
pub struct S3Source {
    spec: cove_mount::MountSpec,
    view: tokio::sync::Mutex<(Option<Arc<cove_mount::S3View>>, Option<tokio::time::Instant>)>,
}

impl S3Source {
    /// Connects now: the error says what is wrong (endpoint, credentials, bucket).
    pub async fn connect(spec: cove_mount::MountSpec) -> Result<S3Source, cove_mount::MountError> {
        let view = cove_mount::S3View::connect(spec.clone()).await?;
        Ok(S3Source { spec, view: tokio::sync::Mutex::new((Some(Arc::new(view)), None)) })
    }

    /// Connects at the first request.
    pub fn lazy(spec: cove_mount::MountSpec) -> S3Source {
        S3Source { spec, view: tokio::sync::Mutex::new((None, None)) }
    }

    async fn view(&self) -> Result<Arc<cove_mount::S3View>, i32> {
        let mut slot = self.view.lock().await;
        if let Some(v) = &slot.0 {
            return Ok(v.clone());
        }
        if slot.1.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
            return Err(libc::EIO);
        }
        slot.1 = Some(tokio::time::Instant::now());
        match cove_mount::S3View::connect(self.spec.clone()).await {
            Ok(v) => {
                let v = Arc::new(v);
                slot.0 = Some(v.clone());
                Ok(v)
            }
            Err(e) => {
                tracing::warn!(bucket = %self.spec.bucket, error = %e, "mount not connected");
                Err(libc::EIO)
            }
        }
    }
}

fn errno(e: cove_mount::MountError) -> i32 {
    use cove_mount::MountError as E;
    match e {
        E::NotFound(_) | E::InvalidPath(_) => libc::ENOENT,
        E::IsADirectory(_) => libc::EISDIR,
        E::AccessDenied(_) => libc::EACCES,
        E::BadEndpoint(_) | E::NoSuchBucket(_) | E::Other(_) => libc::EIO,
    }
}

fn from_view(e: cove_mount::Entry) -> Entry {
    let kind = if e.kind == cove_mount::EntryKind::Dir { Kind::Dir } else { Kind::File };
    Entry { name: e.name, kind, size: e.size, mtime: e.mtime_unix }
}

#[async_trait]
impl FsSource for S3Source {
    async fn stat(&self, path: &str) -> Result<Entry, i32> {
        self.view().await?.stat(path).await.map(from_view).map_err(errno)
    }
    async fn list(&self, path: &str) -> Result<Vec<Entry>, i32> {
        Ok(self.view().await?.list(path).await.map_err(errno)?.into_iter().map(from_view).collect())
    }
    async fn read(&self, path: &str, offset: u64, len: u32) -> Result<Vec<u8>, i32> {
        self.view().await?.read(path, offset, len).await.map(|b| b.to_vec()).map_err(errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One file, "a/b.txt".
    struct OneFile;

    #[async_trait]
    impl FsSource for OneFile {
        async fn stat(&self, path: &str) -> Result<Entry, i32> {
            match path {
                "" | "a" => Ok(Entry { name: path.into(), kind: Kind::Dir, size: 0, mtime: 0 }),
                "a/b.txt" => Ok(Entry { name: "b.txt".into(), kind: Kind::File, size: 5, mtime: 0 }),
                _ => Err(libc::ENOENT),
            }
        }
        async fn list(&self, _path: &str) -> Result<Vec<Entry>, i32> {
            Err(libc::ENOTDIR)
        }
        async fn read(&self, _path: &str, offset: u64, len: u32) -> Result<Vec<u8>, i32> {
            let data = b"hello";
            let start = (offset as usize).min(5);
            Ok(data[start..(start + len as usize).min(5)].to_vec())
        }
    }

    async fn frame(s: &mut UnixStream) -> (Reply, Vec<u8>) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((h, d)) = wire::decode(&mut buf).unwrap() {
                return (serde_json::from_slice(&h).unwrap(), d);
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn request(id: u64, op: Op, mount: &str, path: &str, offset: u64, len: u32) -> Vec<u8> {
        wire::encode(&Request { id, op, mount: mount.into(), path: path.into(), offset, len }, &[])
    }

    #[tokio::test]
    async fn answers_only_its_own_mounts_and_parks() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let sources = Sources::default();
        sources.insert("m1", Arc::new(OneFile));
        let conn = serve(host, sources.clone());

        guest.write_all(&request(1, Op::Read, "m1", "a/b.txt", 1, 3)).await.unwrap();
        let (r, d) = frame(&mut guest).await;
        assert_eq!((r.id, r.errno, d.as_slice()), (1, 0, &b"ell"[..]));

        guest.write_all(&request(2, Op::Stat, "other-sandbox-mount", "a", 0, 0)).await.unwrap();
        let (r, _) = frame(&mut guest).await;
        assert_eq!((r.id, r.errno), (2, libc::ENOENT));

        guest.write_all(&request(3, Op::List, "m1", "a", 0, 0)).await.unwrap();
        let (r, _) = frame(&mut guest).await;
        assert_eq!((r.id, r.errno), (3, libc::ENOTDIR));

        // Park: the guest gets the nonce, answers it, and nothing more is sent until unpark.
        let parked = tokio::spawn({
            let conn = conn.clone();
            async move { conn.park(Duration::from_secs(5)).await }
        });
        let (r, _) = frame(&mut guest).await;
        let nonce = r.park.expect("a park frame");
        guest.write_all(&request(4, Op::Stat, "m1", "a/b.txt", 0, 0)).await.unwrap();
        let parked_frame = wire::encode(
            &Request { id: 0, op: Op::Parked, mount: String::new(), path: nonce, offset: 0, len: 0 },
            &[],
        );
        guest.write_all(&parked_frame).await.unwrap();
        parked.await.unwrap().unwrap();
        let nothing = tokio::time::timeout(Duration::from_millis(300), frame(&mut guest)).await;
        assert!(nothing.is_err(), "an answer was sent while parked");
        conn.unpark().await;
        let (r, _) = frame(&mut guest).await;
        assert_eq!(r.protocol, wire::FS_PROTOCOL);
        assert!(r.hello.is_some(), "unpark greets the guest again");

        // Removing the mount makes its paths vanish.
        sources.remove("m1");
        guest.write_all(&request(5, Op::Stat, "m1", "a/b.txt", 0, 0)).await.unwrap();
        let (r, _) = frame(&mut guest).await;
        assert_eq!((r.id, r.errno), (5, libc::ENOENT));
    }

    #[tokio::test]
    async fn a_broken_frame_closes_the_connection() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let _conn = serve(host, Sources::default());
        guest.write_all(&[0xff; 16]).await.unwrap();
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), guest.read(&mut b)).await.unwrap().unwrap();
        assert_eq!(n, 0);
    }
}
