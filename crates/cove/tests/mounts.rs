//! Object-storage mounts, checked from inside real guests against real S3 servers (s3s-fs from
//! crates.io, installed by `scripts/s3-server install`): a private bucket (signed requests,
//! behind a byte-counting TCP relay so the test sees what the host fetched) and a public one.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{Api, Leftovers, TestServer};
use cove_blob::testing::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const BIG: u64 = 100 << 20;

/// Byte `i` of `data/big.bin` (not compressible, not periodic within a block).
fn big_byte(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (i >> 20) as u8
}

fn big_slice(from: u64, len: u64) -> Vec<u8> {
    (from..from + len).map(big_byte).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes objects straight into s3s-fs's directory (it serves the files as they are).
fn put(server: &S3Server, key: &str, data: &[u8]) {
    let path = server.object_file(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn fill_private(server: &S3Server) {
    put(server, "top.txt", b"top level\n");
    put(server, "docs/readme.md", b"# readme\n");
    put(server, "docs/deep/a/b/c.txt", b"deep file\n");
    let mut big = Vec::with_capacity(BIG as usize);
    big.extend((0..BIG).map(big_byte));
    put(server, "data/big.bin", &big);
    for i in 0..10_000 {
        put(server, &format!("many/f{i:05}.txt"), format!("object {i}").as_bytes());
    }
}

/// A TCP relay in front of an S3 server that counts the bytes the server sent.
struct CountingRelay {
    endpoint: String,
    from_server: Arc<AtomicU64>,
}

impl CountingRelay {
    async fn start(upstream: &str) -> CountingRelay {
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let from_server = Arc::new(AtomicU64::new(0));
        let counter = from_server.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (upstream, counter) = (upstream.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match tokio::io::AsyncReadExt::read(&mut sr, &mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                            if tokio::io::AsyncWriteExt::write_all(&mut cw, &buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut cw).await;
                    };
                    let _ = tokio::join!(up, down);
                });
            }
        });
        CountingRelay { endpoint, from_server }
    }

    fn bytes(&self) -> u64 {
        self.from_server.load(Ordering::Relaxed)
    }
}

