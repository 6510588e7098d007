//! The filesystem operations of the public API (`/v1/fs/<op>`), done inside the guest.
//!
//! The agent runs as root, so everything it newly creates on a caller's behalf (files,
//! directories, copies) is handed to the sandbox user; existing files keep their owner. All
//! disk work runs on blocking threads, and file contents are streamed in both directions so
//! that large files never sit whole in the agent's memory.
//!
//! Statuses: a missing path is 404, an existing destination that may not be replaced is 409,
//! anything wrong with the request (bad JSON, violated constraints, a directory where a file is
//! needed, an edit whose text is not there) is 400, an over-large body is 413.
//!
//! This module parses requests and dispatches them; `ops` does the operations, and the parts
//! with a life of their own are apart: `multipart` (non-JSON bodies), `read` (which bytes a
//! read returns), `search` (globs, walks, grep), `edit` (text replacement and in-place writes),
//! `tree`.

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::fs::{self as sfs, DirBuilder, File, Metadata, OpenOptions, Permissions};
use std::hash::BuildHasher;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cove_api::filesystem::{
    parse_mode, CopyRequest, DeleteRequest, EditFileRequest, EditFileResponse, EditFilesRequest,
    EditFilesResponse, EditResult, ExistsRequest, ExistsResponse, FileEdit, FileInfo, GlobRequest,
    GlobResponse, GrepRequest, GrepResponse, LsRequest, LsResponse, MkdirRequest, MoveRequest,
    ReadFileRequest, ReadFilesRequest, SearchMatch, SetPermissionsRequest, StatRequest, TreeEntry,
    TreeEntryKind, TreeRequest, TreeResponse, WriteFileQuery, MAX_UPLOAD_BYTES,
};
use cove_api::{check_path, Validate, Violations};
use futures::{Stream, StreamExt, TryStreamExt};
use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use http_body_util::{BodyExt, BodyStream, LengthLimitError, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{header, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use tokio_util::io::ReaderStream;

use crate::reply::{self, Body};
use crate::user::{Names, SandboxUser};

mod edit;
mod multipart;
mod ops;
mod read;
mod search;
mod tree;
use edit::*;
pub(crate) use multipart::read_upload;
use multipart::*;
use ops::*;
use read::*;
use search::*;
use tree::*;

/// Largest JSON request body (edit requests carry text, so this is generous).
const MAX_JSON_BODY: usize = 64 << 20;
/// Read and write granularity of streamed file contents.
const CHUNK: usize = 64 << 10;
/// Most entries `ls`, `glob` and `tree` return.
const MAX_ENTRIES: usize = 100_000;
/// Deepest `tree`, whatever `max_depth` asks for.
const MAX_TREE_DEPTH: u32 = 20;
const MAX_GREP_MATCHES: usize = 10_000;
/// Files larger than this are not searched by `grep`.
const MAX_GREP_FILE: u64 = 10 << 20;
/// A file with a NUL byte within this prefix is binary and not searched.
const BINARY_PROBE: usize = 8 << 10;
/// Longest `content` of a grep match; longer lines are cut (at a character boundary).
const MAX_GREP_LINE: usize = 4096;
/// Largest file `edit-file` and `edit-files` work on (they hold it in memory twice).
const MAX_EDIT_FILE: u64 = 64 << 20;
/// `head`/`tail` of a file whose size is unknown (procfs, devices) reads at most this much.
const MAX_UNSIZED_READ: u64 = 64 << 20;
const DEFAULT_DIR_MODE: u32 = 0o755;
const DEFAULT_FILE_MODE: u32 = 0o644;
const OCTET_STREAM: &str = "application/octet-stream";

/// The filesystem half of the agent.
#[derive(Debug, Clone)]
pub struct Fs {
    pub user: SandboxUser,
    pub names: Names,
}

impl Fs {
    /// Serves one operation. `op` is the operation name as in the public path: "ls", "stat",
    /// "mkdir", "write-file", "write-files", "read-file", "read-files", "delete",
    /// "set-permissions", "glob", "grep", "edit-file", "edit-files", "move", "copy", "exists",
    /// "tree".
    pub async fn handle(&self, op: &str, req: Request<Incoming>) -> Response<Body> {
        let result = match op {
            "write-file" => self.write_file(req).await,
            "write-files" => self.write_files(req).await,
            "read-file" => match parse(req).await {
                Ok(r) => self.read_file(r).await,
                Err(e) => Err(e),
            },
            "read-files" => match parse(req).await {
                Ok(r) => self.read_files(r).await,
                Err(e) => Err(e),
            },
            _ => self.json_op(op, req).await,
        };
        result.unwrap_or_else(Fail::into_response)
    }

    fn ctx(&self) -> Ctx {
        Ctx { user: self.user.clone(), names: self.names.clone() }
    }

    /// The operations that take a JSON body and answer in one piece.
    async fn json_op(&self, op: &str, req: Request<Incoming>) -> Res<Response<Body>> {
        macro_rules! run {
            ($req:ty, $method:ident) => {{
                let r: $req = parse(req).await?;
                let ctx = self.ctx();
                blocking(move || ctx.$method(r)).await
            }};
        }
        match op {
            "ls" => run!(LsRequest, ls),
            "stat" => run!(StatRequest, stat),
            "exists" => run!(ExistsRequest, exists),
            "mkdir" => run!(MkdirRequest, mkdir),
            "delete" => run!(DeleteRequest, delete),
            "set-permissions" => run!(SetPermissionsRequest, set_permissions),
            "glob" => run!(GlobRequest, glob),
            "grep" => run!(GrepRequest, grep),
            "edit-file" => run!(EditFileRequest, edit_file),
            "edit-files" => run!(EditFilesRequest, edit_files),
            "move" => run!(MoveRequest, move_path),
            "copy" => run!(CopyRequest, copy),
            "tree" => run!(TreeRequest, tree),
            _ => Err(Fail::Status(StatusCode::NOT_FOUND, format!("unknown filesystem operation {op:?}"))),
        }
    }

    /// `write-file`: the body is the file's bytes, streamed to disk as it arrives.
    async fn write_file(&self, req: Request<Incoming>) -> Res<Response<Body>> {
        let q = parse_write_query(req.uri().query().unwrap_or(""))?;
        check(&q)?;
        let path = resolve(&self.user, &q.path);
        let mode = q.permissions.as_deref().and_then(parse_mode);
        let ctx = self.ctx();
        let p = path.clone();
        let (file, created) = blocking(move || ctx.open_for_write(&p, mode)).await?;
        let body = whole_body(req);
        pump(&path, file, created, body, |e: BodyError| Fail::bad(format!("reading request body: {e}")))
            .await?;
        Ok(reply::empty(StatusCode::NO_CONTENT))
    }

    /// `write-files`: multipart/form-data, each part named by its file's path.
    async fn write_files(&self, req: Request<Incoming>) -> Res<Response<Body>> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Fail::bad("write-files takes a multipart/form-data body"))?
            .to_owned();
        let mut parts = Parts::new(&content_type, whole_body(req)).await?;
        while let Some((name, field)) = parts.next().await? {
            let path = resolve(&self.user, &name);
            let ctx = self.ctx();
            let p = path.clone();
            let (file, created) = blocking(move || ctx.open_for_write(&p, None)).await?;
            pump(&path, file, created, field, |e| parts.fail(e)).await?;
        }
        Ok(reply::empty(StatusCode::NO_CONTENT))
    }

    /// `read-file`: the raw bytes, streamed.
    async fn read_file(&self, r: ReadFileRequest) -> Res<Response<Body>> {
        let path = resolve(&self.user, &r.path);
        let plan = blocking(move || plan_read(&path, &r)).await?;
        let body = match plan {
            ReadPlan::Stream { file, len } => {
                let file = tokio::fs::File::from_std(file);
                match len {
                    Some(n) => reader_body(tokio::io::AsyncReadExt::take(file, n)),
                    None => reader_body(file),
                }
            }
            ReadPlan::Bytes(v) => reply::full(v),
        };
        Ok(reply::bytes(StatusCode::OK, OCTET_STREAM, body))
    }

    /// `read-files`: a multipart/form-data answer, one part per file, streamed.
    async fn read_files(&self, r: ReadFilesRequest) -> Res<Response<Body>> {
        let user = self.user.clone();
        // Check every file first, so that a missing one is a clean 404 rather than a body
        // cut short.
        let files = blocking(move || {
            r.paths
                .into_iter()
                .map(|name| {
                    let path = resolve(&user, &name);
                    let meta = sfs::metadata(&path).at(&path)?;
                    if meta.is_dir() {
                        return Err(Fail::io(&path, is_a_directory()));
                    }
                    if !meta.is_file() {
                        return Err(Fail::bad(format!("{}: not a regular file", path.display())));
                    }
                    Ok((name, path))
                })
                .collect::<Res<Vec<_>>>()
        })
        .await?;
        let boundary = new_boundary();
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let closing = Bytes::from(format!("--{boundary}--\r\n"));
        let parts = futures::stream::iter(files).flat_map(move |(name, path)| {
            let head = Bytes::from(part_header(&boundary, &name));
            let contents = futures::stream::once(tokio::fs::File::open(path))
                .map_ok(|f| ReaderStream::with_capacity(f, CHUNK))
                .try_flatten();
            futures::stream::once(futures::future::ready(Ok(head)))
                .chain(contents)
                .chain(futures::stream::once(futures::future::ready(Ok(Bytes::from_static(b"\r\n")))))
        });
        let stream = parts.chain(futures::stream::once(futures::future::ready(Ok(closing))));
        let body = BodyExt::boxed(StreamBody::new(stream.map_ok(Frame::data)));
        Ok(reply::bytes(StatusCode::OK, &content_type, body))
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and request plumbing

/// Why an operation failed; becomes an `AgentError` answer.
#[derive(Debug)]
enum Fail {
    /// An I/O error on a path; the status follows the error's kind (see `reply::io_error`).
    Io(String, io::Error),
    Status(StatusCode, String),
    /// A 400 caused by one field of the request.
    Field(&'static str, String),
}

type Res<T> = Result<T, Fail>;

impl Fail {
    fn io(path: &Path, e: io::Error) -> Self {
        Fail::Io(path.display().to_string(), e)
    }

    fn bad(message: impl Into<String>) -> Self {
        Fail::Status(StatusCode::BAD_REQUEST, message.into())
    }

    fn field(field: &'static str, message: impl Into<String>) -> Self {
        Fail::Field(field, message.into())
    }

    fn conflict(path: &Path, what: &str) -> Self {
        Fail::Status(StatusCode::CONFLICT, format!("{}: {what}", path.display()))
    }

    fn message(&self) -> String {
        match self {
            Fail::Io(path, e) => format!("{path}: {e}"),
            Fail::Status(_, m) | Fail::Field(_, m) => m.clone(),
        }
    }

    fn into_response(self) -> Response<Body> {
        match self {
            Fail::Io(path, e) => reply::io_error(&path, &e),
            Fail::Status(status, message) => reply::error(status, message),
            Fail::Field(field, message) => reply::field_error(StatusCode::BAD_REQUEST, Some(field), message),
        }
    }
}

/// Attaches the path an I/O error concerns.
trait At<T> {
    fn at(self, path: &Path) -> Res<T>;
}

impl<T> At<T> for io::Result<T> {
    fn at(self, path: &Path) -> Res<T> {
        self.map_err(|e| Fail::io(path, e))
    }
}

fn is_a_directory() -> io::Error {
    io::Error::new(io::ErrorKind::IsADirectory, "is a directory")
}

fn not_a_directory() -> io::Error {
    io::Error::new(io::ErrorKind::NotADirectory, "not a directory")
}

fn violations_message(errors: &[cove_api::FieldError]) -> String {
    let list: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.field, e.error)).collect();
    format!("invalid request: {}", list.join("; "))
}

fn check(v: &impl Validate) -> Res<()> {
    v.validate().map_err(|errs| match errs.first().map(|e| e.field.as_str()) {
        Some(f) => Fail::Field(known_field(f), violations_message(&errs)),
        None => Fail::bad(violations_message(&errs)),
    })
}

/// The static name of a request field (violations carry owned strings).
fn known_field(f: &str) -> &'static str {
    const FIELDS: &[&str] = &[
        "path",
        "src_path",
        "dst_path",
        "paths",
        "files",
        "edits",
        "find",
        "pattern",
        "include",
        "exclude",
        "permissions",
        "mode",
        "owner",
        "group",
        "tail",
        "offset",
        "recursive",
    ];
    FIELDS.iter().find(|k| f == **k || f.starts_with(&format!("{k}["))).copied().unwrap_or("body")
}

