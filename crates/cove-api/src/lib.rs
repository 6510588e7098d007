//! Wire types of Cove's public HTTP API.
//!
//! These are the request and response bodies of the Leap0-compatible API, with their documented
//! constraints as `validate()` methods. No I/O happens here: the control plane, the CLI and the
//! guest agent all share these types, so the JSON on every hop is spelled once.

pub mod error;
pub mod filesystem;
pub mod git;
pub mod lsp;
pub mod presigned;
pub mod process;
pub mod pty;
pub mod sandbox;
pub mod snapshot;
pub mod ssh;
pub mod template;

pub use error::{ErrorResponse, FieldError, ValidationErrorResponse};

/// A type whose documented constraints can be checked after it has been parsed.
pub trait Validate {
    /// Returns every violated constraint, each naming the JSON field it concerns.
    fn validate(&self) -> Result<(), Vec<FieldError>>;
}

/// Collects field errors while a request is being checked.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldError>);

impl Violations {
    pub fn push(&mut self, field: impl Into<String>, error: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), error: error.into() });
    }

    pub fn check(&mut self, ok: bool, field: impl Into<String>, error: impl Into<String>) {
        if !ok {
            self.push(field, error);
        }
    }

    /// `finish` for a body that is itself the checked object: fields were named from an empty
    /// prefix (`.prefix`), which becomes `prefix`.
    pub fn finish_at_root(self) -> Result<(), Vec<FieldError>> {
        self.finish().map_err(|errors| {
            errors
                .into_iter()
                .map(|e| FieldError { field: e.field.trim_start_matches('.').to_string(), error: e.error })
                .collect()
        })
    }

    pub fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// Checks a path given to a filesystem call: non-empty, without NUL bytes.
pub fn check_path(v: &mut Violations, field: &str, path: &str) {
    if path.is_empty() {
        v.push(field, "must not be empty");
    } else if path.contains('\0') {
        v.push(field, "must not contain NUL bytes");
    } else if path.len() > 4096 {
        v.push(field, "must be at most 4096 bytes");
    }
}

/// The paging parameters list endpoints share: `order-by` (`asc`/`desc`, default `desc`),
/// `page` (from 1) and `page-size` (1..=100, default 20). Returns (descending, page, page size).
pub fn parse_paging(
    v: &mut Violations,
    order_by: &Option<String>,
    page: &Option<String>,
    page_size: &Option<String>,
) -> (bool, u64, u64) {
    let descending = match order_by.as_deref() {
        None | Some("") | Some("desc") => true,
        Some("asc") => false,
        Some(_) => {
            v.push("order-by", "must be one of asc, desc");
            true
        }
    };
    let mut int = |field: &str, raw: &Option<String>, default: u64, max: u64| match raw.as_deref() {
        None | Some("") => default,
        Some(s) => match s.parse::<u64>() {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => {
                v.push(field, format!("must be an integer between 1 and {max}"));
                default
            }
        },
    };
    let page = int("page", page, 1, u32::MAX as u64);
    let page_size = int("page-size", page_size, 20, 100);
    (descending, page, page_size)
}
