//! Named snapshots: create from a running sandbox, restore into a new one, list, delete.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::sandbox::{NetworkPolicy, MAX_TIMEOUT_SECS};
use crate::{FieldError, Validate, Violations};

pub const MAX_SNAPSHOT_NAME: usize = 64;

/// Checks a snapshot name: 1..=64 characters after trimming, no control characters.
fn check_name(v: &mut Violations, field: &str, name: &str) {
    let name = name.trim();
    if name.is_empty() {
        v.push(field, "must not be empty");
    } else if name.chars().count() > MAX_SNAPSHOT_NAME {
        v.push(field, format!("must be at most {MAX_SNAPSHOT_NAME} characters"));
    } else if name.chars().any(char::is_control) {
        v.push(field, "must not contain control characters");
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct SnapshotCreateRequest {
    /// Snapshot name, unique in the organization; generated when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Delete the source sandbox once the snapshot is stored.
    #[serde(default)]
    pub kill_sandbox_after: Option<bool>,
}

impl Validate for SnapshotCreateRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        if let Some(name) = &self.name {
            check_name(&mut v, "name", name);
        }
        v.finish()
    }
}

/// A snapshot as returned by create and list.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotResponse {
    pub id: String,
    pub name: String,
    pub template_id: String,
    pub vcpu: u32,
    /// MiB.
    pub memory: u64,
    /// Writable disk size, MiB.
    pub disk: u64,
    pub network_policy: Option<NetworkPolicy>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotRestoreRequest {
    /// Name of the snapshot to restore.
    pub snapshot_name: String,
    /// Lifetime in seconds, 1..=28800 (default 300).
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub auto_pause: Option<bool>,
    /// Replaces the snapshot's policy.
    #[serde(default)]
    pub network_policy: Option<NetworkPolicy>,
}

impl Validate for SnapshotRestoreRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_name(&mut v, "snapshot_name", &self.snapshot_name);
        if let Some(t) = self.timeout {
            v.check(
                (1..=MAX_TIMEOUT_SECS).contains(&t),
                "timeout",
                format!("must be between 1 and {MAX_TIMEOUT_SECS}"),
            );
        }
        if let Some(p) = &self.network_policy {
            p.check(&mut v, "network_policy");
        }
        v.finish()
    }
}

/// `GET /v1/snapshots` query; values arrive as strings so that bad ones get field errors.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListSnapshotsQuery {
    /// Only snapshots whose name contains this (case-insensitive), at most 64 characters.
    pub query: Option<String>,
    /// `created_at` (default) or `template_id`.
    pub sort: Option<String>,
    /// `asc` or `desc` (default).
    #[serde(rename = "order-by")]
    #[param(rename = "order-by")]
    pub order_by: Option<String>,
    /// 1-based page (default 1).
    pub page: Option<String>,
    /// Items per page, 1..=100 (default 20).
    #[serde(rename = "page-size")]
    #[param(rename = "page-size")]
    pub page_size: Option<String>,
}

/// A validated `ListSnapshotsQuery`.
#[derive(Debug, Clone)]
pub struct ListSnapshots {
    pub name: Option<String>,
    pub sort_by_template: bool,
    pub descending: bool,
    pub page: u64,
    pub page_size: u64,
}

impl ListSnapshotsQuery {
    pub fn parse(&self) -> Result<ListSnapshots, Vec<FieldError>> {
        let mut v = Violations::default();
        let name = self.query.as_deref().map(str::trim).filter(|q| !q.is_empty()).map(str::to_string);
        if let Some(q) = &name {
            v.check(q.chars().count() <= MAX_SNAPSHOT_NAME, "query", "must be at most 64 characters");
        }
        let sort_by_template = match self.sort.as_deref() {
            None | Some("") | Some("created_at") => false,
            Some("template_id") => true,
            Some(_) => {
                v.push("sort", "must be one of created_at, template_id");
                false
            }
        };
        let (descending, page, page_size) =
            crate::parse_paging(&mut v, &self.order_by, &self.page, &self.page_size);
        v.finish()?;
        Ok(ListSnapshots { name, sort_by_template, descending, page, page_size })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ListSnapshotsResponse {
    pub items: Vec<SnapshotResponse>,
    pub total_items: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        let ok = SnapshotCreateRequest { name: Some("workspace-warm".into()), kill_sandbox_after: None };
        assert!(ok.validate().is_ok());
        let long = SnapshotCreateRequest { name: Some("x".repeat(65)), kill_sandbox_after: None };
        assert_eq!(long.validate().unwrap_err()[0].field, "name");
        let blank = SnapshotRestoreRequest {
            snapshot_name: "  ".into(),
            timeout: Some(0),
            auto_pause: None,
            network_policy: None,
        };
        let errs = blank.validate().unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["snapshot_name", "timeout"]);
    }

    #[test]
    fn list_query_is_checked() {
        let q = ListSnapshotsQuery {
            sort: Some("name".into()),
            page_size: Some("500".into()),
            ..Default::default()
        };
        let errs = q.parse().unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["sort", "page-size"]);
        let q = ListSnapshotsQuery {
            sort: Some("template_id".into()),
            order_by: Some("asc".into()),
            ..Default::default()
        };
        let p = q.parse().unwrap();
        assert!(p.sort_by_template && !p.descending && p.page == 1 && p.page_size == 20);
    }
}
