//! Metadata store: organizations, API keys (hashed), sandboxes, snapshots, presigned URLs and
//! templates, one module each; this file holds the schema and the connection.
//!
//! SQLite, embedded, is the default; every write that depends on a read (the sandbox limit)
//! happens in one immediate transaction, so concurrent creates cannot overshoot it. Schema
//! changes are numbered migrations applied at open.

mod keys;
mod presigned;
mod sandboxes;
pub mod sealed;
mod snapshots;
mod ssh;
mod templates;

use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use cove_api::sandbox::{ListSandboxes, MountConfig, NetworkPolicy, SandboxState, SortKey};
pub use keys::{generate_key, hash_key, ApiKeyInfo, Org};
pub use presigned::PresignedRecord;
use rusqlite::{params, Connection, OptionalExtension, Row};
pub use sandboxes::{Change, Op, SandboxRecord};
use sha2::{Digest, Sha256};
pub use snapshots::{SnapshotQuery, SnapshotRecord, SnapshotState};
pub use ssh::SshAccessRecord;
pub use templates::{TemplateRecord, TemplateState};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("organization has {count} active sandboxes, its limit is {limit}")]
    LimitReached { count: u64, limit: u64 },
    #[error("not found")]
    NotFound,
    #[error("a snapshot named {0:?} already exists")]
    DuplicateName(String),
    #[error("{0}")]
    InUse(String),
    #[error("a template named {0:?} already exists")]
    TemplateNameTaken(String),
    #[error("the organization has reached its limit of {limit} templates")]
    TemplateLimit { limit: u64 },
}

/// Numbered schema migrations; a database records the highest one applied.
const MIGRATIONS: &[&str] = &[
    // 1: organizations, keys, sandboxes.
    "CREATE TABLE orgs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        sandbox_limit INTEGER,
        created_at TEXT NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL REFERENCES orgs(id),
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL REFERENCES orgs(id),
        template TEXT NOT NULL,
        vcpu INTEGER NOT NULL,
        memory INTEGER NOT NULL,
        disk INTEGER NOT NULL,
        timeout INTEGER NOT NULL,
        auto_pause INTEGER NOT NULL,
        network_policy TEXT,
        env TEXT NOT NULL,
        state TEXT NOT NULL,
        runner_id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        launch_time TEXT,
        state_changed_at TEXT NOT NULL,
        timeout_at INTEGER
    );
    CREATE INDEX sandboxes_org ON sandboxes(org_id, state);",
    // 2: lifecycle operations in flight, pause images, snapshots.
    "ALTER TABLE sandboxes ADD COLUMN op TEXT;
    ALTER TABLE sandboxes ADD COLUMN image TEXT;
    ALTER TABLE sandboxes ADD COLUMN snapshot_id TEXT;
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL REFERENCES orgs(id),
        name TEXT NOT NULL,
        template TEXT NOT NULL,
        vcpu INTEGER NOT NULL,
        memory INTEGER NOT NULL,
        disk INTEGER NOT NULL,
        network_policy TEXT,
        env TEXT NOT NULL,
        source_sandbox TEXT NOT NULL,
        image TEXT NOT NULL,
        state TEXT NOT NULL,
        stored_bytes INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        UNIQUE (org_id, name)
    );",
    // 3: presigned URLs (only the token's hash is kept).
    "CREATE TABLE presigned_urls (
        id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL REFERENCES orgs(id),
        sandbox_id TEXT NOT NULL,
        port INTEGER NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        expires_at INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX presigned_sandbox ON presigned_urls(sandbox_id);",
    // 4: object-storage mounts (credentials sealed by the caller).
    "ALTER TABLE sandboxes ADD COLUMN mounts TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE snapshots ADD COLUMN mounts TEXT NOT NULL DEFAULT '[]';",
    // 5: templates made from container images.
    templates::MIGRATION,
    // 6: SSH accesses (only the password's hash is kept).
    ssh::MIGRATION,
];

