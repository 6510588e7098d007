//! [`S3View`]: one mounted bucket (or prefix), answering stat, list and read.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures::channel::oneshot;
use futures::future::{BoxFuture, Either, FutureExt, Shared};
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path;
use object_store::{
    ClientOptions, GetOptions, GetRange, ListResult, ObjectStore, ObjectStoreExt, RetryConfig,
};

use crate::cache::{BlockCache, TtlCache};
use crate::error::{ErrorContext, MountError};

/// The region used when a [`MountSpec`] names none.
pub const DEFAULT_REGION: &str = "us-east-1";

/// S3 returns at most this many keys per list request.
const LIST_PAGE: usize = 1000;

/// What to mount, as the API gives it (validated there; [`S3View::connect`] checks it again).
#[derive(Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub bucket: String,
    /// e.g. `http://127.0.0.1:9000`; requests are path-style, and plain http is allowed.
    pub endpoint: String,
    /// `""` or `"a/b/"`: the key prefix that is the view's root.
    pub prefix: String,
    /// [`DEFAULT_REGION`] when `None`.
    pub region: Option<String>,
    /// `(access key id, secret access key)`; `None` for a public bucket (unsigned requests).
    pub credentials: Option<(String, String)>,
}

/// The secret key is never printed.
impl fmt::Debug for MountSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MountSpec")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("credentials", &self.credentials.as_ref().map(|(id, _)| (id, "<redacted>")))
            .finish()
    }
}

/// Cache and read-ahead settings. The defaults suit a FUSE client issuing 128 KiB reads.
#[derive(Clone, Debug)]
pub struct ViewOptions {
    /// Reads are fetched and cached in aligned blocks of this size (1 MiB).
    pub block_size: u64,
    /// The block cache holds at most this many bytes (64 MiB), least recently used first out.
    pub cache_bytes: u64,
    /// Sequential reads keep up to this many bytes ahead fetched or in flight (16 MiB).
    pub max_readahead: u64,
    /// One GET asks for at most this many bytes (8 MiB).
    pub max_get: u64,
    /// How long listings, directory stats and "not found" answers are trusted (5 s).
    pub list_ttl: Duration,
    /// How long a file's stat (its size) is trusted (30 s).
    pub file_ttl: Duration,
    /// At most this many listings are cached (256).
    pub max_listings: usize,
    /// At most this many stat answers are cached (16384).
    pub max_stats: usize,
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            block_size: 1 << 20,
            cache_bytes: 64 << 20,
            max_readahead: 16 << 20,
            max_get: 8 << 20,
            list_ttl: Duration::from_secs(5),
            file_ttl: Duration::from_secs(30),
            max_listings: 256,
            max_stats: 16384,
        }
    }
}

/// A file or directory of the view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The last path component (`""` for the root).
    pub name: String,
    pub kind: EntryKind,
    /// Bytes, 0 for directories.
    pub size: u64,
    /// Last modified, in seconds since the epoch; directories (which S3 does not have) get the
    /// time the view was connected.
    pub mtime_unix: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Dir,
}

/// Counters since the view was connected (the connect check itself is not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ViewStats {
    /// ListObjectsV2 requests (one per page of up to 1000 keys).
    pub list_requests: u64,
    /// HeadObject requests.
    pub head_requests: u64,
    /// GetObject requests (all ranged).
    pub get_requests: u64,
    /// Body bytes received from GETs.
    pub bytes_fetched: u64,
    /// Blocks a read found in the block cache.
    pub block_hits: u64,
    /// Blocks a read found already being fetched (usually by read-ahead) and waited for.
    pub block_waits: u64,
    /// Blocks a read had to fetch itself.
    pub block_misses: u64,
    /// Blocks fetched ahead of sequential reads.
    pub readahead_blocks: u64,
    /// stat and list calls answered from the metadata caches.
    pub metadata_hits: u64,
    /// Bytes currently held by the block cache.
    pub cached_bytes: u64,
}

/// One mounted bucket view. Cheap to clone (clones share the client and the caches); `Send` and
/// `Sync`. Reads need a tokio runtime (read-ahead runs on spawned tasks).
#[derive(Clone)]
pub struct S3View {
    inner: Arc<Inner>,
}

