//! The image codec: a sparse file ⇄ one compact blob, plus the manifest that commits an image.
//!
//! Guest RAM files are 512 MiB–2 GiB on tmpfs but the guest has typically touched a fraction of
//! that, and qcow2 overlays are mostly holes too. Pausing and resuming must be fast, so:
//!
//! - **Only data is read.** `SEEK_DATA`/`SEEK_HOLE` find the allocated extents; the file is cut
//!   into aligned [`CHUNK_SIZE`] chunks and only chunks touching data are read. Chunks that are
//!   all zeros (pages the guest zeroed, or tmpfs pages written with zeros) are not stored.
//! - **Cheap compression, on every core.** Each stored chunk is one lz4 block (raw when lz4 does
//!   not make it smaller, flagged by `stored_len == len`) with a crc32 of its uncompressed
//!   bytes. The block codec is the reference library (liblz4, through the `lz4` crate): on
//!   these machines it decodes ~2.4× faster than the pure-Rust `lz4_flex`, and a cold resume
//!   decodes its working set while QEMU starts. Workers on a `std::thread::scope` read and
//!   compress chunks in parallel; the async side puts them back in order and streams them to
//!   the store (a multipart upload for large blobs), so memory stays bounded (about 64 MiB)
//!   whatever the file size.
//! - **The blob is just the chunks back to back.** The chunk table lives in [`PackedFile`],
//!   which the caller keeps in the image's manifest; a chunk's place in the blob is the sum of
//!   the `stored_len`s before it.
//! - **Unpack writes only non-zero pages.** The destination is recreated full size with holes
//!   everywhere, the blob is fetched in ranged reads that are decoded and verified in parallel,
//!   and only 4 KiB pages with data are written, so a restored tmpfs file allocates what the
//!   guest used and no more. Any mismatch (size, chunk table, lz4 stream, crc32) is a
//!   [`BlobError::Corrupt`] naming the file and chunk, never a panic.
//!
//! The manifest (`<prefix>/manifest.json`) is written last: an image without one is an
//! unfinished write and is ignored (and can be deleted) by whoever finds it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::store::{join_key, object_path};
use crate::{sys, BlobError, BlobStore};

/// Size of a chunk (the last one of a file may be shorter). Chunks are aligned to it.
pub const CHUNK_SIZE: u64 = 1 << 20;
/// Name of an image's manifest under its prefix.
pub const MANIFEST: &str = "manifest.json";

/// Unit of the zero check on unpack: pages that are all zeros are left as holes.
const PAGE: usize = 4096;
/// Multipart part size (S3 wants at least 5 MiB but the last). Blobs smaller than this are
/// written with one plain put.
const PART_SIZE: usize = 8 << 20;
/// Parts uploading at once.
const UPLOAD_CONCURRENCY: usize = 4;
/// How far (in chunks) the compression workers may run ahead of the upload.
const WINDOW: usize = 16;
/// Upper bound of one ranged read on unpack.
const MAX_FETCH: u64 = 8 << 20;

/// One file packed into a blob: its logical size and where its data chunks are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PackedFile {
    /// Blob name under the image prefix (the blob's key is `<prefix>/<name>`).
    pub name: String,
    /// Logical length of the file.
    pub size: u64,
    /// Length of the blob: the sum of the chunks' `stored_len`.
    pub stored_bytes: u64,
    /// Uncompressed bytes of the stored chunks (what unpacking reads back at most).
    pub data_bytes: u64,
    /// The stored chunks in file order; everything else is zeros.
    pub chunks: Vec<Chunk>,
}

/// A stored chunk of a [`PackedFile`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Chunk {
    /// Offset in the file, a multiple of [`CHUNK_SIZE`].
    pub offset: u64,
    /// Uncompressed length (`CHUNK_SIZE` except at the end of the file).
    pub len: u32,
    /// Length in the blob; equal to `len` when stored raw, smaller when an lz4 block.
    pub stored_len: u32,
    /// crc32 (IEEE) of the uncompressed bytes.
    pub crc32: u32,
    /// crc32 of the bytes as stored, for an lz4 block (a raw chunk's is `crc32`): the blob can
    /// be checked without decoding it. Absent in images packed before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_crc32: Option<u32>,
}

/// Packs `path` into the blob `<prefix>/<name>` and describes it. Holes and all-zero chunks
/// are not stored; the rest is lz4-compressed in parallel and streamed to the store in order.
/// The blob is durable when this returns (see [`crate::store`]); the caller records the returned
/// [`PackedFile`] in its manifest.
pub async fn pack_file(
    store: &BlobStore,
    prefix: &str,
    name: &str,
    path: &Path,
) -> Result<PackedFile, BlobError> {
    let key = join_key(prefix, name);
    let location = object_path(&key)?;
    let owned_path = path.to_path_buf();
    let (file, size, chunk_offsets) = tokio::task::spawn_blocking(move || scan(&owned_path))
        .await
        .expect("scanning a file to pack panicked")?;

    let shared = Arc::new(Shared {
        file,
        path: path.to_path_buf(),
        size,
        offsets: chunk_offsets,
        next: AtomicUsize::new(0),
        committed: Mutex::new(0),
        advanced: Condvar::new(),
        stop: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::channel(WINDOW);
    let workers = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || compress_all(&shared, tx))
    };
    // Whatever happens to this future (error, cancellation), the workers stop.
    let stop_guard = StopWorkers(shared.clone());
    let mut upload = Upload::Buffered { parts: Vec::new(), len: 0 };
    let result = collect(store, &key, &location, &shared, rx, &mut upload).await;
    drop(stop_guard);
    workers.await.expect("pack workers panicked");
    match result {
        Ok(chunks) => {
            upload.finish(store, &key, &location).await?;
            let stored_bytes = chunks.iter().map(|c| u64::from(c.stored_len)).sum();
            let data_bytes = chunks.iter().map(|c| u64::from(c.len)).sum();
            Ok(PackedFile { name: name.to_string(), size, stored_bytes, data_bytes, chunks })
        }
        Err(e) => {
            upload.abort().await;
            Err(e)
        }
    }
}

