//! Lazy guest RAM for a resume from an image (a cold resume: the sandbox was paused on another
//! runner, or this runner kept no warm entry of it).
//!
//! The image's RAM is a blob of lz4 chunks with a chunk table (`cove_blob::image`), so any
//! chunk can be decoded on its own. Instead of unpacking all of it before the guest runs, the
//! runner puts the blob beside the sandbox as it is stored (a hard link from a local store, a
//! download otherwise) and a helper process serves it as a file on a FUSE mount, decoding a
//! chunk when the kernel first reads it. QEMU maps that file copy-on-write (`share=off`), as a
//! warm resume maps its RAM file on disk: the guest runs at once, its pages come from the page
//! cache on first touch, and the pages it writes become QEMU's own. The chunks the guest had
//! touched when it was paused (`LazyTable::hot`, recorded by the capture) are pushed into the
//! page cache (`FUSE_NOTIFY_STORE`) from both ends in turn from the moment the file is mounted,
//! while QEMU starts, so the working set is there before the guest asks for it: first those the
//! last restore touched until its agent answered (`LazyTable::first`), the rest at a low
//! priority once QEMU has the file. Between the two the server checks every chunk of the blob
//! against its crc32 (in place, in a mapping of it) and tells the runner, whose resume answers
//! only once the whole RAM has passed; the guest runs meanwhile, and every chunk it reads is
//! checked as it is decoded.
//!
//! **Lifetime.** The server is a process of its own (`cove lazy-memory <sandbox dir>`), not a
//! task of the runner, because QEMU outlives runner restarts and its RAM must stay readable:
//! page-cache pages of the file can be dropped under memory pressure and read again. It
//! detaches its mount as soon as QEMU has the file open, so nothing stays mounted, and it ends
//! when the kernel ends the connection, i.e. when the last user of the file (QEMU) has gone. If
//! nobody opens the file within [`OPEN_WAIT`] it ends too.
//!
//! **Background unpack.** Half a second after QEMU has opened the file, the server unpacks the
//! whole RAM into `unpacked.<hash of the image>` beside it, at nice 10. A capture of the VM
//! takes that file as its starting point (else it unpacks the blob then) and writes the pages
//! the guest wrote over it (`memfile::write_back`, the mapping found by [`INODE`]), so a pause
//! after a cold resume costs what a pause after a warm one does.
//!
//! **Files**, in `<sandbox dir>/lazy/` (0700): `memory` (the blob), `memory.json` (the
//! [`LazyTable`]), `mnt/` (the mount point), `server.log` and the unpacked copy; the directory
//! goes with the VM.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cove_blob::{BlobStore, PackedFile, PackedReader};
use fuser::{Errno, FileAttr, FileHandle, FileType, INodeNo, OpenFlags, ReplyAttr, ReplyData, ReplyEntry};
use serde::{Deserialize, Serialize};

use crate::RunnerError;

const DIR: &str = "lazy";
const BLOB: &str = "memory";
const TABLE: &str = "memory.json";
const MNT: &str = "mnt";
const FILE: &str = "memory";
/// The RAM file's inode number ("covemem"), by which a capture finds QEMU's mapping of it.
pub const INODE: u64 = 0x0063_6f76_656d_656d;
/// How long the server waits for QEMU to open the file before it gives up.
const OPEN_WAIT: Duration = Duration::from_secs(60);
/// How long the runner waits for the server to mount.
const MOUNT_WAIT: Duration = Duration::from_secs(10);
/// Decoded chunks the server keeps (the kernel reads a chunk in several requests).
const CACHED_CHUNKS: usize = 8;
/// How long after QEMU opened the file the server starts unpacking it in the background.
const UNPACK_DELAY: Duration = Duration::from_millis(500);
/// How long a capture waits for the server's background unpack to finish.
const UNPACK_WAIT: Duration = Duration::from_secs(3);
/// Read-around on a page fault (the FUSE default is 128 KiB): one chunk's worth.
const READ_AHEAD_KB: u32 = 1024;

