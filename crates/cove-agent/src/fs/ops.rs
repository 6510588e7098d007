//! The operations themselves, on the guest's filesystem, with what they need to hand new files
//! to the sandbox user.

use super::*;

/// What an operation needs: who owns new files, and how to name owners.
#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) user: SandboxUser,
    pub(super) names: Names,
}

/// Who a copied entry should belong to.
#[derive(Clone, Copy)]
pub(super) enum Owner {
    /// The sandbox user (a copy is a new file).
    User,
    /// The source's owner (a move across filesystems).
    Source,
}

impl Ctx {
    pub(super) fn resolve(&self, path: &str) -> PathBuf {
        resolve(&self.user, path)
    }

    /// Gives a newly created entry to `uid:gid`. Only root can give files away, and what root
    /// creates belongs to uid 0; anything else means the agent is not root (as in tests), and
    /// the entry already belongs to the agent's own user.
    pub(super) fn chown_new(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        let m = sfs::symlink_metadata(path)?;
        if m.uid() != 0 || (m.uid() == uid && m.gid() == gid) {
            return Ok(());
        }
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    }

    pub(super) fn give(&self, path: &Path) -> io::Result<()> {
        Self::chown_new(path, self.user.uid, self.user.gid)
    }

    pub(super) fn give_file(&self, file: &File) -> io::Result<()> {
        let m = file.metadata()?;
        if m.uid() != 0 || (m.uid() == self.user.uid && m.gid() == self.user.gid) {
            return Ok(());
        }
        std::os::unix::fs::fchown(file, Some(self.user.uid), Some(self.user.gid))
    }

