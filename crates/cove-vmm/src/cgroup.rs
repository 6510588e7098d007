//! Per-VM cgroups, v2 where the host has it, v1 (memory + pids controllers) otherwise.

use std::io;
use std::path::{Path, PathBuf};

const V2_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup directories of one VM; created empty, joined by QEMU before it execs.
#[derive(Debug, Clone)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates `cove/<name>` with a memory limit, under every controller hierarchy used.
    pub fn create(name: &str, memory_limit_bytes: u64) -> io::Result<Cgroup> {
        let cg = Cgroup::locate(name);
        if Path::new(V2_ROOT).join("cgroup.controllers").exists() {
            let parent = Path::new(V2_ROOT).join("cove");
            std::fs::create_dir_all(&parent)?;
            // Delegate the controllers we set limits with to our subtree.
            let _ = std::fs::write(Path::new(V2_ROOT).join("cgroup.subtree_control"), "+memory +pids");
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +pids");
            let dir = &cg.dirs[0];
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("memory.max"), memory_limit_bytes.to_string())?;
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        } else {
            for dir in &cg.dirs {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(cg.dirs[0].join("memory.limit_in_bytes"), memory_limit_bytes.to_string())?;
        }
        Ok(cg)
    }

    /// The directories `create` makes for `name`, without touching anything.
    pub fn locate(name: &str) -> Cgroup {
        if Path::new(V2_ROOT).join("cgroup.controllers").exists() {
            Cgroup { dirs: vec![Path::new(V2_ROOT).join("cove").join(name)] }
        } else {
            let dirs = ["memory", "pids"]
                .iter()
                .map(|c| Path::new(V2_ROOT).join(c).join("cove").join(name))
                .filter(|d| d.parent().and_then(Path::parent).is_some_and(Path::exists))
                .collect();
            Cgroup { dirs }
        }
    }

    /// `cgroup.procs` files a new process writes itself into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Removes the directories; they must hold no process any more.
    pub fn remove(&self) -> io::Result<()> {
        for dir in &self.dirs {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
