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
    copy_data_between(&File::open(from)?, &std::fs::OpenOptions::new().write(true).open(to)?)
}

/// [`copy_data`] between open files (`dst` as long as `src`).
pub fn copy_data_between(src: &File, dst: &File) -> io::Result<u64> {
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = cove_blob::seek_data(src, pos)? else { break };
        let end = cove_blob::seek_hole(src, start)?.min(len);
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
/// The unit [`WriteBack::touched`] counts in: a packed image's chunk.
const PIECE: u64 = cove_blob::CHUNK_SIZE;

/// The file a process maps as its RAM, as [`write_back`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// The destination file itself, mapped shared: it is the RAM, nothing is written.
    Shared,
    /// The destination file itself, mapped copy-on-write: the changed pages are written into it.
    InPlace,
    /// A template's sealed memfd (named [`TEMPLATE_MEMFD`]…): the destination is made anew
    /// from it (its data, read through `/proc/<pid>/map_files`), then the changed pages.
    Template,
    /// The RAM file a lazy resume serves (inode [`crate::lazymem::INODE`]), whose data the
    /// caller has put in the destination already: the changed pages are written into it.
    Lazy,
}

/// What [`write_back`] did and saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WriteBack {
    /// Bytes of changed pages written.
    pub written: u64,
    /// The 1 MiB pieces of the RAM (offset / 1 MiB, ascending) with any page the process had
    /// touched (mapped, or swapped out): its working set.
    pub touched: Vec<u32>,
}

/// Name prefix of the sealed memfds VMs are cloned from (`/memfd:<name> (deleted)` in maps):
/// templates' RAM (`cove-tmpl-<key>`) and named snapshots' (`cove-tmpl-snap-<image>`, see
/// `snapmem`).
pub const TEMPLATE_MEMFD: &str = "cove-tmpl-";

/// Makes `file` what process `pid` sees through its mapping of `len` bytes of `base`, and
/// finds the pieces of it the process touched. Pages the process wrote are anonymous copies
/// (present but not file pages, or swapped out) in `/proc/<pid>/pagemap`; they are read from
/// `/proc/<pid>/mem` and written at their offsets. Pages it only read, or never touched, are
/// the mapped file's own: they are in `file` already ([`Base::InPlace`], [`Base::Lazy`], and
/// not written, so the mapping's view of them cannot change either) or copied from the mapped
/// file first ([`Base::Template`]). A shared mapping ([`Base::Shared`]) has no copies: `file`
/// is what the process sees. The process must not run meanwhile (a stopped VM).
pub fn write_back(pid: u32, len: u64, file: &Path, base: Base) -> io::Result<WriteBack> {
    let (start, end) = ram_mapping(pid, len, file, base)?;
    let dst = match base {
        Base::Shared => None,
        Base::InPlace | Base::Lazy => Some(std::fs::OpenOptions::new().write(true).open(file)?),
        Base::Template => {
            let dst = File::create(file)?;
            dst.set_len(len)?;
            let mapped = File::open(format!("/proc/{pid}/map_files/{start:x}-{end:x}"))?;
            copy_data_between(&mapped, &dst)?;
            Some(dst)
        }
    };
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    let pages = len / PAGE;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0;
    let mut touched = Touched::default();
    // A run of changed pages [from, page) is copied as one read and one write.
    let mut run: Option<u64> = None;
    let mut flush = |from: u64, to: u64| -> io::Result<()> {
        let Some(dst) = &dst else { return Ok(()) };
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
    walk_pagemap(pid, start, pages, |at, e| {
        touched.see(at, e);
        let changed = (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0;
        match (changed, run) {
            (true, None) => run = Some(at),
            (false, Some(from)) => {
                flush(from, at)?;
                run = None;
            }
            _ => {}
        }
        Ok(())
    })?;
    if let Some(from) = run {
        flush(from, pages)?;
    }
    Ok(WriteBack { written, touched: touched.0 })
}

/// The pieces of its RAM (`len` bytes of `base`, as for [`write_back`]) that process `pid` has
/// touched so far, read while it runs: what a VM touched to get where it is.
pub fn touched(pid: u32, len: u64, file: &Path, base: Base) -> io::Result<Vec<u32>> {
    let (start, _) = ram_mapping(pid, len, file, base)?;
    let mut touched = Touched::default();
    walk_pagemap(pid, start, len / PAGE, |at, e| {
        touched.see(at, e);
        Ok(())
    })?;
    Ok(touched.0)
}

/// Pieces with a touched page (mapped, or swapped out), ascending, from pagemap entries seen
/// in page order.
#[derive(Default)]
struct Touched(Vec<u32>);

impl Touched {
    fn see(&mut self, page: u64, entry: u64) {
        if entry & (PM_PRESENT | PM_SWAPPED) != 0 {
            let piece = (page * PAGE / PIECE) as u32;
            if self.0.last() != Some(&piece) {
                self.0.push(piece);
            }
        }
    }
}

/// Start and end addresses of process `pid`'s mapping of its RAM (`len` bytes of `base`).
fn ram_mapping(pid: u32, len: u64, file: &Path, base: Base) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let found = match base {
        Base::Shared | Base::InPlace => {
            let ino = std::fs::metadata(file)?.ino();
            let shared = base == Base::Shared;
            mapping(&maps, len, shared, |i, _| i == ino)
        }
        Base::Template => {
            let prefix = format!("/memfd:{TEMPLATE_MEMFD}");
            mapping(&maps, len, false, |_, path| path.starts_with(&prefix))
        }
        Base::Lazy => mapping(&maps, len, false, |i, _| i == crate::lazymem::INODE),
    };
    found.ok_or_else(|| {
        let what = format!("process {pid} has no {base:?} mapping of {len} bytes for {}", file.display());
        io::Error::new(io::ErrorKind::NotFound, what)
    })
}

/// Calls `each(page, entry)` for the `pages` pagemap entries of process `pid` from address
/// `start` on, in order.
fn walk_pagemap(
    pid: u32,
    start: u64,
    pages: u64,
    mut each: impl FnMut(u64, u64) -> io::Result<()>,
) -> io::Result<()> {
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    let mut entries = vec![0u8; 8 * 65536];
    let mut page = 0;
    while page < pages {
        let n = ((pages - page) as usize).min(entries.len() / 8);
        pagemap.read_exact_at(&mut entries[..n * 8], (start / PAGE + page) * 8)?;
        for (i, e) in entries[..n * 8].chunks_exact(8).enumerate() {
            each(page + i as u64, u64::from_le_bytes(e.try_into().expect("8 bytes")))?;
        }
        page += n as u64;
    }
    Ok(())
}

/// Start and end addresses of a mapping (`s` in its permissions when `shared`, `p` otherwise)
/// of `len` bytes from offset 0 of a file whose inode and path satisfy `which`, in a
/// `/proc/<pid>/maps` text.
fn mapping(maps: &str, len: u64, shared: bool, which: impl Fn(u64, &str) -> bool) -> Option<(u64, u64)> {
    maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (range, perms, offset, _dev, inode) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        let path = f.next().unwrap_or("");
        let (a, b) = range.split_once('-')?;
        let (a, b) = (u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?);
        let fits = b.checked_sub(a) == Some(len) && u64::from_str_radix(offset, 16) == Ok(0);
        let kind = if shared { 's' } else { 'p' };
        (fits && perms.ends_with(kind) && which(inode.parse().ok()?, path)).then_some((a, b))
    })
}

