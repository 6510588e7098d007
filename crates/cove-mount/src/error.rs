//! [`MountError`] and the mapping from `object_store` errors to it.

use object_store::client::{HttpError, HttpErrorKind};

/// What went wrong, in words a user can act on. Messages never contain the secret key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    /// No file or directory at this path (relative to the view's root).
    #[error("{0:?}: no such file or directory")]
    NotFound(String),
    /// The server refused the request: wrong or missing credentials, or no permission.
    #[error("{0}")]
    AccessDenied(String),
    /// The endpoint is malformed, did not answer, or did not answer like an S3 server.
    #[error("{0}")]
    BadEndpoint(String),
    /// The bucket does not exist at this endpoint.
    #[error("{0}")]
    NoSuchBucket(String),
    /// A path that could reach outside the view or is ambiguous (`..`, `.`, `a//b`, `/a`).
    #[error("{0}")]
    InvalidPath(String),
    /// A read of a directory (the path is relative to the view's root).
    #[error("{0:?} is a directory")]
    IsADirectory(String),
    /// Anything else, with the server's or client's message.
    #[error("{0}")]
    Other(String),
}

/// Where a request went, to build messages: never holds the secret itself, only what is needed
/// to scrub it from messages that might echo it.
#[derive(Clone)]
pub(crate) struct ErrorContext {
    pub bucket: String,
    pub endpoint: String,
    /// The access key id (not secret), or `None` for unsigned requests.
    pub access_key_id: Option<String>,
    pub secret: Option<String>,
}

impl ErrorContext {
    /// Maps an `object_store` error from operation `op` on `what` (a path relative to the view,
    /// or a description such as "the bucket").
    pub fn map(&self, op: &str, what: &str, e: object_store::Error) -> MountError {
        let text = self.scrub(&e.to_string());
        let code = s3_error_code(&text);
        let endpoint = &self.endpoint;
        let bucket = &self.bucket;

        if let Some(kind) = http_error_kind(&e) {
            if matches!(kind, HttpErrorKind::Connect | HttpErrorKind::Timeout) {
                let cause = self.scrub(&innermost_message(&e));
                return MountError::BadEndpoint(format!(
                    "the endpoint {endpoint} did not answer ({op} {what}): {cause}"
                ));
            }
        }
        if code.as_deref() == Some("NoSuchBucket") {
            return MountError::NoSuchBucket(format!("bucket {bucket:?} does not exist at {endpoint}"));
        }
        let denied_code = matches!(
            code.as_deref(),
            Some(
                "AccessDenied"
                    | "SignatureDoesNotMatch"
                    | "InvalidAccessKeyId"
                    | "InvalidToken"
                    | "ExpiredToken"
                    | "AllAccessDisabled"
                    | "AccountProblem"
            )
        );
        let denied_status = text.contains("status code: 403") || text.contains("status code: 401");
        if matches!(
            e,
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
        ) || denied_code
            || denied_status
        {
            let reason = code.map(|c| format!(" ({c})")).unwrap_or_default();
            return MountError::AccessDenied(match &self.access_key_id {
                Some(id) => format!(
                    "the credentials (access key id {id}) were rejected by {endpoint} for bucket \
                     {bucket:?}{reason} when trying to {op} {what}"
                ),
                None => format!(
                    "bucket {bucket:?} at {endpoint} does not allow anonymous access{reason} \
                     when trying to {op} {what}: give credentials to mount it"
                ),
            });
        }
        if matches!(e, object_store::Error::NotFound { .. }) {
            return MountError::NotFound(what.to_string());
        }
        if text.contains("invalid list response") || text.contains("Unable to extract metadata") {
            return MountError::BadEndpoint(format!(
                "the endpoint {endpoint} answered, but not like an S3 server ({op} {what}): {text}"
            ));
        }
        MountError::Other(format!("{op} {what} in bucket {bucket:?} at {endpoint} failed: {text}"))
    }

    /// Removes the secret from a message, should a server or library ever echo it.
    fn scrub(&self, text: &str) -> String {
        match &self.secret {
            Some(secret) if !secret.is_empty() => text.replace(secret.as_str(), "<redacted>"),
            _ => text.to_string(),
        }
    }
}

/// The kind of the first [`HttpError`] in the error's source chain (connection problems).
fn http_error_kind(e: &object_store::Error) -> Option<HttpErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(http) = err.downcast_ref::<HttpError>() {
            return Some(http.kind());
        }
        source = err.source();
    }
    None
}

/// The last error of the source chain, e.g. "Connection refused (os error 111)".
fn innermost_message(e: &object_store::Error) -> String {
    let mut last: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// The `<Code>…</Code>` of an S3 error body quoted in a message.
fn s3_error_code(text: &str) -> Option<String> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    let code = text[start..start + len].trim();
    (!code.is_empty()).then(|| code.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_codes_are_found() {
        let body = "Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?>\
                    <Error><Code>NoSuchBucket</Code><Message>x</Message></Error>";
        assert_eq!(s3_error_code(body).as_deref(), Some("NoSuchBucket"));
        assert_eq!(s3_error_code("no xml here"), None);
    }

    #[test]
    fn secrets_are_scrubbed() {
        let ctx = ErrorContext {
            bucket: "b".into(),
            endpoint: "http://127.0.0.1:1".into(),
            access_key_id: Some("AKID".into()),
            secret: Some("s3cr3t".into()),
        };
        let e = object_store::Error::Generic { store: "S3", source: "oops s3cr3t <Code>Weird</Code>".into() };
        let msg = ctx.map("read", "a.txt", e).to_string();
        assert!(!msg.contains("s3cr3t"), "{msg}");
        assert!(msg.contains("<redacted>"), "{msg}");
    }
}
