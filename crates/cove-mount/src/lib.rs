//! The host side of Cove's read-only S3 bucket mounts.
//!
//! A sandbox can mount an S3 bucket (or a prefix of one) read-only. In the guest, a FUSE
//! filesystem served by the guest agent forwards every lookup, listing and read over the agent
//! channel to the host runner; the runner answers them from an [`S3View`], which talks S3 with
//! credentials that never enter the guest.
//!
//! An [`S3View`] shows the keys under a prefix as a directory tree:
//!
//! - directories are implied by key prefixes (`a/b/c.txt` makes `a` and `a/b`), so `stat` of a
//!   directory works without a marker object; a key ending in `/` (a "folder marker") makes a
//!   directory, never a file; when a file and a directory share a name, the directory wins (the
//!   file is not reachable), as in mountpoint-s3;
//! - paths are relative to the view's root (`""` is the root) and may not contain `..`, `.` or
//!   empty components, so the view never reaches outside its prefix;
//! - metadata (listings, `stat`) is cached for a few seconds, and reads go through a bounded LRU
//!   cache of aligned blocks with sequential read-ahead, so that the 128 KiB reads FUSE issues
//!   cost about as much as one large GET, while a random read fetches only the blocks it touches.
//!
//! [`S3View::stats`] counts requests, bytes fetched and cache hits, for tests and benchmarks.

mod cache;
mod error;
mod view;

pub use error::MountError;
pub use view::{process_stats, Entry, EntryKind, MountSpec, S3View, ViewOptions, ViewStats, DEFAULT_REGION};