/// What the server serves: the RAM's chunk table, and the chunks to push into the page cache
/// first (indices into its chunks).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LazyTable {
    /// The image (its blob prefix).
    pub image: String,
    pub file: PackedFile,
    #[serde(default)]
    pub hot: Vec<u32>,
    /// Of the chunks, those the guest needed first when it was last resumed.
    #[serde(default)]
    pub first: Vec<u32>,
}

/// Where the server leaves the whole RAM of `image`, unpacked in the background, for a capture
/// to start from. Named by the image: a file another image's server left can never be taken.
fn unpacked_path(sandbox: &Path, image: &str) -> PathBuf {
    use sha2::Digest;
    dir(sandbox).join(format!("unpacked.{}", &hex::encode(sha2::Sha256::digest(image.as_bytes()))[..16]))
}

fn dir(sandbox: &Path) -> PathBuf {
    sandbox.join(DIR)
}

/// The RAM file QEMU maps for a VM restored lazily in `sandbox`.
pub fn ram_path(sandbox: &Path) -> PathBuf {
    dir(sandbox).join(MNT).join(FILE)
}

/// Whether the VM of `sandbox` was restored lazily (its RAM is served from the image's blob).
pub fn is_lazy(sandbox: &Path) -> bool {
    dir(sandbox).join(TABLE).exists()
}

/// The RAM of an image, served: the file to map, and the server's check of every chunk.
pub struct Served {
    pub path: PathBuf,
    checked: tokio::sync::oneshot::Receiver<Result<(), cove_blob::BlobError>>,
}

impl Served {
    /// Waits for the server's check of every chunk of the RAM against its crc32 (it runs while
    /// QEMU starts and the guest's first moments): a resume answers only once the memory is
    /// known whole, as an unpack would have made sure, rather than leave a guest that fails on
    /// a damaged chunk when it first touches it.
    pub async fn checked(self) -> Result<(), RunnerError> {
        match self.checked.await {
            Ok(checked) => Ok(checked?),
            Err(_) => Err(RunnerError::io(
                "checking guest memory",
                io::Error::other("the lazy memory server ended before it checked the RAM"),
            )),
        }
    }
}

/// What the server says once it has checked every chunk, or a damaged chunk as JSON after it.
const CHECKED: &str = "checked";
const DAMAGED: &str = "damaged ";

/// A damaged chunk, as the server reports it.
#[derive(Serialize, Deserialize)]
struct Damaged {
    file: String,
    offset: u64,
    reason: String,
}

impl From<cove_blob::BlobError> for Damaged {
    fn from(e: cove_blob::BlobError) -> Damaged {
        match e {
            cove_blob::BlobError::Corrupt { file, offset, reason } => Damaged { file, offset, reason },
            // Its details (paths) stay in the server's log.
            _ => Damaged { file: FILE.into(), offset: 0, reason: "the blob could not be read".into() },
        }
    }
}

impl From<Damaged> for cove_blob::BlobError {
    fn from(d: Damaged) -> cove_blob::BlobError {
        cove_blob::BlobError::Corrupt { file: d.file, offset: d.offset, reason: d.reason }
    }
}