/// Reads, parses and validates a JSON request body.
async fn parse<T: DeserializeOwned + Validate>(req: Request<Incoming>) -> Res<T> {
    let body = Limited::new(req.into_body(), MAX_JSON_BODY).collect().await.map_err(|e| {
        if e.downcast_ref::<LengthLimitError>().is_some() {
            Fail::Status(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {MAX_JSON_BODY} bytes"),
            )
        } else {
            Fail::bad(format!("reading request body: {e}"))
        }
    })?;
    let value: T =
        serde_json::from_slice(&body.to_bytes()).map_err(|e| Fail::bad(format!("invalid JSON body: {e}")))?;
    check(&value)?;
    Ok(value)
}

/// Runs disk work on a blocking thread.
/// An upload's body error: hyper's, or a body that ended short of its Content-Length.
type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// An upload's data, ending with an error when fewer bytes came than its Content-Length says.
/// hyper ends an HTTP/2 body *cleanly* when its stream is reset with `NO_ERROR` (or its
/// connection goes away with it), the way a server's early answer is signalled, without
/// checking its length: unchecked, such a body would be written as a shorter file.
fn whole_body(req: Request<Incoming>) -> impl Stream<Item = Result<Bytes, BodyError>> + Send + 'static {
    let expected = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let data = BodyStream::new(req.into_body())
        .try_filter_map(|frame| futures::future::ready(Ok(frame.into_data().ok())))
        .map_err(|e| Box::new(e) as BodyError);
    checked_length(data, expected)
}