/// Recreates `file` at `dest` from its blob under `prefix`: `dest` is created (or truncated)
/// at the file's full size with holes everywhere, then every chunk is fetched, decoded and
/// checked against its crc32, and only its non-zero 4 KiB pages are written. Returns the
/// number of bytes written. On error `dest`'s content is unspecified (the caller deletes it).
pub async fn unpack_file(
    store: &BlobStore,
    prefix: &str,
    file: &PackedFile,
    dest: &Path,
) -> Result<u64, BlobError> {
    let key = join_key(prefix, &file.name);
    let location = object_path(&key)?;
    check_chunk_table(file)?;

    let out = {
        let dest = dest.to_path_buf();
        let size = file.size;
        tokio::task::spawn_blocking(move || {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&dest)
                .map_err(io_error("creating", &dest))?;
            f.set_len(size).map_err(io_error("resizing", &dest))?;
            Ok::<_, BlobError>(f)
        })
        .await
        .expect("creating the unpack destination panicked")?
    };
    if file.chunks.is_empty() {
        return Ok(0);
    }

    // A blob of the wrong length is caught here, before anything is decoded.
    let meta = store.object_store().head(&location).await.map_err(|e| store.error("head", &key, e))?;
    if meta.size != file.stored_bytes {
        return Err(BlobError::Corrupt {
            file: file.name.clone(),
            offset: 0,
            reason: format!("blob {key:?} is {} bytes, expected {}", meta.size, file.stored_bytes),
        });
    }

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let groups = fetch_groups(&file.chunks, file.stored_bytes, cores);
    let out = Arc::new(out);
    let dest = Arc::new(dest.to_path_buf());
    let name: Arc<str> = file.name.as_str().into();
    let chunks: Arc<[Chunk]> = file.chunks.as_slice().into();
    futures::stream::iter(groups)
        .map(|group| {
            let (store, key, location) = (store.clone(), key.clone(), location.clone());
            let (out, dest, name, chunks) = (out.clone(), dest.clone(), name.clone(), chunks.clone());
            async move {
                let data = store
                    .object_store()
                    .get_range(&location, group.blob.clone())
                    .await
                    .map_err(|e| store.error("get", &key, e))?;
                tokio::task::spawn_blocking(move || {
                    decode_group(&name, &chunks[group.chunks.clone()], group.blob, &data, &out, &dest)
                })
                .await
                .expect("decoding chunks panicked")
            }
        })
        .buffer_unordered(cores + 2)
        .try_fold(0u64, |total, written| async move { Ok(total + written) })
        .await
}

/// Writes `m` as `<prefix>/manifest.json`. Write it last: its presence is what says the image
/// is complete.
pub async fn write_manifest<T: Serialize>(store: &BlobStore, prefix: &str, m: &T) -> Result<(), BlobError> {
    let key = join_key(prefix, MANIFEST);
    let json =
        serde_json::to_vec_pretty(m).map_err(|source| BlobError::Manifest { key: key.clone(), source })?;
    store.put(&key, Bytes::from(json)).await
}

/// Reads `<prefix>/manifest.json`; `None` when there is none (no image, or an unfinished one).
pub async fn read_manifest<T: DeserializeOwned>(
    store: &BlobStore,
    prefix: &str,
) -> Result<Option<T>, BlobError> {
    let key = join_key(prefix, MANIFEST);
    let json = match store.get(&key).await {
        Ok(json) => json,
        Err(BlobError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&json).map(Some).map_err(|source| BlobError::Manifest { key, source })
}

// ---- packing ----

/// Opens the file and lists the offsets of the chunks that overlap data extents.
fn scan(path: &Path) -> Result<(File, u64, Vec<u64>), BlobError> {
    let io = |op| io_error(op, path);
    let file = File::open(path).map_err(io("opening"))?;
    let size = file.metadata().map_err(io("stat"))?.len();
    let mut offsets: Vec<u64> = Vec::new();
    let mut add_extent = |start: u64, end: u64| {
        let mut chunk = start - start % CHUNK_SIZE;
        while chunk < end {
            if offsets.last() != Some(&chunk) {
                offsets.push(chunk);
            }
            chunk += CHUNK_SIZE;
        }
    };
    let mut pos = 0;
    while pos < size {
        let data = match sys::seek_data(&file, pos) {
            Ok(Some(data)) => data,
            Ok(None) => break,
            // A filesystem without SEEK_DATA: everything is data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                add_extent(pos, size);
                break;
            }
            Err(e) => return Err(io("seeking data in")(e)),
        };
        if data >= size {
            break;
        }
        let hole = sys::seek_hole(&file, data).map_err(io("seeking a hole in"))?.clamp(data + 1, size);
        add_extent(data, hole);
        pos = hole;
    }
    Ok((file, size, offsets))
}

