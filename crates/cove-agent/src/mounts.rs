//! Read-only bucket mounts: a FUSE filesystem per mount, whose every lookup, getattr,
//! readdir and read is answered by the host over the `cove.fs` virtio-serial port.
//!
//! FUSE requests arrive on fuser's session thread; each is handed to the tokio runtime with
//! its reply, so any number wait on the host at once. The port task resends every unanswered
//! request when a host greets it (a new connection after a restore or a runner restart).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use cove_proto::fs::{self as wire, Entry, Kind, Op, Reply, Request};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEntry,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

// With no host connected, reads end at once: poll, backing off from the first to the last, as
// the agent's own port does.
use crate::channel::IDLE_POLL;

const TTL: Duration = Duration::from_secs(5);

type Answer = Result<(Reply, Vec<u8>), i32>;
type Pending = (Vec<u8>, oneshot::Sender<Answer>);

/// The guest's client on the `cove.fs` port, shared by all mounts.
#[derive(Clone)]
pub struct FsClient {
    inner: Arc<Inner>,
}

struct Inner {
    next: AtomicU64,
    /// Unanswered requests: the frame (to resend after a hello) and who waits for it.
    pending: Mutex<HashMap<u64, Pending>>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

impl FsClient {
    pub fn start() -> FsClient {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner { next: AtomicU64::new(1), pending: Mutex::new(HashMap::new()), tx });
        tokio::spawn(run_port(inner.clone(), rx));
        FsClient { inner }
    }

    async fn call(&self, op: Op, mount: &str, path: &str, offset: u64, len: u32) -> Answer {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let frame =
            wire::encode(&Request { id, op, mount: mount.into(), path: path.into(), offset, len }, &[]);
        let (done, wait) = oneshot::channel();
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (frame.clone(), done));
        let _ = self.inner.tx.send(frame);
        wait.await.unwrap_or(Err(libc::EIO))
    }
}

fn find_port() -> Option<String> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == wire::PORT_NAME {
            return Some(format!("/dev/{}", entry.file_name().to_string_lossy()));
        }
    }
    None
}