impl fmt::Debug for S3View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("S3View").field(&self.inner.description).finish()
    }
}

/// The cache key of a block: the object's key, its size and mtime (so that a changed object,
/// once its new stat is seen, does not mix with old blocks) and the block's index.
#[derive(Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    key: Arc<str>,
    size: u64,
    mtime: i64,
    index: u64,
}

/// One block being fetched, shared by everyone waiting for it. A fetch (one ranged GET) covers
/// several consecutive blocks and completes each as soon as its bytes have arrived.
type Fetch = Shared<BoxFuture<'static, Result<Bytes, MountError>>>;

/// Where a block of a read comes from.
enum Source {
    Cached(Bytes),
    Pending(Fetch),
}

/// Sequential-read detection for one object.
struct SeqState {
    /// Where the next read starts if the reader is sequential.
    next: u64,
    /// Current read-ahead window in blocks (doubles while sequential).
    window: u64,
}

struct Inner {
    s3: AmazonS3,
    errors: ErrorContext,
    /// "" or "a/b/".
    prefix: String,
    description: String,
    options: ViewOptions,
    connected_at: i64,
    /// Directory (relative path) → its entries, sorted by name.
    listings: Mutex<TtlCache<String, Arc<Vec<Entry>>>>,
    /// Path → entry, or `None` for "not found".
    stats: Mutex<TtlCache<String, Option<Entry>>>,
    blocks: Mutex<BlockCache<BlockKey>>,
    /// Blocks being fetched → (id of the GET, the block's future).
    inflight: Mutex<HashMap<BlockKey, (u64, Fetch)>>,
    sequential: Mutex<HashMap<Arc<str>, SeqState>>,
    counters: Counters,
}

struct Counters {
    list: AtomicU64,
    head: AtomicU64,
    get: AtomicU64,
    bytes_fetched: AtomicU64,
    block_hits: AtomicU64,
    block_waits: AtomicU64,
    block_misses: AtomicU64,
    readahead_blocks: AtomicU64,
    metadata_hits: AtomicU64,
    fetch_ids: AtomicU64,
}

/// The counters of every view this process has had, for its metrics.
static ALL_VIEWS: Counters = Counters::new();

impl Counters {
    const fn new() -> Counters {
        Counters {
            list: AtomicU64::new(0),
            head: AtomicU64::new(0),
            get: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            block_hits: AtomicU64::new(0),
            block_waits: AtomicU64::new(0),
            block_misses: AtomicU64::new(0),
            readahead_blocks: AtomicU64::new(0),
            metadata_hits: AtomicU64::new(0),
            fetch_ids: AtomicU64::new(0),
        }
    }

    /// Adds to one counter of this view and of [`ALL_VIEWS`].
    fn bump(&self, counter: fn(&Counters) -> &AtomicU64, by: u64) {
        counter(self).fetch_add(by, Ordering::Relaxed);
        counter(&ALL_VIEWS).fetch_add(by, Ordering::Relaxed);
    }

    fn stats(&self, cached_bytes: u64) -> ViewStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ViewStats {
            list_requests: get(&self.list),
            head_requests: get(&self.head),
            get_requests: get(&self.get),
            bytes_fetched: get(&self.bytes_fetched),
            block_hits: get(&self.block_hits),
            block_waits: get(&self.block_waits),
            block_misses: get(&self.block_misses),
            readahead_blocks: get(&self.readahead_blocks),
            metadata_hits: get(&self.metadata_hits),
            cached_bytes,
        }
    }
}

