//! BlobStore and the image codec against a real S3 server: s3s-fs from crates.io, installed by
//! `scripts/s3-server install`. A mock would not catch what matters with S3: request signing,
//! path-style addressing, multipart uploads, ranged gets, delimiter listing and bulk deletes.
//!
//! Each test starts its own server (on a free port, with its own root and credentials) and
//! passes the settings through `S3Options`, not the process environment, so tests stay
//! independent when run in parallel. A missing server binary fails the tests: it is never a
//! reason to skip them.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};

use bytes::Bytes;
use cove_blob::{pack_file, read_manifest, unpack_file, write_manifest, BlobError, BlobStore};
use rand::{RngCore, SeedableRng};

use cove_blob::testing::{S3Server, BUCKET};
const MIB: u64 = 1 << 20;

#[tokio::test]
async fn put_get_list_delete() {
    let server = S3Server::start();
    let store = server.store("cove/blobs");
    assert!(store.description().starts_with("s3://cove-test/cove/blobs (endpoint http://127.0.0.1:"));

    assert!(!store.exists("img/1/ram").await.unwrap());
    assert!(matches!(store.get("img/1/ram").await, Err(BlobError::NotFound(k)) if k == "img/1/ram"));
    store.put("img/1/ram", Bytes::from_static(b"one")).await.unwrap();
    store.put("img/1/manifest.json", Bytes::from_static(b"{}")).await.unwrap();
    store.put("img/2/ram", Bytes::from_static(b"two")).await.unwrap();
    store.put("imgx/3/ram", Bytes::from_static(b"three")).await.unwrap();
    // Keys are relative to the URL's prefix.
    assert_eq!(std::fs::read(server.object_file("cove/blobs/img/1/ram")).unwrap(), b"one");

    assert_eq!(store.get("img/2/ram").await.unwrap(), Bytes::from_static(b"two"));
    assert!(store.exists("img/1/manifest.json").await.unwrap());
    assert_eq!(store.list_dirs("img").await.unwrap(), ["1", "2"]);
    assert_eq!(store.list_dirs("").await.unwrap(), ["img", "imgx"]);
    assert!(store.list_dirs("nothing").await.unwrap().is_empty());

    assert_eq!(store.delete_prefix("img/1").await.unwrap(), 2);
    assert!(!store.exists("img/1/ram").await.unwrap());
    assert_eq!(store.list_dirs("img").await.unwrap(), ["2"]);
    assert_eq!(store.delete_prefix("img").await.unwrap(), 1);
    assert_eq!(store.delete_prefix("img").await.unwrap(), 0);
    assert!(store.exists("imgx/3/ram").await.unwrap());

    // Another prefix of the same bucket sees none of it.
    assert!(server.store("elsewhere").list_dirs("").await.unwrap().is_empty());
}

#[tokio::test]
async fn pack_unpack_round_trip() {
    let server = S3Server::start();
    let store = server.store("images");
    let dir = tempfile::tempdir().unwrap();

    // 40 MiB, sparse: 12 MiB of random bytes (stored raw, so the blob needs a multipart
    // upload), 6 MiB of text (compresses), an all-zero allocated MiB, and odd-offset bits.
    let src = dir.path().join("ram");
    let size = 40 * MIB + 333;
    File::create(&src).unwrap().set_len(size).unwrap();
    let f = OpenOptions::new().write(true).open(&src).unwrap();
    let mut random = vec![0u8; 12 * MIB as usize];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut random);
    f.write_all_at(&random, 3 * MIB).unwrap();
    let text = b"Cove keeps sandboxes as VMs; this is a line of guest memory. ".repeat(110_000);
    f.write_all_at(&text[..6 * MIB as usize], 20 * MIB + 17).unwrap();
    f.write_all_at(&vec![0u8; MIB as usize], 30 * MIB).unwrap();
    f.write_all_at(b"odd", 12_345).unwrap();
    f.write_all_at(b"the end", size - 7).unwrap();
    drop(f);

    let packed = pack_file(&store, "sbx-1", "ram", &src).await.unwrap();
    assert_eq!(packed.size, size);
    assert!(!packed.chunks.iter().any(|c| c.offset == 30 * MIB), "zero chunk stored");
    assert!(packed.stored_bytes > 12 * MIB && packed.stored_bytes < 14 * MIB, "{}", packed.stored_bytes);
    write_manifest(&store, "sbx-1", &packed).await.unwrap();

    let manifest: cove_blob::PackedFile = read_manifest(&store, "sbx-1").await.unwrap().unwrap();
    assert_eq!(manifest, packed);
    let dest = dir.path().join("restored");
    let written = unpack_file(&store, "sbx-1", &manifest, &dest).await.unwrap();
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&src).unwrap(), "content differs");
    let allocated = std::fs::metadata(&dest).unwrap().blocks() * 512;
    assert!(allocated <= written + 256 * 1024, "not sparse: {allocated} allocated, {written} written");

    // The manifest was written last and is what listing finds; deleting the image removes all.
    assert_eq!(store.list_dirs("").await.unwrap(), ["sbx-1"]);
    assert_eq!(store.delete_prefix("sbx-1").await.unwrap(), 2);
    assert_eq!(read_manifest::<cove_blob::PackedFile>(&store, "sbx-1").await.unwrap(), None);
}

#[tokio::test]
async fn wrong_secret_is_a_clear_error() {
    let server = S3Server::start();
    let store = BlobStore::open_with(&format!("s3://{BUCKET}/x"), &server.options("not-the-secret")).unwrap();
    let err = store.put("k", Bytes::from_static(b"v")).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BlobError::Store { op: "put", .. }), "{msg}");
    assert!(msg.contains("403") && msg.contains("SignatureDoesNotMatch"), "{msg}");
    assert!(!msg.contains("not-the-secret"), "secret leaked: {msg}");
    let err = store.get("k").await.unwrap_err();
    assert!(matches!(err, BlobError::Store { op: "get", .. }), "{err}");
}