/// State shared by the compression workers and the collecting task.
struct Shared {
    file: File,
    path: PathBuf,
    size: u64,
    /// Offsets of the chunks to look at, ascending.
    offsets: Vec<u64>,
    /// Index (into `offsets`) of the next chunk a worker should take.
    next: AtomicUsize,
    /// How many chunks (a prefix of `offsets`) the collector has handed to the upload.
    committed: Mutex<usize>,
    advanced: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _guard = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        self.advanced.notify_all();
    }
}

struct StopWorkers(Arc<Shared>);

impl Drop for StopWorkers {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A chunk's fate: not stored (all zeros), or stored as these bytes.
enum Piece {
    Zero,
    Stored(Chunk, Bytes),
}

type Message = (usize, Result<Piece, BlobError>);

/// Runs one worker per core (this thread included) until every chunk is done or told to stop.
fn compress_all(shared: &Shared, tx: mpsc::Sender<Message>) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers = cores.min(shared.offsets.len().max(1));
    std::thread::scope(|scope| {
        for _ in 1..workers {
            let tx = tx.clone();
            scope.spawn(move || compress_worker(shared, &tx));
        }
        compress_worker(shared, &tx);
    });
}

fn compress_worker(shared: &Shared, tx: &mpsc::Sender<Message>) {
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    let bound = lz4::block::compress_bound(CHUNK_SIZE as usize).expect("a chunk is small");
    let mut out = vec![0u8; bound];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let i = shared.next.fetch_add(1, Ordering::SeqCst);
        if i >= shared.offsets.len() {
            return;
        }
        // Stay within WINDOW chunks of the upload, so memory does not grow with the file.
        {
            let mut committed = shared.committed.lock().unwrap_or_else(|e| e.into_inner());
            while i >= *committed + WINDOW && !shared.stop.load(Ordering::SeqCst) {
                committed = shared.advanced.wait(committed).unwrap_or_else(|e| e.into_inner());
            }
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let piece = compress_chunk(shared, shared.offsets[i], &mut buf, &mut out);
        let failed = piece.is_err();
        if tx.blocking_send((i, piece)).is_err() || failed {
            return;
        }
    }
}

fn compress_chunk(shared: &Shared, offset: u64, buf: &mut [u8], out: &mut [u8]) -> Result<Piece, BlobError> {
    let len = CHUNK_SIZE.min(shared.size - offset) as usize;
    let data = &mut buf[..len];
    shared.file.read_exact_at(data, offset).map_err(io_error("reading", &shared.path))?;
    if data.chunks(PAGE).all(is_zero) {
        return Ok(Piece::Zero);
    }
    let crc32 = crc32fast::hash(data);
    // `out` has room for the worst case, so this cannot fail; if it did, store the chunk raw.
    let compressed = lz4::block::compress_to_buffer(data, None, false, out).unwrap_or(len);
    let stored = if compressed < len {
        Bytes::copy_from_slice(&out[..compressed])
    } else {
        Bytes::copy_from_slice(data)
    };
    let stored_crc32 = (stored.len() < len).then(|| crc32fast::hash(&stored));
    let chunk = Chunk { offset, len: len as u32, stored_len: stored.len() as u32, crc32, stored_crc32 };
    Ok(Piece::Stored(chunk, stored))
}

/// Receives the workers' chunks, puts them back in file order and feeds them to the upload.
async fn collect(
    store: &BlobStore,
    key: &str,
    location: &ObjectPath,
    shared: &Shared,
    mut rx: mpsc::Receiver<Message>,
    upload: &mut Upload,
) -> Result<Vec<Chunk>, BlobError> {
    let mut chunks = Vec::new();
    let mut waiting: BTreeMap<usize, Piece> = BTreeMap::new();
    let mut next = 0;
    while next < shared.offsets.len() {
        let Some((i, piece)) = rx.recv().await else {
            // Workers stop early only after sending an error, which returned above.
            let stopped = std::io::Error::other("compression workers stopped early");
            return Err(io_error("packing", &shared.path)(stopped));
        };
        waiting.insert(i, piece?);
        while let Some(piece) = waiting.remove(&next) {
            if let Piece::Stored(chunk, bytes) = piece {
                chunks.push(chunk);
                upload.put(store, key, location, bytes).await?;
            }
            next += 1;
        }
        *shared.committed.lock().unwrap_or_else(|e| e.into_inner()) = next;
        shared.advanced.notify_all();
    }
    Ok(chunks)
}

/// The blob being written: held in memory while it is smaller than one part (then written
/// with a single put), a multipart upload once it is not.
enum Upload {
    Buffered { parts: Vec<Bytes>, len: usize },
    Multipart(WriteMultipart),
}

impl Upload {
    async fn put(
        &mut self,
        store: &BlobStore,
        key: &str,
        location: &ObjectPath,
        bytes: Bytes,
    ) -> Result<(), BlobError> {
        match self {
            Upload::Buffered { parts, len } => {
                *len += bytes.len();
                parts.push(bytes);
                if *len >= PART_SIZE {
                    let multipart = store
                        .object_store()
                        .put_multipart(location)
                        .await
                        .map_err(|e| store.error("starting upload of", key, e))?;
                    let mut writer = WriteMultipart::new_with_chunk_size(multipart, PART_SIZE);
                    for part in parts.drain(..) {
                        writer.put(part);
                    }
                    *self = Upload::Multipart(writer);
                }
            }
            Upload::Multipart(writer) => {
                writer.wait_for_capacity(UPLOAD_CONCURRENCY).await.map_err(|e| store.error("put", key, e))?;
                writer.put(bytes);
            }
        }
        Ok(())
    }

