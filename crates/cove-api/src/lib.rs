//! Wire types of Cove's public HTTP API.
//!
//! These are the request and response bodies of the Leap0-compatible API, with their documented
//! constraints as `validate()` methods. No I/O happens here: the control plane, the CLI and the
//! guest agent all share these types, so the JSON on every hop is spelled once.

pub mod error;
pub mod filesystem;
pub mod process;
pub mod sandbox;

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