/// Makes the RAM of image `prefix` (`packed`, with the working set `hot`) ready to be mapped
/// from [`ram_path`]: fetches its blob, starts the server (`helper lazy-memory <sandbox>`) and
/// waits until it has mounted. On error nothing is left running.
pub async fn prepare(
    store: &BlobStore,
    prefix: &str,
    table: LazyTable,
    sandbox: &Path,
    helper: &Path,
) -> Result<Served, RunnerError> {
    let d = dir(sandbox);
    remove(sandbox);
    // Root only: the mount allows other users (QEMU reads as the VM user) until it is detached.
    std::fs::create_dir_all(d.join(MNT))
        .and_then(|()| std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o700)))
        .map_err(|e| RunnerError::io("creating the lazy memory dir", e))?;
    cove_blob::fetch_packed(store, prefix, &table.file, &d.join(BLOB)).await?;
    let json = serde_json::to_vec(&table).map_err(|e| RunnerError::io("writing the RAM table", e.into()))?;
    std::fs::write(d.join(TABLE), json).map_err(|e| RunnerError::io("writing the RAM table", e))?;
    let log =
        std::fs::File::create(d.join("server.log")).map_err(|e| RunnerError::io("creating a log", e))?;
    let mut cmd = tokio::process::Command::new(helper);
    cmd.arg("lazy-memory")
        .arg(sandbox)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        // It needs nothing of the runner's environment (which may hold the store's credentials).
        .env_clear()
        .env("COVE_LOG", "warn")
        // Its own process group: a signal to the runner's (Ctrl-C) must not end it under QEMU.
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| RunnerError::io("starting the lazy memory server", e))?;
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    let ready = async {
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line).await?;
        Ok::<_, io::Error>(line.trim() == "ready")
    };
    let ready = matches!(tokio::time::timeout(MOUNT_WAIT, ready).await, Ok(Ok(true)));
    if !ready {
        let _ = child.start_kill();
        let _ = child.wait().await;
        let why = std::fs::read_to_string(d.join("server.log")).unwrap_or_default();
        remove(sandbox);
        return Err(RunnerError::io(
            "starting the lazy memory server",
            io::Error::other(why.trim().to_string()),
        ));
    }
    // Its check of every chunk comes next; then reap it whenever it ends (it outlives this
    // runner if need be).
    let (tx, checked) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        line.clear();
        if tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line).await.is_ok() {
            let said = line.trim_end();
            let outcome = if said == CHECKED {
                Some(Ok(()))
            } else {
                let damaged =
                    said.strip_prefix(DAMAGED).and_then(|j| serde_json::from_str::<Damaged>(j).ok());
                damaged.map(|d| Err(d.into()))
            };
            // Anything else is no answer: the resume fails as if the server had ended.
            if let Some(outcome) = outcome {
                let _ = tx.send(outcome);
            }
        }
        drop(stdout);
        let _ = child.wait().await;
    });
    Ok(Served { path: ram_path(sandbox), checked })
}

/// Puts the image RAM that the VM of `sandbox` was resumed from at `dest` (a capture's first
/// step: the pages the guest wrote then go over it): the copy the server unpacked in the
/// background (waiting a little if it is under way), else unpacked now. Returns whether it was
/// unpacked now.
pub async fn unpack(sandbox: &Path, dest: &Path) -> Result<bool, RunnerError> {
    let d = dir(sandbox);
    let table = read_table(&d)?;
    let unpacked = unpacked_path(sandbox, &table.image);
    // The server may be at it (the guest is stopped now, so it has the CPU): doing it twice at
    // once would only slow both.
    let partial = unpacked.with_extension("partial");
    let since = std::time::Instant::now();
    while partial.exists() && !unpacked.exists() && since.elapsed() < UNPACK_WAIT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if std::fs::rename(&unpacked, dest).is_ok() {
        return Ok(false);
    }
    let local = BlobStore::open(&d.display().to_string())?;
    cove_blob::unpack_file(&local, "", &table.file, dest).await?;
    Ok(true)
}

fn read_table(d: &Path) -> Result<LazyTable, RunnerError> {
    let read = |e| RunnerError::io("reading the RAM table", e);
    let bytes = std::fs::read(d.join(TABLE)).map_err(read)?;
    serde_json::from_slice(&bytes).map_err(|e| read(e.into()))
}

/// Removes a lazily restored VM's RAM files (after the VM has ended, or before a new start).
/// A mount still there is detached: a server nobody uses then ends.
pub fn remove(sandbox: &Path) {
    let d = dir(sandbox);
    let _ = crate::sys::detach(&d.join(MNT));
    let _ = std::fs::remove_dir_all(&d);
}