    async fn finish(self, store: &BlobStore, key: &str, location: &ObjectPath) -> Result<(), BlobError> {
        match self {
            Upload::Buffered { parts, .. } => {
                store
                    .object_store()
                    .put(location, PutPayload::from_iter(parts))
                    .await
                    .map_err(|e| store.error("put", key, e))?;
            }
            Upload::Multipart(writer) => {
                writer.finish().await.map_err(|e| store.error("completing upload of", key, e))?;
            }
        }
        Ok(())
    }

    async fn abort(self) {
        if let Upload::Multipart(writer) = self {
            if let Err(e) = writer.abort().await {
                tracing::warn!("aborting a multipart upload: {e}");
            }
        }
    }
}

// ---- unpacking ----

/// Refuses a chunk table that could not have come from [`pack_file`] (before any allocation or
/// write depends on it).
fn check_chunk_table(file: &PackedFile) -> Result<(), BlobError> {
    let corrupt = |offset, reason: String| BlobError::Corrupt { file: file.name.clone(), offset, reason };
    let mut end = 0;
    let (mut stored, mut data) = (0u64, 0u64);
    for c in &file.chunks {
        if c.offset % CHUNK_SIZE != 0 || c.offset < end {
            return Err(corrupt(c.offset, "chunk misaligned or out of order".into()));
        }
        if c.len == 0 || u64::from(c.len) > CHUNK_SIZE || c.offset + u64::from(c.len) > file.size {
            return Err(corrupt(c.offset, format!("bad chunk length {} (file size {})", c.len, file.size)));
        }
        if c.stored_len == 0 || c.stored_len > c.len {
            return Err(corrupt(c.offset, format!("bad stored length {} for {} bytes", c.stored_len, c.len)));
        }
        end = c.offset + u64::from(c.len);
        stored += u64::from(c.stored_len);
        data += u64::from(c.len);
    }
    if stored != file.stored_bytes || data != file.data_bytes {
        return Err(corrupt(
            0,
            format!(
                "chunk table adds up to {stored} stored / {data} data bytes, file says {} / {}",
                file.stored_bytes, file.data_bytes
            ),
        ));
    }
    Ok(())
}

/// A run of consecutive chunks fetched with one ranged read.
struct Group {
    blob: Range<u64>,
    chunks: Range<usize>,
}

/// Cuts the chunk list into ranged reads: at most [`MAX_FETCH`] each, and small enough that
/// every core gets a couple to decode.
fn fetch_groups(chunks: &[Chunk], stored_bytes: u64, cores: usize) -> Vec<Group> {
    let target = (stored_bytes / (2 * cores as u64)).clamp(CHUNK_SIZE, MAX_FETCH);
    let mut groups = Vec::new();
    let (mut start, mut first, mut pos) = (0u64, 0usize, 0u64);
    for (i, c) in chunks.iter().enumerate() {
        pos += u64::from(c.stored_len);
        if pos - start >= target || i + 1 == chunks.len() {
            groups.push(Group { blob: start..pos, chunks: first..i + 1 });
            start = pos;
            first = i + 1;
        }
    }
    groups
}

/// Decodes, verifies and writes one fetched group; returns the bytes written.
fn decode_group(
    name: &str,
    chunks: &[Chunk],
    blob: Range<u64>,
    data: &[u8],
    out: &File,
    dest: &Path,
) -> Result<u64, BlobError> {
    let corrupt = |offset, reason: String| BlobError::Corrupt { file: name.to_string(), offset, reason };
    let expected = blob.end - blob.start;
    if data.len() as u64 != expected {
        let first = chunks.first().map_or(0, |c| c.offset);
        return Err(corrupt(
            first,
            format!("read {} bytes at blob offset {}, expected {expected}", data.len(), blob.start),
        ));
    }
    let mut buf = Vec::new();
    let mut pos = 0usize;
    let mut written = 0;
    for c in chunks {
        let stored = &data[pos..pos + c.stored_len as usize];
        pos += c.stored_len as usize;
        let plain = decode_chunk(name, c, stored, &mut buf)?;
        written += write_nonzero_pages(out, c.offset, plain).map_err(io_error("writing", dest))?;
    }
    Ok(written)
}

/// Decodes one stored chunk (into `buf` unless it was stored raw) and checks its crc32.
fn decode_chunk<'a>(
    name: &str,
    c: &Chunk,
    stored: &'a [u8],
    buf: &'a mut Vec<u8>,
) -> Result<&'a [u8], BlobError> {
    let plain = if c.stored_len == c.len {
        stored
    } else {
        buf.resize(c.len as usize, 0);
        decompress(name, c, stored, buf)?;
        &buf[..]
    };
    check_crc(name, c, plain)?;
    Ok(plain)
}

/// Decodes the lz4 block `stored` of chunk `c` into `plain` (`c.len` bytes).
fn decompress(name: &str, c: &Chunk, stored: &[u8], plain: &mut [u8]) -> Result<(), BlobError> {
    let corrupt = |reason: String| BlobError::Corrupt { file: name.to_string(), offset: c.offset, reason };
    let len = c.len as usize;
    let n = lz4::block::decompress_to_buffer(stored, Some(len as i32), &mut plain[..len])
        .map_err(|e| corrupt(format!("lz4: {e}")))?;
    if n != len {
        return Err(corrupt(format!("decoded {n} bytes, expected {len}")));
    }
    Ok(())
}

fn check_crc(name: &str, c: &Chunk, plain: &[u8]) -> Result<(), BlobError> {
    let crc32 = crc32fast::hash(plain);
    if crc32 != c.crc32 {
        return Err(BlobError::Corrupt {
            file: name.to_string(),
            offset: c.offset,
            reason: format!("crc32 {crc32:08x}, expected {:08x}", c.crc32),
        });
    }
    Ok(())
}

