//! Blob storage for Cove and the compact image format that VM state is stored in.
//!
//! Pausing a sandbox, snapshotting it or publishing a template all come down to the same thing:
//! put a few large, mostly empty files (guest RAM on tmpfs, qcow2 overlays) somewhere durable and
//! get them back quickly, possibly on another host. This crate is that one piece:
//!
//! - [`BlobStore`] ([`store`]) is a small key/value façade over the `object_store` crate, opened
//!   from a URL: a local directory (`file:///var/lib/cove/blobs`) or S3 and anything that speaks
//!   its protocol (`s3://bucket/prefix`). Every byte goes through the `ObjectStore` trait, so the
//!   backends behave the same and tests can inject failures.
//! - [`image`] packs a sparse file into one blob of lz4-compressed 1 MiB chunks (holes and
//!   zero chunks are not stored), and unpacks it with a crc32 check per chunk, writing only the
//!   non-zero pages so the restored file is as sparse as the guest's memory was. An image is a
//!   set of such blobs under a prefix plus a `manifest.json` written last, which is what makes
//!   the image exist.

pub mod image;
pub mod store;
#[allow(unsafe_code)]
mod sys;
pub mod testing;

use std::path::PathBuf;

pub use image::{
    fetch_packed, pack_file, read_manifest, unpack_file, write_manifest, Chunk, PackedFile, PackedReader,
    CHUNK_SIZE, MANIFEST,
};
pub use store::{BlobStore, S3Options};
/// Walking a sparse file's data extents (lseek SEEK_DATA / SEEK_HOLE), also used by the runner.
pub use sys::{seek_data, seek_hole};

/// What went wrong, with enough context (store, key, file, chunk) to act on it.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The store URL could not be understood or the store could not be set up from it.
    #[error("blob store {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// A key or prefix that is not a valid object path (empty, `..`, empty segments, ...).
    #[error("invalid blob key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    /// What a runner on another machine reported of its store (whole, for the logs).
    #[error("{0}")]
    Remote(String),
    /// The object does not exist.
    #[error("blob {0:?} not found")]
    NotFound(String),
    /// The store refused or failed an operation (the source says why: HTTP status, I/O error).
    #[error("blob store {store}: {op} {key:?} failed: {source}")]
    Store {
        store: String,
        op: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
    /// A local file (the one being packed, or the destination of an unpack) failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A packed image does not match its description: bad chunk table, truncated blob,
    /// undecodable chunk or checksum mismatch.
    #[error("image file {file:?}, chunk at offset {offset}: {reason}")]
    Corrupt { file: String, offset: u64, reason: String },
    /// A manifest could not be encoded or decoded.
    #[error("manifest {key:?}: {source}")]
    Manifest {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}