pub struct Store {
    conn: Mutex<Connection>,
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", hex::encode(rand::random::<[u8; 8]>()))
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_ts(s: &str) -> Result<DateTime<Utc>, rusqlite::Error> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

fn conversion(e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(Store { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running sandbox of `org` from template "t".
    pub(crate) fn sandbox(org: &str) -> SandboxRecord {
        rec(org, &new_id("sbx"), SandboxState::Running)
    }

    fn rec(org: &str, id: &str, state: SandboxState) -> SandboxRecord {
        let now = Utc::now();
        SandboxRecord {
            id: id.into(),
            org_id: org.into(),
            template: "t".into(),
            vcpu: 1,
            memory: 1024,
            disk: 2048,
            timeout: 300,
            auto_pause: false,
            network_policy: None,
            mounts: Vec::new(),
            env: Default::default(),
            state,
            runner_id: "local".into(),
            created_at: now,
            launch_time: None,
            state_changed_at: now,
            timeout_at: Some(now.timestamp() + 300),
            op: None,
            image: None,
            snapshot_id: None,
        }
    }

    #[test]
    fn keys_are_stored_hashed_and_authenticate() {
        let s = Store::open_in_memory().unwrap();
        let org = s.create_org("acme", None).unwrap();
        let key = generate_key();
        s.add_key(&org.id, "ci", &key).unwrap();
        assert_eq!(s.authenticate(&key).unwrap(), Some(org.id.clone()));
        assert_eq!(s.authenticate("cove_wrong").unwrap(), None);
        let stored: String = s.conn().query_row("SELECT key_hash FROM api_keys", [], |r| r.get(0)).unwrap();
        assert_ne!(stored, key);
        assert_eq!(stored, hash_key(&key));
    }

    #[test]
    fn limit_counts_only_vm_holding_states() {
        let s = Store::open_in_memory().unwrap();
        let org = s.create_org("acme", None).unwrap();
        s.insert_sandbox(&rec(&org.id, "a", SandboxState::Running), 2).unwrap();
        s.insert_sandbox(&rec(&org.id, "b", SandboxState::Paused), 2).unwrap();
        s.insert_sandbox(&rec(&org.id, "c", SandboxState::Starting), 2).unwrap();
        let err = s.insert_sandbox(&rec(&org.id, "d", SandboxState::Starting), 2).unwrap_err();
        assert!(matches!(err, StoreError::LimitReached { count: 2, limit: 2 }));
        // A per-organization limit overrides the default.
        s.set_org_limit(&org.id, Some(5)).unwrap();
        s.insert_sandbox(&rec(&org.id, "d", SandboxState::Starting), 2).unwrap();
        let mut counts = s.count_by_state().unwrap();
        counts.sort();
        let want = [("paused", 1), ("running", 1), ("starting", 2)].map(|(k, n)| (k.to_string(), n));
        assert_eq!(counts, want);
    }

    #[test]
    fn transitions_are_compare_and_set() {
        let s = Store::open_in_memory().unwrap();
        let org = s.create_org("acme", None).unwrap();
        s.insert_sandbox(&rec(&org.id, "a", SandboxState::Starting), 3).unwrap();
        assert!(s.transition("a", &[SandboxState::Starting], SandboxState::Running).unwrap().is_some());
        assert!(s.transition("a", &[SandboxState::Starting], SandboxState::Deleting).unwrap().is_none());
        let r = s.sandbox(&org.id, "a").unwrap().unwrap();
        assert_eq!(r.state, SandboxState::Running);
        assert!(r.launch_time.is_some());
        assert!(s.sandbox("other-org", "a").unwrap().is_none());
    }

    #[test]
    fn list_filters_sorts_and_pages() {
        let s = Store::open_in_memory().unwrap();
        let org = s.create_org("acme", None).unwrap();
        for i in 0..5 {
            let mut r = rec(
                &org.id,
                &format!("s{i}"),
                if i % 2 == 0 { SandboxState::Running } else { SandboxState::Paused },
            );
            r.created_at += chrono::Duration::seconds(i);
            s.insert_sandbox(&r, 100).unwrap();
        }
        let q =
            ListSandboxes { state: None, sort: SortKey::CreatedAt, descending: true, page: 1, page_size: 2 };
        let (rows, total) = s.list_sandboxes(&org.id, &q).unwrap();
        assert_eq!(total, 5);
        assert_eq!(rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["s4", "s3"]);
        let q = ListSandboxes {
            state: Some(SandboxState::Paused),
            page: 1,
            page_size: 10,
            descending: false,
            ..q
        };
        let (rows, total) = s.list_sandboxes(&org.id, &q).unwrap();
        assert_eq!((total, rows.len()), (2, 2));
        assert_eq!(rows[0].id, "s1");
    }

    fn snap(org: &str, id: &str, name: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: id.into(),
            org_id: org.into(),
            name: name.into(),
            template: "t".into(),
            vcpu: 1,
            memory: 1024,
            disk: 2048,
            network_policy: None,
            mounts: Vec::new(),
            env: Default::default(),
            source_sandbox: "a".into(),
            image: format!("images/{id}"),
            state: SnapshotState::Creating,
            stored_bytes: 0,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn operations_are_recorded_and_limits_apply_to_resumes() {
        let s = Store::open_in_memory().unwrap();
        let org = s.create_org("acme", None).unwrap();
        s.insert_sandbox(&rec(&org.id, "a", SandboxState::Running), 1).unwrap();
        let op = Op::Pause { image: "images/x".into() };
        s.update("a", &[SandboxState::Running], Change::to(SandboxState::Snapshotting).op(op.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(s.sandbox(&org.id, "a").unwrap().unwrap().op, Some(op));
        assert!(s.referenced_images().unwrap().contains("images/x"));
        s.update(
            "a",
            &[SandboxState::Snapshotting],
            Change::to(SandboxState::Paused).image(Some("images/x".into())),
        )
        .unwrap()
        .unwrap();
        let r = s.sandbox(&org.id, "a").unwrap().unwrap();
        assert_eq!((r.state, r.op, r.image.as_deref()), (SandboxState::Paused, None, Some("images/x")));
        // Paused does not count: another sandbox fits, and then resuming the first is over the limit.
        s.insert_sandbox(&rec(&org.id, "b", SandboxState::Running), 1).unwrap();
        let resume = Change::to(SandboxState::Unpausing).limit(1);
        assert!(matches!(
            s.update("a", &[SandboxState::Paused], resume),
            Err(StoreError::LimitReached { .. })
        ));
    }

    #[test]
    fn snapshots_have_unique_names_and_cannot_be_deleted_while_restoring() {
        let s = Store::open_in_memory().unwrap();
        let org = s.create_org("acme", None).unwrap();
        s.insert_snapshot(&snap(&org.id, "snap-1", "warm")).unwrap();
        assert!(matches!(
            s.insert_snapshot(&snap(&org.id, "snap-2", "warm")),
            Err(StoreError::DuplicateName(_))
        ));
        // Not restorable (nor listed) until ready.
        let mut r = rec(&org.id, "b", SandboxState::Starting);
        r.snapshot_id = Some("snap-1".into());
        assert!(matches!(s.insert_sandbox(&r, 5), Err(StoreError::NotFound)));
        let q =
            SnapshotQuery { name: None, sort_by_template: false, descending: true, page: 1, page_size: 10 };
        assert_eq!(s.list_snapshots(&org.id, &q).unwrap().1, 0);
        s.snapshot_ready("snap-1", 42).unwrap();
        assert_eq!(s.list_snapshots(&org.id, &q).unwrap().1, 1);
        let q2 = SnapshotQuery { name: Some("AR".into()), ..q.clone() };
        assert_eq!(s.list_snapshots(&org.id, &q2).unwrap().1, 1);
        let q3 = SnapshotQuery { name: Some("%".into()), ..q };
        assert_eq!(s.list_snapshots(&org.id, &q3).unwrap().1, 0);
        s.insert_sandbox(&r, 5).unwrap();
        assert!(matches!(s.begin_snapshot_delete(&org.id, "snap-1"), Err(StoreError::InUse(_))));
        s.transition("b", &[SandboxState::Starting], SandboxState::Running).unwrap().unwrap();
        assert_eq!(s.snapshot(&org.id, "warm").unwrap().unwrap().id, "snap-1");
        s.begin_snapshot_delete(&org.id, "snap-1").unwrap();
        // A snapshot being deleted is not restorable.
        let mut r2 = rec(&org.id, "c", SandboxState::Starting);
        r2.snapshot_id = Some("snap-1".into());
        assert!(matches!(s.insert_sandbox(&r2, 5), Err(StoreError::NotFound)));
        assert!(s.snapshot("other", "snap-1").unwrap().is_none());
    }

    #[test]
    fn migrations_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cove.db");
        Store::open(&p).unwrap().create_org("a", None).unwrap();
        let s = Store::open(&p).unwrap();
        assert_eq!(s.org_count().unwrap(), 1);
    }
}
