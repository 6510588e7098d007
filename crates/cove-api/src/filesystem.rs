//! Filesystem calls. The same types are the guest agent's wire format, so the control plane
//! validates a request and hands the agent exactly what the client sent.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::{check_path, FieldError, Validate, Violations};

/// Largest body accepted by `write-file` and `write-files` (1 GiB).
pub const MAX_UPLOAD_BYTES: usize = 1 << 30;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileInfo {
    pub name: String,
    pub path: String,
    pub is_dir: bool,
    pub size: u64,
    /// Octal permission bits, e.g. `755`.
    pub mode: String,
    /// Modification time, Unix seconds.
    pub mtime: i64,
    pub owner: String,
    pub group: String,
    pub is_symlink: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

macro_rules! path_request {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
        pub struct $name {
            pub path: String,
            $($(#[$fm])* #[serde(default)] pub $f: $t,)*
        }
    };
}

path_request!(LsRequest { pub recursive: bool, pub exclude: Vec<String> });
path_request!(StatRequest {});
path_request!(MkdirRequest {
    pub recursive: bool,
    /// Octal mode, default `755`.
    pub permissions: Option<String>,
});
path_request!(DeleteRequest { pub recursive: bool });
path_request!(SetPermissionsRequest {
    pub mode: Option<String>,
    pub owner: Option<String>,
    pub group: Option<String>,
});
path_request!(GlobRequest { pub pattern: Option<String>, pub exclude: Vec<String> });
path_request!(GrepRequest {
    /// Regular expression (a plain string matches itself unless it has regex metacharacters).
    pub pattern: Option<String>,
    /// File-name filter such as `*.go`.
    pub include: Option<String>,
    pub exclude: Vec<String>,
});
path_request!(ExistsRequest {});
path_request!(TreeRequest { pub exclude: Vec<String>, pub max_depth: Option<u32> });
path_request!(ReadFileRequest {
    pub offset: Option<u64>,
    pub limit: Option<u64>,
    pub head: Option<u64>,
    pub tail: Option<u64>,
});

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EditFileRequest {
    pub path: String,
    pub edits: Vec<FileEdit>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileEdit {
    pub find: String,
    #[serde(default)]
    pub replace: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EditFilesRequest {
    pub files: Vec<String>,
    pub find: String,
    #[serde(default)]
    pub replace: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MoveRequest {
    pub src_path: String,
    pub dst_path: String,
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CopyRequest {
    pub src_path: String,
    pub dst_path: String,
    #[serde(default)]
    pub recursive: bool,
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReadFilesRequest {
    pub paths: Vec<String>,
}

/// Query of `write-file`; the body is the file's raw bytes.
#[derive(Debug, Clone, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WriteFileQuery {
    /// File path inside the sandbox.
    pub path: String,
    /// Octal mode such as `0755`.
    #[serde(default)]
    pub permissions: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LsResponse {
    pub items: Vec<FileInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GlobResponse {
    pub items: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SearchMatch {
    pub path: String,
    pub line: u64,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GrepResponse {
    pub items: Vec<SearchMatch>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EditFileResponse {
    /// Unified diff of the change.
    pub diff: String,
    pub replacements: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EditResult {
    pub file: String,
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EditFilesResponse {
    pub items: Vec<EditResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExistsResponse {
    pub exists: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TreeEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: TreeEntryKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(no_recursion)]
    pub children: Option<Vec<TreeEntry>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TreeEntryKind {
    File,
    Directory,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TreeResponse {
    pub items: Vec<TreeEntry>,
}

/// Parses an octal mode such as `755` or `0644`.
pub fn parse_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    (!digits.is_empty() && digits.len() <= 4)
        .then(|| u32::from_str_radix(digits, 8).ok())
        .flatten()
        .filter(|m| *m <= 0o7777)
}

fn check_mode(v: &mut Violations, field: &str, mode: &Option<String>) {
    if let Some(m) = mode {
        v.check(parse_mode(m).is_some(), field, "must be an octal mode such as 755");
    }
}

fn check_globs(v: &mut Violations, field: &str, globs: &[String]) {
    for (i, g) in globs.iter().enumerate() {
        v.check(globset::Glob::new(g).is_ok(), format!("{field}[{i}]"), "is not a valid glob");
    }
}

macro_rules! validate_path_only {
    ($($t:ty),*) => {$(
        impl Validate for $t {
            fn validate(&self) -> Result<(), Vec<FieldError>> {
                let mut v = Violations::default();
                check_path(&mut v, "path", &self.path);
                v.finish()
            }
        }
    )*};
}
validate_path_only!(StatRequest, DeleteRequest, ExistsRequest);

impl Validate for LsRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_path(&mut v, "path", &self.path);
        check_globs(&mut v, "exclude", &self.exclude);
        v.finish()
    }
}

impl Validate for TreeRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_path(&mut v, "path", &self.path);
        check_globs(&mut v, "exclude", &self.exclude);
        v.finish()
    }
}

impl Validate for MkdirRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_path(&mut v, "path", &self.path);
        check_mode(&mut v, "permissions", &self.permissions);
        v.finish()
    }
}

impl Validate for SetPermissionsRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_path(&mut v, "path", &self.path);
        check_mode(&mut v, "mode", &self.mode);
        v.check(
            self.mode.is_some() || self.owner.is_some() || self.group.is_some(),
            "mode",
            "one of mode, owner or group is required",
        );
        v.finish()
    }
}

impl Validate for GlobRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_path(&mut v, "path", &self.path);
        if let Some(p) = &self.pattern {
            v.check(globset::Glob::new(p).is_ok(), "pattern", "is not a valid glob");
        }
        check_globs(&mut v, "exclude", &self.exclude);
        v.finish()
    }
}

impl Validate for GrepRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_path(&mut v, "path", &self.path);
        v.check(self.pattern.as_deref().is_some_and(|p| !p.is_empty()), "pattern", "must not be empty");
        if let Some(p) = &self.include {
            v.check(globset::Glob::new(p).is_ok(), "include", "is not a valid glob");
        }
        check_globs(&mut v, "exclude", &self.exclude);
        v.finish()
    }
}

impl Validate for ReadFileRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_path(&mut v, "path", &self.path);
        v.check(self.head.is_none() || self.tail.is_none(), "tail", "head and tail are mutually exclusive");
        let lines = self.head.is_some() || self.tail.is_some();
        v.check(
            !lines || (self.offset.is_none() && self.limit.is_none()),
            "offset",
            "offset/limit cannot be combined with head/tail",
        );
        v.finish()
    }
}