// ---- random access ----

/// Puts the blob of `file` (under `prefix`) at `dest` as it is stored, for a [`PackedReader`]:
/// a hard link when the store is a local directory on the same filesystem, else a copy or a
/// download. Nothing is decoded.
pub async fn fetch_packed(
    store: &BlobStore,
    prefix: &str,
    file: &PackedFile,
    dest: &Path,
) -> Result<(), BlobError> {
    let key = join_key(prefix, &file.name);
    let _ = std::fs::remove_file(dest);
    if let Some(src) = store.local_file(&key) {
        let linked = std::fs::hard_link(&src, dest).or_else(|_| std::fs::copy(&src, dest).map(drop));
        return match linked {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BlobError::NotFound(key)),
            other => other.map_err(io_error("copying a blob to", dest)),
        };
    }
    let location = object_path(&key)?;
    let get = store.object_store().get(&location).await.map_err(|e| store.error("get", &key, e))?;
    let mut body = get.into_stream();
    let mut out = tokio::fs::File::create(dest).await.map_err(io_error("creating", dest))?;
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| store.error("get", &key, e))?;
        tokio::io::AsyncWriteExt::write_all(&mut out, &piece).await.map_err(io_error("writing", dest))?;
    }
    tokio::io::AsyncWriteExt::flush(&mut out).await.map_err(io_error("writing", dest))?;
    Ok(())
}

/// Random access to a packed file whose blob is a local file (see [`fetch_packed`]): any chunk
/// can be decoded on its own, so a reader can serve the file's bytes without unpacking it.
pub struct PackedReader {
    blob: File,
    file: PackedFile,
    /// Where each chunk starts in the blob.
    starts: Vec<u64>,
}

impl PackedReader {
    /// Opens `blob`, after checking `file`'s chunk table and the blob's length against it.
    pub fn open(blob: &Path, file: PackedFile) -> Result<PackedReader, BlobError> {
        check_chunk_table(&file)?;
        let f = File::open(blob).map_err(io_error("opening", blob))?;
        let len = f.metadata().map_err(io_error("stat", blob))?.len();
        if len != file.stored_bytes {
            return Err(BlobError::Corrupt {
                file: file.name.clone(),
                offset: 0,
                reason: format!("blob {} is {len} bytes, expected {}", blob.display(), file.stored_bytes),
            });
        }
        let starts = file
            .chunks
            .iter()
            .scan(0u64, |pos, c| {
                let start = *pos;
                *pos += u64::from(c.stored_len);
                Some(start)
            })
            .collect();
        Ok(PackedReader { blob: f, file, starts })
    }

    pub fn file(&self) -> &PackedFile {
        &self.file
    }

    /// The stored chunk holding byte `offset`, if any (every other byte is zero).
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        let i = self.file.chunks.partition_point(|c| c.offset + u64::from(c.len) <= offset);
        self.file.chunks.get(i).filter(|c| c.offset <= offset).map(|_| i)
    }

    /// The first stored chunk at or after byte `offset`.
    pub fn next_chunk(&self, offset: u64) -> Option<usize> {
        let i = self.file.chunks.partition_point(|c| c.offset + u64::from(c.len) <= offset);
        (i < self.file.chunks.len()).then_some(i)
    }

    /// Writes the whole file into `out` (as long as the file, holes everywhere): every chunk
    /// decoded and checked in turn, only its non-zero pages written. Returns the bytes written.
    pub fn unpack_into(&self, out: &File, out_path: &Path) -> Result<u64, BlobError> {
        let mut buf = Vec::new();
        let mut written = 0;
        for (i, c) in self.file.chunks.iter().enumerate() {
            self.decode(i, &mut buf)?;
            written += write_nonzero_pages(out, c.offset, &buf).map_err(io_error("writing", out_path))?;
        }
        Ok(written)
    }

    /// Checks every chunk against its crc32, writing nothing: whether the whole file is as it
    /// was packed. A chunk is checked as stored where its image recorded that crc32, in place in
    /// a mapping of the blob (on one core: a resume runs this while QEMU starts, on a host that
    /// may have two, and copying the chunks out cost more than their crc32), else decoded.
    pub fn verify(&self) -> Result<(), BlobError> {
        let map = crate::sys::Mapping::read_only(&self.blob, self.file.stored_bytes)
            .map_err(|e| self.corrupt(0, format!("mapping the blob: {e}")))?;
        let mut buf = Vec::new();
        for (i, c) in self.file.chunks.iter().enumerate() {
            let want = match c.stored_crc32 {
                Some(crc) => crc,
                None if c.stored_len == c.len => c.crc32,
                None => {
                    self.decode(i, &mut buf)?;
                    continue;
                }
            };
            let start = self.starts[i] as usize;
            let got = crc32fast::hash(&map.bytes()[start..start + c.stored_len as usize]);
            if got != want {
                return Err(self.corrupt(c.offset, format!("stored crc32 {got:08x}, expected {want:08x}")));
            }
        }
        Ok(())
    }

    fn corrupt(&self, offset: u64, reason: String) -> BlobError {
        BlobError::Corrupt { file: self.file.name.clone(), offset, reason }
    }

    /// Decodes chunk `i` into `out` (which ends up `chunks[i].len` long), checked. The stored
    /// bytes are read into `out` too, behind the decoded ones: a buffer used again costs no
    /// allocation (a fresh MiB is a fault per page, as dear as the decoding).
    pub fn decode(&self, i: usize, out: &mut Vec<u8>) -> Result<(), BlobError> {
        let c = &self.file.chunks[i];
        let (len, raw) = (c.len as usize, c.stored_len == c.len);
        out.resize(if raw { len } else { len + c.stored_len as usize }, 0);
        let (plain, stored) = out.split_at_mut(len);
        self.blob.read_exact_at(if raw { plain } else { stored }, self.starts[i]).map_err(|e| {
            BlobError::Corrupt {
                file: self.file.name.clone(),
                offset: c.offset,
                reason: format!("reading the blob: {e}"),
            }
        })?;
        if !raw {
            decompress(&self.file.name, c, stored, plain)?;
        }
        out.truncate(len);
        check_crc(&self.file.name, c, out)
    }
}

