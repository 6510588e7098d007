//! Request and response bodies that are not JSON: `write-file`'s query, multipart uploads
//! (`write-files`) and downloads (`read-files`), and streaming a body to or from a file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;

/// Parses `write-file`'s query string (`application/x-www-form-urlencoded`).
pub(super) fn parse_write_query(query: &str) -> Res<WriteFileQuery> {
    let mut path = None;
    let mut permissions = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (percent_decode(k), percent_decode(v)) else {
            return Err(Fail::bad("query string is not valid UTF-8 once decoded"));
        };
        match k.as_str() {
            "path" => path = Some(v),
            "permissions" => permissions = Some(v).filter(|v| !v.is_empty()),
            _ => {}
        }
    }
    let path = path.ok_or_else(|| Fail::bad("invalid request: path: is required"))?;
    Ok(WriteFileQuery { path, permissions })
}

/// Decodes `%XX` escapes and `+` (space). A `%` not followed by two hex digits stays as is.
pub(super) fn percent_decode(s: &str) -> Option<String> {
    fn hex(c: Option<&u8>) -> Option<u8> {
        c.and_then(|c| (*c as char).to_digit(16)).and_then(|d| u8::try_from(d).ok())
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => match (hex(b.get(i + 1)), hex(b.get(i + 2))) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The path a `write-files` part is for: its `name`, or its RFC 5987 `name*` (which clients
/// such as reqwest send for names with `/` or non-ASCII characters), or failing both its file
/// name.
pub(super) fn part_name(field: &multer::Field<'_>) -> Option<String> {
    if let Some(n) = field.name().filter(|n| !n.is_empty()) {
        return Some(n.to_owned());
    }
    let disposition = field.headers().get(header::CONTENT_DISPOSITION).and_then(|v| v.to_str().ok());
    disposition
        .and_then(|d| extended_param(d, "name"))
        .or_else(|| field.file_name().filter(|n| !n.is_empty()).map(str::to_owned))
        .or_else(|| disposition.and_then(|d| extended_param(d, "filename")))
}

/// The value of an RFC 5987 extended parameter (`name*=utf-8''%2Fpath`) of a header.
pub(super) fn extended_param(header: &str, param: &str) -> Option<String> {
    header.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case(&format!("{param}*")) {
            return None;
        }
        let v = v.trim().trim_matches('"');
        let (charset, rest) = v.split_once('\'')?;
        let (_lang, encoded) = rest.split_once('\'')?;
        if !charset.eq_ignore_ascii_case("utf-8") {
            return None;
        }
        // Unlike a query string, `+` is itself here.
        percent_decode(&encoded.replace('+', "%2B")).filter(|s| !s.is_empty())
    })
}

/// The parts of a `write-files` body, in order: each with the path its name gives (checked,
/// not yet resolved) and its bytes as a stream.
pub(crate) struct Parts {
    multipart: multer::Multipart<'static>,
    /// Body bytes received so far, so that a body cut short says how far it got.
    received: Arc<AtomicU64>,
    count: usize,
}

/// How much of a body [`Parts::new`] reads ahead looking for its first delimiter (a preamble
/// may come before it; clients send none).
const DELIMITER_READ_AHEAD: usize = 64 << 10;

impl Parts {
    /// The parts of `body`, a `multipart/form-data` body of `content_type`.
    ///
    /// The body is read until its first delimiter has arrived (or the body has ended) before
    /// multer (3.1.0) sees any of it. Looking for that delimiter, multer reads what has
    /// arrived, and when it is not there yet, reads once more in the same poll; when that
    /// second read brings the rest of the body *and its end*, it answers `incomplete multipart
    /// stream` without looking at what it just read (rwf2/multer#70, not in a release). So a
    /// whole, well-formed upload was refused whenever its bytes reached the agent just after
    /// the handler first looked: about 1 upload in 100 when the server streamed bodies on, and
    /// rarely once it buffered them (the `write-files` loss, docs/status.md). With the
    /// delimiter in hand, multer finds it at its first read.
    pub(crate) async fn new<S, E>(content_type: &str, body: S) -> Res<Parts>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        let boundary =
            multer::parse_boundary(content_type).map_err(|e| Fail::bad(format!("content-type: {e}")))?;
        let body = with_delimiter_in_hand(body, &boundary).await;
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let body = body.inspect_ok(move |b: &Bytes| {
            counter.fetch_add(b.len() as u64, Ordering::Relaxed);
        });
        let limits = multer::SizeLimit::new().whole_stream(MAX_UPLOAD_BYTES as u64);
        let constraints = multer::Constraints::new().size_limit(limits);
        let multipart = multer::Multipart::with_constraints(body, boundary, constraints);
        Ok(Parts { multipart, received, count: 0 })
    }

    /// The next part and the path it names; `None` after the last. A body with no parts, a
    /// part without a name or with a bad path, and a malformed body are errors.
    pub(crate) async fn next(&mut self) -> Res<Option<(String, multer::Field<'static>)>> {
        let Some(field) = self.multipart.next_field().await.map_err(|e| self.fail(e))? else {
            return match self.count {
                0 => Err(Fail::bad("the multipart body holds no files")),
                _ => Ok(None),
            };
        };
        let name =
            part_name(&field).ok_or_else(|| Fail::bad("every part needs a name: the path of its file"))?;
        let mut v = Violations::default();
        check_path(&mut v, &format!("parts[{}].name", self.count), &name);
        v.finish().map_err(|errs| Fail::bad(violations_message(&errs)))?;
        self.count += 1;
        Ok(Some((name, field)))
    }

    /// The answer to a multipart error, with how many body bytes had arrived.
    pub(crate) fn fail(&self, e: multer::Error) -> Fail {
        match multipart_fail(e) {
            Fail::Status(status, m) => {
                let n = self.received.load(Ordering::Relaxed);
                Fail::Status(status, format!("{m} (after {n} bytes of the body)"))
            }
            other => other,
        }
    }
}

