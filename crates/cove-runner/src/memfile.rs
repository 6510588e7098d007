//! Guest RAM files: copying a template's RAM into a new sandbox's file while QEMU starts.
//!
//! A booted guest has touched a fraction of its RAM; the rest of the file is holes. The copy
//! walks the data extents (SEEK_DATA/SEEK_HOLE) and, within them, skips chunks that are all
//! zero, so the new file allocates only what the guest really uses.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Creates `to` with the length of `from` (all holes), ready for QEMU to map.
pub fn create_sized(from: &Path, to: &Path) -> io::Result<()> {
    let len = std::fs::metadata(from)?.len();
    let f = File::create(to)?;
    f.set_len(len)
}

/// Copies the data of `from` into `to` (created by `create_sized`), leaving holes as holes.
pub fn copy_data(from: &Path, to: &Path) -> io::Result<u64> {
    let src = File::open(from)?;
    let dst = std::fs::OpenOptions::new().write(true).open(to)?;
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = cove_blob::seek_data(&src, pos)? else { break };
        let end = cove_blob::seek_hole(&src, start)?.min(len);
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], off)?;
            if buf[..n].iter().any(|b| *b != 0) {
                dst.write_all_at(&buf[..n], off)?;
                copied += n as u64;
            }
            off += n as u64;
        }
        pos = end;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let f = File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"hello", 3 << 20).unwrap();
        f.write_all_at(&[7u8; 5000], 40 << 20).unwrap();
        create_sized(&a, &b).unwrap();
        copy_data(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        use std::os::unix::fs::MetadataExt;
        // Only the chunks with data were written.
        assert!(std::fs::metadata(&b).unwrap().blocks() * 512 <= 4 << 20);
    }
}
