//! Cove on an S3 blob store: a real S3 server (s3s-fs from crates.io, see scripts/s3-server)
//! holds the pause images and snapshots, configured only by `--blob-url` and the usual AWS
//! variables. Pause, transparent resume, snapshot and restore work as on the local store, and
//! the objects are really in the bucket (nothing in the server's local blob directory).

mod common;

use common::{qemu_pids, stored_images, TestServer};
use cove_blob::testing::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use serde_json::json;

fn dirs(path: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(path)
        .map(|rd| rd.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn pause_resume_and_snapshots_on_an_s3_store() {
    let s3 = S3Server::start();
    let url = format!("s3://{BUCKET}/cove");
    let data_dir = std::env::temp_dir().join(format!("cove-test-s3-{}", common::rand_hex()));
    let server = TestServer::start_with(
        data_dir,
        &["--blob-url", &url],
        &[
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_ENDPOINT_URL", &s3.endpoint),
        ],
    );
    let api = server.new_org(None);
    let id = api.create(json!({})).await;
    let (code, _, err) = api
        .exec(
            &id,
            "nohup setsid sh -c 'while true; do sleep 1; done' >/dev/null 2>&1 & echo on-s3 > /home/user/f",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let (_, pid, _) = api.exec(&id, "sleep 0.3; pgrep -f 'while true' | head -1").await;

    let r = api.post(&format!("/v1/sandbox/{id}/pause"), json!({})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(qemu_pids(&id).is_empty());
    let images = s3.object_file("cove/images");
    let stored = dirs(&images);
    assert_eq!(stored.len(), 1, "one image in the bucket: {stored:?}");
    assert!(images.join(&stored[0]).join("manifest.json").exists());
    assert!(stored_images(&server.data_dir).is_empty(), "nothing may land in the local blob dir");

    // Resumed from S3 by the next request: same process, same files.
    let (code, out, _) = api.exec(&id, "pgrep -f 'while true' | head -1; cat /home/user/f").await;
    assert_eq!((code, out), (0, format!("{pid}on-s3\n")));
    // The server's S3 keys are not in the environment of its QEMU, where an escaped guest lands.
    let qemu = qemu_pids(&id);
    assert_eq!(qemu.len(), 1);
    let environ = std::fs::read(format!("/proc/{}/environ", qemu[0])).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains(SECRET_KEY) && !environ.contains("AWS_"), "QEMU's environment: {environ:?}");

    let r = api.post(&format!("/v1/sandbox/{id}/snapshot/create"), json!({"name": "s3-snap"})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let snap_id = r.json()["id"].as_str().unwrap().to_string();
    let r = api.post("/v1/snapshot/restore", json!({"snapshot_name": "s3-snap"})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let restored = r.json()["id"].as_str().unwrap().to_string();
    let (code, out, _) = api.exec(&restored, "cat /home/user/f; hostname").await;
    assert_eq!((code, out), (0, format!("on-s3\n{restored}\n")));

    assert_eq!(api.delete(&format!("/v1/snapshot/{snap_id}")).await.status, 204);
    for sbx in [&id, &restored] {
        assert_eq!(api.delete(&format!("/v1/sandbox/{sbx}")).await.status, 204);
    }
    // (s3s-fs keeps emptied directories; what counts is that no object is left.)
    common::eventually("no image objects left in the bucket", || {
        walkdir::WalkDir::new(&images).into_iter().filter_map(|e| e.ok()).all(|e| !e.file_type().is_file())
    })
    .await;
    server.kill(libc::SIGTERM);
}