/// The counters of all views this process has connected, added up (`cached_bytes` is 0).
pub fn process_stats() -> ViewStats {
    ALL_VIEWS.stats(0)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl S3View {
    /// Builds the client and checks it with a real request (a list of one key under the
    /// prefix), so that a wrong endpoint, rejected credentials or a missing bucket fail here.
    pub async fn connect(spec: MountSpec) -> Result<S3View, MountError> {
        S3View::connect_with(spec, ViewOptions::default()).await
    }

    /// [`S3View::connect`] with explicit cache settings.
    pub async fn connect_with(spec: MountSpec, options: ViewOptions) -> Result<S3View, MountError> {
        if spec.bucket.is_empty() || spec.bucket.contains('/') {
            return Err(MountError::Other(format!("invalid bucket name {:?}", spec.bucket)));
        }
        let endpoint = spec.endpoint.trim_end_matches('/').to_string();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            || endpoint.len() <= "https://".len()
        {
            return Err(MountError::BadEndpoint(format!(
                "the endpoint {:?} is not an http:// or https:// URL",
                spec.endpoint
            )));
        }
        let prefix = normalise_prefix(&spec.prefix)?;
        let region = spec.region.clone().unwrap_or_else(|| DEFAULT_REGION.to_string());
        let options = ViewOptions {
            block_size: options.block_size.max(4096),
            max_get: options.max_get.max(options.block_size.max(4096)),
            ..options
        };

        let build = |retry: RetryConfig| {
            // Client options first: they would replace the allow-http setting.
            let mut builder = AmazonS3Builder::new()
                .with_client_options(ClientOptions::new().with_connect_timeout(Duration::from_secs(5)))
                .with_bucket_name(&spec.bucket)
                .with_region(&region)
                .with_endpoint(&endpoint)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_retry(retry);
            builder = match &spec.credentials {
                Some((id, secret)) => builder.with_access_key_id(id).with_secret_access_key(secret),
                None => builder.with_skip_signature(true),
            };
            builder.build().map_err(|e| MountError::BadEndpoint(format!("endpoint {endpoint}: {e}")))
        };
        // The check fails fast (no retries); the view itself retries transient failures a few
        // times, within seconds: a FUSE caller is waiting.
        let probe = build(RetryConfig { max_retries: 0, ..RetryConfig::default() })?;
        let s3 = build(RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(15),
            ..RetryConfig::default()
        })?;

        let errors = ErrorContext {
            bucket: spec.bucket.clone(),
            endpoint: endpoint.clone(),
            access_key_id: spec.credentials.as_ref().map(|(id, _)| id.clone()),
            secret: spec.credentials.as_ref().map(|(_, secret)| secret.clone()),
        };
        let description = format!(
            "s3://{}/{prefix} (endpoint {endpoint}, region {region}, {})",
            spec.bucket,
            if spec.credentials.is_some() { "signed" } else { "anonymous" }
        );
        let check = PaginatedListOptions { max_keys: Some(1), ..Default::default() };
        probe
            .list_paginated((!prefix.is_empty()).then_some(prefix.as_str()), check)
            .await
            .map_err(|e| errors.map("list", "the bucket", e))?;
        tracing::debug!(view = %description, "S3 view connected");

        let connected_at =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        Ok(S3View {
            inner: Arc::new(Inner {
                s3,
                errors,
                prefix,
                description,
                listings: Mutex::new(TtlCache::new(options.max_listings)),
                stats: Mutex::new(TtlCache::new(options.max_stats)),
                blocks: Mutex::new(BlockCache::new(options.cache_bytes)),
                inflight: Mutex::new(HashMap::new()),
                sequential: Mutex::new(HashMap::new()),
                options,
                connected_at,
                counters: Counters::new(),
            }),
        })
    }

    /// Where the view is, e.g. `s3://bucket/prefix/ (endpoint http://…, region us-east-1,
    /// signed)`. Never credentials.
    pub fn description(&self) -> &str {
        &self.inner.description
    }

    /// The file or directory at `path` (relative to the view's root; `""` is the root).
    pub async fn stat(&self, path: &str) -> Result<Entry, MountError> {
        let rel = relative_path(path)?;
        self.inner.stat(&rel).await
    }

    /// The immediate children of the directory `dir`, sorted by name. All pages are fetched,
    /// so directories of any size work.
    pub async fn list(&self, dir: &str) -> Result<Vec<Entry>, MountError> {
        let rel = relative_path(dir)?;
        Ok(self.inner.list(&rel).await?.as_ref().clone())
    }

    /// Up to `len` bytes of the file at `path` from `offset`: fewer at the end of the file, none
    /// past it.
    pub async fn read(&self, path: &str, offset: u64, len: u32) -> Result<Bytes, MountError> {
        let rel = relative_path(path)?;
        self.inner.read(&rel, offset, len).await
    }

    pub fn stats(&self) -> ViewStats {
        self.inner.counters.stats(lock(&self.inner.blocks).bytes())
    }
}