/// `data`, with an error after its end when it held fewer bytes than `expected`.
fn checked_length<S>(data: S, expected: Option<u64>) -> impl Stream<Item = Result<Bytes, BodyError>>
where
    S: Stream<Item = Result<Bytes, BodyError>>,
{
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = received.clone();
    let counted = data.inspect_ok(move |b| {
        counter.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
    });
    let end = futures::stream::once(async move {
        let got = received.load(std::sync::atomic::Ordering::Relaxed);
        match expected {
            Some(want) if got < want => {
                Some(Err(format!("the body ended after {got} of its {want} bytes").into()))
            }
            _ => None,
        }
    })
    .filter_map(futures::future::ready);
    counted.chain(end)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Res<T> + Send + 'static) -> Res<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Fail::Status(StatusCode::INTERNAL_SERVER_ERROR, format!("filesystem task failed: {e}"))
    })?
}

// ---------------------------------------------------------------------------------------------
// Paths

/// A request path as a guest path: relative ones are taken from the home directory, and `.`
/// components are dropped so that answers name paths cleanly (`/home/user/x`, not
/// `/home/user/./x`). A trailing `/` is kept: it still means "a directory".
fn resolve(user: &SandboxUser, path: &str) -> PathBuf {
    let mut out: PathBuf = user.resolve(path).components().collect();
    if path.ends_with('/') && out != Path::new("/") {
        out.as_mut_os_string().push("/");
    }
    out
}