    pub(super) fn file_info(&self, path: &Path, meta: &Metadata) -> FileInfo {
        let is_symlink = meta.file_type().is_symlink();
        FileInfo {
            name: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| lossy(path)),
            path: lossy(path),
            is_dir: meta.is_dir(),
            size: meta.len(),
            mode: format!("{:o}", meta.mode() & 0o777),
            mtime: meta.mtime(),
            owner: self.names.user(meta.uid()),
            group: self.names.group(meta.gid()),
            is_symlink,
            link_target: if is_symlink { sfs::read_link(path).ok().map(|t| lossy(&t)) } else { None },
        }
    }

    /// `mkdir -p`: creates `dir` and its missing ancestors (ancestors 755, `dir` itself
    /// `mode`), each given to the sandbox user.
    pub(super) fn create_dir_all_owned(&self, dir: &Path, mode: u32) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut cur = dir;
        loop {
            match sfs::metadata(cur) {
                Ok(m) if m.is_dir() => break,
                Ok(_) => {
                    return Err(io::Error::new(
                        if cur == dir { io::ErrorKind::AlreadyExists } else { io::ErrorKind::NotADirectory },
                        format!("{} exists and is not a directory", cur.display()),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    missing.push(cur);
                    match cur.parent() {
                        Some(p) if !p.as_os_str().is_empty() => cur = p,
                        _ => break,
                    }
                }
                Err(e) => return Err(e),
            }
        }
        for d in missing.into_iter().rev() {
            let m = if d == dir { mode } else { DEFAULT_DIR_MODE };
            match DirBuilder::new().mode(m).create(d) {
                Ok(()) => {
                    self.give(d)?;
                    sfs::set_permissions(d, Permissions::from_mode(m))?;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::AlreadyExists
                        && sfs::metadata(d).is_ok_and(|m| m.is_dir()) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Opens `path` for writing, creating its parents; returns the file and whether it is new.
    /// A new file gets `mode` (default 644) and the sandbox user; an existing one keeps its
    /// owner, and its mode unless `mode` is given.
    pub(super) fn open_for_write(&self, path: &Path, mode: Option<u32>) -> Res<(File, bool)> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // A file where a parent directory should be is a bad path, not a conflict.
            self.create_dir_all_owned(parent, DEFAULT_DIR_MODE)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => {
                        io::Error::new(io::ErrorKind::NotADirectory, e.to_string())
                    }
                    _ => e,
                })
                .at(parent)?;
        }
        let new_mode = mode.unwrap_or(DEFAULT_FILE_MODE);
        let fresh = |file: File| -> Res<(File, bool)> {
            self.give_file(&file).at(path)?;
            file.set_permissions(Permissions::from_mode(new_mode)).at(path)?;
            Ok((file, true))
        };
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).mode(new_mode).open(path) {
                Ok(file) => return fresh(file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Fail::io(path, e)),
            }
            match OpenOptions::new().write(true).truncate(true).open(path) {
                Ok(file) => {
                    if let Some(m) = mode {
                        file.set_permissions(Permissions::from_mode(m)).at(path)?;
                    }
                    return Ok((file, false));
                }
                // Deleted in between, or a dangling symlink: go round again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Fail::io(path, e)),
            }
        }
        // A dangling symlink: write through it, as a shell redirection would.
        let file =
            OpenOptions::new().write(true).create(true).truncate(true).mode(new_mode).open(path).at(path)?;
        fresh(file)
    }

    pub(super) fn ls(&self, r: LsRequest) -> Res<Response<Body>> {
        let base = self.resolve(&r.path);
        let meta = sfs::metadata(&base).at(&base)?;
        if !meta.is_dir() {
            let meta = sfs::symlink_metadata(&base).at(&base)?;
            return Ok(reply::json(
                StatusCode::OK,
                &LsResponse { items: vec![self.file_info(&base, &meta)] },
            ));
        }
        let excludes = Excludes::new(&r.exclude)?;
        let depth = if r.recursive { usize::MAX } else { 1 };
        let items: Vec<FileInfo> = walk(&base, depth, &excludes)
            .filter_map(|e| e.metadata().ok().map(|m| self.file_info(e.path(), &m)))
            .take(MAX_ENTRIES)
            .collect();
        Ok(reply::json(StatusCode::OK, &LsResponse { items }))
    }

    pub(super) fn stat(&self, r: StatRequest) -> Res<Response<Body>> {
        let path = self.resolve(&r.path);
        let meta = sfs::symlink_metadata(&path).at(&path)?;
        Ok(reply::json(StatusCode::OK, &self.file_info(&path, &meta)))
    }

    pub(super) fn exists(&self, r: ExistsRequest) -> Res<Response<Body>> {
        let path = self.resolve(&r.path);
        let exists = match sfs::symlink_metadata(&path) {
            Ok(_) => true,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => false,
            Err(e) => return Err(Fail::io(&path, e)),
        };
        Ok(reply::json(StatusCode::OK, &ExistsResponse { exists }))
    }

    pub(super) fn mkdir(&self, r: MkdirRequest) -> Res<Response<Body>> {
        let path = self.resolve(&r.path);
        let mode = r.permissions.as_deref().and_then(parse_mode).unwrap_or(DEFAULT_DIR_MODE);
        if r.recursive {
            self.create_dir_all_owned(&path, mode).at(&path)?;
        } else {
            DirBuilder::new().mode(mode).create(&path).at(&path)?;
            self.give(&path).at(&path)?;
            sfs::set_permissions(&path, Permissions::from_mode(mode)).at(&path)?;
        }
        Ok(reply::empty(StatusCode::NO_CONTENT))
    }

    pub(super) fn delete(&self, r: DeleteRequest) -> Res<Response<Body>> {
        let path = self.resolve(&r.path);
        let meta = sfs::symlink_metadata(&path).at(&path)?;
        if meta.is_dir() {
            if sfs::canonicalize(&path).is_ok_and(|c| c == Path::new("/")) {
                return Err(Fail::bad("refusing to delete /"));
            }
            if r.recursive {
                sfs::remove_dir_all(&path).at(&path)?;
            } else {
                match sfs::remove_dir(&path) {
                    Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                        return Err(Fail::bad(format!(
                            "{}: directory is not empty (set recursive to delete it)",
                            path.display()
                        )))
                    }
                    r => r.at(&path)?,
                }
            }
        } else {
            sfs::remove_file(&path).at(&path)?;
        }
        Ok(reply::empty(StatusCode::NO_CONTENT))
    }

    pub(super) fn set_permissions(&self, r: SetPermissionsRequest) -> Res<Response<Body>> {
        let path = self.resolve(&r.path);
        let uid = match &r.owner {
            Some(o) => Some(
                self.names
                    .uid_of(o)
                    .ok_or_else(|| Fail::field("owner", format!("owner: unknown user {o:?}")))?,
            ),
            None => None,
        };
        let gid = match &r.group {
            Some(g) => Some(
                self.names
                    .gid_of(g)
                    .ok_or_else(|| Fail::field("group", format!("group: unknown group {g:?}")))?,
            ),
            None => None,
        };
        sfs::metadata(&path).at(&path)?;
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::chown(&path, uid, gid).at(&path)?;
        }
        // After chown, which may clear set-id bits.
        if let Some(mode) = r.mode.as_deref().and_then(parse_mode) {
            sfs::set_permissions(&path, Permissions::from_mode(mode)).at(&path)?;
        }
        Ok(reply::empty(StatusCode::NO_CONTENT))
    }

    pub(super) fn glob(&self, r: GlobRequest) -> Res<Response<Body>> {
        let base = self.resolve(&r.path);
        let items = glob_paths(&base, r.pattern.as_deref(), &r.exclude)?;
        Ok(reply::json(StatusCode::OK, &GlobResponse { items }))
    }

    pub(super) fn grep(&self, r: GrepRequest) -> Res<Response<Body>> {
        let base = self.resolve(&r.path);
        let items = grep_paths(&base, r.pattern.as_deref().unwrap_or(""), r.include.as_deref(), &r.exclude)?;
        Ok(reply::json(StatusCode::OK, &GrepResponse { items }))
    }

    pub(super) fn edit_file(&self, r: EditFileRequest) -> Res<Response<Body>> {
        let path = self.resolve(&r.path);
        let old = read_for_edit(&path)?;
        let (new, replacements) = apply_edits(&old, &r.edits)
            .map_err(|m| Fail::field("edits", format!("{}: {m}", path.display())))?;
        if new != old {
            write_in_place(&path, &new)?;
        }
        let diff = unified_diff(&lossy(&path), &old, &new);
        Ok(reply::json(StatusCode::OK, &EditFileResponse { diff, replacements }))
    }

    pub(super) fn edit_files(&self, r: EditFilesRequest) -> Res<Response<Body>> {
        let edit = [FileEdit { find: r.find, replace: r.replace }];
        let items = r
            .files
            .into_iter()
            .map(|file| {
                let path = self.resolve(&file);
                let outcome = read_for_edit(&path).and_then(|old| {
                    let (new, _) = apply_edits(&old, &edit).map_err(|_| {
                        Fail::bad(format!("{}: text not found: {:?}", path.display(), edit[0].find))
                    })?;
                    if new != old {
                        write_in_place(&path, &new)?;
                    }
                    Ok(())
                });
                match outcome {
                    Ok(()) => EditResult { file, success: true, error: None },
                    Err(e) => EditResult { file, success: false, error: Some(e.message()) },
                }
            })
            .collect();
        Ok(reply::json(StatusCode::OK, &EditFilesResponse { items }))
    }

    /// Checks that replacing `dst` by `src` is possible and safe, and clears `dst` if it must go
    /// first. Returns false when there is nothing to do (`src` and `dst` are the same entry).
    pub(super) fn clear_destination(
        &self,
        src: &Path,
        src_meta: &Metadata,
        dst: &Path,
        overwrite: bool,
        follow_src: bool,
    ) -> Res<bool> {
        // A copy reads through a symlinked source; a move moves the link itself.
        let src_canon = if follow_src { sfs::canonicalize(src).at(src)? } else { canonical_destination(src) };
        let dst_canon = canonical_destination(dst);
        if src_meta.is_dir() && dst_canon.starts_with(&src_canon) && dst_canon != src_canon {
            return Err(Fail::field(
                "dst_path",
                format!("cannot put {} inside itself ({})", src.display(), dst.display()),
            ));
        }
        let dst_meta = match sfs::symlink_metadata(dst) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(Fail::io(dst, e)),
        };
        if !overwrite {
            return Err(Fail::conflict(dst, "destination exists (set overwrite to replace it)"));
        }
        let same_entry = dst_meta.dev() == src_meta.dev() && dst_meta.ino() == src_meta.ino();
        // Copying onto a symlink that leads back to the source would truncate the source.
        let same_target = follow_src && sfs::canonicalize(dst).is_ok_and(|d| d == src_canon);
        if same_entry || same_target {
            return Ok(false);
        }
        if dst_meta.is_dir() && src_canon.starts_with(&dst_canon) {
            return Err(Fail::bad(format!(
                "cannot replace {} by something inside it ({})",
                dst.display(),
                src.display()
            )));
        }
        if dst_meta.is_dir() {
            sfs::remove_dir_all(dst).at(dst)?;
        } else if src_meta.is_dir() {
            sfs::remove_file(dst).at(dst)?;
        }
        Ok(true)
    }

    pub(super) fn move_path(&self, r: MoveRequest) -> Res<Response<Body>> {
        let src = self.resolve(&r.src_path);
        let dst = self.resolve(&r.dst_path);
        let src_meta = sfs::symlink_metadata(&src).at(&src)?;
        if !self.clear_destination(&src, &src_meta, &dst, r.overwrite, false)? {
            return Ok(reply::empty(StatusCode::NO_CONTENT));
        }
        match sfs::rename(&src, &dst) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                self.copy_entry(&src, &dst, &src_meta, Owner::Source).at(&dst)?;
                if src_meta.is_dir() {
                    sfs::remove_dir_all(&src).at(&src)?;
                } else {
                    sfs::remove_file(&src).at(&src)?;
                }
            }
            Err(e) => return Err(Fail::io(&dst, e)),
        }
        Ok(reply::empty(StatusCode::NO_CONTENT))
    }

    pub(super) fn copy(&self, r: CopyRequest) -> Res<Response<Body>> {
        let src = self.resolve(&r.src_path);
        let dst = self.resolve(&r.dst_path);
        // The source itself is followed if it is a symlink (like cp); links inside a copied
        // tree are copied as links.
        let src_meta = sfs::metadata(&src).at(&src)?;
        if src_meta.is_dir() && !r.recursive {
            return Err(Fail::field(
                "recursive",
                format!("{} is a directory (set recursive to copy it)", src.display()),
            ));
        }
        if !src_meta.is_dir() && !src_meta.is_file() {
            return Err(Fail::field(
                "src_path",
                format!("{}: not a regular file or directory", src.display()),
            ));
        }
        if !self.clear_destination(&src, &src_meta, &dst, r.overwrite, true)? {
            return Err(Fail::field(
                "dst_path",
                format!("{} and {} are the same file", src.display(), dst.display()),
            ));
        }
        self.copy_entry(&src, &dst, &src_meta, Owner::User).at(&dst)?;
        Ok(reply::empty(StatusCode::NO_CONTENT))
    }

    /// Copies one entry (recursively for directories), keeping permission bits. Sockets,
    /// FIFOs and devices are skipped.
    pub(super) fn copy_entry(&self, src: &Path, dst: &Path, meta: &Metadata, owner: Owner) -> io::Result<()> {
        let (uid, gid) = match owner {
            Owner::User => (self.user.uid, self.user.gid),
            Owner::Source => (meta.uid(), meta.gid()),
        };
        let ft = meta.file_type();
        let mode = Permissions::from_mode(meta.mode() & 0o7777);
        if ft.is_symlink() {
            std::os::unix::fs::symlink(sfs::read_link(src)?, dst)?;
            Self::chown_new(dst, uid, gid)?;
        } else if ft.is_dir() {
            DirBuilder::new().mode(0o700).create(dst)?;
            Self::chown_new(dst, uid, gid)?;
            for entry in sfs::read_dir(src)? {
                let entry = entry?;
                let m = entry.metadata()?;
                self.copy_entry(&entry.path(), &dst.join(entry.file_name()), &m, owner)?;
            }
            sfs::set_permissions(dst, mode)?;
        } else if ft.is_file() {
            let existed = sfs::symlink_metadata(dst).is_ok();
            sfs::copy(src, dst)?;
            if !existed {
                Self::chown_new(dst, uid, gid)?;
            }
            sfs::set_permissions(dst, mode)?;
        } else {
            tracing::debug!(path = %src.display(), "copy: skipping special file");
        }
        Ok(())
    }

    pub(super) fn tree(&self, r: TreeRequest) -> Res<Response<Body>> {
        let base = self.resolve(&r.path);
        let items = tree_entries(&base, r.max_depth, &r.exclude)?;
        Ok(reply::json(StatusCode::OK, &TreeResponse { items }))
    }
}

/// Where `dst` would be with symlinks in its parent resolved (it need not exist).
pub(super) fn canonical_destination(dst: &Path) -> PathBuf {
    match (dst.parent(), dst.file_name()) {
        (Some(parent), Some(name)) => {
            sfs::canonicalize(if parent.as_os_str().is_empty() { Path::new(".") } else { parent })
                .map(|p| p.join(name))
                .unwrap_or_else(|_| dst.to_path_buf())
        }
        _ => sfs::canonicalize(dst).unwrap_or_else(|_| dst.to_path_buf()),
    }
}
