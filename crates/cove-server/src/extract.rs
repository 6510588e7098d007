//! Request extractors: the caller's organization, and JSON bodies that are parsed and
//! validated with field-level errors (never a bare 422 or a panic).

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use cove_api::{FieldError, Validate};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::AppState;

/// The authenticated organization.
#[derive(Debug, Clone)]
pub struct OrgId(pub String);

/// The key from `authorization` or `leap0-authorization`, with an optional `Bearer ` prefix.
pub fn api_key(headers: &axum::http::HeaderMap) -> Option<String> {
    ["authorization", "leap0-authorization"].iter().find_map(|h| {
        let v = headers.get(*h)?.to_str().ok()?.trim();
        let key = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v).trim();
        (!key.is_empty()).then(|| key.to_string())
    })
}

impl FromRequestParts<AppState> for OrgId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let key = api_key(&parts.headers).ok_or(ApiError::Unauthorized)?;
        match state.core.store.authenticate(&key)? {
            Some(org) => Ok(OrgId(org)),
            None => Err(ApiError::Unauthorized),
        }
    }
}

/// Largest JSON body accepted.
const MAX_JSON: usize = 16 << 20;

/// A JSON body, parsed with the path of any type error and then validated.
pub struct ValidJson<T>(pub T);

impl<T: DeserializeOwned + Validate> FromRequest<AppState> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_JSON)
            .await
            .map_err(|_| ApiError::field("body", format!("must be at most {} MiB", MAX_JSON >> 20)))?;
        let value = parse_json::<T>(&bytes)?;
        value.validate().map_err(ApiError::Invalid)?;
        Ok(ValidJson(value))
    }
}

/// Like `ValidJson`, for endpoints whose every field is optional: an empty body is `{}`.
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Validate + Default> FromRequest<AppState> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_JSON)
            .await
            .map_err(|_| ApiError::field("body", format!("must be at most {} MiB", MAX_JSON >> 20)))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        let value = parse_json::<T>(&bytes)?;
        value.validate().map_err(ApiError::Invalid)?;
        Ok(OptionalJson(value))
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::field("body", "a JSON body is required"));
    }
    // serde would also build a struct from a JSON array; the contract's bodies are objects.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::field("body", "must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        // serde names a missing field in its message: report it as that field.
        let field = if let Some(rest) = message.strip_prefix("missing field `") {
            rest.split('`').next().unwrap_or("body").to_string()
        } else if path == "." || path == "?" || path.is_empty() || inner.is_syntax() || inner.is_eof() {
            "body".to_string()
        } else {
            path
        };
        let error =
            if inner.is_syntax() || inner.is_eof() { format!("invalid JSON: {message}") } else { message };
        ApiError::Invalid(vec![FieldError { field, error }])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cove_api::sandbox::SandboxCreateRequest;

    fn field_of(body: &str) -> String {
        match parse_json::<SandboxCreateRequest>(&Bytes::from(body.to_string())) {
            Err(ApiError::Invalid(errors)) => errors[0].field.clone(),
            Err(other) => panic!("{body}: unexpected error {other}"),
            Ok(_) => panic!("{body}: parsed"),
        }
    }

    #[test]
    fn parse_errors_name_the_field_or_the_body() {
        for bad_json in ["{bad", "{not json", r#"{"template_name": "x", "vcpu": }"#, "[", "{"] {
            assert_eq!(field_of(bad_json), "body", "{bad_json}");
        }
        assert_eq!(field_of("  "), "body");
        assert_eq!(field_of("{}"), "template_name");
        assert_eq!(field_of(r#"{"template_name": "t", "env_vars": {"A": 1}}"#), "env_vars.A");
        assert_eq!(field_of(r#"{"template_name": "t", "vcpu": "two"}"#), "vcpu");
    }
}