/// `body`, with its first chunks read ahead until they hold the delimiter of `boundary`, or
/// [`DELIMITER_READ_AHEAD`] bytes, or the body has ended or failed (see [`Parts::new`]).
async fn with_delimiter_in_hand<S, E>(body: S, boundary: &str) -> impl Stream<Item = Result<Bytes, E>>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    let delimiter = format!("--{boundary}");
    let found =
        |seen: &[u8], from: usize| seen[from..].windows(delimiter.len()).any(|w| w == delimiter.as_bytes());
    let mut body = Box::pin(body.fuse());
    let (mut ahead, mut seen) = (Vec::new(), Vec::new());
    while seen.len() < DELIMITER_READ_AHEAD {
        match body.next().await {
            Some(Ok(chunk)) => {
                // Only what a delimiter ending in this chunk can span is looked at again.
                let from = seen.len().saturating_sub(delimiter.len() - 1);
                // Enough to look in: the loop ends at the read-ahead anyway.
                seen.extend_from_slice(&chunk[..chunk.len().min(DELIMITER_READ_AHEAD)]);
                ahead.push(Ok(chunk));
                if found(&seen, from) {
                    break;
                }
            }
            Some(Err(e)) => {
                ahead.push(Err(e));
                break;
            }
            None => break,
        }
    }
    futures::stream::iter(ahead).chain(body)
}

fn multipart_fail(e: multer::Error) -> Fail {
    match e {
        multer::Error::StreamSizeExceeded { limit } | multer::Error::FieldSizeExceeded { limit, .. } => {
            Fail::Status(StatusCode::PAYLOAD_TOO_LARGE, format!("upload is larger than {limit} bytes"))
        }
        e => Fail::bad(format!("multipart body: {e}")),
    }
}

/// Writes a stream of chunks into `file` on a blocking thread. On failure a file this request
/// created is removed again rather than left half-written.
pub(super) async fn pump<S, E>(
    path: &Path,
    file: File,
    created: bool,
    stream: S,
    on_error: impl Fn(E) -> Fail,
) -> Res<()>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let writer = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let mut file = file;
        while let Some(chunk) = rx.blocking_recv() {
            file.write_all(&chunk)?;
        }
        file.flush()
    });
    let mut stream = std::pin::pin!(stream);
    let mut total: u64 = 0;
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                failure = Some(on_error(e));
                break;
            }
        };
        total += chunk.len() as u64;
        if total > MAX_UPLOAD_BYTES as u64 {
            failure = Some(Fail::Status(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("upload is larger than {MAX_UPLOAD_BYTES} bytes"),
            ));
            break;
        }
        if tx.send(chunk).await.is_err() {
            break; // the writer stopped on an error, which it returns below
        }
    }
    drop(tx);
    let written = match writer.await {
        Ok(r) => r.at(path),
        Err(e) => Err(Fail::Status(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}: writer failed: {e}", path.display()),
        )),
    };
    let result = match failure {
        Some(f) => Err(f),
        None => written,
    };
    if result.is_err() && created {
        let p = path.to_path_buf();
        let _ = tokio::task::spawn_blocking(move || sfs::remove_file(p)).await;
    }
    result
}

pub(super) fn reader_body<R: tokio::io::AsyncRead + Send + Sync + 'static>(reader: R) -> Body {
    BodyExt::boxed(StreamBody::new(ReaderStream::with_capacity(reader, CHUNK).map_ok(Frame::data)))
}

/// An unpredictable multipart boundary (std's hasher keys are random per process).
pub(super) fn new_boundary() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let a = RandomState::new().hash_one(nanos);
    let b = RandomState::new().hash_one(std::process::id());
    format!("cove-{a:016x}{b:016x}")
}

/// The head of one `read-files` part. Quotes and line breaks in names are percent-escaped,
/// as browsers do in form-data.
pub(super) fn part_header(boundary: &str, name: &str) -> String {
    let escape = |s: &str| s.replace('"', "%22").replace('\r', "%0D").replace('\n', "%0A");
    let base = Path::new(name)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_string());
    format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"; filename=\"{}\"\r\n\
         Content-Type: {OCTET_STREAM}\r\n\r\n",
        escape(name),
        escape(&base)
    )
}

/// Reads a whole `write-files` body the way [`Fs`]'s handler does, into memory instead of
/// files: each part's path and bytes, or the status the agent would answer with. For the fuzz
/// targets ([`crate::fuzzing`]).
pub(crate) async fn read_upload<S, E>(
    content_type: &str,
    body: S,
) -> Result<Vec<(String, Vec<u8>)>, StatusCode>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let status = |f: Fail| f.into_response().status();
    let mut parts = Parts::new(content_type, body).await.map_err(status)?;
    let mut files = Vec::new();
    while let Some((name, mut field)) = parts.next().await.map_err(status)? {
        let mut bytes = Vec::new();
        while let Some(chunk) = field.next().await {
            bytes.extend_from_slice(&chunk.map_err(|e| status(parts.fail(e)))?);
        }
        files.push((name, bytes));
    }
    Ok(files)
}
