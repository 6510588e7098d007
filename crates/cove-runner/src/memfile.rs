//! Guest RAM files.
//!
//! - Copying a template's RAM into a new sandbox's file while QEMU starts. A booted guest has
//!   touched a fraction of its RAM; the rest of the file is holes. The copy walks the data
//!   extents (SEEK_DATA/SEEK_HOLE) and, within them, skips chunks that are all zero, so the
//!   new file allocates only what the guest really uses.
//! - Writing back the pages a guest changed under a private (copy-on-write) mapping of its RAM
//!   file, so that the file becomes its RAM again (see [`write_back`]).

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

/// Pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
const PAGE: u64 = 4096;

/// Writes into `file` the pages process `pid` changed under its private mapping of it: after
/// this, the file holds what the process sees. Pages the process wrote are anonymous copies
/// (present but not file pages, or swapped out) in `/proc/<pid>/pagemap`; they are read from
/// `/proc/<pid>/mem` and written at their offsets. Pages it only read, or never touched, are
/// the file's own and are not written, so the mapping's view of them cannot change either.
/// The process must not run meanwhile (a stopped VM). Returns the bytes written.
pub fn write_back(pid: u32, file: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let dst = std::fs::OpenOptions::new().write(true).open(file)?;
    let (ino, len) = {
        let m = dst.metadata()?;
        (m.ino(), m.len())
    };
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let start = private_mapping(&maps, ino, len).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {pid} has no private mapping of {}", file.display()),
        )
    })?;
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    let pages = len / PAGE;
    let mut entries = vec![0u8; 8 * 65536];
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0;
    let mut page = 0;
    // A run of changed pages [from, page) is copied as one read and one write.
    let mut run: Option<u64> = None;
    let mut flush = |from: u64, to: u64| -> io::Result<()> {
        let mut off = from * PAGE;
        while off < to * PAGE {
            let n = ((to * PAGE - off) as usize).min(buf.len());
            mem.read_exact_at(&mut buf[..n], start + off)?;
            dst.write_all_at(&buf[..n], off)?;
            written += n as u64;
            off += n as u64;
        }
        Ok(())
    };
    while page < pages {
        let n = ((pages - page) as usize).min(entries.len() / 8);
        pagemap.read_exact_at(&mut entries[..n * 8], (start / PAGE + page) * 8)?;
        for (i, e) in entries[..n * 8].chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            let changed = (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0;
            let at = page + i as u64;
            match (changed, run) {
                (true, None) => run = Some(at),
                (false, Some(from)) => {
                    flush(from, at)?;
                    run = None;
                }
                _ => {}
            }
        }
        page += n as u64;
    }
    if let Some(from) = run {
        flush(from, pages)?;
    }
    Ok(written)
}

/// Start address of the mapping of inode `ino`, `len` bytes from offset 0, in a
/// `/proc/<pid>/maps` text, if it is private (`p` in its permissions).
fn private_mapping(maps: &str, ino: u64, len: u64) -> Option<u64> {
    maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (range, perms, offset, _dev, inode) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        let (a, b) = range.split_once('-')?;
        let (a, b) = (u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?);
        let fits = inode.parse() == Ok(ino) && b - a == len && u64::from_str_radix(offset, 16) == Ok(0);
        (fits && perms.ends_with('p')).then_some(a)
    })
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

    #[test]
    fn finds_the_private_mapping_of_a_file() {
        let maps = "7f0000000000-7f0020000000 rw-s 00000000 00:19 42 /dev/shm/x.mem\n\
                    7f1000000000-7f1020000000 rw-p 00000000 fe:00 43 /data/memory\n\
                    7f2000000000-7f2000001000 rw-p 00001000 fe:00 43 /data/memory\n";
        assert_eq!(private_mapping(maps, 43, 512 << 20), Some(0x7f1000000000));
        assert_eq!(private_mapping(maps, 42, 512 << 20), None, "a shared mapping is not it");
        assert_eq!(private_mapping(maps, 43, 4096), None, "nor one at another offset");
        assert_eq!(private_mapping("garbage\n\n1-2", 43, 1), None);
    }

    /// A child maps a file privately, writes some pages (one with zeros over data), and
    /// stops; after the write-back the file reads as the child's memory did.
    #[test]
    fn writes_back_what_a_process_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1u8; 4096 * 3], 0).unwrap();
        f.write_all_at(&[2u8; 4096], 5 << 20).unwrap();
        drop(f);
        let script = format!(
            "import mmap,os,signal\n\
             f=open('{p}','r+b'); m=mmap.mmap(f.fileno(),8<<20,flags=mmap.MAP_PRIVATE)\n\
             m[4096:8192]=b'\\x07'*4096; m[5<<20:(5<<20)+4096]=bytes(4096); m[(7<<20)+5:(7<<20)+8]=b'abc'\n\
             x=m[6<<20]\n\
             os.kill(os.getpid(), signal.SIGSTOP)\n",
            p = path.display()
        );
        let mut child = std::process::Command::new("python3").arg("-c").arg(script).spawn().unwrap();
        let pid = child.id();
        // Wait until the child stops itself.
        for _ in 0..500 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('T')) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let written = write_back(pid, &path).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let got = std::fs::read(&path).unwrap();
        let mut want = vec![0u8; 8 << 20];
        want[..4096 * 3].fill(1);
        want[4096..8192].fill(7);
        want[(7 << 20) + 5..(7 << 20) + 8].copy_from_slice(b"abc");
        assert!(got == want, "the file is the child's view of its memory");
        assert_eq!(written, 3 * 4096, "only the three pages the child wrote");
    }
}
