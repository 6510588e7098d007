//! Finding files: glob patterns, exclusions, walking a tree, and grep.

use super::*;

/// `exclude` globs: an entry is excluded when its name or its path relative to the walk's root
/// matches one of them.
pub(super) struct Excludes(Option<GlobSet>);

impl Excludes {
    pub(super) fn new(globs: &[String]) -> Res<Self> {
        if globs.is_empty() {
            return Ok(Excludes(None));
        }
        let mut b = GlobSetBuilder::new();
        for g in globs {
            let g = g.trim_end_matches('/');
            let g = g.strip_prefix("./").unwrap_or(g);
            b.add(Glob::new(g).map_err(|e| Fail::field("exclude", format!("exclude: {e}")))?);
        }
        b.build().map(|s| Excludes(Some(s))).map_err(|e| Fail::field("exclude", format!("exclude: {e}")))
    }

    pub(super) fn matches(&self, rel: &Path, name: &OsStr) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_match(name) || s.is_match(rel))
    }
}

/// A glob as `glob` and grep's `include` use it: without a `/` it matches entry names at any
/// depth (like `find -name`); with one it matches the path relative to the search root, where
/// `*` stays within a directory and `**` crosses them; an absolute one matches absolute paths.
pub(super) struct PathGlob {
    matcher: GlobMatcher,
    scope: GlobScope,
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum GlobScope {
    Name,
    Relative,
    Absolute,
}

impl PathGlob {
    fn new(field: &str, pattern: &str) -> Res<Self> {
        let pattern = pattern.strip_prefix("./").unwrap_or(pattern);
        let scope = if pattern.starts_with('/') {
            GlobScope::Absolute
        } else if pattern.contains('/') {
            GlobScope::Relative
        } else {
            GlobScope::Name
        };
        let glob = GlobBuilder::new(pattern)
            .literal_separator(scope != GlobScope::Name)
            .build()
            .map_err(|e| Fail::bad(format!("{field}: {e}")))?;
        Ok(PathGlob { matcher: glob.compile_matcher(), scope })
    }

    fn is_match(&self, abs: &Path, rel: &Path) -> bool {
        match self.scope {
            GlobScope::Name => abs.file_name().is_some_and(|n| self.matcher.is_match(n)),
            GlobScope::Relative => self.matcher.is_match(rel),
            GlobScope::Absolute => self.matcher.is_match(abs),
        }
    }
}

/// Walks `base` without following symlinks, sorted by name, pruning excluded entries.
pub(super) fn walk<'a>(
    base: &'a Path,
    max_depth: usize,
    excludes: &'a Excludes,
) -> impl Iterator<Item = walkdir::DirEntry> + 'a {
    walkdir::WalkDir::new(base)
        .follow_links(false)
        .min_depth(1)
        .max_depth(max_depth)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(move |e| {
            let rel = e.path().strip_prefix(base).unwrap_or(e.path());
            !excludes.matches(rel, e.file_name())
        })
        .filter_map(Result::ok)
}

/// `glob`: absolute paths under `base` matching `pattern` (default `*`), sorted.
pub(super) fn glob_paths(base: &Path, pattern: Option<&str>, exclude: &[String]) -> Res<Vec<String>> {
    let meta = sfs::metadata(base).at(base)?;
    if !meta.is_dir() {
        return Err(Fail::io(base, not_a_directory()));
    }
    let pattern = pattern.filter(|p| !p.is_empty()).unwrap_or("*");
    let glob = PathGlob::new("pattern", pattern)?;
    let excludes = Excludes::new(exclude)?;
    let mut items: Vec<String> = walk(base, usize::MAX, &excludes)
        .filter(|e| glob.is_match(e.path(), e.path().strip_prefix(base).unwrap_or(e.path())))
        .take(MAX_ENTRIES)
        .map(|e| lossy(e.path()))
        .collect();
    items.sort();
    Ok(items)
}

/// `grep`: lines matching `pattern` (a regex, or the literal text if it is not a valid one) in
/// the regular text files under `base` (or in `base` itself if it is a file).
pub(super) fn grep_paths(
    base: &Path,
    pattern: &str,
    include: Option<&str>,
    exclude: &[String],
) -> Res<Vec<SearchMatch>> {
    let meta = sfs::metadata(base).at(base)?;
    let regex = regex::bytes::Regex::new(pattern)
        .or_else(|_| regex::bytes::Regex::new(&regex::escape(pattern)))
        .map_err(|e| Fail::field("pattern", format!("pattern: {e}")))?;
    let include = include.filter(|i| !i.is_empty()).map(|i| PathGlob::new("include", i)).transpose()?;
    let excludes = Excludes::new(exclude)?;
    let mut items = Vec::new();
    if !meta.is_dir() {
        grep_file(&regex, base, &mut items);
        return Ok(items);
    }
    for entry in walk(base, usize::MAX, &excludes) {
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(base).unwrap_or(entry.path());
        if include.as_ref().is_some_and(|g| !g.is_match(entry.path(), rel)) {
            continue;
        }
        if grep_file(&regex, entry.path(), &mut items) {
            break;
        }
    }
    Ok(items)
}

/// Adds `path`'s matching lines to `out`; returns true once `out` is full. Binary, empty
/// (which includes procfs files) and over-large files are skipped.
pub(super) fn grep_file(regex: &regex::bytes::Regex, path: &Path, out: &mut Vec<SearchMatch>) -> bool {
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.is_file() || meta.len() == 0 || meta.len() > MAX_GREP_FILE {
        return false;
    }
    let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    if (&mut file).take(MAX_GREP_FILE).read_to_end(&mut data).is_err() {
        return false;
    }
    if data[..data.len().min(BINARY_PROBE)].contains(&0) {
        return false;
    }
    let text = data.strip_suffix(b"\n").unwrap_or(&data);
    let name = lossy(path);
    for (i, line) in text.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if regex.is_match(line) {
            out.push(SearchMatch { path: name.clone(), line: i as u64 + 1, content: cut_line(line) });
            if out.len() >= MAX_GREP_MATCHES {
                return true;
            }
        }
    }
    false
}

pub(super) fn cut_line(line: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(line).into_owned();
    if s.len() > MAX_GREP_LINE {
        let mut end = MAX_GREP_LINE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}
