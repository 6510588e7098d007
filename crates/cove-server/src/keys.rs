//! API keys of the caller's organization (a Cove extension; Leap0 manages keys elsewhere).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use cove_api::{ErrorResponse, FieldError, Validate, ValidationErrorResponse, Violations};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::extract::{OrgId, ValidJson};
use crate::AppState;

#[derive(Debug, Deserialize, ToSchema)]
pub struct KeyCreateRequest {
    /// A label for the key, 1..=64 characters.
    pub name: String,
}

impl Validate for KeyCreateRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        v.check((1..=64).contains(&self.name.chars().count()), "name", "must be 1 to 64 characters");
        v.finish()
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// First characters of the key, to recognise it.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    /// The key itself: only in the answer to its creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub items: Vec<ApiKey>,
}

fn to_api(k: cove_store::ApiKeyInfo, key: Option<String>) -> ApiKey {
    ApiKey { id: k.id, name: k.name, prefix: k.prefix, created_at: k.created_at, key }
}

#[utoipa::path(post, path = "/v1/keys", tag = "Keys", request_body = KeyCreateRequest,
    responses((status = 201, description = "Created; the key is shown once", body = ApiKey),
        (status = 400, description = "Invalid request", body = ValidationErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse)))]
pub async fn create(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    ValidJson(req): ValidJson<KeyCreateRequest>,
) -> Result<(StatusCode, Json<ApiKey>), ApiError> {
    let key = cove_store::generate_key();
    let info = s.core.store.add_key(&org, &req.name, &key)?;
    Ok((StatusCode::CREATED, Json(to_api(info, Some(key)))))
}

#[utoipa::path(get, path = "/v1/keys", tag = "Keys",
    responses((status = 200, description = "Keys of the organization", body = ApiKeyList),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse)))]
pub async fn list(State(s): State<AppState>, OrgId(org): OrgId) -> Result<Json<ApiKeyList>, ApiError> {
    let items = s.core.store.list_keys(&org)?.into_iter().map(|k| to_api(k, None)).collect();
    Ok(Json(ApiKeyList { items }))
}

#[utoipa::path(delete, path = "/v1/keys/{keyID}", tag = "Keys",
    params(("keyID" = String, Path, description = "Key id")),
    responses((status = 204, description = "Revoked"),
        (status = 404, description = "No such key in this organization", body = ErrorResponse)))]
pub async fn delete(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.core.store.delete_key(&org, &id).map_err(|e| match e {
        cove_store::StoreError::NotFound => ApiError::NotFound(format!("key {id} not found")),
        other => other.into(),
    })?;
    Ok(StatusCode::NO_CONTENT)
}
