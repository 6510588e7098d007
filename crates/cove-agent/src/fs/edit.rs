//! Editing files in place: exact-text replacements, their diff, and the write that keeps the
//! file's identity (owner, mode, hard links).

use super::*;

/// Byte offsets of the non-overlapping occurrences of `needle` in `hay`.
pub(super) fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    let mut found = Vec::new();
    let Some((&first, _)) = needle.split_first() else {
        return found;
    };
    let Some(last_start) = hay.len().checked_sub(needle.len()) else {
        return found;
    };
    let mut i = 0;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|b| *b == first) {
            Some(p) => {
                i += p;
                if hay[i..].starts_with(needle) {
                    found.push(i);
                    i += needle.len();
                } else {
                    i += 1;
                }
            }
            None => break,
        }
    }
    found
}

/// Replaces every occurrence of `find`; returns the new text and how many there were.
pub(super) fn replace_all(hay: &[u8], find: &[u8], replace: &[u8]) -> (Vec<u8>, u64) {
    let hits = find_all(hay, find);
    if hits.is_empty() {
        return (hay.to_vec(), 0);
    }
    let mut out = Vec::with_capacity(hay.len() + hits.len() * replace.len());
    let mut last = 0;
    for &at in &hits {
        out.extend_from_slice(&hay[last..at]);
        out.extend_from_slice(replace);
        last = at + find.len();
    }
    out.extend_from_slice(&hay[last..]);
    (out, hits.len() as u64)
}

/// Applies edits in order, each to the previous one's result. Fails, naming the edit, when a
/// `find` text does not occur.
pub(super) fn apply_edits(content: &[u8], edits: &[FileEdit]) -> Result<(Vec<u8>, u64), String> {
    let mut current = content.to_vec();
    let mut total = 0;
    for (i, e) in edits.iter().enumerate() {
        let replace = e.replace.as_deref().unwrap_or("");
        let (next, n) = replace_all(&current, e.find.as_bytes(), replace.as_bytes());
        if n == 0 {
            return Err(format!("edits[{i}].find: text not found: {:?}", e.find));
        }
        current = next;
        total += n;
    }
    Ok((current, total))
}

pub(super) fn unified_diff(name: &str, old: &[u8], new: &[u8]) -> String {
    let old = String::from_utf8_lossy(old);
    let new = String::from_utf8_lossy(new);
    similar::TextDiff::from_lines(old.as_ref(), new.as_ref()).unified_diff().header(name, name).to_string()
}

pub(super) fn read_for_edit(path: &Path) -> Res<Vec<u8>> {
    let mut file = File::open(path).at(path)?;
    let meta = file.metadata().at(path)?;
    if meta.is_dir() {
        return Err(Fail::io(path, is_a_directory()));
    }
    if meta.len() > MAX_EDIT_FILE {
        return Err(Fail::bad(format!(
            "{}: too large to edit ({} bytes; the limit is {MAX_EDIT_FILE})",
            path.display(),
            meta.len()
        )));
    }
    let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    (&mut file).take(MAX_EDIT_FILE + 1).read_to_end(&mut data).at(path)?;
    if data.len() as u64 > MAX_EDIT_FILE {
        return Err(Fail::bad(format!("{}: too large to edit", path.display())));
    }
    Ok(data)
}

/// Rewrites a file in place, which keeps its inode, mode and owner.
pub(super) fn write_in_place(path: &Path, data: &[u8]) -> Res<()> {
    let mut file = OpenOptions::new().write(true).truncate(true).open(path).at(path)?;
    file.write_all(data).at(path)?;
    file.flush().at(path)
}