fn lossy(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that resets its upload's stream with `NO_ERROR` halfway: hyper hands the
    /// handler a body that simply ends, 5 of 10 bytes in. The upload must see an error there,
    /// not a whole (and shorter) file.
    #[tokio::test]
    async fn an_upload_reset_halfway_is_an_error_not_a_shorter_file() {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let (tx, rx) = tokio::sync::oneshot::channel::<(usize, Option<String>)>();
        let tx = std::sync::Mutex::new(Some(tx));
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let tx = tx.lock().unwrap().take();
            async move {
                let results: Vec<Result<Bytes, BodyError>> = whole_body(req).collect().await;
                let got = results.iter().filter_map(|r| r.as_ref().ok()).map(|b| b.len()).sum();
                let err = results.iter().find_map(|r| r.as_ref().err().map(|e| e.to_string()));
                if let Some(tx) = tx {
                    let _ = tx.send((got, err));
                }
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
            }
        });
        let server = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(server_io), service);
        tokio::spawn(server);
        let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let req = Request::post("http://agent/upload").header(header::CONTENT_LENGTH, "10").body(()).unwrap();
        let (_answer, mut send) = client.send_request(req, false).unwrap();
        send.send_data(Bytes::from_static(b"hello"), false).unwrap();
        // Let the data go out before the reset, which drops what is still queued.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        send.send_reset(h2::Reason::NO_ERROR);
        let (got, err) = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await.unwrap().unwrap();
        assert_eq!(got, 5);
        assert_eq!(err.as_deref(), Some("the body ended after 5 of its 10 bytes"));
    }

    #[tokio::test]
    async fn a_body_is_checked_against_its_length_only_when_it_has_one() {
        let chunks =
            || futures::stream::iter([Ok(Bytes::from_static(b"abc")), Ok(Bytes::from_static(b"de"))]);
        let run = |expected| async move {
            checked_length(chunks(), expected).map(|r| r.map_err(|e| e.to_string())).collect::<Vec<_>>().await
        };
        assert_eq!(run(Some(5)).await.len(), 2);
        assert_eq!(run(None).await.len(), 2);
        let short = run(Some(6)).await;
        assert_eq!(short.last().unwrap().as_ref().unwrap_err(), "the body ended after 5 of its 6 bytes");
    }
    use std::io::Cursor;

    fn test_ctx(home: &Path) -> Ctx {
        let m = sfs::metadata(home).expect("home");
        Ctx {
            user: SandboxUser {
                name: "tester".into(),
                uid: m.uid(),
                gid: m.gid(),
                home: home.to_path_buf(),
                workdir: home.to_path_buf(),
            },
            names: Names::default(),
        }
    }

    fn write(path: &Path, data: &str) {
        if let Some(p) = path.parent() {
            sfs::create_dir_all(p).expect("mkdir");
        }
        sfs::write(path, data).expect("write");
    }

    fn status(r: Res<Response<Body>>) -> StatusCode {
        match r {
            Ok(r) => r.status(),
            Err(f) => f.into_response().status(),
        }
    }

    #[test]
    fn query_decoding() {
        assert_eq!(percent_decode("a%20b+c%2Bd%zz%").as_deref(), Some("a b c+d%zz%"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%FF"), None);
        let q = parse_write_query("path=%2Ftmp%2Fa%20b.txt&permissions=0755&x=1").expect("query");
        assert_eq!(q.path, "/tmp/a b.txt");
        assert_eq!(q.permissions.as_deref(), Some("0755"));
        let q = parse_write_query("permissions=&path=rel/f").expect("query");
        assert_eq!((q.path.as_str(), q.permissions), ("rel/f", None));
        assert!(parse_write_query("permissions=644").is_err());
    }

    #[test]
    fn paths_resolve_cleanly() {
        let user = SandboxUser {
            name: "u".into(),
            uid: 1,
            gid: 1,
            home: PathBuf::from("/home/u"),
            workdir: PathBuf::from("/home/u"),
        };
        assert_eq!(resolve(&user, "."), Path::new("/home/u"));
        assert_eq!(resolve(&user, "./a/./b"), Path::new("/home/u/a/b"));
        assert_eq!(resolve(&user, "/etc//x/."), Path::new("/etc/x"));
        assert_eq!(resolve(&user, "/etc/").as_os_str(), "/etc/");
        assert_eq!(resolve(&user, "/").as_os_str(), "/");
        assert_eq!(resolve(&user, "../x"), Path::new("/home/u/../x"));
    }

    #[test]
    fn extended_parameters() {
        let h = "form-data; name*=utf-8''%2Fhome%2Fuser%2Fa%20b+c.txt; filename=\"x\"";
        assert_eq!(extended_param(h, "name").as_deref(), Some("/home/user/a b+c.txt"));
        assert_eq!(extended_param(h, "filename"), None);
        assert_eq!(extended_param("form-data; NAME*=UTF-8'en'%C3%A9", "name").as_deref(), Some("é"));
        assert_eq!(extended_param("form-data; name*=iso-8859-1''%E9", "name"), None);
        assert_eq!(extended_param("form-data; name=\"plain\"", "name"), None);
    }

    fn head(data: &[u8], n: u64) -> Vec<u8> {
        let end = head_end(&mut Cursor::new(data), n).expect("head");
        data[..end as usize].to_vec()
    }

    fn tail(data: &[u8], n: u64) -> Vec<u8> {
        let start = tail_start(&mut Cursor::new(data), data.len() as u64, n).expect("tail");
        data[start as usize..].to_vec()
    }

    #[test]
    fn head_and_tail_lines() {
        let d = b"a\nb\nc\n";
        assert_eq!(head(d, 0), b"");
        assert_eq!(head(d, 2), b"a\nb\n");
        assert_eq!(head(d, 9), d);
        assert_eq!(tail(d, 0), b"");
        assert_eq!(tail(d, 1), b"c\n");
        assert_eq!(tail(d, 2), b"b\nc\n");
        assert_eq!(tail(d, 9), d);
        assert_eq!(tail(b"a\nb\nc", 1), b"c");
        assert_eq!(tail(b"a\n\n", 1), b"\n");
        assert_eq!(tail(b"abc", 3), b"abc");
        assert_eq!(tail(b"", 3), b"");
        assert_eq!(head(b"abc", 1), b"abc");
        // Lines that straddle read chunks.
        let mut big = Vec::new();
        for i in 0..50_000 {
            big.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        assert_eq!(tail(&big, 2), b"line 49998\nline 49999\n");
        assert_eq!(head(&big, 2), b"line 0\nline 1\n");
        let h = head(&big, 30_000);
        assert!(h.ends_with(b"line 29999\n"));
        let t = tail(&big, 30_000);
        assert!(t.starts_with(b"line 20000\n"));
    }

    #[test]
    fn edits_and_diff() {
        assert_eq!(find_all(b"aaaa", b"aa"), vec![0, 2]);
        assert_eq!(find_all(b"ab", b"abc"), Vec::<usize>::new());
        let edits = vec![
            FileEdit { find: "foo".into(), replace: Some("bar".into()) },
            FileEdit { find: "bar baz".into(), replace: None },
        ];
        let (out, n) = apply_edits(b"foo baz\nfoo\nx foo\n", &edits).expect("edits");
        assert_eq!(out, b"\nbar\nx bar\n");
        assert_eq!(n, 4);
        let err = apply_edits(b"abc", &[FileEdit { find: "zzz".into(), replace: None }]).unwrap_err();
        assert!(err.contains("zzz"), "{err}");
        let diff = unified_diff("/f.txt", b"one\ntwo\n", b"one\n2\n");
        assert!(diff.starts_with("--- /f.txt\n+++ /f.txt\n"), "{diff}");
        assert!(diff.contains("-two\n") && diff.contains("+2\n"), "{diff}");
    }

    #[test]
    fn edit_file_writes_and_keeps_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = test_ctx(dir.path());
        let f = dir.path().join("a.txt");
        write(&f, "hello world\nhello\n");
        sfs::set_permissions(&f, Permissions::from_mode(0o751)).expect("chmod");
        let edit = |find: &str| EditFileRequest {
            path: "a.txt".into(),
            edits: vec![FileEdit { find: find.into(), replace: Some("bye".into()) }],
        };
        assert_eq!(status(ctx.edit_file(edit("nope"))), StatusCode::BAD_REQUEST);
        assert_eq!(sfs::read_to_string(&f).expect("read"), "hello world\nhello\n");
        assert_eq!(status(ctx.edit_file(edit("hello"))), StatusCode::OK);
        assert_eq!(sfs::read_to_string(&f).expect("read"), "bye world\nbye\n");
        assert_eq!(sfs::metadata(&f).expect("meta").mode() & 0o777, 0o751);
        assert_eq!(
            status(ctx.edit_file(EditFileRequest { path: "missing".into(), ..edit("x") })),
            StatusCode::NOT_FOUND
        );

        let r = EditFilesRequest {
            files: vec!["a.txt".into(), "missing".into()],
            find: "bye".into(),
            replace: Some("ciao".into()),
        };
        assert_eq!(status(ctx.edit_files(r)), StatusCode::OK);
        assert_eq!(sfs::read_to_string(&f).expect("read"), "ciao world\nciao\n");
    }

    #[test]
    fn glob_matching() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = dir.path();
        write(&b.join("a.rs"), "");
        write(&b.join("src/b.rs"), "");
        write(&b.join("src/deep/c.rs"), "");
        write(&b.join("src/d.txt"), "");
        write(&b.join("node_modules/x.rs"), "");
        let rel = |items: Vec<String>| -> Vec<String> {
            items
                .iter()
                .map(|p| p.strip_prefix(&format!("{}/", b.display())).unwrap_or(p).to_string())
                .collect()
        };
        let ex = vec!["node_modules".to_string()];
        let g = |p: Option<&str>, ex: &[String]| rel(glob_paths(b, p, ex).expect("glob"));
        assert_eq!(g(Some("*.rs"), &ex), ["a.rs", "src/b.rs", "src/deep/c.rs"]);
        assert_eq!(g(Some("src/*.rs"), &ex), ["src/b.rs"]);
        assert_eq!(g(Some("**/*.rs"), &ex), ["a.rs", "src/b.rs", "src/deep/c.rs"]);
        assert_eq!(g(Some("src/**"), &ex), ["src/b.rs", "src/d.txt", "src/deep", "src/deep/c.rs"]);
        assert_eq!(g(Some("*.rs"), &[]).len(), 4);
        assert_eq!(g(None, &["src".into(), "node_modules".into()]), ["a.rs"]);
        assert_eq!(g(Some("src/deep/*.rs"), &["src/deep".into()]), Vec::<String>::new());
        let abs = format!("{}/src/*.txt", b.display());
        assert_eq!(g(Some(&abs), &[]), ["src/d.txt"]);
        assert!(
            matches!(glob_paths(&b.join("nope"), None, &[]), Err(Fail::Io(_, e)) if e.kind() == io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn grep_search() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = dir.path();
        write(&b.join("a.go"), "package main\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n");
        write(&b.join("b.txt"), "func(x\r\nnothing\n");
        write(&b.join("skip/c.go"), "func main\n");
        sfs::write(b.join("bin.go"), b"func\0main\n").expect("write");
        let hits = grep_paths(b, "^func \\w+", Some("*.go"), &["skip".into()]).expect("grep");
        assert_eq!(hits.len(), 1);
        assert_eq!((hits[0].line, hits[0].content.as_str()), (2, "func main() {"));
        assert!(hits[0].path.ends_with("/a.go"));
        // Not a valid regex: searched for literally.
        let hits = grep_paths(b, "func(", None, &[]).expect("grep");
        let found: Vec<(String, u64, String)> = hits
            .iter()
            .map(|h| {
                (
                    Path::new(&h.path)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    h.line,
                    h.content.clone(),
                )
            })
            .collect();
        assert_eq!(found, [("b.txt".to_string(), 1, "func(x".to_string())]);
        let hits = grep_paths(&b.join("skip/c.go"), "main", None, &[]).expect("grep");
        assert_eq!(hits.len(), 1);
        assert_eq!(cut_line("é".repeat(3000).as_bytes()).len(), MAX_GREP_LINE);
    }

    #[test]
    fn tree_building() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = dir.path();
        write(&b.join("a/b/c/d.txt"), "");
        write(&b.join("a/x.txt"), "");
        write(&b.join(".git/config"), "");
        std::os::unix::fs::symlink(b.join("a"), b.join("link")).expect("symlink");
        let t = tree_entries(b, None, &[".git".into()]).expect("tree");
        let names: Vec<&str> = t.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "link"]);
        assert_eq!(t[1].kind, TreeEntryKind::File);
        assert!(t[1].children.is_none());
        let a = &t[0];
        assert_eq!(a.kind, TreeEntryKind::Directory);
        let kids = a.children.as_ref().expect("children");
        assert_eq!(kids.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["b", "x.txt"]);
        let json = serde_json::to_value(&t[0]).expect("json");
        assert_eq!(json["children"][0]["children"][0]["children"][0]["name"], "d.txt");
        assert_eq!(json["type"], "directory");

        let t = tree_entries(b, Some(1), &[]).expect("tree");
        assert_eq!(t.len(), 3);
        assert!(t.iter().all(|e| e.children.is_none()));
        let t = tree_entries(b, Some(2), &["a/b".into()]).expect("tree");
        let a = t.iter().find(|e| e.name == "a").expect("a");
        let kids = a.children.as_ref().expect("children");
        assert_eq!(kids.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["x.txt"]);
        assert!(tree_entries(&b.join("a/x.txt"), None, &[]).is_err());
    }

    #[test]
    fn directory_operations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = test_ctx(dir.path());
        let b = dir.path();
        let mkdir = |path: &str, recursive: bool, permissions: Option<&str>| {
            status(ctx.mkdir(MkdirRequest {
                path: path.into(),
                recursive,
                permissions: permissions.map(Into::into),
            }))
        };
        assert_eq!(mkdir("x/y", false, None), StatusCode::NOT_FOUND);
        assert_eq!(mkdir("x/y", true, Some("700")), StatusCode::NO_CONTENT);
        assert_eq!(sfs::metadata(b.join("x/y")).expect("y").mode() & 0o777, 0o700);
        assert_eq!(sfs::metadata(b.join("x")).expect("x").mode() & 0o777, 0o755);
        assert_eq!(mkdir("x/y", true, None), StatusCode::NO_CONTENT);
        assert_eq!(mkdir("x/y", false, None), StatusCode::CONFLICT);
        write(&b.join("x/f"), "data");
        assert_eq!(mkdir("x/f", true, None), StatusCode::CONFLICT);
        assert_eq!(mkdir("x/f/g", true, None), StatusCode::BAD_REQUEST);

        let (file, created) = ctx.open_for_write(&b.join("new/dir/file"), Some(0o600)).expect("open");
        drop(file);
        assert!(created);
        assert_eq!(sfs::metadata(b.join("new/dir/file")).expect("f").mode() & 0o777, 0o600);
        let (_, created) = ctx.open_for_write(&b.join("new/dir/file"), None).expect("open");
        assert!(!created);
        assert_eq!(sfs::metadata(b.join("new/dir/file")).expect("f").mode() & 0o777, 0o600);

        let del =
            |path: &str, recursive: bool| status(ctx.delete(DeleteRequest { path: path.into(), recursive }));
        assert_eq!(del("x", false), StatusCode::BAD_REQUEST);
        assert_eq!(del("x/f", false), StatusCode::NO_CONTENT);
        assert_eq!(del("x/f", false), StatusCode::NOT_FOUND);
        assert_eq!(del("x", true), StatusCode::NO_CONTENT);
        assert!(!b.join("x").exists());

        let exists = |path: &str| {
            let r = ctx.exists(ExistsRequest { path: path.into() }).expect("exists");
            r.status()
        };
        assert_eq!(exists("new/dir/file/sub"), StatusCode::OK);
    }

    #[test]
    fn copy_and_move() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = test_ctx(dir.path());
        let b = dir.path();
        write(&b.join("src/a.txt"), "A");
        write(&b.join("src/sub/b.txt"), "B");
        sfs::set_permissions(b.join("src/a.txt"), Permissions::from_mode(0o741)).expect("chmod");
        std::os::unix::fs::symlink("a.txt", b.join("src/link")).expect("symlink");
        let copy = |src: &str, dst: &str, recursive: bool, overwrite: bool| {
            status(ctx.copy(CopyRequest { src_path: src.into(), dst_path: dst.into(), recursive, overwrite }))
        };
        assert_eq!(copy("src", "dst", false, false), StatusCode::BAD_REQUEST);
        assert_eq!(copy("src", "src/inner", true, false), StatusCode::BAD_REQUEST);
        assert_eq!(copy("nope", "dst", true, false), StatusCode::NOT_FOUND);
        assert_eq!(copy("src", "dst", true, false), StatusCode::NO_CONTENT);
        assert_eq!(sfs::read_to_string(b.join("dst/sub/b.txt")).expect("b"), "B");
        assert_eq!(sfs::metadata(b.join("dst/a.txt")).expect("a").mode() & 0o777, 0o741);
        assert_eq!(sfs::read_link(b.join("dst/link")).expect("link"), Path::new("a.txt"));
        assert_eq!(copy("src", "dst", true, false), StatusCode::CONFLICT);
        write(&b.join("dst/extra"), "");
        assert_eq!(copy("src", "dst", true, true), StatusCode::NO_CONTENT);
        assert!(!b.join("dst/extra").exists());
        assert_eq!(copy("src/a.txt", "src/a.txt", false, true), StatusCode::BAD_REQUEST);
        assert_eq!(copy("src/a.txt", "one.txt", false, false), StatusCode::NO_CONTENT);
        assert_eq!(sfs::read_to_string(b.join("one.txt")).expect("one"), "A");

        let mv = |src: &str, dst: &str, overwrite: bool| {
            status(ctx.move_path(MoveRequest { src_path: src.into(), dst_path: dst.into(), overwrite }))
        };
        assert_eq!(mv("one.txt", "src/a.txt", false), StatusCode::CONFLICT);
        assert_eq!(mv("one.txt", "two.txt", false), StatusCode::NO_CONTENT);
        assert!(!b.join("one.txt").exists());
        assert_eq!(mv("dst", "src", true), StatusCode::NO_CONTENT);
        assert!(!b.join("dst").exists() && b.join("src/sub/b.txt").exists());
        assert_eq!(mv("src", "src/sub/x", true), StatusCode::BAD_REQUEST);
        assert_eq!(mv("src/sub", "src", true), StatusCode::BAD_REQUEST);
        assert!(b.join("src/sub/b.txt").exists());
        assert_eq!(mv("src", "src", true), StatusCode::NO_CONTENT);
        assert_eq!(mv("missing", "x", true), StatusCode::NOT_FOUND);
        std::os::unix::fs::symlink("nowhere", b.join("dangling")).expect("symlink");
        assert_eq!(mv("dangling", "moved-link", false), StatusCode::NO_CONTENT);
        assert!(sfs::symlink_metadata(b.join("moved-link")).is_ok());
        std::os::unix::fs::symlink("two.txt", b.join("to-two")).expect("symlink");
        assert_eq!(copy("two.txt", "to-two", false, true), StatusCode::BAD_REQUEST);
        assert_eq!(sfs::read_to_string(b.join("two.txt")).expect("two"), "A");
    }

    #[test]
    fn stat_and_ls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = test_ctx(dir.path());
        let b = dir.path();
        write(&b.join("d/f.txt"), "12345");
        sfs::set_permissions(b.join("d/f.txt"), Permissions::from_mode(0o640)).expect("chmod");
        std::os::unix::fs::symlink("d", b.join("l")).expect("symlink");
        let info =
            ctx.file_info(&b.join("d/f.txt"), &sfs::symlink_metadata(b.join("d/f.txt")).expect("meta"));
        assert_eq!(
            (info.name.as_str(), info.size, info.mode.as_str(), info.is_dir),
            ("f.txt", 5, "640", false)
        );
        let info = ctx.file_info(&b.join("l"), &sfs::symlink_metadata(b.join("l")).expect("meta"));
        assert!(info.is_symlink && !info.is_dir);
        assert_eq!(info.link_target.as_deref(), Some("d"));
        assert_eq!(status(ctx.stat(StatRequest { path: "nope".into() })), StatusCode::NOT_FOUND);
        assert_eq!(
            status(ctx.ls(LsRequest { path: "nope".into(), recursive: false, exclude: vec![] })),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(ctx.ls(LsRequest { path: ".".into(), recursive: true, exclude: vec![] })),
            StatusCode::OK
        );
    }

    /// New entries go to the sandbox user, existing ones keep their owner (needs root).
    #[test]
    fn new_entries_belong_to_the_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = dir.path();
        if sfs::metadata(b).expect("meta").uid() != 0 {
            return; // only root can give files away
        }
        let mut ctx = test_ctx(b);
        ctx.user.uid = 4321;
        ctx.user.gid = 4322;
        let owner = |p: &str| {
            let m = sfs::symlink_metadata(b.join(p)).expect("meta");
            (m.uid(), m.gid())
        };
        write(&b.join("old.txt"), "x");
        let (file, _) = ctx.open_for_write(&b.join("old.txt"), None).expect("open");
        drop(file);
        assert_eq!(owner("old.txt"), (0, 0));
        let (file, _) = ctx.open_for_write(&b.join("p/q/new.txt"), None).expect("open");
        drop(file);
        for p in ["p", "p/q", "p/q/new.txt"] {
            assert_eq!(owner(p), (4321, 4322), "{p}");
        }
        assert_eq!(
            status(ctx.mkdir(MkdirRequest { path: "m/n".into(), recursive: true, permissions: None })),
            StatusCode::NO_CONTENT
        );
        assert_eq!(owner("m"), (4321, 4322));
        assert_eq!(owner("m/n"), (4321, 4322));
        std::os::unix::fs::symlink("old.txt", b.join("p/ln")).expect("symlink");
        let copy =
            CopyRequest { src_path: "p".into(), dst_path: "c".into(), recursive: true, overwrite: false };
        assert_eq!(status(ctx.copy(copy)), StatusCode::NO_CONTENT);
        for p in ["c", "c/q", "c/q/new.txt", "c/ln"] {
            assert_eq!(owner(p), (4321, 4322), "{p}");
        }
        let set = SetPermissionsRequest {
            path: "old.txt".into(),
            mode: None,
            owner: Some("77".into()),
            group: Some("78".into()),
        };
        assert_eq!(status(ctx.set_permissions(set)), StatusCode::NO_CONTENT);
        assert_eq!(owner("old.txt"), (77, 78));
    }

    // ---- end to end, through hyper

    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    use std::sync::Arc;

    struct Client {
        sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    }

    impl Client {
        async fn start(fs: Fs) -> Client {
            let fs = Arc::new(fs);
            let (a, b) = tokio::io::duplex(1 << 20);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let fs = fs.clone();
                    async move {
                        let op = req.uri().path().trim_start_matches("/v1/fs/").to_string();
                        Ok::<_, std::convert::Infallible>(fs.handle(&op, req).await)
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(b), svc).await;
            });
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(a)).await.expect("handshake");
            tokio::spawn(conn);
            Client { sender }
        }

        async fn send(
            &mut self,
            uri: &str,
            content_type: &str,
            body: impl Into<Bytes>,
        ) -> (StatusCode, Option<String>, Bytes) {
            let req = Request::post(uri)
                .header(header::CONTENT_TYPE, content_type)
                .body(Full::new(body.into()))
                .expect("request");
            let resp = self.sender.send_request(req).await.expect("send");
            let status = resp.status();
            let ct =
                resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, ct, body)
        }

        async fn json(&mut self, op: &str, value: serde_json::Value) -> (StatusCode, Bytes) {
            let (s, _, b) = self.send(&format!("/v1/fs/{op}"), "application/json", value.to_string()).await;
            (s, b)
        }
    }

    #[tokio::test]
    async fn end_to_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = test_ctx(dir.path());
        let b = dir.path().to_path_buf();
        let mut c = Client::start(Fs { user: ctx.user, names: ctx.names }).await;

        let data: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8 * u8::from(i % 7 != 0)).collect();
        let (s, _, _) = c
            .send("/v1/fs/write-file?path=bin%2Fdata.bin&permissions=0755", OCTET_STREAM, data.clone())
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        assert_eq!(sfs::metadata(b.join("bin/data.bin")).expect("meta").mode() & 0o777, 0o755);
        let (s, body) = c.json("read-file", serde_json::json!({"path": "bin/data.bin"})).await;
        assert_eq!(s, StatusCode::OK);
        assert!(body == data, "round trip differs");
        let (s, body) =
            c.json("read-file", serde_json::json!({"path": "bin/data.bin", "offset": 10, "limit": 5})).await;
        assert_eq!((s, &body[..]), (StatusCode::OK, &data[10..15]));

        write(&b.join("t.txt"), "1\n2\n3\n4\n");
        let (_, body) = c.json("read-file", serde_json::json!({"path": "t.txt", "tail": 2})).await;
        assert_eq!(&body[..], b"3\n4\n");
        let (_, body) = c.json("read-file", serde_json::json!({"path": "t.txt", "head": 1})).await;
        assert_eq!(&body[..], b"1\n");
        let (s, _) = c.json("read-file", serde_json::json!({"path": "t.txt", "head": 1, "tail": 1})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let (s, _) = c.json("read-file", serde_json::json!({"path": "absent"})).await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // read-files: parse the multipart answer back.
        let (s, ct, body) = c
            .send(
                "/v1/fs/read-files",
                "application/json",
                serde_json::json!({"paths": ["t.txt", "bin/data.bin"]}).to_string(),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        let boundary = multer::parse_boundary(ct.expect("content-type")).expect("boundary");
        let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(body) });
        let mut mp = multer::Multipart::new(stream, boundary);
        let mut parts = Vec::new();
        while let Some(f) = mp.next_field().await.expect("field") {
            let name = f.name().map(str::to_owned);
            let file_name = f.file_name().map(str::to_owned);
            parts.push((name, file_name, f.bytes().await.expect("bytes")));
        }
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0.as_deref(), Some("t.txt"));
        assert_eq!(&parts[0].2[..], b"1\n2\n3\n4\n");
        assert_eq!((parts[1].0.as_deref(), parts[1].1.as_deref()), (Some("bin/data.bin"), Some("data.bin")));
        assert!(parts[1].2 == data);
        let (s, body) = c.json("read-files", serde_json::json!({"paths": ["t.txt", "gone.txt"]})).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(String::from_utf8_lossy(&body).contains("gone.txt"));

        // write-files
        let mp_body = "--XyZ\r\nContent-Disposition: form-data; name=\"m/one.txt\"; filename=\"one.txt\"\r\n\r\nfirst\r\n\
                       --XyZ\r\nContent-Disposition: form-data; name=\"/tmp-not-used\"\r\n\r\n\r\n--XyZ--\r\n"
            .replace("/tmp-not-used", &b.join("m/two").display().to_string());
        let (s, _, _) = c.send("/v1/fs/write-files", "multipart/form-data; boundary=XyZ", mp_body).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        assert_eq!(sfs::read_to_string(b.join("m/one.txt")).expect("one"), "first");
        assert_eq!(sfs::read(b.join("m/two")).expect("two"), b"");
        let (s, _, _) = c.send("/v1/fs/write-files", "text/plain", "x").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);

        // JSON ops
        let (s, body) = c
            .json(
                "edit-file",
                serde_json::json!({"path": "t.txt", "edits": [{"find": "2\n", "replace": "two\n"}]}),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        let r: EditFileResponse = serde_json::from_slice(&body).expect("edit response");
        assert_eq!(r.replacements, 1);
        assert!(r.diff.contains("+two"));
        let (s, body) = c.json("exists", serde_json::json!({"path": "t.txt"})).await;
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"{\"exists\":true}"[..]));
        let (s, body) = c.json("ls", serde_json::json!({"path": "m"})).await;
        assert_eq!(s, StatusCode::OK);
        let ls: LsResponse = serde_json::from_slice(&body).expect("ls");
        assert_eq!(ls.items.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["one.txt", "two"]);
        assert_eq!(ls.items[0].mode, "644");
        let (s, _) = c.json("set-permissions", serde_json::json!({"path": "t.txt", "mode": "600"})).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        assert_eq!(sfs::metadata(b.join("t.txt")).expect("meta").mode() & 0o777, 0o600);
        let (s, _) =
            c.json("set-permissions", serde_json::json!({"path": "t.txt", "owner": "no-such-user"})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let (s, body) = c.json("ls", serde_json::json!({"nope": 1})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&body).contains("message"));
        let (s, _) = c.json("ls", serde_json::json!({"path": ""})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let (s, _) = c.json("frobnicate", serde_json::json!({"path": "x"})).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, body) = c.json("tree", serde_json::json!({"path": ".", "max_depth": 1})).await;
        assert_eq!(s, StatusCode::OK);
        assert!(String::from_utf8_lossy(&body).contains("\"type\":\"directory\""));
    }
}