async fn run_port(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    let path = loop {
        match find_port() {
            Some(p) => break p,
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let port = loop {
        match crate::channel::Port::open(&path) {
            Ok(p) => break p,
            Err(e) => {
                eprintln!("cove-agent: opening {path}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (mut rd, mut wr) = tokio::io::split(port);
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            // With no host connected the bytes are dropped; the next host's hello makes us
            // resend whatever is still unanswered.
            if let Err(e) = wr.write_all(&frame).await {
                eprintln!("cove-agent: fs port write: {e}");
            }
        }
    });
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut chunk = vec![0u8; 256 << 10];
    let mut idle = IDLE_POLL.0;
    loop {
        let n = match rd.read(&mut chunk).await {
            Ok(n) => n,
            Err(e) => {
                eprintln!("cove-agent: fs port read: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if n == 0 {
            // No host connected: whatever partial frame we hold died with the old connection.
            buf.clear();
            tokio::time::sleep(idle).await;
            idle = (idle * 2).min(IDLE_POLL.1);
            continue;
        }
        idle = IDLE_POLL.0;
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match wire::decode(&mut buf) {
                Ok(Some((header, data))) => dispatch(&inner, &header, data),
                Ok(None) => break,
                Err(e) => {
                    eprintln!("cove-agent: fs port: {e}; dropping buffered bytes");
                    buf.clear();
                    break;
                }
            }
        }
    }
}

fn dispatch(inner: &Inner, header: &[u8], data: Vec<u8>) {
    let Ok(reply) = serde_json::from_slice::<Reply>(header) else {
        eprintln!("cove-agent: fs port: unreadable header");
        return;
    };
    if let Some(nonce) = reply.park {
        let parked = Request { id: 0, op: Op::Parked, mount: String::new(), path: nonce, offset: 0, len: 0 };
        let _ = inner.tx.send(wire::encode(&parked, &[]));
        return;
    }
    let mut pending = inner.pending.lock().unwrap_or_else(|p| p.into_inner());
    if reply.hello.is_some() {
        // A new host: everything unanswered goes again, oldest first.
        if reply.protocol != wire::FS_PROTOCOL {
            eprintln!(
                "cove-agent: fs host speaks protocol {}, this agent {}",
                reply.protocol,
                wire::FS_PROTOCOL
            );
        }
        let mut ids: Vec<u64> = pending.keys().copied().collect();
        ids.sort_unstable();
        eprintln!("cove-agent: fs host hello, resending {} unanswered requests", ids.len());
        for id in ids {
            let _ = inner.tx.send(pending[&id].0.clone());
        }
        return;
    }
    if !pending.contains_key(&reply.id) {
        eprintln!("cove-agent: fs answer to unknown request {} (answered twice?)", reply.id);
    }
    if let Some((_, done)) = pending.remove(&reply.id) {
        let answer = if reply.errno != 0 { Err(reply.errno) } else { Ok((reply, data)) };
        let _ = done.send(answer);
    }
}

/// Inode numbers: one per path seen, never reused while mounted.
#[derive(Default)]
struct Inodes {
    paths: HashMap<u64, String>,
    inos: HashMap<String, u64>,
    next: u64,
}

impl Inodes {
    fn new() -> Self {
        let mut t = Inodes { next: 2, ..Default::default() };
        t.paths.insert(1, String::new());
        t.inos.insert(String::new(), 1);
        t
    }
    fn intern(&mut self, path: &str) -> u64 {
        if let Some(i) = self.inos.get(path) {
            return *i;
        }
        let i = self.next;
        self.next += 1;
        self.paths.insert(i, path.to_string());
        self.inos.insert(path.to_string(), i);
        i
    }
}

/// A directory listing as readdir hands it out: (inode, type, name), "." and ".." first.
type Listing = Arc<Vec<(u64, FileType, String)>>;

pub struct CoveFs {
    mount: String,
    client: FsClient,
    rt: tokio::runtime::Handle,
    inodes: Arc<Mutex<Inodes>>,
    /// Listings of open directories, by handle: fetched once at opendir, because the kernel
    /// reads a directory in many small readdir calls.
    open_dirs: Arc<Mutex<HashMap<u64, Listing>>>,
    next_fh: Arc<AtomicU64>,
}

/// Fetches the listing of `path` (inode `ino`) from the host.
async fn listing(
    client: &FsClient,
    mount: &str,
    inodes: &Mutex<Inodes>,
    ino: u64,
    path: &str,
) -> Result<Listing, i32> {
    let entries = match client.call(Op::List, mount, path, 0, 0).await {
        Ok((Reply { entries: Some(e), .. }, _)) => e,
        Ok(_) => return Err(libc::EIO),
        Err(errno) => return Err(errno),
    };
    let mut all = Vec::with_capacity(entries.len() + 2);
    all.push((ino, FileType::Directory, ".".to_string()));
    all.push((1, FileType::Directory, "..".to_string()));
    let mut t = inodes.lock().unwrap_or_else(|p| p.into_inner());
    for e in entries {
        let kind = if e.kind == Kind::Dir { FileType::Directory } else { FileType::RegularFile };
        all.push((t.intern(&join(path, &e.name)), kind, e.name));
    }
    Ok(Arc::new(all))
}

fn fill(listing: &[(u64, FileType, String)], offset: u64, mut reply: ReplyDirectory) {
    for (i, (ino, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
        if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
            break;
        }
    }
    reply.ok();
}

fn attr(ino: u64, e: &Entry) -> FileAttr {
    let mtime = UNIX_EPOCH + Duration::from_secs(e.mtime.max(0) as u64);
    let (kind, perm, nlink) = match e.kind {
        Kind::Dir => (FileType::Directory, 0o555, 2),
        Kind::File => (FileType::RegularFile, 0o444, 1),
    };
    FileAttr {
        ino: INodeNo(ino),
        size: e.size,
        blocks: e.size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

impl CoveFs {
    fn path_of(&self, ino: INodeNo) -> Option<String> {
        self.inodes.lock().unwrap_or_else(|p| p.into_inner()).paths.get(&u64::from(ino)).cloned()
    }
}

impl Filesystem for CoveFs {
    fn init(&mut self, _req: &fuser::Request, config: &mut fuser::KernelConfig) -> io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (Some(dir), Some(name)) = (self.path_of(parent), name.to_str()) else {
            return reply.error(Errno::ENOENT);
        };
        let path = join(&dir, name);
        let (client, mount, inodes) = (self.client.clone(), self.mount.clone(), self.inodes.clone());
        self.rt.spawn(async move {
            match client.call(Op::Stat, &mount, &path, 0, 0).await {
                Ok((Reply { entry: Some(e), .. }, _)) => {
                    let ino = inodes.lock().unwrap_or_else(|p| p.into_inner()).intern(&path);
                    reply.entry(&TTL, &attr(ino, &e), fuser::Generation(0));
                }
                Ok(_) => reply.error(Errno::EIO),
                Err(errno) => reply.error(Errno::from_i32(errno)),
            }
        });
    }

    fn getattr(&self, _req: &fuser::Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let Some(path) = self.path_of(ino) else { return reply.error(Errno::ENOENT) };
        let (client, mount) = (self.client.clone(), self.mount.clone());
        self.rt.spawn(async move {
            match client.call(Op::Stat, &mount, &path, 0, 0).await {
                Ok((Reply { entry: Some(e), .. }, _)) => reply.attr(&TTL, &attr(u64::from(ino), &e)),
                Ok(_) => reply.error(Errno::EIO),
                Err(errno) => reply.error(Errno::from_i32(errno)),
            }
        });
    }

    fn open(&self, _req: &fuser::Request, _ino: INodeNo, flags: OpenFlags, reply: fuser::ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // Objects do not change under a mount: keep the page cache across opens.
        reply.opened(FileHandle(0), fuser::FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(path) = self.path_of(ino) else { return reply.error(Errno::ENOENT) };
        let (client, mount) = (self.client.clone(), self.mount.clone());
        self.rt.spawn(async move {
            match client.call(Op::Read, &mount, &path, offset, size.min(wire::MAX_READ)).await {
                Ok((_, data)) => reply.data(&data),
                Err(errno) => reply.error(Errno::from_i32(errno)),
            }
        });
    }

    fn opendir(&self, _req: &fuser::Request, ino: INodeNo, _flags: OpenFlags, reply: fuser::ReplyOpen) {
        let Some(path) = self.path_of(ino) else { return reply.error(Errno::ENOENT) };
        let (client, mount, inodes) = (self.client.clone(), self.mount.clone(), self.inodes.clone());
        let (open_dirs, next_fh) = (self.open_dirs.clone(), self.next_fh.clone());
        self.rt.spawn(async move {
            match listing(&client, &mount, &inodes, u64::from(ino), &path).await {
                Ok(l) => {
                    let fh = next_fh.fetch_add(1, Ordering::Relaxed);
                    open_dirs.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, l);
                    reply.opened(FileHandle(fh), fuser::FopenFlags::empty());
                }
                Err(errno) => reply.error(Errno::from_i32(errno)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let open = self.open_dirs.lock().unwrap_or_else(|p| p.into_inner()).get(&u64::from(fh)).cloned();
        if let Some(l) = open {
            return fill(&l, offset, reply);
        }
        let Some(path) = self.path_of(ino) else { return reply.error(Errno::ENOENT) };
        let (client, mount, inodes) = (self.client.clone(), self.mount.clone(), self.inodes.clone());
        self.rt.spawn(async move {
            match listing(&client, &mount, &inodes, u64::from(ino), &path).await {
                Ok(l) => fill(&l, offset, reply),
                Err(errno) => reply.error(Errno::from_i32(errno)),
            }
        });
    }

    fn releasedir(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: fuser::ReplyEmpty,
    ) {
        self.open_dirs.lock().unwrap_or_else(|p| p.into_inner()).remove(&u64::from(fh));
        reply.ok();
    }
}

const READ_AHEAD_KB: u32 = 4096;

/// Sets the read-ahead of the filesystem mounted at `path` (its backing device info).
fn set_read_ahead(path: &str, kb: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)?.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    std::fs::write(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"), kb.to_string())
}

struct Mounted {
    path: String,
    /// Whether the agent made the directory (it then removes it at unmount).
    made_dir: bool,
    session: fuser::BackgroundSession,
}

/// The mounts of this guest, by id.
#[derive(Default)]
pub struct Mounts {
    client: Mutex<Option<FsClient>>,
    mounted: tokio::sync::Mutex<HashMap<String, Mounted>>,
}

impl Mounts {
    fn client(&self) -> FsClient {
        self.client.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(FsClient::start).clone()
    }

    /// Opens the port now rather than at the first mount.
    pub fn start_client(&self) {
        self.client();
    }

    pub async fn mount(&self, req: wire::MountRequest) -> io::Result<()> {
        let mut mounted = self.mounted.lock().await;
        if let Some(m) = mounted.get(&req.id) {
            return if m.path == req.path {
                Ok(())
            } else {
                Err(io::Error::other(format!("mount {} is already at {}", req.id, m.path)))
            };
        }
        if let Some((id, _)) = mounted.iter().find(|(_, m)| m.path == req.path) {
            return Err(io::Error::other(format!("{} is already mount {id}", req.path)));
        }
        let fs = CoveFs {
            mount: req.id.clone(),
            client: self.client(),
            rt: tokio::runtime::Handle::current(),
            inodes: Arc::new(Mutex::new(Inodes::new())),
            open_dirs: Default::default(),
            next_fh: Arc::new(AtomicU64::new(1)),
        };
        // Filesystem calls block: never on the runtime's few worker threads, which the FUSE
        // handlers of this and other mounts need to answer the kernel.
        let dir = req.path.clone();
        let made_dir = tokio::task::spawn_blocking(move || {
            let made = !std::path::Path::new(&dir).exists();
            std::fs::create_dir_all(&dir).map(|_| made)
        })
        .await
        .map_err(io::Error::other)??;
        let path = req.path.clone();
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoDev,
            fuser::MountOption::FSName(format!("cove-{}", req.id)),
            fuser::MountOption::Subtype("cove".into()),
        ];
        config.acl = fuser::SessionACL::All;
        let session = tokio::task::spawn_blocking(move || fuser::spawn_mount(fs, &path, &config))
            .await
            .map_err(io::Error::other)?;
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                if made_dir {
                    let _ = std::fs::remove_dir(&req.path);
                }
                return Err(e);
            }
        };
        // The kernel reads ahead 128 KiB on FUSE by default, one request at a time, which leaves
        // the channel idle between requests: 1 MiB keeps several in flight.
        let dir = req.path.clone();
        let read_ahead = tokio::task::spawn_blocking(move || set_read_ahead(&dir, READ_AHEAD_KB)).await;
        if let Ok(Err(e)) = read_ahead {
            eprintln!("cove-agent: read-ahead of {}: {e}", req.path);
        }
        mounted.insert(req.id, Mounted { path: req.path, made_dir, session });
        Ok(())
    }

    /// Detaches the mount at once (files still open keep working until closed, as far as the
    /// host still serves the mount) and removes the directory the agent made for it.
    pub async fn unmount(&self, id: &str) -> io::Result<()> {
        let Some(m) = self.mounted.lock().await.remove(id) else { return Ok(()) };
        let path = m.path.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::sys::umount_lazy(&m.path) {
                // EINVAL: not mounted any more (someone in the guest unmounted it).
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
            // The session's own unmount now finds nothing to do; its thread ends when the
            // kernel drops the connection.
            drop(m.session);
            if m.made_dir {
                let _ = std::fs::remove_dir(&m.path);
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
        .map_err(|e| io::Error::new(e.kind(), format!("unmounting {path}: {e}")))
    }
}