/// Writes the runs of non-zero pages of `data` (which belongs at `offset`); zero pages stay holes.
fn write_nonzero_pages(out: &File, offset: u64, data: &[u8]) -> std::io::Result<u64> {
    let mut written = 0;
    let mut run: Option<usize> = None;
    for (i, page) in data.chunks(PAGE).enumerate() {
        let start = i * PAGE;
        match (is_zero(page), run) {
            (false, None) => run = Some(start),
            (true, Some(from)) => {
                out.write_all_at(&data[from..start], offset + from as u64)?;
                written += (start - from) as u64;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(from) = run {
        out.write_all_at(&data[from..], offset + from as u64)?;
        written += (data.len() - from) as u64;
    }
    Ok(written)
}

/// Whether every byte is zero (an OR-reduction, which the compiler vectorizes).
fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |acc, &b| acc | b) == 0
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BlobError + 'a {
    move |source| BlobError::Io { op, path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use rand::{RngCore, SeedableRng};

    use super::*;

    const MIB: u64 = 1 << 20;

    fn local() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&format!("{}/blobs", dir.path().display())).unwrap();
        (dir, store)
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    fn write_at(path: &Path, offset: u64, data: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(data, offset).unwrap();
    }

    /// A sparse file with data at odd offsets, text and random bytes, an allocated all-zero
    /// chunk in the middle of a data extent, and a size that is not a multiple of the chunk.
    fn sparse_file(path: &Path) -> u64 {
        let size = 9 * MIB + 12345;
        File::create(path).unwrap().set_len(size).unwrap();
        write_at(path, 4097, b"hello from an odd offset");
        // One extent from 2 MiB + 100 to 5 MiB + 10: random, then the whole chunk at 3 MiB
        // zero (allocated, but nothing to store), then text.
        let mut extent = vec![0u8; (3 * MIB - 90) as usize];
        let (random_part, rest) = extent.split_at_mut((MIB - 100) as usize);
        random_part.copy_from_slice(&random(random_part.len(), 1));
        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(30_000);
        let tail = &mut rest[MIB as usize..];
        tail.copy_from_slice(&text[..tail.len()]);
        write_at(path, 2 * MIB + 100, &extent);
        // Data that ends exactly at the (unaligned) end of the file.
        write_at(path, size - 3000, &random(3000, 2));
        size
    }

    #[tokio::test]
    async fn sparse_round_trip() {
        let (dir, store) = local();
        let src = dir.path().join("ram");
        let size = sparse_file(&src);

        let packed = pack_file(&store, "images/one", "ram", &src).await.unwrap();
        assert_eq!(packed.name, "ram");
        assert_eq!(packed.size, size);
        let offsets: Vec<u64> = packed.chunks.iter().map(|c| c.offset).collect();
        assert_eq!(offsets, [0, 2 * MIB, 4 * MIB, 5 * MIB, 9 * MIB], "zero chunk at 3 MiB skipped");
        assert_eq!(packed.chunks.last().unwrap().len, 12345);
        assert_eq!(packed.data_bytes, 4 * MIB + 12345);
        let blob = store.get("images/one/ram").await.unwrap();
        assert_eq!(blob.len() as u64, packed.stored_bytes);
        // Text compresses, random bytes are stored raw.
        assert!(packed.chunks.iter().any(|c| c.stored_len < c.len / 4));
        assert!(packed.chunks.iter().any(|c| c.stored_len == c.len));

        let dest = dir.path().join("restored");
        std::fs::write(&dest, vec![0xffu8; 100_000]).unwrap(); // replaced, not merged
        let written = unpack_file(&store, "images/one", &packed, &dest).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&src).unwrap());
        assert!(written <= packed.data_bytes);
        let allocated = std::fs::metadata(&dest).unwrap().blocks() * 512;
        assert!(
            allocated <= written + 64 * 1024,
            "dest not sparse: {allocated} bytes allocated for {written} written"
        );
        // Only non-zero pages are written: at most 2 pages of the 4 KiB at 4097 etc.
        assert!(written < 3 * MIB, "{written}");
    }

    /// A packed file read chunk by chunk from a local copy of its blob is the file, from a local
    /// store (a hard link) and through a ranged-read store alike; a damaged copy is refused.
    #[tokio::test]
    async fn a_local_copy_reads_chunk_by_chunk() {
        let (dir, store) = local();
        let src = dir.path().join("ram");
        let size = sparse_file(&src);
        let packed = pack_file(&store, "images/one", "ram", &src).await.unwrap();
        let want = std::fs::read(&src).unwrap();
        let remote = BlobStore::from_object_store(store.object_store().clone(), "not local");
        for (i, store) in [store, remote].iter().enumerate() {
            let copy = dir.path().join(format!("copy{i}"));
            fetch_packed(store, "images/one", &packed, &copy).await.unwrap();
            let reader = PackedReader::open(&copy, packed.clone()).unwrap();
            let mut got = vec![0u8; size as usize];
            let mut buf = Vec::new();
            let mut at = 0;
            while let Some(c) = reader.next_chunk(at) {
                let chunk = reader.file().chunks[c];
                assert_eq!(reader.chunk_at(chunk.offset + 17), Some(c));
                reader.decode(c, &mut buf).unwrap();
                got[chunk.offset as usize..][..buf.len()].copy_from_slice(&buf);
                at = chunk.offset + u64::from(chunk.len);
            }
            assert!(got == want, "read {i}: the chunks make the file");
            let out = dir.path().join(format!("out{i}"));
            let f = File::create(&out).unwrap();
            f.set_len(size).unwrap();
            assert!(reader.unpack_into(&f, &out).unwrap() <= packed.data_bytes);
            assert!(std::fs::read(&out).unwrap() == want, "unpacked {i}: the file");
            assert_eq!(reader.chunk_at(3 * MIB + 5), None, "a zero chunk is no stored chunk");
            assert_eq!(reader.next_chunk(3 * MIB), Some(2));
            assert_eq!(reader.next_chunk(size), None);
        }
        // A flipped byte in any chunk, raw or lz4, is found by a verification, naming its
        // chunk: checked as stored, and decoded for an image without the stored crc32s.
        let copy = dir.path().join("copy0");
        let kinds = |p: &PackedFile| p.chunks.iter().map(|c| c.stored_crc32.is_some()).collect::<Vec<_>>();
        assert!(kinds(&packed).contains(&true) && kinds(&packed).contains(&false), "{:?}", packed.chunks);
        let mut older = packed.clone();
        older.chunks.iter_mut().for_each(|c| c.stored_crc32 = None);
        let good = std::fs::read(&copy).unwrap();
        for file in [packed.clone(), older] {
            let reader = PackedReader::open(&copy, file.clone()).unwrap();
            reader.verify().unwrap();
            let mut start = 0;
            for c in &file.chunks {
                let mut bytes = good.clone();
                bytes[start + c.stored_len as usize / 2] ^= 0x5a;
                std::fs::write(&copy, &bytes).unwrap();
                match reader.verify() {
                    Err(BlobError::Corrupt { offset, .. }) => assert_eq!(offset, c.offset),
                    other => panic!("a flipped byte in the chunk at {}: {other:?}", c.offset),
                }
                start += c.stored_len as usize;
            }
            std::fs::write(&copy, &good).unwrap();
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .unwrap()
            .set_len(packed.stored_bytes - 1)
            .unwrap();
        assert!(matches!(PackedReader::open(&copy, packed.clone()), Err(BlobError::Corrupt { .. })));
        let missing = fetch_packed(&local().1, "images/none", &packed, &dir.path().join("x")).await;
        assert!(matches!(missing, Err(BlobError::NotFound(_))), "{missing:?}");
    }

    #[tokio::test]
    async fn dense_file_across_many_parts() {
        // Larger than a multipart part, size not a multiple of the chunk size.
        let (dir, store) = local();
        let src = dir.path().join("disk");
        let data = random((PART_SIZE as u64 * 2 + MIB / 2 + 7) as usize, 3);
        std::fs::write(&src, &data).unwrap();
        let packed = pack_file(&store, "p", "disk", &src).await.unwrap();
        assert_eq!(packed.chunks.len(), 17);
        assert_eq!(packed.stored_bytes, data.len() as u64);
        let dest = dir.path().join("out");
        let written = unpack_file(&store, "p", &packed, &dest).await.unwrap();
        assert_eq!(written, data.len() as u64);
        assert!(std::fs::read(&dest).unwrap() == data);
    }

    #[tokio::test]
    async fn empty_and_all_hole_files() {
        let (dir, store) = local();
        for (name, size) in [("empty", 0), ("holes", 3 * MIB + 5)] {
            let src = dir.path().join(name);
            File::create(&src).unwrap().set_len(size).unwrap();
            let packed = pack_file(&store, "img", name, &src).await.unwrap();
            assert_eq!((packed.size, packed.stored_bytes, packed.chunks.len()), (size, 0, 0));
            assert!(store.exists(&format!("img/{name}")).await.unwrap());
            let dest = dir.path().join(format!("{name}.out"));
            assert_eq!(unpack_file(&store, "img", &packed, &dest).await.unwrap(), 0);
            let meta = std::fs::metadata(&dest).unwrap();
            assert_eq!((meta.len(), meta.blocks()), (size, 0));
        }
    }

    #[tokio::test]
    async fn corrupted_blob_is_detected() {
        let (dir, store) = local();
        let src = dir.path().join("ram");
        sparse_file(&src);
        let packed = pack_file(&store, "img", "ram", &src).await.unwrap();
        let blob_path = dir.path().join("blobs/img/ram");
        let dest = dir.path().join("out");
        let original = std::fs::read(&blob_path).unwrap();

        // One flipped byte in each chunk (raw or lz4) is caught, and the error names the chunk.
        let mut pos = 0;
        for chunk in &packed.chunks {
            let mut bad = original.clone();
            bad[pos + chunk.stored_len as usize / 2] ^= 0x40;
            std::fs::write(&blob_path, &bad).unwrap();
            match unpack_file(&store, "img", &packed, &dest).await {
                Err(BlobError::Corrupt { file, offset, .. }) => {
                    assert_eq!((file.as_str(), offset), ("ram", chunk.offset));
                }
                other => panic!("chunk at {}: expected Corrupt, got {other:?}", chunk.offset),
            }
            pos += chunk.stored_len as usize;
        }

        // A truncated blob is an error, not a panic.
        std::fs::write(&blob_path, &original[..original.len() - 10]).unwrap();
        let err = unpack_file(&store, "img", &packed, &dest).await.unwrap_err();
        assert!(matches!(err, BlobError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("bytes, expected"), "{err}");

        // So is a missing one.
        std::fs::remove_file(&blob_path).unwrap();
        let err = unpack_file(&store, "img", &packed, &dest).await.unwrap_err();
        assert!(matches!(err, BlobError::NotFound(ref k) if k == "img/ram"), "{err}");
    }

    #[tokio::test]
    async fn bad_chunk_tables_are_refused() {
        let (dir, store) = local();
        let src = dir.path().join("ram");
        sparse_file(&src);
        let packed = pack_file(&store, "img", "ram", &src).await.unwrap();
        let dest = dir.path().join("out");
        let tamper: [fn(&mut PackedFile); 5] = [
            |p| p.chunks[1].crc32 ^= 1,
            |p| p.chunks[1].offset += 1,
            |p| p.chunks[0].len = CHUNK_SIZE as u32 + 1,
            |p| p.size = 1,
            |p| p.chunks.swap(0, 1),
        ];
        for (i, change) in tamper.iter().enumerate() {
            let mut bad = packed.clone();
            change(&mut bad);
            let err = unpack_file(&store, "img", &bad, &dest).await.unwrap_err();
            assert!(matches!(err, BlobError::Corrupt { .. }), "tamper {i}: {err}");
        }
    }

    #[tokio::test]
    async fn manifests() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Manifest {
            files: Vec<PackedFile>,
        }
        let (dir, store) = local();
        assert_eq!(read_manifest::<Manifest>(&store, "img").await.unwrap(), None);
        let src = dir.path().join("f");
        std::fs::write(&src, b"some bytes").unwrap();
        let m = Manifest { files: vec![pack_file(&store, "img", "f", &src).await.unwrap()] };
        write_manifest(&store, "img", &m).await.unwrap();
        assert_eq!(read_manifest::<Manifest>(&store, "img").await.unwrap(), Some(m));
        store.put("bad/manifest.json", Bytes::from_static(b"{")).await.unwrap();
        let err = read_manifest::<Manifest>(&store, "bad").await.unwrap_err();
        assert!(matches!(err, BlobError::Manifest { .. }), "{err}");
    }

    #[tokio::test]
    async fn missing_source_file() {
        let (dir, store) = local();
        let err = pack_file(&store, "img", "ram", &dir.path().join("nope")).await.unwrap_err();
        assert!(matches!(err, BlobError::Io { op: "opening", .. }), "{err}");
    }

    /// An ObjectStore whose writes fail, to check that pack_file reports the store's error.
    mod failing {
        use std::fmt;

        use futures::stream::BoxStream;
        use object_store::memory::InMemory;
        use object_store::{
            CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
            PutMultipartOptions, PutOptions, PutResult, Result,
        };

        use super::*;

        #[derive(Debug, Default)]
        pub struct FailingWrites(InMemory);

        impl fmt::Display for FailingWrites {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("FailingWrites")
            }
        }

        fn refused() -> object_store::Error {
            object_store::Error::Generic { store: "test", source: "disk on fire".into() }
        }

        #[async_trait::async_trait]
        impl ObjectStore for FailingWrites {
            async fn put_opts(&self, _: &ObjectPath, _: PutPayload, _: PutOptions) -> Result<PutResult> {
                Err(refused())
            }
            async fn put_multipart_opts(
                &self,
                _: &ObjectPath,
                _: PutMultipartOptions,
            ) -> Result<Box<dyn MultipartUpload>> {
                Err(refused())
            }
            async fn get_opts(&self, location: &ObjectPath, options: GetOptions) -> Result<GetResult> {
                self.0.get_opts(location, options).await
            }
            fn delete_stream(
                &self,
                locations: BoxStream<'static, Result<ObjectPath>>,
            ) -> BoxStream<'static, Result<ObjectPath>> {
                self.0.delete_stream(locations)
            }
            fn list(&self, prefix: Option<&ObjectPath>) -> BoxStream<'static, Result<ObjectMeta>> {
                self.0.list(prefix)
            }
            async fn list_with_delimiter(&self, prefix: Option<&ObjectPath>) -> Result<ListResult> {
                self.0.list_with_delimiter(prefix).await
            }
            async fn copy_opts(
                &self,
                from: &ObjectPath,
                to: &ObjectPath,
                options: CopyOptions,
            ) -> Result<()> {
                self.0.copy_opts(from, to, options).await
            }
        }
    }

    #[tokio::test]
    async fn store_errors_surface() {
        let store = BlobStore::from_object_store(Arc::new(failing::FailingWrites::default()), "failing");
        let dir = tempfile::tempdir().unwrap();
        // Small (one put) and large (multipart) blobs.
        for size in [1000usize, 3 * PART_SIZE] {
            let src = dir.path().join(format!("f{size}"));
            std::fs::write(&src, random(size, 4)).unwrap();
            let err = pack_file(&store, "img", "f", &src).await.unwrap_err();
            assert!(matches!(err, BlobError::Store { .. }), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains("failing") && msg.contains("\"img/f\"") && msg.contains("disk on fire"),
                "{msg}"
            );
        }
    }
}
