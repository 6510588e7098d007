//! lseek(2) with SEEK_DATA / SEEK_HOLE, which std does not expose.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

fn lseek(f: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an open descriptor with integer arguments; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after `offset`.
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    Ok(Some(r as u64))
}

/// Start of the next data extent at or after `offset`.
pub fn seek_data(f: &File, offset: u64) -> io::Result<Option<u64>> {
    lseek(f, offset, libc::SEEK_DATA)
}

/// Start of the next hole at or after `offset` (the end of the file counts as one).
pub fn seek_hole(f: &File, offset: u64) -> io::Result<u64> {
    Ok(lseek(f, offset, libc::SEEK_HOLE)?.unwrap_or(offset))
}

/// A read-only shared mapping of a whole file, unmapped on drop.
pub struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    /// Maps the first `len` bytes of `f` (which must be that long) for reading. The file must
    /// not shrink while it is mapped (reading past its end raises SIGBUS): blobs are written
    /// whole under another name and never truncated.
    pub fn read_only(f: &File, len: u64) -> io::Result<Mapping> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        if len == 0 {
            return Ok(Mapping { ptr: std::ptr::null_mut(), len: 0 });
        }
        // SAFETY: a new mapping of an open descriptor at an address the kernel chooses; no
        // memory of this process is touched.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is a live mapping of `len` readable bytes until `self` is dropped, and
        // the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps the mapping made in `read_only`; no slice of it outlives `self`.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}
