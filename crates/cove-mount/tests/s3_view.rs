//! S3View against a real S3 server (s3s-fs, see `cove_blob::testing`).
//!
//! Run: `COVE_S3S_FS=/var/cache/cove/tools/bin/s3s-fs cargo test -p cove-mount -- --nocapture`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cove_blob::testing::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use cove_mount::{Entry, EntryKind, MountError, MountSpec, S3View, ViewOptions};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const BIG: usize = 100 << 20;

/// Tests that move 100 MB or 10,000 objects take turns (2 cores; and the benchmark should not
/// compete with them).
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spec(endpoint: &str, prefix: &str, secret: Option<&str>) -> MountSpec {
    MountSpec {
        bucket: BUCKET.into(),
        endpoint: endpoint.into(),
        prefix: prefix.into(),
        region: None,
        credentials: secret.map(|s| (ACCESS_KEY.to_string(), s.to_string())),
    }
}

async fn connect(server: &S3Server, prefix: &str) -> S3View {
    S3View::connect(spec(&server.endpoint, prefix, Some(SECRET_KEY))).await.unwrap()
}

/// A plain object_store client for the test bucket, to upload with (unsigned when `secret` is
/// `None`).
fn uploader(endpoint: &str, secret: Option<&str>) -> Arc<dyn ObjectStore> {
    let builder = AmazonS3Builder::new()
        .with_bucket_name(BUCKET)
        .with_region("us-east-1")
        .with_endpoint(endpoint)
        .with_virtual_hosted_style_request(false)
        .with_allow_http(true);
    let builder = match secret {
        Some(secret) => builder.with_access_key_id(ACCESS_KEY).with_secret_access_key(secret),
        None => builder.with_skip_signature(true),
    };
    Arc::new(builder.build().unwrap())
}

async fn put(store: &Arc<dyn ObjectStore>, key: &str, data: impl Into<Bytes>) {
    store.put(&Path::parse(key).unwrap(), PutPayload::from(data.into())).await.unwrap();
}