/// The server's main (`cove lazy-memory <sandbox dir>`): mounts the RAM file, says `ready` on
/// stdout, and serves until its last user has gone.
pub fn serve(sandbox: &Path) -> io::Result<()> {
    let d = dir(sandbox);
    let table = read_table(&d).map_err(io::Error::other)?;
    let (first, rest) = push_order(&table.hot, &table.first);
    let unpacked = unpacked_path(sandbox, &table.image);
    let reader = PackedReader::open(&d.join(BLOB), table.file).map_err(io::Error::other)?;
    let (mnt, file) = (d.join(MNT), ram_path(sandbox));
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<()>();
    let fs = RamFs {
        reader: Arc::new(reader),
        cache: Arc::new(Mutex::new(Vec::new())),
        opened_tx: Mutex::new(Some(opened_tx)),
    };
    let reader = fs.reader.clone();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoExec,
        fuser::MountOption::FSName("cove-memory".into()),
        fuser::MountOption::Subtype("cove".into()),
    ];
    // QEMU opens its RAM as root, then runs as the VM user: the reads it causes later must be
    // allowed. The mount point is in a directory only root can enter.
    config.acl = fuser::SessionACL::All;
    let session = fuser::Session::new(fs, &mnt, &config)?;
    let notifier = session.notifier();
    if let Err(e) = set_read_ahead(&mnt) {
        tracing::warn!(error = %e, "read-ahead of the RAM file not raised");
    }
    println!("ready");
    io::stdout().flush()?;
    std::thread::spawn(move || {
        // What the resume needs first, while QEMU starts: a lookup makes the kernel know the
        // file's inode, and QEMU's open keeps what is in its page cache (FOPEN_KEEP_CACHE).
        let pushed = std::fs::metadata(&file).is_ok() && push(&reader, &notifier, &first);
        // Then every chunk checked, on this same thread, while QEMU starts and the guest has its
        // first moments (the resume's answer waits for it, the guest does not): QEMU starts
        // meanwhile on a host that may have two cores, and a third busy thread took from its
        // start more than the check gained by starting sooner (a mapping of the blob in the
        // runner's would take the runner's memory map lock, so it is done in this small
        // process).
        let said = match reader.verify() {
            Ok(()) => CHECKED.to_string(),
            Err(e) => {
                tracing::error!(error = %e, "checking guest memory");
                format!("{DAMAGED}{}", serde_json::to_string(&Damaged::from(e)).unwrap_or_default())
            }
        };
        // The runner may have gone meanwhile: nobody to tell.
        let _ = writeln!(io::stdout(), "{said}").and_then(|()| io::stdout().flush());
        if opened_rx.recv_timeout(OPEN_WAIT).is_err() {
            // Nobody came: end (a detached mount without users ends the session).
            let _ = crate::sys::detach(&mnt);
            return;
        }
        // QEMU holds the file: nothing needs the mount any more (the connection lives on until
        // the file's last user has gone). Not from a request's handler: the unmount looks the
        // mount point up, which may ask this filesystem.
        if let Err(e) = crate::sys::detach(&mnt) {
            tracing::warn!(error = %e, "detaching the RAM file's mount");
        }
        // What an early push could not store (the kernel may drop an inode nobody has open).
        if !pushed && !push(&reader, &notifier, &first) {
            return; // the connection is gone, or the RAM cannot be read (logged)
        }
        // The rest of the working set at a low priority: it must not take the CPU from
        // QEMU's start and the guest's first moments, and what the guest wants of it meanwhile
        // it reads on demand.
        if !rest.is_empty() {
            crate::sys::lower_priority();
            if !push(&reader, &notifier, &rest) {
                return;
            }
        }
        // Then, once the guest has had its first moments, the whole RAM into a file of its own
        // at a low priority, so that a capture need not unpack it.
        std::thread::sleep(UNPACK_DELAY);
        crate::sys::lower_priority();
        let partial = unpacked.with_extension("partial");
        let done = std::fs::File::create(&partial)
            .and_then(|f| f.set_len(reader.file().size).map(|()| f))
            .map_err(|e| e.to_string())
            .and_then(|f| reader.unpack_into(&f, &partial).map_err(|e| e.to_string()))
            .and_then(|_| std::fs::rename(&partial, &unpacked).map_err(|e| e.to_string()));
        if let Err(e) = done {
            // The VM may have ended meanwhile (its directory gone): a capture unpacks it then.
            tracing::debug!(error = %e, "guest memory not unpacked in the background");
            let _ = std::fs::remove_file(&partial);
        }
    });
    match session.run() {
        // The kernel ends the connection once the file's last user has gone. A request the
        // server reads just as it does fails with ECONNABORTED instead of the usual ENODEV
        // (which fuser takes as the end): the same end.
        Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => Ok(()),
        r => r,
    }
}