impl Inner {
    fn dir_entry(&self, name: &str) -> Entry {
        Entry { name: name.to_string(), kind: EntryKind::Dir, size: 0, mtime_unix: self.connected_at }
    }

    /// The object key of a relative path.
    fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    /// The key prefix of the directory at a relative path ("" or ending in "/").
    fn dir_prefix(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}{rel}/", self.prefix)
        }
    }

    async fn list_page(
        &self,
        prefix: &str,
        delimiter: bool,
        max_keys: usize,
        page_token: Option<String>,
        what: &str,
    ) -> Result<(ListResult, Option<String>), MountError> {
        self.counters.bump(|c| &c.list, 1);
        let opts = PaginatedListOptions {
            delimiter: delimiter.then_some("/".into()),
            max_keys: Some(max_keys),
            page_token,
            ..Default::default()
        };
        let page = self
            .s3
            .list_paginated((!prefix.is_empty()).then_some(prefix), opts)
            .await
            .map_err(|e| self.errors.map("list", what, e))?;
        Ok((page.result, page.page_token))
    }

    async fn list(&self, rel: &str) -> Result<Arc<Vec<Entry>>, MountError> {
        if let Some(entries) = lock(&self.listings).get(&rel.to_string(), Instant::now()) {
            self.counters.bump(|c| &c.metadata_hits, 1);
            return Ok(entries);
        }
        let prefix = self.dir_prefix(rel);
        let shown = if rel.is_empty() { "/".to_string() } else { rel.to_string() };
        let mut assembled = Listing::default();
        let mut token = None;
        loop {
            let (page, next) = self.list_page(&prefix, true, LIST_PAGE, token, &shown).await?;
            assembled.add(&prefix, page, self.connected_at);
            match next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        if !rel.is_empty() && assembled.is_empty() && !assembled.saw_marker {
            lock(&self.stats).insert(rel.to_string(), None, self.options.list_ttl, Instant::now());
            return Err(MountError::NotFound(rel.to_string()));
        }
        let entries = Arc::new(assembled.into_entries());
        lock(&self.listings).insert(rel.to_string(), entries.clone(), self.options.list_ttl, Instant::now());
        Ok(entries)
    }

    async fn stat(&self, rel: &str) -> Result<Entry, MountError> {
        if rel.is_empty() {
            return Ok(self.dir_entry(""));
        }
        let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        let cached = {
            let now = Instant::now();
            let listings = &mut *lock(&self.listings);
            if listings.get(&rel.to_string(), now).is_some() {
                Some(Some(self.dir_entry(name)))
            } else if let Some(siblings) = listings.get(&parent.to_string(), now) {
                Some(
                    siblings
                        .binary_search_by(|e| e.name.as_str().cmp(name))
                        .ok()
                        .map(|i| siblings[i].clone()),
                )
            } else {
                lock(&self.stats).get(&rel.to_string(), now)
            }
        };
        let found = match cached {
            Some(found) => {
                self.counters.bump(|c| &c.metadata_hits, 1);
                found
            }
            None => {
                let found = self.probe(rel, name).await?;
                let ttl = match &found {
                    Some(Entry { kind: EntryKind::File, .. }) => self.options.file_ttl,
                    _ => self.options.list_ttl,
                };
                lock(&self.stats).insert(rel.to_string(), found.clone(), ttl, Instant::now());
                found
            }
        };
        found.ok_or_else(|| MountError::NotFound(rel.to_string()))
    }

    /// Asks S3 what `rel` is: a directory if any key starts with `rel/` (a marker counts), else
    /// a file if the key `rel` exists. Both requests start together; a directory answer does not
    /// wait for the HEAD.
    async fn probe(&self, rel: &str, name: &str) -> Result<Option<Entry>, MountError> {
        let key = self.key(rel);
        let path =
            Path::parse(&key).map_err(|e| MountError::InvalidPath(format!("invalid path {rel:?}: {e}")))?;
        let dir_prefix = format!("{key}/");
        let is_dir = pin!(async {
            let (page, _) = self.list_page(&dir_prefix, false, 1, None, rel).await?;
            Ok::<bool, MountError>(!page.objects.is_empty() || !page.common_prefixes.is_empty())
        });
        let head = pin!(async {
            self.counters.bump(|c| &c.head, 1);
            match self.s3.head(&path).await {
                Ok(meta) => Ok(Some(Entry {
                    name: name.to_string(),
                    kind: EntryKind::File,
                    size: meta.size,
                    mtime_unix: meta.last_modified.timestamp(),
                })),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.errors.map("stat", rel, e)),
            }
        });
        match futures::future::select(is_dir, head).await {
            Either::Left((is_dir, head)) => {
                if is_dir? {
                    Ok(Some(self.dir_entry(name)))
                } else {
                    head.await
                }
            }
            Either::Right((file, is_dir)) => {
                if is_dir.await? {
                    Ok(Some(self.dir_entry(name)))
                } else {
                    file
                }
            }
        }
    }

    async fn read(self: &Arc<Self>, rel: &str, offset: u64, len: u32) -> Result<Bytes, MountError> {
        if rel.is_empty() {
            return Err(MountError::IsADirectory(String::new()));
        }
        let entry = self.stat(rel).await?;
        if entry.kind == EntryKind::Dir {
            return Err(MountError::IsADirectory(rel.to_string()));
        }
        if offset >= entry.size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = entry.size.min(offset + u64::from(len));
        let key: Arc<str> = self.key(rel).into();
        let path =
            Path::parse(&*key).map_err(|e| MountError::InvalidPath(format!("invalid path {rel:?}: {e}")))?;
        let object = Object { rel: rel.into(), key, path, size: entry.size, mtime: entry.mtime_unix };

        let bs = self.options.block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let window = self.note_access(&object.key, offset, end);

        // The blocks this read needs: cached, already in flight, or fetched now (consecutive
        // missing blocks in one GET).
        let mut sources = Vec::new();
        let mut missing: Option<(u64, u64)> = None;
        for index in first..=last {
            match self.lookup(&object, index) {
                Some(source) => {
                    if let Some((start, count)) = missing.take() {
                        self.fetch_run(&object, start, count, &mut sources);
                    }
                    sources.push(source);
                }
                None => {
                    self.counters.bump(|c| &c.block_misses, 1);
                    missing = Some(missing.map_or((index, 1), |(start, count)| (start, count + 1)));
                }
            }
        }
        if let Some((start, count)) = missing {
            self.fetch_run(&object, start, count, &mut sources);
        }
        if window > 0 {
            self.read_ahead(&object, last + 1, window);
        }

        let mut blocks = Vec::with_capacity(sources.len());
        for source in sources {
            blocks.push(match source {
                Source::Cached(data) => data,
                Source::Pending(fetch) => fetch.await?,
            });
        }
        let start_in_first = (offset - first * bs) as usize;
        let total = (end - offset) as usize;
        if let [only] = blocks.as_slice() {
            return Ok(slice(only, start_in_first, total));
        }
        let mut out = BytesMut::with_capacity(total);
        for (i, block) in blocks.iter().enumerate() {
            let from = if i == 0 { start_in_first } else { 0 };
            let want = (total - out.len()).min(block.len().saturating_sub(from));
            out.extend_from_slice(&block[from..from + want]);
        }
        Ok(out.freeze())
    }

    /// Records a read of `[offset, end)` and returns how many blocks to keep fetched ahead of
    /// it: 0 for a random read, a window that doubles while the reader stays sequential.
    fn note_access(&self, key: &Arc<str>, offset: u64, end: u64) -> u64 {
        let bs = self.options.block_size;
        let max_window = (self.options.max_readahead / bs).max(1);
        let mut states = lock(&self.sequential);
        if states.len() > 4096 && !states.contains_key(key) {
            states.clear();
        }
        let state = states.entry(key.clone()).or_insert(SeqState { next: 0, window: 0 });
        // FUSE may deliver the kernel's parallel read-ahead requests slightly out of order:
        // a read starting within two blocks of where the last one ended counts as sequential.
        let sequential = offset.abs_diff(state.next) <= 2 * bs;
        if sequential {
            state.window = (state.window * 2).clamp(2, max_window);
            state.next = state.next.max(end);
        } else {
            state.window = 0;
            state.next = end;
        }
        state.window
    }

    fn lookup(&self, object: &Object, index: u64) -> Option<Source> {
        let key = object.block_key(index);
        if let Some(data) = lock(&self.blocks).get(&key) {
            self.counters.bump(|c| &c.block_hits, 1);
            return Some(Source::Cached(data));
        }
        let inflight = lock(&self.inflight);
        let (_, fetch) = inflight.get(&key)?;
        self.counters.bump(|c| &c.block_waits, 1);
        Some(Source::Pending(fetch.clone()))
    }

    fn is_present(&self, object: &Object, index: u64) -> bool {
        let key = object.block_key(index);
        lock(&self.blocks).contains(&key) || lock(&self.inflight).contains_key(&key)
    }

    /// Starts fetches for `count` blocks from `start` (split into GETs of at most `max_get`)
    /// and appends their sources.
    fn fetch_run(self: &Arc<Self>, object: &Object, start: u64, count: u64, sources: &mut Vec<Source>) {
        let per_get = (self.options.max_get / self.options.block_size).max(1);
        let mut index = start;
        while index < start + count {
            let n = per_get.min(start + count - index);
            sources.extend(self.start_fetch(object, index, n).into_iter().map(Source::Pending));
            index += n;
        }
    }

    /// Keeps the blocks after `from` fetched or in flight, up to `window` of them: once fewer
    /// than half the window is ahead, fetches the rest in the background, in large GETs.
    fn read_ahead(self: &Arc<Self>, object: &Object, from: u64, window: u64) {
        let bs = self.options.block_size;
        let blocks = object.size.div_ceil(bs);
        let until = blocks.min(from + window);
        let ahead = (from..until).take_while(|&i| self.is_present(object, i)).count() as u64;
        if from + ahead >= until || ahead * 2 >= window {
            return;
        }
        let per_get = (self.options.max_get / bs).max(1);
        let mut index = from + ahead;
        while index < until {
            if self.is_present(object, index) {
                index += 1;
                continue;
            }
            let mut n = 1;
            while n < per_get && index + n < until && !self.is_present(object, index + n) {
                n += 1;
            }
            self.counters.bump(|c| &c.readahead_blocks, n);
            // Runs on its own; a reader that needs these blocks finds them in flight. Errors are
            // reported to that reader (and the next read fetches again).
            self.start_fetch(object, index, n);
            index += n;
        }
    }

    /// Starts one ranged GET for `count` blocks from `first` on a task of its own and returns
    /// a future per block. Blocks go into the cache, and their futures complete, as their bytes
    /// arrive; they are registered as in flight until then.
    fn start_fetch(self: &Arc<Self>, object: &Object, first: u64, count: u64) -> Vec<Fetch> {
        let id = self.counters.fetch_ids.fetch_add(1, Ordering::Relaxed);
        let mut senders = Vec::with_capacity(count as usize);
        let mut fetches = Vec::with_capacity(count as usize);
        {
            let mut inflight = lock(&self.inflight);
            for index in first..first + count {
                let (tx, rx) = oneshot::channel::<Result<Bytes, MountError>>();
                let fetch: Fetch = rx
                    .map(|received| {
                        received
                            .unwrap_or_else(|_| Err(MountError::Other("the S3 read was abandoned".into())))
                    })
                    .boxed()
                    .shared();
                inflight.insert(object.block_key(index), (id, fetch.clone()));
                senders.push((object.block_key(index), tx));
                fetches.push(fetch);
            }
        }
        let fetch = BlockFetch { inner: Arc::clone(self), id, object: object.clone(), first, senders };
        tokio::spawn(fetch.run());
        fetches
    }
}