/// Deterministic, incompressible-looking content (xorshift).
fn big_data(len: usize) -> Bytes {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn names(entries: &[Entry]) -> Vec<(&str, EntryKind, u64)> {
    entries.iter().map(|e| (e.name.as_str(), e.kind, e.size)).collect()
}

/// The small tree most tests use.
async fn small_tree(server: &S3Server) {
    let store = uploader(&server.endpoint, Some(SECRET_KEY));
    put(&store, "hello.txt", "hello world\n").await;
    put(&store, "z.bin", vec![7u8; 1000]).await;
    put(&store, "docs/a.txt", "alpha").await;
    put(&store, "docs/sub/b.txt", "bravo!").await;
    put(&store, "docsx/c.txt", "not in docs/").await;
    // A folder marker: s3s-fs stores a PUT of "empty/" as an empty directory (and then never
    // lists it); object_store cannot PUT a key ending in "/", so make that directory directly.
    std::fs::create_dir_all(server.object_file("empty")).unwrap();
}

#[tokio::test]
async fn listing_stat_and_prefix_scoping() {
    let server = S3Server::start();
    small_tree(&server).await;
    let started = Instant::now();
    let view = connect(&server, "").await;

    let root = view.list("").await.unwrap();
    // "empty" (a bare folder marker) is invisible on s3s-fs; on S3 it would be a directory. In
    // no case is it a file.
    let root: Vec<_> = root.into_iter().filter(|e| e.name != "empty" || e.kind != EntryKind::Dir).collect();
    assert_eq!(
        names(&root),
        [
            ("docs", EntryKind::Dir, 0),
            ("docsx", EntryKind::Dir, 0),
            ("hello.txt", EntryKind::File, 12),
            ("z.bin", EntryKind::File, 1000)
        ]
    );
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((root[2].mtime_unix - now).abs() < 120, "mtime {} vs now {now}", root[2].mtime_unix);

    assert_eq!(
        names(&view.list("docs").await.unwrap()),
        [("a.txt", EntryKind::File, 5), ("sub", EntryKind::Dir, 0)]
    );
    assert_eq!(names(&view.list("docs/sub/").await.unwrap()), [("b.txt", EntryKind::File, 6)]);
    assert!(matches!(view.list("nope").await, Err(MountError::NotFound(p)) if p == "nope"));

    // Stats answered from the cached listings: no requests.
    let before = view.stats();
    assert_eq!(view.stat("hello.txt").await.unwrap().size, 12);
    assert_eq!(view.stat("docs/sub").await.unwrap().kind, EntryKind::Dir);
    assert!(matches!(view.stat("missing").await, Err(MountError::NotFound(_))));
    let after = view.stats();
    assert_eq!(after.list_requests + after.head_requests, before.list_requests + before.head_requests);
    assert_eq!(after.metadata_hits, before.metadata_hits + 3);

    // A fresh view must ask S3 (HEAD + a one-key list), directories need no marker.
    let cold = connect(&server, "").await;
    let root_entry = cold.stat("").await.unwrap();
    assert_eq!((root_entry.kind, root_entry.name.as_str()), (EntryKind::Dir, ""));
    assert_eq!(names(&[cold.stat("docs").await.unwrap()]), [("docs", EntryKind::Dir, 0)]);
    assert_eq!(names(&[cold.stat("docs/sub").await.unwrap()]), [("sub", EntryKind::Dir, 0)]);
    assert_eq!(names(&[cold.stat("docs/sub/b.txt").await.unwrap()]), [("b.txt", EntryKind::File, 6)]);
    assert_eq!(names(&[cold.stat("z.bin").await.unwrap()]), [("z.bin", EntryKind::File, 1000)]);
    assert!(matches!(cold.stat("nope").await, Err(MountError::NotFound(p)) if p == "nope"));
    assert!(matches!(cold.stat("docs/nope.txt").await, Err(MountError::NotFound(_))));
    // "doc" is a string prefix of "docs/…" but no directory.
    assert!(matches!(cold.stat("doc").await, Err(MountError::NotFound(_))));
    // A second stat of the same paths is cached.
    let before = cold.stats();
    cold.stat("z.bin").await.unwrap();
    cold.stat("nope").await.unwrap_err();
    assert_eq!(cold.stats().head_requests, before.head_requests);
    // The marker is never a file (on s3s-fs the HEAD of its directory fails; on S3 it is a dir).
    if let Ok(entry) = cold.stat("empty").await {
        assert_eq!(entry.kind, EntryKind::Dir);
    }
    println!("cold stats: {:?}", cold.stats());

    // Prefix scoping: "docs/" shows a.txt and sub, and nothing outside ("docsx" included).
    for prefix in ["docs/", "docs", "/docs/"] {
        let docs = connect(&server, prefix).await;
        assert_eq!(
            names(&docs.list("").await.unwrap()),
            [("a.txt", EntryKind::File, 5), ("sub", EntryKind::Dir, 0)],
            "prefix {prefix:?}"
        );
        assert_eq!(docs.stat("sub/b.txt").await.unwrap().size, 6);
        assert_eq!(docs.read("a.txt", 0, 100).await.unwrap(), "alpha");
        for outside in ["hello.txt", "docs", "docs/a.txt", "x/c.txt"] {
            assert!(matches!(docs.stat(outside).await, Err(MountError::NotFound(_))), "{outside}");
        }
        assert!(matches!(docs.read("hello.txt", 0, 10).await, Err(MountError::NotFound(_))));
    }

    // Paths that could escape are refused, before any request.
    let requests = view.stats();
    for bad in ["..", "../hello.txt", "docs/../hello.txt", "/hello.txt", "docs//a.txt", "./a", "/"] {
        assert!(matches!(view.stat(bad).await, Err(MountError::InvalidPath(_))), "stat {bad:?}");
        assert!(matches!(view.list(bad).await, Err(MountError::InvalidPath(_))), "list {bad:?}");
        assert!(matches!(view.read(bad, 0, 1).await, Err(MountError::InvalidPath(_))), "read {bad:?}");
    }
    let docs = connect(&server, "docs/").await;
    assert!(matches!(docs.read("../hello.txt", 0, 10).await, Err(MountError::InvalidPath(_))));
    assert!(matches!(
        S3View::connect(spec(&server.endpoint, "docs/../", Some(SECRET_KEY))).await,
        Err(MountError::InvalidPath(_))
    ));
    assert_eq!(view.stats().list_requests, requests.list_requests);
    println!("listing_stat_and_prefix_scoping: {:?} in {:?}", view.stats(), started.elapsed());
}

#[tokio::test]
async fn small_reads() {
    let server = S3Server::start();
    small_tree(&server).await;
    let data = big_data(20_000);
    put(&uploader(&server.endpoint, Some(SECRET_KEY)), "blocks.bin", data.clone()).await;
    let view = connect(&server, "").await;

    assert_eq!(view.read("hello.txt", 0, 128 << 10).await.unwrap(), "hello world\n");
    assert_eq!(view.read("hello.txt", 6, 5).await.unwrap(), "world");
    assert_eq!(view.read("hello.txt", 6, 100).await.unwrap(), "world\n", "short at EOF");
    assert!(view.read("hello.txt", 12, 10).await.unwrap().is_empty(), "at EOF");
    assert!(view.read("hello.txt", 1000, 10).await.unwrap().is_empty(), "past EOF");
    assert!(view.read("hello.txt", 0, 0).await.unwrap().is_empty());
    assert_eq!(view.read("docs/sub/b.txt", 0, 4096).await.unwrap(), "bravo!");
    assert_eq!(view.read("z.bin", 990, 4096).await.unwrap(), vec![7u8; 10]);
    assert!(matches!(view.read("docs", 0, 10).await, Err(MountError::IsADirectory(p)) if p == "docs"));
    assert!(matches!(view.read("", 0, 10).await, Err(MountError::IsADirectory(_))));
    assert!(matches!(view.read("nope.txt", 0, 10).await, Err(MountError::NotFound(_))));
    // Reading the same file again comes from the block cache.
    let before = view.stats();
    assert_eq!(view.read("hello.txt", 0, 4096).await.unwrap(), "hello world\n");
    assert_eq!(view.stats().get_requests, before.get_requests);
    assert_eq!(view.stats().block_hits, before.block_hits + 1);

    // Reads spanning several blocks (4 KiB blocks here), at odd offsets.
    let options = ViewOptions { block_size: 4096, max_get: 8192, ..ViewOptions::default() };
    let small_blocks =
        S3View::connect_with(spec(&server.endpoint, "", Some(SECRET_KEY)), options).await.unwrap();
    for (offset, len) in [(0u64, 20_000u32), (4000, 10_000), (4096, 4096), (19_999, 5), (12_345, 1), (0, 1)] {
        let got = small_blocks.read("blocks.bin", offset, len).await.unwrap();
        let end = (offset as usize + len as usize).min(data.len());
        assert_eq!(got, data.slice(offset as usize..end), "offset {offset} len {len}");
    }
    // Concurrent reads of the same blocks share fetches and all get the right bytes.
    let reads = (0..32u64).map(|i| {
        let view = small_blocks.clone();
        let data = data.clone();
        tokio::spawn(async move {
            let offset = (i * 613) % 19_000;
            let got = view.read("blocks.bin", offset, 1000).await.unwrap();
            assert_eq!(got, data.slice(offset as usize..offset as usize + 1000));
        })
    });
    for read in futures::future::join_all(reads).await {
        read.unwrap();
    }
    println!("small_reads: {:?}", small_blocks.stats());
}

#[tokio::test]
async fn large_object_random_and_sequential_reads() {
    let _heavy = HEAVY.lock().await;
    let server = S3Server::start();
    let data = big_data(BIG);
    put(&uploader(&server.endpoint, Some(SECRET_KEY)), "big.bin", data.clone()).await;

    // A 4 KiB read in the middle fetches only the block it touches.
    let view = connect(&server, "").await;
    let offset = 50 * MIB;
    let got = view.read("big.bin", offset, 4096).await.unwrap();
    assert_eq!(got, data.slice(offset as usize..offset as usize + 4096));
    let stats = view.stats();
    println!("random 4 KiB read at 50 MiB: {stats:?}");
    assert!(stats.bytes_fetched < 3 * MIB, "fetched {} bytes", stats.bytes_fetched);
    assert_eq!(stats.get_requests, 1);

    // A few scattered reads (one crossing a block boundary) stay small too.
    for offset in [10 * MIB - 100, 77 * MIB + 12_345, (BIG as u64) - 1000] {
        let got = view.read("big.bin", offset, 4096).await.unwrap();
        let end = (offset as usize + 4096).min(BIG);
        assert_eq!(got, data.slice(offset as usize..end), "offset {offset}");
    }
    let stats = view.stats();
    assert!(stats.bytes_fetched <= 6 * MIB, "scattered reads fetched {} bytes", stats.bytes_fetched);

    // Sequential 128 KiB reads through the whole object, on a fresh view.
    let view = connect(&server, "").await;
    let started = Instant::now();
    let (digest, total) = read_sequentially(&view, "big.bin", 128 << 10).await;
    let elapsed = started.elapsed();
    assert_eq!(total, BIG as u64);
    assert_eq!(digest, Sha256::digest(&data).to_vec(), "sequential read returned wrong bytes");
    let stats = view.stats();
    println!(
        "sequential 100 MiB in 128 KiB reads: {elapsed:?} ({:.0} MiB/s), {} GET requests, {:.1} MiB \
         fetched, {stats:?}",
        100.0 / elapsed.as_secs_f64(),
        stats.get_requests,
        stats.bytes_fetched as f64 / MIB as f64
    );
    assert!(stats.bytes_fetched < BIG as u64 + BIG as u64 / 10, "fetched {} bytes", stats.bytes_fetched);
    assert!(stats.get_requests <= 40, "{} GETs for a sequential read", stats.get_requests);
    assert!(stats.cached_bytes <= 64 * MIB);
}

/// Reads `path` from the start in `chunk`-sized reads until EOF; returns the sha256 and size.
async fn read_sequentially(view: &S3View, path: &str, chunk: u32) -> (Vec<u8>, u64) {
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    loop {
        let data = view.read(path, offset, chunk).await.unwrap();
        if data.is_empty() {
            break;
        }
        hasher.update(&data);
        offset += data.len() as u64;
    }
    (hasher.finalize().to_vec(), offset)
}

#[tokio::test]
async fn ten_thousand_objects() {
    let _heavy = HEAVY.lock().await;
    let server = S3Server::start();
    let store = uploader(&server.endpoint, Some(SECRET_KEY));
    let started = Instant::now();
    futures::stream::iter(0..10_000)
        .map(|i| {
            let store = store.clone();
            async move { put(&store, &format!("many/f{i:05}.txt"), format!("object {i}")).await }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    put(&store, "many/sub/deeper.txt", "x").await;
    println!("uploaded 10,000 objects in {:?}", started.elapsed());

    let view = connect(&server, "").await;
    let started = Instant::now();
    let entries = view.list("many").await.unwrap();
    let listed_in = started.elapsed();
    assert_eq!(entries.len(), 10_001);
    assert_eq!(names(&entries[..1]), [("f00000.txt", EntryKind::File, 8)]);
    assert_eq!(names(&entries[9_999..]), [("f09999.txt", EntryKind::File, 11), ("sub", EntryKind::Dir, 0)]);
    assert!(entries.windows(2).all(|w| w[0].name < w[1].name), "sorted, no duplicates");
    let files = entries.iter().filter(|e| e.kind == EntryKind::File).count();
    assert_eq!(files, 10_000);
    let stats = view.stats();
    println!(
        "list(\"many\"): {} entries in {listed_in:?}, {} list requests",
        entries.len(),
        stats.list_requests
    );
    assert!(stats.list_requests >= 11, "pagination: {} requests", stats.list_requests);

    // Lookups after the listing are answered from it.
    assert_eq!(view.stat("many/f05000.txt").await.unwrap().size, 11);
    assert!(matches!(view.stat("many/f10000.txt").await, Err(MountError::NotFound(_))));
    assert_eq!(view.read("many/f01234.txt", 0, 4096).await.unwrap(), "object 1234");
    let after = view.stats();
    assert_eq!((after.list_requests, after.head_requests), (stats.list_requests, 0));
    assert_eq!(view.list("many").await.unwrap().len(), 10_001, "cached");
    assert_eq!(view.stats().list_requests, stats.list_requests);
}

#[tokio::test]
async fn connect_errors() {
    let server = S3Server::start();
    small_tree(&server).await;

    let started = Instant::now();
    let err = S3View::connect(spec(&server.endpoint, "", Some("wrong-secret-4242"))).await.unwrap_err();
    println!("wrong secret: {err}");
    assert!(matches!(err, MountError::AccessDenied(_)), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("wrong-secret-4242"));
    assert!(err.to_string().contains("rejected"), "{err}");

    // A closed port: take a free port and let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let err = S3View::connect(spec(&endpoint, "", Some(SECRET_KEY))).await.unwrap_err();
    println!("closed port: {err}");
    assert!(matches!(err, MountError::BadEndpoint(_)), "{err:?}");
    assert!(err.to_string().contains(&endpoint), "{err}");
    assert!(!format!("{err} {err:?}").contains(SECRET_KEY));

    for bad in ["ftp://127.0.0.1:1", "127.0.0.1:9000", "http://"] {
        let err = S3View::connect(spec(bad, "", Some(SECRET_KEY))).await.unwrap_err();
        assert!(matches!(err, MountError::BadEndpoint(_)), "{bad}: {err:?}");
    }

    let mut missing = spec(&server.endpoint, "", Some(SECRET_KEY));
    missing.bucket = "no-such-bucket".into();
    let err = S3View::connect(missing).await.unwrap_err();
    println!("missing bucket: {err}");
    assert!(matches!(err, MountError::NoSuchBucket(_)), "{err:?}");
    assert!(err.to_string().contains("no-such-bucket"), "{err}");

    // A prefix with nothing under it is an empty view, not an error.
    let empty = connect(&server, "nothing/here/").await;
    assert!(empty.list("").await.unwrap().is_empty());
    // All of the above fail fast (no retry storms).
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

#[tokio::test]
async fn anonymous_access() {
    // A public bucket: no credentials, unsigned requests.
    let public = S3Server::start_anonymous();
    let store = uploader(&public.endpoint, None);
    put(&store, "pub/readme.txt", "public data").await;
    let view = S3View::connect(spec(&public.endpoint, "", None)).await.unwrap();
    assert!(view.description().contains("anonymous"), "{}", view.description());
    assert_eq!(names(&view.list("").await.unwrap()), [("pub", EntryKind::Dir, 0)]);
    assert_eq!(view.stat("pub/readme.txt").await.unwrap().size, 11);
    assert_eq!(view.read("pub/readme.txt", 7, 100).await.unwrap(), "data");

    // An anonymous client against a bucket that needs credentials is told so.
    let private = S3Server::start();
    small_tree(&private).await;
    let err = S3View::connect(spec(&private.endpoint, "", None)).await.unwrap_err();
    println!("anonymous on a private bucket: {err}");
    assert!(matches!(err, MountError::AccessDenied(_)), "{err:?}");
    assert!(err.to_string().contains("anonymous"), "{err}");
}

/// Not a pass/fail test: prints sequential throughput through `read` (128 KiB reads, as FUSE
/// issues them) next to one direct GET of the same 100 MiB object, in the same run. Runs on a
/// multi-threaded runtime, as the runner does, so read-ahead overlaps the reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_sequential_read_vs_direct_get() {
    let _heavy = HEAVY.lock().await;
    let server = S3Server::start();
    let data = big_data(BIG);
    let store = uploader(&server.endpoint, Some(SECRET_KEY));
    put(&store, "bench.bin", data.clone()).await;
    let expected = Sha256::digest(&data).to_vec();
    drop(data);
    let location = Path::parse("bench.bin").unwrap();

    let direct = || async {
        let started = Instant::now();
        let mut stream = store.get(&location).await.unwrap().into_stream();
        let mut total = 0;
        while let Some(chunk) = stream.try_next().await.unwrap() {
            total += chunk.len();
        }
        assert_eq!(total, BIG);
        started.elapsed()
    };
    // Like the direct GET, the timed loop only counts bytes (correctness is checked once, below,
    // and by `large_object_random_and_sequential_reads`).
    let through_view = || async {
        let view = connect(&server, "").await;
        let started = Instant::now();
        let mut offset = 0u64;
        loop {
            let data = view.read("bench.bin", offset, 128 << 10).await.unwrap();
            if data.is_empty() {
                break;
            }
            offset += data.len() as u64;
        }
        let elapsed = started.elapsed();
        assert_eq!(offset, BIG as u64);
        (elapsed, view.stats().get_requests)
    };
    let view = connect(&server, "").await;
    assert_eq!(read_sequentially(&view, "bench.bin", 128 << 10).await, (expected, BIG as u64));
    drop(view);
    // Warm the server's page cache, then alternate.
    direct().await;
    let mut best_direct = Duration::MAX;
    let mut best_view = Duration::MAX;
    let mut gets = 0;
    for _ in 0..3 {
        best_direct = best_direct.min(direct().await);
        let (elapsed, requests) = through_view().await;
        if elapsed < best_view {
            (best_view, gets) = (elapsed, requests);
        }
    }
    let rate = |d: Duration| 100.0 / d.as_secs_f64();
    println!(
        "BENCH sequential 100 MiB: direct GET {best_direct:?} ({:.0} MiB/s); S3View 128 KiB reads \
         {best_view:?} ({:.0} MiB/s, {gets} GETs); ratio {:.0}% (best of 3 each)",
        rate(best_direct),
        rate(best_view),
        100.0 * best_direct.as_secs_f64() / best_view.as_secs_f64()
    );
}
