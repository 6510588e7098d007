//! Presigned URLs: temporary public URLs to one port of a sandbox.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{FieldError, Validate, Violations};

pub const DEFAULT_EXPIRES_IN_SECS: i64 = 3600;
/// The longest a presigned URL may live: 30 days.
pub const MAX_EXPIRES_IN_SECS: i64 = 30 * 24 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PresignedUrlCreateRequest {
    /// Sandbox port the URL opens, 1–65535.
    pub port: i64,
    /// Lifetime in seconds (default 3600).
    #[serde(default)]
    pub expires_in: Option<i64>,
}

impl Validate for PresignedUrlCreateRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        v.check((1..=65535).contains(&self.port), "port", "must be between 1 and 65535");
        if let Some(e) = self.expires_in {
            v.check(
                (1..=MAX_EXPIRES_IN_SECS).contains(&e),
                "expires_in",
                format!("must be between 1 and {MAX_EXPIRES_IN_SECS} seconds"),
            );
        }
        v.finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PresignedUrlResponse {
    pub id: String,
    /// The raw token: returned this once, stored only as a SHA-256 hash.
    pub token: String,
    /// The public URL: `<scheme>://<token>.<presigned domain>`.
    pub url: String,
    pub sandbox_id: String,
    pub port: u16,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_and_lifetime_are_bounded() {
        let bad = PresignedUrlCreateRequest { port: 0, expires_in: Some(0) }.validate().unwrap_err();
        let fields: Vec<&str> = bad.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["port", "expires_in"]);
        assert!(PresignedUrlCreateRequest { port: 65536, expires_in: None }.validate().is_err());
        assert!(PresignedUrlCreateRequest { port: 8080, expires_in: Some(60) }.validate().is_ok());
    }
}