/// A running ranged GET and the blocks still waiting for their bytes.
struct BlockFetch {
    inner: Arc<Inner>,
    id: u64,
    object: Object,
    first: u64,
    /// Blocks not delivered yet, in order.
    senders: Vec<(BlockKey, oneshot::Sender<Result<Bytes, MountError>>)>,
}

impl BlockFetch {
    async fn run(mut self) {
        let bs = self.inner.options.block_size;
        let size = self.object.size;
        let start = self.first * bs;
        let end = size.min((self.first + self.senders.len() as u64) * bs);
        self.inner.counters.bump(|c| &c.get, 1);
        let options = GetOptions { range: Some(GetRange::Bounded(start..end)), ..Default::default() };
        let mut stream = match self.inner.s3.get_opts(&self.object.path, options).await {
            Ok(result) => result.into_stream(),
            Err(e) => {
                let error = self.inner.errors.map("read", &self.object.rel, e);
                return self.fail(error);
            }
        };
        let mut index = self.first;
        let block_len = |index: u64| (size.min((index + 1) * bs) - index * bs) as usize;
        let mut buf = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let mut chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    let error = self.inner.errors.map("read", &self.object.rel, e);
                    return self.fail(error);
                }
            };
            self.inner.counters.bump(|c| &c.bytes_fetched, chunk.len() as u64);
            while !chunk.is_empty() && !self.senders.is_empty() {
                let want = block_len(index) - buf.len();
                let block = if buf.is_empty() && chunk.len() >= want {
                    // A whole block within the chunk: no copy.
                    chunk.split_to(want)
                } else {
                    let take = want.min(chunk.len());
                    buf.extend_from_slice(&chunk.split_to(take));
                    if buf.len() < block_len(index) {
                        continue;
                    }
                    buf.split().freeze()
                };
                self.deliver(block);
                index += 1;
            }
        }
        if !self.senders.is_empty() {
            let message = format!(
                "reading {:?}: the server sent less than asked (did the object change?)",
                self.object.rel
            );
            self.fail(MountError::Other(message));
        }
    }

    /// Caches the next block and hands it to its waiters.
    fn deliver(&mut self, block: Bytes) {
        let (key, tx) = self.senders.remove(0);
        lock(&self.inner.blocks).insert(key.clone(), block.clone());
        self.unregister(&key);
        let _ = tx.send(Ok(block));
    }

    fn fail(&mut self, error: MountError) {
        for (key, tx) in std::mem::take(&mut self.senders) {
            self.unregister(&key);
            let _ = tx.send(Err(error.clone()));
        }
    }

    fn unregister(&self, key: &BlockKey) {
        let mut inflight = lock(&self.inner.inflight);
        if inflight.get(key).is_some_and(|(owner, _)| *owner == self.id) {
            inflight.remove(key);
        }
    }
}

