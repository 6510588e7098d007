//! Applying image layers to a directory, as an overlay mount of them would show it: later
//! layers replace earlier entries, `.wh.<name>` deletes `<name>` (a directory with everything
//! below it), `.wh..wh..opq` hides what lower layers put in its directory. Owners, modes
//! (setuid included), extended attributes, hard links, symlinks and file times are kept.
//!
//! Every path is resolved inside the root: a symlink a layer planted (`etc -> /etc`) is
//! followed as the guest would follow it, within the image, never into the host. Runs as root
//! (owners are set as they are in the image).

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Layer, OciError};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// Symlinks followed while resolving one path, as Linux allows.
const MAX_HOPS: usize = 40;

/// Limits on what all the layers of one image may write.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub bytes: u64,
    pub entries: u64,
}

/// Applies `layers` in order into `root` (an empty directory), checking each layer's content
/// against its `diff_id`. Returns the bytes of file content written.
pub fn apply_layers(root: &Path, layers: &[Layer], mut budget: Budget) -> Result<u64, OciError> {
    let start = budget.bytes;
    for (i, layer) in layers.iter().enumerate() {
        let file = fs::File::open(&layer.path).map_err(|e| OciError::io("opening a layer", e))?;
        let reader = decompress(&layer.media_type, io::BufReader::with_capacity(1 << 20, file))?;
        let mut hashing = HashingReader { inner: reader, hash: Sha256::new() };
        apply_layer(root, &mut hashing, &mut budget).map_err(|e| match e {
            OciError::Unusable(m) => OciError::Unusable(format!("layer {}: {m}", i + 1)),
            other => other,
        })?;
        // The tar may end before the stream does (padding): the digest covers all of it.
        io::copy(&mut hashing, &mut io::sink()).map_err(|e| corrupt_or_io(i, e))?;
        let got = format!("sha256:{}", hex::encode(hashing.hash.finalize()));
        if got != layer.diff_id {
            return Err(OciError::Corrupt(format!(
                "layer {}: its content is {got}, the config says {}",
                i + 1,
                layer.diff_id
            )));
        }
    }
    Ok(start - budget.bytes)
}

fn corrupt_or_io(i: usize, e: io::Error) -> OciError {
    match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof => {
            OciError::Corrupt(format!("layer {}: {e}", i + 1))
        }
        _ => OciError::io(format!("reading layer {}", i + 1), e),
    }
}

fn decompress<'a>(media_type: &str, r: impl Read + 'a) -> Result<Box<dyn Read + 'a>, OciError> {
    let mt = media_type.to_ascii_lowercase();
    if mt.ends_with("gzip") {
        Ok(Box::new(flate2::read::GzDecoder::new(r)))
    } else if mt.ends_with(".tar") || mt.ends_with("rootfs.diff.tar") {
        Ok(Box::new(r))
    } else {
        Err(OciError::Unusable(format!("unsupported layer media type {media_type:?}")))
    }
}

struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Applies one layer's tar stream.
pub fn apply_layer(root: &Path, tar: impl Read, budget: &mut Budget) -> Result<(), OciError> {
    let bad = |e: io::Error| match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof => {
            OciError::Corrupt(e.to_string())
        }
        _ => OciError::io("unpacking a layer", e),
    };
    let mut archive = tar::Archive::new(tar);
    // Paths this layer wrote (and their ancestors): an opaque marker hides everything else.
    let mut written: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let raw = entry.path().map_err(bad)?.into_owned();
        let Some(rel) = clean(&raw) else { continue };
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name().and_then(|n| n.to_str())) else {
            continue;
        };
        if budget.entries == 0 {
            return Err(OciError::TooLarge("the image has too many files".into()));
        }
        budget.entries -= 1;
        if name == OPAQUE {
            if let Some(dir) = resolve(root, parent, false)? {
                hide_lower(&dir, parent, &written)?;
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            // A whiteout below a directory an earlier whiteout removed has nothing to remove.
            if let Some(dir) = resolve(root, parent, false)? {
                remove_any(&dir.join(hidden))?;
            }
            continue;
        }
        let Some(dir) = resolve(root, parent, true)? else { continue };
        let dest = dir.join(name);
        let header = entry.header().clone();
        let (uid, gid) = (owner(header.uid()), owner(header.gid()));
        // Read where it matters (files and directories): links carry no mode of their own.
        let mode = || {
            header
                .mode()
                .map(|m| m & 0o7777)
                .map_err(|e| OciError::Corrupt(format!("{}: {e}", rel.display())))
        };
        let kind = header.entry_type();
        match kind {
            tar::EntryType::Directory => {
                let is_dir = fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir());
                if !is_dir {
                    remove_any(&dest)?;
                    fs::create_dir(&dest).map_err(|e| OciError::io("creating a directory", e))?;
                }
                set_owner_mode(&dest, uid, gid, mode()?)?;
                set_xattrs(&mut entry, &dest)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.size();
                if size > budget.bytes {
                    return Err(OciError::TooLarge("the image's files are larger than allowed".into()));
                }
                budget.bytes -= size;
                remove_any(&dest)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(|e| OciError::io("creating a file", e))?;
                io::copy(&mut entry, &mut f).map_err(bad)?;
                f.flush().map_err(|e| OciError::io("writing a file", e))?;
                drop(f);
                set_owner_mode(&dest, uid, gid, mode()?)?;
                set_xattrs(&mut entry, &dest)?;
                set_mtime(&dest, &header, false);
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| OciError::Unusable(format!("symlink {} has no target", rel.display())))?;
                remove_any(&dest)?;
                std::os::unix::fs::symlink(&target, &dest)
                    .map_err(|e| OciError::io("creating a symlink", e))?;
                std::os::unix::fs::lchown(&dest, Some(uid), Some(gid))
                    .map_err(|e| OciError::io("setting an owner", e))?;
                set_mtime(&dest, &header, true);
            }
            tar::EntryType::Link => {
                let target = entry.link_name().map_err(bad)?.and_then(|t| clean(&t)).ok_or_else(|| {
                    OciError::Unusable(format!("hard link {} has no target", rel.display()))
                })?;
                let (Some(tdir), Some(tname)) = (target.parent(), target.file_name()) else {
                    return Err(OciError::Unusable(format!("hard link {} to the root", rel.display())));
                };
                let source = resolve(root, tdir, false)?
                    .map(|d| d.join(tname))
                    .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| !m.is_dir()));
                let Some(source) = source else {
                    return Err(OciError::Unusable(format!(
                        "hard link {} to {}, which is not in the image",
                        rel.display(),
                        target.display()
                    )));
                };
                if source != dest {
                    remove_any(&dest)?;
                    fs::hard_link(&source, &dest).map_err(|e| OciError::io("creating a hard link", e))?;
                }
            }
            // Device nodes and FIFOs belong to a running system (/dev is the kernel's in a
            // sandbox); other types carry no file.
            _ => {
                tracing::debug!(path = %rel.display(), ?kind, "skipping entry");
                continue;
            }
        }
        for a in rel.ancestors().filter(|a| !a.as_os_str().is_empty()) {
            written.insert(a.to_path_buf());
        }
    }
    Ok(())
}

/// The path as a relative one without `.`; `None` for the root itself or a path that climbs
/// out with `..` (never in a sane layer; skipped rather than followed).
fn clean(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// The real directory `rel` names inside `root`, following symlinks within the image (an
/// absolute target is taken from `root`, `..` stops at `root`). Missing directories are made
/// when `create` (and a file in the way is replaced by one); otherwise `None`.
fn resolve(root: &Path, rel: &Path, create: bool) -> Result<Option<PathBuf>, OciError> {
    let mut pending: Vec<std::ffi::OsString> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .collect();
    let mut stack: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            stack.pop();
            continue;
        }
        if part == "." || part.is_empty() {
            continue;
        }
        let here: PathBuf = stack.iter().fold(root.to_path_buf(), |p, s| p.join(s)).join(&part);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.is_dir() => stack.push(part),
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(OciError::Unusable(format!("too many symlinks under {}", rel.display())));
                }
                let target = fs::read_link(&here).map_err(|e| OciError::io("reading a symlink", e))?;
                if target.is_absolute() {
                    stack.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(_) | Err(_) if !create => return Ok(None),
            Ok(_) => {
                remove_any(&here)?;
                fs::create_dir(&here).map_err(|e| OciError::io("creating a directory", e))?;
                stack.push(part);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&here).map_err(|e| OciError::io("creating a directory", e))?;
                fs::set_permissions(&here, fs::Permissions::from_mode(0o755))
                    .map_err(|e| OciError::io("setting a mode", e))?;
                stack.push(part);
            }
            Err(e) => return Err(OciError::io("resolving a path", e)),
        }
    }
    Ok(Some(stack.iter().fold(root.to_path_buf(), |p, s| p.join(s))))
}

