//! Warm images: what a pause leaves on the runner beside the image it stored, so that a resume
//! here need not fetch and unpack it.
//!
//! A pause stores the sandbox's RAM, disk and device state in the blob store (the image: the
//! truth, portable to any runner), and keeps the same three files in `<data>/warm/<id>/`, the
//! RAM file on disk. A resume of that image on this runner takes them back: the RAM file is
//! mapped copy-on-write (`VmSpec::private_memory`), so the guest runs before any of its memory
//! is read, and pages come from the page cache (or the disk) on first touch.
//!
//! An entry names its image (`image` holds the prefix, written last): a resume of another image
//! of the sandbox (a newer pause, or one made on another runner) finds a mismatch, drops the
//! entry and unpacks as before. Entries are made under `<id>.<random>.partial` and renamed
//! whole, so a crash leaves either a whole entry or a partial one that nobody takes (and the
//! runner's next start removes).

use std::path::{Path, PathBuf};

use crate::RunnerConfig;

/// The files of an entry, and where they go in a sandbox's directory.
pub const MEMORY: &str = "memory";
pub const DISK: &str = "disk.qcow2";
pub const STATE: &str = "state.bin";
const IMAGE: &str = "image";

fn root(cfg: &RunnerConfig) -> PathBuf {
    cfg.data_dir.join("warm")
}

fn entry(cfg: &RunnerConfig, id: &str) -> PathBuf {
    root(cfg).join(id)
}

/// An entry being made: the disk and device state are in, the RAM file and the image name
/// are not yet (see [`Partial::finish`]).
pub struct Partial {
    dir: PathBuf,
}

/// Starts the warm entry of a sandbox just paused: moves its disk and device state in. The RAM
/// file follows with [`Partial::finish`], at once when it is on disk (a rename), or in the
/// background when it is on tmpfs (a copy): the pause need not wait for it.
pub fn begin(cfg: &RunnerConfig, id: &str, disk: &Path, state: &Path) -> std::io::Result<Partial> {
    let dir = root(cfg).join(format!("{id}.{}.partial", hex::encode(rand::random::<[u8; 4]>())));
    std::fs::create_dir_all(&dir)?;
    let moved = std::fs::rename(disk, dir.join(DISK)).and_then(|()| std::fs::rename(state, dir.join(STATE)));
    if let Err(e) = moved {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(Partial { dir })
}

impl Partial {
    /// Adds the RAM file (moved, or when `on_tmpfs` copied, data only, and removed) and names
    /// the image: the entry of sandbox `id` is then whole, replacing any older one.
    pub fn finish(
        self,
        cfg: &RunnerConfig,
        id: &str,
        prefix: &str,
        memory: &Path,
        on_tmpfs: bool,
    ) -> std::io::Result<()> {
        let done = (|| {
            if on_tmpfs {
                let to = self.dir.join(MEMORY);
                crate::memfile::create_sized(memory, &to)?;
                crate::memfile::copy_data(memory, &to)?;
            } else {
                std::fs::rename(memory, self.dir.join(MEMORY))?;
            }
            std::fs::write(self.dir.join(IMAGE), prefix)?;
            let entry = entry(cfg, id);
            let _ = std::fs::remove_dir_all(&entry);
            std::fs::rename(&self.dir, entry)
        })();
        if on_tmpfs {
            let _ = std::fs::remove_file(memory);
        }
        if done.is_err() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        done
    }
}

/// Takes the warm entry of image `prefix` of sandbox `id`, if this runner has it: its files
/// move to `memory`, `disk` and `state`. An entry of another image is dropped.
pub fn take(cfg: &RunnerConfig, id: &str, prefix: &str, memory: &Path, disk: &Path, state: &Path) -> bool {
    let dir = entry(cfg, id);
    let Ok(image) = std::fs::read_to_string(dir.join(IMAGE)) else { return false };
    let taken = image == prefix
        && [(MEMORY, memory), (DISK, disk), (STATE, state)]
            .iter()
            .all(|(name, to)| std::fs::rename(dir.join(name), to).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
    taken
}

/// Drops the warm entry of sandbox `id` (it is deleted, or its image is gone).
pub fn drop_entry(cfg: &RunnerConfig, id: &str) {
    let _ = std::fs::remove_dir_all(entry(cfg, id));
}

/// Removes unfinished entries (cut by a crash) and returns the ids and image prefixes of the
/// whole ones, for the caller to drop those whose image is gone. Run before any pause.
pub fn sweep(cfg: &RunnerConfig) -> Vec<(String, String)> {
    let Ok(rd) = std::fs::read_dir(root(cfg)) else { return Vec::new() };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            match std::fs::read_to_string(e.path().join(IMAGE)) {
                Ok(image) if !name.ends_with(".partial") => Some((name, image)),
                _ => {
                    let _ = std::fs::remove_dir_all(e.path());
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> RunnerConfig {
        RunnerConfig::new(dir.join("cache"), dir.join("data"))
    }

    fn files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let (m, d, s) = (dir.join("m"), dir.join("d"), dir.join("s"));
        std::fs::write(&m, b"ram").unwrap();
        std::fs::write(&d, b"disk").unwrap();
        std::fs::write(&s, b"state").unwrap();
        (m, d, s)
    }

    #[test]
    fn an_entry_is_taken_once_and_only_for_its_image() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = cfg(tmp.path());
        let (m, d, s) = files(tmp.path());
        let partial = begin(&cfg, "sbx-1", &d, &s).unwrap();
        assert!(sweep_view(&cfg).is_empty(), "an unfinished entry is not one");
        partial.finish(&cfg, "sbx-1", "images/a", &m, false).unwrap();
        assert!(!m.exists() && !d.exists() && !s.exists(), "the files moved into the entry");
        assert_eq!(sweep(&cfg), vec![("sbx-1".to_string(), "images/a".to_string())]);
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let (m2, d2, s2) = (out.join("m"), out.join("d"), out.join("s"));
        assert!(take(&cfg, "sbx-1", "images/a", &m2, &d2, &s2));
        assert_eq!(std::fs::read(&m2).unwrap(), b"ram");
        assert_eq!(std::fs::read(&d2).unwrap(), b"disk");
        assert_eq!(std::fs::read(&s2).unwrap(), b"state");
        assert!(!take(&cfg, "sbx-1", "images/a", &m2, &d2, &s2), "taken once");

        // An entry of another image is dropped, not taken.
        let (m, d, s) = files(tmp.path());
        begin(&cfg, "sbx-1", &d, &s).unwrap().finish(&cfg, "sbx-1", "images/b", &m, true).unwrap();
        assert!(!m.exists(), "a tmpfs RAM file is copied, then removed");
        assert!(!take(&cfg, "sbx-1", "images/c", &m2, &d2, &s2));
        assert!(sweep(&cfg).is_empty());

        // A crash between the two steps leaves a partial entry, which the sweep removes.
        let (_, d, s) = files(tmp.path());
        drop(begin(&cfg, "sbx-2", &d, &s).unwrap());
        assert!(sweep(&cfg).is_empty());
        assert_eq!(std::fs::read_dir(root(&cfg)).unwrap().count(), 0, "nothing left");
    }

    /// Whole entries, without removing anything.
    fn sweep_view(cfg: &RunnerConfig) -> Vec<String> {
        std::fs::read_dir(root(cfg))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(IMAGE).exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}