fn private_mount(endpoint: &str, path: &str) -> Value {
    json!({"type": "object-storage", "bucket": BUCKET, "mount_path": path, "endpoint": endpoint,
        "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY})
}

async fn sh(api: &Api, id: &str, cmd: &str) -> (i64, String) {
    let (code, out, err) = api.exec(id, cmd).await;
    (code, format!("{out}{err}"))
}

/// A grep pattern that matches `s` without holding it (sending the secret into the guest would
/// put it there).
fn pattern(s: &str) -> String {
    format!("{}.", &s[..s.len() - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_appear_lazily_read_only_and_change_live() {
    let private = S3Server::start();
    fill_private(&private);
    let relay = CountingRelay::start(&private.endpoint).await;
    let public = S3Server::start_anonymous();
    put(&public, "pub/hello.txt", b"public hello\n");

    let srv = TestServer::shared();
    let api = srv.new_org(None);
    let left = Leftovers::new(&api);
    let public_mount = json!({"type": "object-storage", "bucket": BUCKET, "mount_path": "/data/public",
        "endpoint": public.endpoint});
    let r = api
        .post(
            "/v1/sandbox",
            json!({"template_name": "system/debian:bookworm",
                "mounts": [private_mount(&relay.endpoint, "/data/private"), public_mount]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let id = created["id"].as_str().unwrap().to_string();
    left.sandbox(&id);
    let mounts = created["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 2, "{created}");
    assert!(mounts[0]["id"].as_str().unwrap().starts_with("mnt-"));
    assert_eq!(mounts[0]["read_only"], true);
    for field in ["endpoint", "access_key_id", "secret_access_key"] {
        assert!(mounts[0].get(field).is_none(), "{field} returned: {created}");
    }
    assert!(!r.text().contains(SECRET_KEY) && !r.text().contains(ACCESS_KEY));

    // Attached before the sandbox was handed back: files, nested prefixes, right sizes.
    let (code, out) = sh(
        &api,
        &id,
        "cat /data/private/top.txt /data/public/pub/hello.txt && \
         stat -c '%s %F %n' /data/private/docs/readme.md /data/private/docs/deep/a/b/c.txt \
           /data/private/data/big.bin /data/private/docs/deep && ls /data/private",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("top level\npublic hello\n"), "{out}");
    for want in [
        "9 regular file /data/private/docs/readme.md",
        "10 regular file /data/private/docs/deep/a/b/c.txt",
        &format!("{BIG} regular file /data/private/data/big.bin"),
        "directory /data/private/docs/deep",
    ] {
        assert!(out.contains(want), "{want:?} in {out}");
    }
    assert!(out.ends_with("data\ndocs\nmany\ntop.txt\n"), "{out}");
    let (_, mtab) = sh(&api, &id, "grep ' /data/' /proc/mounts").await;
    assert!(mtab.contains("cove-mnt-") && mtab.contains(" ro,"), "{mtab}");

    // A read at an offset of the 100 MB object fetches about what it needs, not the object.
    let before = relay.bytes();
    let offset = 50 * (1 << 20) + 12_345;
    let (code, out) = sh(
        &api,
        &id,
        &format!(
            "python3 -c \"f = open('/data/private/data/big.bin', 'rb'); f.seek({offset}); \
             import hashlib, sys; sys.stdout.write(hashlib.sha256(f.read(4096)).hexdigest())\""
        ),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, sha256_hex(&big_slice(offset, 4096)));
    let fetched = relay.bytes() - before;
    println!("a 4 KiB read at 50 MiB fetched {fetched} bytes from the S3 server");
    assert!((4096..=4 << 20).contains(&fetched), "fetched {fetched} bytes for a 4 KiB read");

    // The whole object, sequentially, is right.
    let (code, out) = sh(&api, &id, "sha256sum /data/private/data/big.bin").await;
    assert_eq!(code, 0, "{out}");
    let whole: Vec<u8> = (0..BIG).map(big_byte).collect();
    assert!(out.starts_with(&sha256_hex(&whole)), "{out}");
    drop(whole);

    // 10,000 objects in one directory.
    let (code, out) = sh(&api, &id, "ls /data/private/many | wc -l; cat /data/private/many/f09999.txt").await;
    assert_eq!((code, out.as_str()), (0, "10000\nobject 9999"), "{out}");

    // Read-only: nothing can be written, made or removed.
    for cmd in [
        "echo x > /data/private/new.txt",
        "echo x >> /data/private/top.txt",
        "mkdir /data/private/d",
        "rm /data/private/top.txt",
        "touch /data/public/pub/hello.txt",
    ] {
        let (code, out) = sh(&api, &id, &format!("sudo -n sh -c '{cmd}'")).await;
        assert_ne!(code, 0, "{cmd} succeeded");
        assert!(out.contains("Read-only file system"), "{cmd}: {out}");
    }

    // Add one with a prefix: only that prefix is visible.
    let mut docs = private_mount(&relay.endpoint, "/mnt/docs");
    docs["prefix"] = json!("docs/");
    let r = api.post(&format!("/v1/sandbox/{id}/mounts"), docs).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let added = r.json();
    let mid = added["id"].as_str().unwrap().to_string();
    assert_eq!((added["prefix"].as_str(), added["mount_path"].as_str()), (Some("docs/"), Some("/mnt/docs")));
    let (code, out) = sh(&api, &id, "ls /mnt/docs; cat /mnt/docs/deep/a/b/c.txt; ls /mnt/docs/../").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("deep\nreadme.md\ndeep file\n"), "{out}");
    let (code, _) = sh(&api, &id, "test -e /mnt/docs/top.txt").await;
    assert_ne!(code, 0, "an object outside the prefix is visible");

    // Update: the prefix (remount in place), then the path (the old one goes).
    let path = format!("/v1/sandbox/{id}/mounts/{mid}");
    let r = api.req(reqwest::Method::PATCH, &path, Some(json!({"prefix": "docs/deep/"}))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["prefix"], "docs/deep/");
    let (code, out) = sh(&api, &id, "ls /mnt/docs").await;
    assert_eq!((code, out.as_str()), (0, "a\n"), "{out}");
    let r =
        api.req(reqwest::Method::PATCH, &path, Some(json!({"mount_path": "/mnt/docs2", "prefix": ""}))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().get("prefix").is_none(), "{}", r.text());
    let (code, out) = sh(&api, &id, "test ! -e /mnt/docs && ls /mnt/docs2").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("top.txt"), "{out}");
    // Credentials only: no remount needed, reads go on.
    let r = api
        .req(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Clearing one credential alone is refused with the field named; `id` cannot change.
    let r = api.req(reqwest::Method::PATCH, &path, Some(json!({"secret_access_key": ""}))).await;
    common::assert_field(&r, "secret_access_key");
    let r = api.req(reqwest::Method::PATCH, &path, Some(json!({"id": "mnt-other"}))).await;
    assert_eq!(r.status, 400, "{}", r.text());
    // Wrong settings are refused before anything changes, with the field named.
    let r = api.req(reqwest::Method::PATCH, &path, Some(json!({"bucket": "no-such-bucket"}))).await;
    common::assert_field(&r, "bucket");
    let (code, out) = sh(&api, &id, "cat /mnt/docs2/top.txt").await;
    assert_eq!((code, out.as_str()), (0, "top level\n"), "{out}");

    // Delete: unmounted, the path is gone.
    assert_eq!(api.delete(&path).await.status, 204);
    let (code, out) = sh(&api, &id, "test ! -e /mnt/docs2 && grep -c cove- /proc/mounts").await;
    assert_eq!((code, out.as_str()), (0, "2\n"), "{out}");
    assert_eq!(api.delete(&path).await.status, 404);

    // Errors at add time name the field; nothing is mounted.
    let mut m = private_mount("http://127.0.0.1:1", "/mnt/bad");
    let r = api.post(&format!("/v1/sandbox/{id}/mounts"), m.clone()).await;
    common::assert_field(&r, "endpoint");
    m["endpoint"] = json!(relay.endpoint);
    m["secret_access_key"] = json!("not-the-secret");
    let r = api.post(&format!("/v1/sandbox/{id}/mounts"), m.clone()).await;
    common::assert_field(&r, "access_key_id");
    assert!(!r.text().contains("not-the-secret"), "{}", r.text());
    m["secret_access_key"] = json!(SECRET_KEY);
    m["bucket"] = json!("no-such-bucket");
    let r = api.post(&format!("/v1/sandbox/{id}/mounts"), m.clone()).await;
    common::assert_field(&r, "bucket");
    let r = api
        .post(&format!("/v1/sandbox/{id}/mounts"), private_mount(&relay.endpoint, "/data/private/x"))
        .await;
    assert_eq!(r.status, 409, "{}", r.text());
    let (_, out) = sh(&api, &id, "ls -d /mnt/bad 2>&1; grep -c cove- /proc/mounts").await;
    assert!(out.ends_with("2\n") && out.contains("No such file"), "{out}");

    // At most 8: six more fit, the ninth is a 409.
    for i in 0..6 {
        let r = api
            .post(&format!("/v1/sandbox/{id}/mounts"), private_mount(&relay.endpoint, &format!("/m/{i}")))
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let r = api.post(&format!("/v1/sandbox/{id}/mounts"), private_mount(&relay.endpoint, "/m/9")).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let got = api.get(&format!("/v1/sandbox/{id}")).await;
    assert_eq!(got.json()["mounts"].as_array().unwrap().len(), 8);
    assert!(!got.text().contains(SECRET_KEY) && !got.text().contains(&relay.endpoint), "{}", got.text());
    let (code, out) = sh(&api, &id, "cat /m/5/top.txt && grep -c cove- /proc/mounts").await;
    assert_eq!((code, out.as_str()), (0, "top level\n8\n"), "{out}");

    // Create-time errors name the mount's field and leave no sandbox behind.
    let r = api
        .post(
            "/v1/sandbox",
            json!({"template_name": "system/debian:bookworm",
                "mounts": [private_mount(&relay.endpoint, "/a"), private_mount("http://127.0.0.1:1", "/b")]}),
        )
        .await;
    common::assert_field(&r, "mounts[1].endpoint");
    let list = api.get("/v1/sandboxes").await;
    assert_eq!(list.json()["items"].as_array().map(|a| a.len()), Some(1), "{}", list.text());

    left.delete_sandbox(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_survive_pause_snapshots_stop_and_restarts_and_keys_stay_out() {
    let since = common::unix_now();
    let private = S3Server::start();
    put(&private, "top.txt", b"top level\n");
    put(&private, "data/chunk.bin", &big_slice(0, 8 << 20));
    let data_dir = std::env::temp_dir().join(format!("cove-test-mounts-{}", common::rand_hex()));
    // Everything the server sends into guests (agent requests, mount answers) is recorded.
    let trace = std::env::temp_dir().join(format!("cove-test-mounts-trace-{}", common::rand_hex()));
    let trace_env = [("COVE_CHANNEL_TRACE", trace.to_str().unwrap())];
    let srv = TestServer::start_with(data_dir.clone(), &[], &trace_env);
    let api = srv.new_org(None);
    let left = Leftovers::new(&api);
    let r = api
        .post(
            "/v1/sandbox",
            json!({"template_name": "system/debian:bookworm",
                "mounts": [private_mount(&private.endpoint, "/data/b")]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    left.sandbox(&id);
    let check =
        "cat /data/b/top.txt && python3 -c \"f = open('/data/b/data/chunk.bin', 'rb'); f.seek(3000000); \
         import hashlib, sys; sys.stdout.write(hashlib.sha256(f.read(65536)).hexdigest())\"";
    let want = format!("top level\n{}", sha256_hex(&big_slice(3_000_000, 65536)));
    let (code, out) = sh(&api, &id, check).await;
    assert_eq!((code, &out), (0, &want));

    // The keys are nowhere in the guest: files, mount table, process environments, memory. A
    // marker the guest holds is found by the same scan, so the scan can see.
    let marker = common::hold_marker(&api, &id).await;
    for key in [SECRET_KEY, ACCESS_KEY] {
        let (code, out) = common::guest_scan(&api, &id, &pattern(key), since, "/data").await;
        assert_eq!(out.trim(), "0", "a key is in the guest: exit {code}: {out}");
    }
    assert!(
        common::guest_memory_contains(&id, marker.as_bytes()),
        "the memory scan cannot see the guest's memory"
    );
    for key in [SECRET_KEY, ACCESS_KEY] {
        assert!(!common::guest_memory_contains(&id, key.as_bytes()), "a key is in the guest's memory");
    }
    // Nor stored in plain by the control plane.
    let db = common::stored_metadata(&data_dir);
    assert!(!db.is_empty(), "no metadata for {}", data_dir.display());
    assert!(memchr::memmem::find(&db, SECRET_KEY.as_bytes()).is_none(), "the secret is in the database");

    // Pause: the stored memory image holds no key; after the resume reads work.
    let r = api.action(&id, "pause").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let store = cove_blob::BlobStore::open(&format!("file://{}", data_dir.join("blobs").display())).unwrap();
    let images = common::stored_images(&data_dir);
    assert_eq!(images.len(), 1, "{images:?}");
    let prefix = format!("images/{}", images[0]);
    let m = cove_runner::image::manifest(&store, &prefix).await.unwrap().unwrap();
    let dest = data_dir.join("scan.mem");
    cove_blob::unpack_file(&store, &prefix, &m.memory, &dest).await.unwrap();
    assert!(common::file_contains(&dest, marker.as_bytes()), "the image scan cannot see the guest's memory");
    for key in [SECRET_KEY, ACCESS_KEY] {
        assert!(!common::file_contains(&dest, key.as_bytes()), "a key is in the paused image");
    }
    std::fs::remove_file(&dest).unwrap();
    let (code, out) = sh(&api, &id, check).await;
    assert_eq!((code, &out), (0, &want), "after resume");

    // A snapshot records the mounts; the restored sandbox has them and reads work in both.
    let r = api.post(&format!("/v1/sandbox/{id}/snapshot/create"), json!({})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let snap = r.json();
    left.snapshot(snap["id"].as_str().unwrap());
    let r = api.post("/v1/snapshot/restore", json!({"snapshot_name": snap["name"]})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let restored = r.json();
    let rid = restored["id"].as_str().unwrap().to_string();
    left.sandbox(&rid);
    assert_eq!(restored["mounts"][0]["mount_path"], "/data/b", "{restored}");
    for sid in [&id, &rid] {
        let (code, out) = sh(&api, sid, check).await;
        assert_eq!((code, &out), (0, &want), "after snapshot, {sid}");
    }

    // The server is killed and started again: the running guests' mounts are served again.
    srv.kill(libc::SIGKILL);
    let srv2 = TestServer::start_with(data_dir.clone(), &[], &trace_env);
    let api = api.on(&srv2);
    for p in [
        format!("/v1/sandbox/{id}"),
        format!("/v1/sandbox/{rid}"),
        format!("/v1/snapshot/{}", snap["id"].as_str().unwrap()),
    ] {
        left.forget(&p);
    }
    let left = Leftovers::new(&api);
    left.sandbox(&id);
    left.sandbox(&rid);
    left.snapshot(snap["id"].as_str().unwrap());
    let (code, out) = sh(&api, &rid, check).await;
    assert_eq!((code, &out), (0, &want), "after a server restart");

    // Stop and start: a fresh boot mounts them again, and changes made while stopped (checked
    // against the server, recorded) apply at the start.
    assert_eq!(api.action(&rid, "stop").await.status, 200);
    let mut extra = private_mount(&private.endpoint, "/data/c");
    extra["prefix"] = json!("data/");
    let r = api.post(&format!("/v1/sandbox/{rid}/mounts"), extra.clone()).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let extra_id = r.json()["id"].as_str().unwrap().to_string();
    extra["secret_access_key"] = json!("not-the-secret");
    extra["mount_path"] = json!("/data/d");
    let r = api.post(&format!("/v1/sandbox/{rid}/mounts"), extra).await;
    common::assert_field(&r, "access_key_id");
    let r = api
        .req(
            reqwest::Method::PATCH,
            &format!("/v1/sandbox/{rid}/mounts/{extra_id}"),
            Some(json!({"mount_path": "/data/e"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(api.state_of(&rid).await, "stopped", "a mount change started the sandbox");
    assert_eq!(api.action(&rid, "start").await.status, 200);
    let (code, out) = sh(&api, &rid, check).await;
    assert_eq!((code, &out), (0, &want), "after stop/start");
    let (code, out) =
        sh(&api, &rid, "stat -c %s /data/e/chunk.bin; test ! -e /data/c && test ! -e /data/d").await;
    assert_eq!((code, out.trim()), (0, (8u64 << 20).to_string().as_str()), "{out}");

    // The agent traffic and the mounts' answers carried the mount (its path, the files' bytes)
    // and never a key.
    assert!(common::file_contains(&trace, b"/data/b"), "the trace did not record the mount request");
    assert!(common::file_contains(&trace, b"top level"), "the trace did not record the mount's answers");
    for key in [SECRET_KEY, ACCESS_KEY] {
        assert!(!common::file_contains(&trace, key.as_bytes()), "a key was sent into a guest");
    }
    let _ = std::fs::remove_file(&trace);

    left.delete_sandbox(&rid).await;
    left.delete_sandbox(&id).await;
    left.delete_snapshot(snap["id"].as_str().unwrap()).await;
    srv2.kill(libc::SIGTERM);
    let _ = std::fs::remove_dir_all(&data_dir);
}