/// Should a fetch task end early (the runtime shutting down), its blocks are no longer in flight.
impl Drop for BlockFetch {
    fn drop(&mut self) {
        for (key, _) in std::mem::take(&mut self.senders) {
            self.unregister(&key);
        }
    }
}

/// A file being read, as of its last stat.
#[derive(Clone)]
struct Object {
    rel: Arc<str>,
    key: Arc<str>,
    path: Path,
    size: u64,
    mtime: i64,
}

impl Object {
    fn block_key(&self, index: u64) -> BlockKey {
        BlockKey { key: self.key.clone(), size: self.size, mtime: self.mtime, index }
    }
}

fn slice(data: &Bytes, from: usize, len: usize) -> Bytes {
    let from = from.min(data.len());
    data.slice(from..data.len().min(from + len))
}

/// The entries of a directory, assembled from list pages.
#[derive(Default)]
struct Listing {
    entries: BTreeMap<String, Entry>,
    /// A folder marker (the key `dir/` itself) was seen: the directory exists even if empty.
    saw_marker: bool,
}

impl Listing {
    /// Adds a page listed with delimiter "/" under `prefix` ("" or ending in "/").
    fn add(&mut self, prefix: &str, page: ListResult, dir_mtime: i64) {
        let marker = prefix.strip_suffix('/').unwrap_or(prefix);
        for object in page.objects {
            let key = object.location.as_ref();
            // object_store drops the trailing "/" of keys: the marker of this very directory
            // comes back as its own prefix.
            if !marker.is_empty() && key == marker {
                self.saw_marker = true;
                continue;
            }
            let Some(name) = key.strip_prefix(prefix) else { continue };
            if name.is_empty() || name.contains('/') {
                continue;
            }
            // A directory of the same name wins over a file.
            self.entries.entry(name.to_string()).or_insert(Entry {
                name: name.to_string(),
                kind: EntryKind::File,
                size: object.size,
                mtime_unix: object.last_modified.timestamp(),
            });
        }
        for common in page.common_prefixes {
            let Some(name) = common.as_ref().strip_prefix(prefix) else { continue };
            if name.is_empty() || name.contains('/') {
                continue;
            }
            self.entries.insert(
                name.to_string(),
                Entry { name: name.to_string(), kind: EntryKind::Dir, size: 0, mtime_unix: dir_mtime },
            );
        }
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn into_entries(self) -> Vec<Entry> {
        self.entries.into_values().collect()
    }
}

/// `"" `or `"a/b/"`, refusing anything that could escape or is ambiguous.
fn normalise_prefix(prefix: &str) -> Result<String, MountError> {
    let trimmed = prefix.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    check_components(trimmed)
        .map_err(|reason| MountError::InvalidPath(format!("invalid prefix {prefix:?}: {reason}")))?;
    Ok(format!("{trimmed}/"))
}

/// A path relative to the view's root: `""` (the root) or `a/b` (one trailing `/` is allowed).
/// Leading `/`, empty components, `.` and `..` are refused.
fn relative_path(path: &str) -> Result<String, MountError> {
    if path.is_empty() {
        return Ok(String::new());
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    check_components(trimmed)
        .map_err(|reason| MountError::InvalidPath(format!("invalid path {path:?}: {reason}")))?;
    Ok(trimmed.to_string())
}

fn check_components(path: &str) -> Result<(), &'static str> {
    for component in path.split('/') {
        match component {
            "" => return Err("empty path component (leading \"/\" or \"//\")"),
            "." | ".." => return Err("\".\" and \"..\" are not allowed"),
            c if c.chars().any(|ch| ch.is_ascii_control()) => return Err("control character"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectMeta;

    #[test]
    fn paths_are_checked() {
        assert_eq!(relative_path("").unwrap(), "");
        assert_eq!(relative_path("a/b").unwrap(), "a/b");
        assert_eq!(relative_path("a/b/").unwrap(), "a/b");
        for bad in ["/", "/a", "a//b", "..", "a/../b", "./a", "a/.", "a\0b", "a//"] {
            assert!(matches!(relative_path(bad), Err(MountError::InvalidPath(_))), "{bad:?} accepted");
        }
        assert_eq!(normalise_prefix("").unwrap(), "");
        assert_eq!(normalise_prefix("/").unwrap(), "");
        assert_eq!(normalise_prefix("a/b").unwrap(), "a/b/");
        assert_eq!(normalise_prefix("a/b/").unwrap(), "a/b/");
        assert!(normalise_prefix("a/../b/").is_err());
    }

    #[test]
    fn spec_debug_hides_the_secret() {
        let spec = MountSpec {
            bucket: "b".into(),
            endpoint: "http://x".into(),
            prefix: String::new(),
            region: None,
            credentials: Some(("AKID".into(), "very-secret".into())),
        };
        let debug = format!("{spec:?}");
        assert!(debug.contains("AKID") && !debug.contains("very-secret"), "{debug}");
    }

    fn meta(key: &str, size: u64) -> ObjectMeta {
        ObjectMeta {
            location: Path::parse(key).unwrap(),
            last_modified: Default::default(),
            size,
            e_tag: None,
            version: None,
        }
    }

    /// What real S3 sends for folder markers, which s3s-fs (the test server) cannot store.
    #[test]
    fn listing_skips_markers_and_prefers_dirs() {
        let mut listing = Listing::default();
        // Listing "docs/": the marker "docs/" itself, a file, a file shadowed by a directory.
        let page = ListResult {
            common_prefixes: vec![Path::parse("docs/sub/").unwrap(), Path::parse("docs/both/").unwrap()],
            objects: vec![meta("docs/", 0), meta("docs/a.txt", 3), meta("docs/both", 7)],
            extensions: Default::default(),
        };
        listing.add("docs/", page, 42);
        assert!(listing.saw_marker);
        let entries = listing.into_entries();
        let names: Vec<(&str, EntryKind, u64)> =
            entries.iter().map(|e| (e.name.as_str(), e.kind, e.size)).collect();
        assert_eq!(
            names,
            [("a.txt", EntryKind::File, 3), ("both", EntryKind::Dir, 0), ("sub", EntryKind::Dir, 0)]
        );

        // An empty directory that only has its marker.
        let mut listing = Listing::default();
        let page = ListResult {
            common_prefixes: vec![],
            objects: vec![meta("empty/", 0)],
            extensions: Default::default(),
        };
        listing.add("empty/", page, 0);
        assert!(listing.is_empty() && listing.saw_marker);
    }
}