impl Validate for ReadFilesRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        v.check(!self.paths.is_empty(), "paths", "must list at least one path");
        for (i, p) in self.paths.iter().enumerate() {
            check_path(&mut v, &format!("paths[{i}]"), p);
        }
        v.finish()
    }
}

impl Validate for EditFileRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_path(&mut v, "path", &self.path);
        v.check(!self.edits.is_empty(), "edits", "must list at least one edit");
        for (i, e) in self.edits.iter().enumerate() {
            v.check(!e.find.is_empty(), format!("edits[{i}].find"), "must not be empty");
        }
        v.finish()
    }
}

impl Validate for EditFilesRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        v.check(!self.files.is_empty(), "files", "must list at least one file");
        for (i, p) in self.files.iter().enumerate() {
            check_path(&mut v, &format!("files[{i}]"), p);
        }
        v.check(!self.find.is_empty(), "find", "must not be empty");
        v.finish()
    }
}

impl Validate for MoveRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_path(&mut v, "src_path", &self.src_path);
        check_path(&mut v, "dst_path", &self.dst_path);
        v.finish()
    }
}

impl Validate for CopyRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_path(&mut v, "src_path", &self.src_path);
        check_path(&mut v, "dst_path", &self.dst_path);
        v.finish()
    }
}

impl Validate for WriteFileQuery {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_path(&mut v, "path", &self.path);
        check_mode(&mut v, "permissions", &self.permissions);
        v.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("755"), Some(0o755));
        assert_eq!(parse_mode("0644"), Some(0o644));
        assert_eq!(parse_mode("9"), None);
        assert_eq!(parse_mode(""), None);
        assert_eq!(parse_mode("77777"), None);
    }

    #[test]
    fn head_and_tail_conflict() {
        let r =
            ReadFileRequest { path: "/a".into(), offset: None, limit: None, head: Some(1), tail: Some(1) };
        assert_eq!(r.validate().unwrap_err()[0].field, "tail");
    }
}
