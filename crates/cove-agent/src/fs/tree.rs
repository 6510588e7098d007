//! Directory trees, depth-limited and with exclusions.

use super::*;

/// `tree`: the entries under `base`, `max_depth` levels deep (absent or 0: as deep as allowed).
pub(super) fn tree_entries(base: &Path, max_depth: Option<u32>, exclude: &[String]) -> Res<Vec<TreeEntry>> {
    let meta = sfs::metadata(base).at(base)?;
    if !meta.is_dir() {
        return Err(Fail::io(base, not_a_directory()));
    }
    let depth = max_depth.filter(|d| *d > 0).unwrap_or(MAX_TREE_DEPTH).min(MAX_TREE_DEPTH);
    let excludes = Excludes::new(exclude)?;
    let mut budget = MAX_ENTRIES;
    build_tree(base, Path::new(""), depth, &excludes, &mut budget).at(base)
}

pub(super) fn build_tree(
    dir: &Path,
    rel: &Path,
    depth: u32,
    excludes: &Excludes,
    budget: &mut usize,
) -> io::Result<Vec<TreeEntry>> {
    let mut entries: Vec<sfs::DirEntry> = sfs::read_dir(dir)?.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    let mut out = Vec::new();
    for entry in entries {
        if *budget == 0 {
            break;
        }
        let name = entry.file_name();
        let rel = rel.join(&name);
        if excludes.matches(&rel, &name) {
            continue;
        }
        *budget -= 1;
        // DirEntry::file_type does not follow symlinks: a link is a file here.
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let children = (is_dir && depth > 1)
            .then(|| build_tree(&entry.path(), &rel, depth - 1, excludes, budget).unwrap_or_default());
        out.push(TreeEntry {
            name: name.to_string_lossy().into_owned(),
            kind: if is_dir { TreeEntryKind::Directory } else { TreeEntryKind::File },
            children,
        });
    }
    Ok(out)
}