/// Removes what lower layers put under `dir` (logical path `rel`), keeping what this layer
/// wrote.
fn hide_lower(dir: &Path, rel: &Path, written: &HashSet<PathBuf>) -> Result<(), OciError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(_) => return Ok(()),
    };
    for entry in entries {
        let entry = entry.map_err(|e| OciError::io("listing a directory", e))?;
        let child_rel = rel.join(entry.file_name());
        if !written.contains(&child_rel) {
            remove_any(&entry.path())?;
        } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
            hide_lower(&entry.path(), &child_rel, written)?;
        }
    }
    Ok(())
}

/// Removes a file, symlink or directory tree; nothing there is fine.
fn remove_any(p: &Path) -> Result<(), OciError> {
    let result = match fs::symlink_metadata(p) {
        Err(_) => return Ok(()),
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
    };
    result.map_err(|e| OciError::io("removing a replaced entry", e))
}

/// Tar ids beyond u32 cannot be owners on Linux; they become root's.
fn owner(id: io::Result<u64>) -> u32 {
    id.ok().and_then(|i| u32::try_from(i).ok()).unwrap_or(0)
}

/// Owner first: changing it clears setuid and setgid, which the mode then sets.
fn set_owner_mode(p: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), OciError> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(|e| OciError::io("setting an owner", e))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(|e| OciError::io("setting a mode", e))
}

fn set_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, p: &Path) -> Result<(), OciError> {
    let Ok(Some(exts)) = entry.pax_extensions() else { return Ok(()) };
    for ext in exts.flatten() {
        let Ok(key) = ext.key() else { continue };
        let Some(name) = key.strip_prefix("SCHILY.xattr.") else { continue };
        xattr::set(p, name, ext.value_bytes())
            .map_err(|e| OciError::io(format!("setting extended attribute {name}"), e))?;
    }
    Ok(())
}