/// Whether process `pid` maps a template's or a snapshot's memfd (a VM created from a template
/// or restored from a named snapshot).
pub fn maps_template(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .is_ok_and(|m| m.contains(&format!("/memfd:{TEMPLATE_MEMFD}")))
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
        let ino = |want: u64| move |i: u64, _: &str| i == want;
        assert_eq!(mapping(maps, 512 << 20, false, ino(43)), Some((0x7f1000000000, 0x7f1020000000)));
        assert_eq!(mapping(maps, 512 << 20, false, ino(42)), None, "a shared mapping is not it");
        assert_eq!(mapping(maps, 512 << 20, true, ino(42)), Some((0x7f0000000000, 0x7f0020000000)));
        assert_eq!(mapping(maps, 4096, false, ino(43)), None, "nor one at another offset");
        assert_eq!(mapping("garbage\n\n2-1", 1, false, ino(43)), None);
        let memfd = "7f3000000000-7f3040000000 rw-p 00000000 00:01 9 /memfd:cove-tmpl-x (deleted)\n";
        let named = |_: u64, p: &str| p.starts_with("/memfd:cove-tmpl-");
        assert_eq!(mapping(memfd, 1 << 30, false, named), Some((0x7f3000000000, 0x7f3040000000)));
    }

    /// A child maps its RAM privately (the file itself, or a memfd copy of it named like a
    /// template's) or shared, writes some pages (one with zeros over data), reads one and
    /// stops; after the write-back the file reads as the child's memory did, and the pieces it
    /// touched are known.
    #[test]
    fn writes_back_what_a_process_changed() {
        for base in [Base::InPlace, Base::Template, Base::Shared] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ram");
            let f = File::create(&path).unwrap();
            f.set_len(8 << 20).unwrap();
            f.write_all_at(&[1u8; 4096 * 3], 0).unwrap();
            f.write_all_at(&[2u8; 4096], 5 << 20).unwrap();
            drop(f);
            let open = match base {
                Base::InPlace | Base::Shared => format!("f=open('{}','r+b')", path.display()),
                _ => format!(
                    "f=os.fdopen(os.memfd_create('{TEMPLATE_MEMFD}test'),'r+b'); f.write(open('{}','rb').read()); f.flush()",
                    path.display()
                ),
            };
            let flags = if base == Base::Shared { "MAP_SHARED" } else { "MAP_PRIVATE" };
            let script = format!(
                "import mmap,os,signal\n\
                 {open}; m=mmap.mmap(f.fileno(),8<<20,flags=mmap.{flags})\n\
                 m[4096:8192]=b'\\x07'*4096; m[5<<20:(5<<20)+4096]=bytes(4096); m[(7<<20)+5:(7<<20)+8]=b'abc'\n\
                 x=m[6<<20]\n\
                 os.kill(os.getpid(), signal.SIGSTOP)\n"
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
            // Read as a running VM's is after its restore: the same pieces.
            assert_eq!(touched(pid, 8 << 20, &path, base).unwrap(), [0, 5, 6, 7], "{base:?}: touched");
            if base == Base::Template {
                std::fs::remove_file(&path).unwrap();
            }
            let back = write_back(pid, 8 << 20, &path, base).unwrap();
            let _ = child.kill();
            let _ = child.wait();
            let got = std::fs::read(&path).unwrap();
            let mut want = vec![0u8; 8 << 20];
            want[..4096 * 3].fill(1);
            want[4096..8192].fill(7);
            want[(7 << 20) + 5..(7 << 20) + 8].copy_from_slice(b"abc");
            assert!(got == want, "{base:?}: the file is the child's view of its memory");
            let written = if base == Base::Shared { 0 } else { 3 * 4096 };
            assert_eq!(back.written, written, "{base:?}: only the three pages the child wrote");
            assert_eq!(back.touched, [0, 5, 6, 7], "{base:?}: the pieces the child touched");
        }
    }
}