/// The chunks to push while QEMU starts and those to push after (ascending indices): the
/// working set `hot` split by `first`, the chunks the last resume touched until its agent
/// answered; all of `hot` first if that is not known.
fn push_order(hot: &[u32], first: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let mut hot = hot.to_vec();
    hot.sort_unstable();
    if first.is_empty() {
        return (hot, Vec::new());
    }
    let mut first = first.to_vec();
    first.sort_unstable();
    first.dedup();
    hot.retain(|c| first.binary_search(c).is_err());
    (first, hot)
}

/// Stores the chunks `hot` (ascending indices) in the kernel's page cache, from both ends in
/// turn. A resume needs both ends first: the state load and the guest's kernel touch the bottom
/// of the RAM, the guest's processes the top (Linux hands out free pages from high addresses
/// first). One thread: QEMU starts meanwhile, and the host may have two cores (two pushing
/// threads slowed its start more than they gained). Returns whether every chunk was stored.
fn push(reader: &PackedReader, notifier: &fuser::Notifier, hot: &[u32]) -> bool {
    // One buffer, used again: the kernel keeps what is stored.
    let mut buf = Vec::new();
    for i in both_ends(hot) {
        let Some(c) = reader.file().chunks.get(i as usize).copied() else { continue };
        let stored = match reader.decode(i as usize, &mut buf) {
            Ok(()) => notifier.store(INodeNo(INODE), c.offset, &buf).is_ok(),
            Err(e) => {
                tracing::error!(error = %e, "prefetching guest memory");
                false
            }
        };
        if !stored {
            return false;
        }
    }
    true
}

/// `items` from both ends in turn: the last, the first, the second to last, the second…
fn both_ends<T: Copy>(items: &[T]) -> impl Iterator<Item = T> + '_ {
    let (mut lo, mut hi, mut top) = (0, items.len(), true);
    std::iter::from_fn(move || {
        if lo >= hi {
            return None;
        }
        let item = if top {
            hi -= 1;
            items[hi]
        } else {
            lo += 1;
            items[lo - 1]
        };
        top = !top;
        Some(item)
    })
}

/// Decoded chunks by index, most recently used last.
type ChunkCache = Mutex<Vec<(usize, Arc<Vec<u8>>)>>;

/// Decoded chunk `i`, from the cache or decoded now (and cached).
fn cached(
    reader: &PackedReader,
    cache: &ChunkCache,
    i: usize,
    buf: &mut Vec<u8>,
) -> Result<Arc<Vec<u8>>, cove_blob::BlobError> {
    // A panic elsewhere leaves a valid list.
    let lock = || cache.lock().unwrap_or_else(|p| p.into_inner());
    {
        let mut c = lock();
        if let Some(pos) = c.iter().position(|(j, _)| *j == i) {
            let hit = c.remove(pos);
            let data = hit.1.clone();
            c.push(hit);
            return Ok(data);
        }
    }
    reader.decode(i, buf)?;
    let data = Arc::new(std::mem::take(buf));
    let mut c = lock();
    if c.len() >= CACHED_CHUNKS {
        c.remove(0);
    }
    c.push((i, data.clone()));
    Ok(data)
}