fn set_mtime(p: &Path, header: &tar::Header, symlink: bool) {
    let Ok(mtime) = header.mtime() else { return };
    let t = filetime::FileTime::from_unix_time(mtime as i64, 0);
    let _ =
        if symlink { filetime::set_symlink_file_times(p, t, t) } else { filetime::set_file_times(p, t, t) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A layer made of (path, kind) entries.
    enum E<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8], u32),
        Link(&'a str, &'a str),
        Sym(&'a str, &'a str),
    }

    fn layer(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_mtime(1_700_000_000);
            match e {
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
                E::File(p, data, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, p, *data).unwrap();
                }
                E::Link(p, t) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, p, t).unwrap();
                }
                E::Sym(p, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, p, t).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn budget() -> Budget {
        Budget { bytes: 1 << 30, entries: 1 << 20 }
    }

    fn apply(root: &Path, entries: &[E]) {
        apply_layer(root, &layer(entries)[..], &mut budget()).unwrap();
    }

    #[test]
    fn whiteouts_opaque_dirs_and_replacements() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        apply(
            root,
            &[
                E::Dir("etc"),
                E::File("etc/keep", b"keep", 0o644),
                E::File("etc/gone", b"gone", 0o644),
                E::Dir("opt/tree/deep"),
                E::File("opt/tree/deep/f", b"f", 0o644),
                E::Dir("var/opaque"),
                E::File("var/opaque/old", b"old", 0o644),
                E::Dir("var/opaque/sub"),
                E::File("var/opaque/sub/older", b"older", 0o644),
                E::File("replaced", b"v1", 0o644),
            ],
        );
        apply(
            root,
            &[
                E::File("etc/.wh.gone", b"", 0o644),
                E::File("opt/.wh.tree", b"", 0o644),
                // Shadowed by the whiteout above (as Kaniko writes them): nothing to do.
                E::File("opt/tree/.wh.deep", b"", 0o644),
                E::File("var/opaque/.wh..wh..opq", b"", 0o644),
                E::File("var/opaque/new", b"new", 0o644),
                E::File("replaced", b"v2", 0o4755),
            ],
        );
        assert_eq!(fs::read(root.join("etc/keep")).unwrap(), b"keep");
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("opt/tree").exists() && root.join("opt").is_dir());
        let mut left: Vec<String> = fs::read_dir(root.join("var/opaque"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["new"]);
        assert_eq!(fs::read(root.join("replaced")).unwrap(), b"v2");
        let m = fs::metadata(root.join("replaced")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o4755, 1000, 1000));
        assert_eq!(m.mtime(), 1_700_000_000);
    }

    #[test]
    fn links_and_type_changes() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        apply(
            root,
            &[
                E::File("bin/tool", b"tool", 0o755),
                E::Link("bin/alias", "bin/tool"),
                E::Sym("usr/bin", "../bin"),
                E::Dir("becomes-file"),
                E::File("becomes-file/x", b"x", 0o644),
            ],
        );
        apply(root, &[E::File("becomes-file", b"now a file", 0o644), E::File("usr/bin/via", b"v", 0o644)]);
        let (a, b) =
            (fs::metadata(root.join("bin/tool")).unwrap(), fs::metadata(root.join("bin/alias")).unwrap());
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
        assert_eq!(fs::read_link(root.join("usr/bin")).unwrap(), PathBuf::from("../bin"));
        // A file written through a symlinked directory lands where the link points.
        assert_eq!(fs::read(root.join("bin/via")).unwrap(), b"v");
        assert_eq!(fs::read(root.join("becomes-file")).unwrap(), b"now a file");
    }

    #[test]
    fn symlinks_never_lead_out_of_the_root() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = t.path();
        let out = outside.path().to_str().unwrap().trim_start_matches('/').to_string();
        apply(root, &[E::Sym("escape", outside.path().to_str().unwrap()), E::Sym("up", "../../../../..")]);
        apply(root, &[E::File("escape/pwned", b"x", 0o644), E::File("up/pwned2", b"x", 0o644)]);
        assert!(fs::read_dir(outside.path()).unwrap().next().is_none(), "wrote outside the root");
        // Both landed inside: the absolute target under the root, `..` stopped at the root.
        assert!(root.join(&out).join("pwned").is_file());
        assert!(root.join("pwned2").is_file());
    }

    #[test]
    fn paths_climbing_out_are_skipped_and_budgets_hold() {
        let t = tempfile::tempdir().unwrap();
        let mut raw = layer(&[E::File("ok", b"fine", 0o644)]);
        // Rewrite the name in the header to climb out (the builder refuses to write `..`).
        raw[..2].copy_from_slice(b"..");
        raw[2..5].copy_from_slice(b"/ok");
        let mut h = tar::Header::from_byte_slice(&raw[..512]).clone();
        h.set_cksum();
        raw[..512].copy_from_slice(h.as_bytes());
        apply_layer(t.path(), &raw[..], &mut budget()).unwrap();
        assert!(fs::read_dir(t.path()).unwrap().next().is_none());

        let big = layer(&[E::File("big", &[0u8; 4096], 0o644)]);
        let err = apply_layer(t.path(), &big[..], &mut Budget { bytes: 100, entries: 10 }).unwrap_err();
        assert!(matches!(err, OciError::TooLarge(_)), "{err}");
    }

    #[test]
    fn diff_ids_are_checked() {
        let t = tempfile::tempdir().unwrap();
        let data = layer(&[E::File("a", b"a", 0o644)]);
        let path = t.path().join("layer.tar");
        fs::write(&path, &data).unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let good = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let l = |diff_id: &str| Layer {
            path: path.clone(),
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            diff_id: diff_id.into(),
            size: data.len() as u64,
        };
        assert_eq!(apply_layers(&root, &[l(&good)], budget()).unwrap(), 1);
        let err = apply_layers(&root, &[l(&format!("sha256:{}", "0".repeat(64)))], budget()).unwrap_err();
        assert!(matches!(err, OciError::Corrupt(_)), "{err}");
    }
}