struct RamFs {
    reader: Arc<PackedReader>,
    cache: Arc<ChunkCache>,
    /// Tells the detach-and-prefetch thread that the file is open (taken at the first open).
    opened_tx: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

impl RamFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size) = if ino == INODE {
            (FileType::RegularFile, 0o600, self.reader.file().size)
        } else {
            (FileType::Directory, 0o700, 0)
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: self.reader.file().data_bytes / 512,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// `size` bytes of the file from `offset` (fewer at its end): stored chunks decoded, the
    /// rest zeros.
    fn read_at(&self, offset: u64, size: u32) -> Result<Vec<u8>, cove_blob::BlobError> {
        let end = (offset + u64::from(size)).min(self.reader.file().size);
        let mut out = vec![0u8; end.saturating_sub(offset) as usize];
        let mut at = offset;
        let mut buf = Vec::new();
        while at < end {
            let Some(i) = self.reader.next_chunk(at) else { break };
            let c = self.reader.file().chunks[i];
            if c.offset >= end {
                break;
            }
            let data = cached(&self.reader, &self.cache, i, &mut buf)?;
            let from = at.max(c.offset);
            let to = end.min(c.offset + u64::from(c.len));
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - c.offset) as usize..(to - c.offset) as usize]);
            at = to;
        }
        Ok(out)
    }
}

impl fuser::Filesystem for RamFs {
    fn init(&mut self, _req: &fuser::Request, config: &mut fuser::KernelConfig) -> io::Result<()> {
        let _ = config.set_max_readahead(READ_AHEAD_KB << 10);
        Ok(())
    }

    fn lookup(&self, _req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT || name != FILE {
            return reply.error(Errno::ENOENT);
        }
        reply.entry(&TTL, &self.attr(INODE), fuser::Generation(0));
    }

    fn getattr(&self, _req: &fuser::Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match u64::from(ino) {
            1 | INODE => reply.attr(&TTL, &self.attr(u64::from(ino))),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &fuser::Request, ino: INodeNo, _flags: OpenFlags, reply: fuser::ReplyOpen) {
        if u64::from(ino) != INODE {
            return reply.error(Errno::EISDIR);
        }
        // QEMU opens its RAM read-write and maps it privately: nothing is ever written here.
        reply.opened(FileHandle(0), fuser::FopenFlags::FOPEN_KEEP_CACHE);
        if let Some(tx) = self.opened_tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
    }

    fn read(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        if u64::from(ino) != INODE {
            return reply.error(Errno::EISDIR);
        }
        match self.read_at(offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => {
                // The guest's memory cannot be read: QEMU gets SIGBUS. Say why, loudly.
                tracing::error!(error = %e, offset, "guest memory unreadable");
                reply.error(Errno::EIO)
            }
        }
    }

    fn write(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// Sets the read-around of the filesystem mounted at `mnt` (its backing device info). Its
/// device number comes from `/proc/self/mountinfo`: a `stat` of the mount point would ask this
/// very filesystem, which serves nothing before its session runs.
fn set_read_ahead(mnt: &Path) -> io::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let path = mnt.to_str().ok_or_else(|| io::Error::other("mount point is not UTF-8"))?;
    let dev = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(4) == Some(&path)).then(|| f.get(2).map(|d| d.to_string())).flatten()
        })
        .next_back()
        .ok_or_else(|| io::Error::other("mount not found"))?;
    std::fs::write(format!("/sys/class/bdi/{dev}/read_ahead_kb"), READ_AHEAD_KB.to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;

    /// Whether anything is mounted at `path` now.
    fn mounted(path: &Path) -> bool {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let path = path.to_str().unwrap();
        mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(path))
    }

    /// The server, run here in a thread as the runner runs it in a process: its file reads as
    /// the packed RAM, its mount is gone once the file is open, the working set reaches the page
    /// cache unasked, the whole RAM is unpacked in the background for a capture, and the server
    /// ends when the file's last user has gone.
    #[tokio::test(flavor = "multi_thread")]
    async fn serves_a_packed_file_until_its_last_user_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, sandbox) = (tmp.path().join("ram"), tmp.path().join("sbx"));
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        let text = b"guest memory, page after page. ".repeat(70_000);
        f.write_all_at(&text, 3 << 20).unwrap();
        f.write_all_at(b"the last bytes", (64 << 20) - 14).unwrap();
        drop(f);
        let store = BlobStore::open(&tmp.path().join("blobs").display().to_string()).unwrap();
        let packed = cove_blob::pack_file(&store, "images/x", "memory", &src).await.unwrap();
        // The chunks at 4 and 63 MiB are the working set, the first of them what the last
        // resume needed first.
        let at = |mib: u64| packed.chunks.iter().position(|c| c.offset == mib << 20).unwrap() as u32;
        let (first, later) = (at(4), at(63));
        let d = dir(&sandbox);
        std::fs::create_dir_all(d.join(MNT)).unwrap();
        cove_blob::fetch_packed(&store, "images/x", &packed, &d.join(BLOB)).await.unwrap();
        let table =
            LazyTable { image: "images/x".into(), file: packed, hot: vec![later, first], first: vec![first] };
        std::fs::write(d.join(TABLE), serde_json::to_vec(&table).unwrap()).unwrap();

        let served = {
            let sandbox = sandbox.clone();
            std::thread::spawn(move || serve(&sandbox))
        };
        let path = ram_path(&sandbox);
        wait_for(|| mounted(&d.join(MNT)));
        assert!(is_lazy(&sandbox));
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        wait_for(|| !mounted(&d.join(MNT)));
        assert!(!mounted(&d.join(MNT)), "the mount is detached once the file is open");
        assert_eq!(file.metadata().unwrap().ino(), INODE);
        // The working set reaches the page cache unasked, and nothing else does.
        wait_for(|| in_page_cache(&file) >= 2 << 20);
        assert_eq!(in_page_cache(&file), 2 << 20, "the hot chunks alone are in the page cache");
        let mut got = vec![0u8; 64 << 20];
        file.read_exact_at(&mut got, 0).unwrap();
        assert!(got == std::fs::read(&src).unwrap(), "the file reads as the packed RAM");
        assert!(file.write_all_at(b"x", 0).is_err(), "nothing is written to it");
        // A capture starts from the copy the server unpacked in the background, or unpacks.
        let out = tmp.path().join("out");
        wait_for(|| unpacked_path(&sandbox, "images/x").exists());
        assert!(!unpack(&sandbox, &out).await.unwrap(), "the background copy is taken");
        assert!(std::fs::read(&out).unwrap() == got);
        assert!(unpack(&sandbox, &out).await.unwrap(), "unpacked now when there is none");
        assert!(std::fs::read(&out).unwrap() == got);
        drop(file);
        let ended = tokio::task::spawn_blocking(move || served.join().unwrap()).await.unwrap();
        assert!(ended.is_ok(), "{ended:?}");
        remove(&sandbox);
        assert!(!d.exists());
    }

    #[test]
    fn chunks_are_pushed_from_both_ends_in_turn() {
        assert_eq!(both_ends(&[1, 2, 3, 4, 5]).collect::<Vec<_>>(), [5, 1, 4, 2, 3]);
        assert_eq!(both_ends(&[1, 2]).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(both_ends::<u32>(&[]).count(), 0);
    }

    #[test]
    fn what_the_last_resume_needed_is_pushed_first() {
        assert_eq!(push_order(&[9, 2, 5], &[]), (vec![2, 5, 9], vec![]), "all at once when not known");
        assert_eq!(push_order(&[9, 2, 5, 7], &[7, 2, 7]), (vec![2, 7], vec![5, 9]));
        assert_eq!(push_order(&[2], &[2, 4]), (vec![2, 4], vec![]), "a first chunk not in hot still goes");
    }

    /// Waits up to 10 s for `cond`.
    fn wait_for(cond: impl Fn() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Bytes of `file` in the page cache (`fincore`, util-linux, through this process's fd: the
    /// file's mount is detached).
    fn in_page_cache(file: &std::fs::File) -> u64 {
        use std::os::fd::AsRawFd;
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
            .arg(format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}
