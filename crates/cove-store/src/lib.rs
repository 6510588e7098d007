//! Metadata store: organizations, API keys (hashed), sandboxes, snapshots, presigned URLs and
//! templates, one module each; this file holds the schema and the connection.
//!
//! SQLite, embedded, is the default; Postgres (`postgres://…`) serves several control planes
//! and hosts (see `db`). Every write that depends on a read (the sandbox limit) happens in one
//! transaction that excludes other writers, so concurrent creates cannot overshoot it. Schema
//! changes are numbered migrations applied at open.

mod db;
mod keys;
mod presigned;
mod runners;
mod sandboxes;
pub mod sealed;
mod snapshots;
mod ssh;
mod templates;
pub mod testing;
mod tls;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use cove_api::sandbox::{ListSandboxes, MountConfig, NetworkPolicy, SandboxState, SortKey};
pub use db::DbError;
use db::{params, Db, Row};
pub use keys::{generate_key, hash_key, ApiKeyInfo, Org};
pub use presigned::PresignedRecord;
pub use runners::{now_ms, RunnerLease, RunnerLoad, RunnerRecord, RunnerState};
pub use sandboxes::{Change, Op, SandboxRecord};
use sha2::{Digest, Sha256};
pub use snapshots::{SnapshotQuery, SnapshotRecord, SnapshotState};
pub use ssh::SshAccessRecord;
pub use templates::{TemplateRecord, TemplateState};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Its message has the cause's whole message (no `source`, so it is not said twice).
    #[error("database: {0}")]
    Db(DbError),
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

impl From<DbError> for StoreError {
    fn from(e: DbError) -> StoreError {
        StoreError::Db(e)
    }
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
    // 7: the runners of a cluster and their leases.
    runners::MIGRATION,
];

pub struct Store {
    db: Mutex<Db>,
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", hex::encode(rand::random::<[u8; 8]>()))
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_ts(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("timestamp {s:?}: {e}")))
}

fn json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("stored JSON: {e}")))
}

/// Is this a Postgres connection URL (rather than a SQLite file)?
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Store {
    /// The SQLite database in `path`, made if missing.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = rusqlite::Connection::open(path).map_err(DbError::from)?;
        Self::init_sqlite(conn)
    }

    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::init_sqlite(rusqlite::Connection::open_in_memory().map_err(DbError::from)?)
    }

    /// The Postgres database at `url` (`postgres://user:password@host:port/db`, or a
    /// `host=/run/postgresql` socket form); the database must exist, its tables are made.
    pub fn connect(url: &str) -> Result<Store, StoreError> {
        Self::init(Db::Postgres(db::Postgres::connect(url)?))
    }

    fn init_sqlite(conn: rusqlite::Connection) -> Result<Store, StoreError> {
        let pragmas = || -> rusqlite::Result<()> {
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.busy_timeout(std::time::Duration::from_secs(5))
        };
        pragmas().map_err(DbError::from)?;
        Self::init(Db::Sqlite(conn))
    }

    fn init(mut db: Db) -> Result<Store, StoreError> {
        db.migrate(MIGRATIONS)?;
        Ok(Store { db: Mutex::new(db) })
    }

    /// Runs `f` on the connection (each statement on its own).
    fn with<T>(&self, f: impl FnOnce(&mut Db) -> Result<T, StoreError>) -> Result<T, StoreError> {
        f(&mut self.db.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs `f` in one transaction that no other writer interleaves with: committed if it
    /// returns `Ok`, rolled back if not.
    fn write<T>(&self, f: impl FnOnce(&mut Db) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.with(|db| {
            db.begin_write()?;
            match f(db) {
                Ok(v) => {
                    db.commit()?;
                    Ok(v)
                }
                Err(e) => {
                    db.rollback()?;
                    Err(e)
                }
            }
        })
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
        let s = testing::store();
        let org = s.create_org("acme", None).unwrap();
        let key = generate_key();
        s.add_key(&org.id, "ci", &key).unwrap();
        assert_eq!(s.authenticate(&key).unwrap(), Some(org.id.clone()));
        assert_eq!(s.authenticate("cove_wrong").unwrap(), None);
        let stored: String = s.with(|db| db.query_one("SELECT key_hash FROM api_keys", &[])?.get(0)).unwrap();
        assert_ne!(stored, key);
        assert_eq!(stored, hash_key(&key));
    }

    #[test]
    fn limit_counts_only_vm_holding_states() {
        let s = testing::store();
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
        let s = testing::store();
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
        let s = testing::store();
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
        let s = testing::store();
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
        let s = testing::store();
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

    /// Two stores on one database (two control planes): `open` and `migrate` a second time,
    /// then create concurrently from both against one limit.
    fn two_stores() -> (Store, Store, Option<tempfile::TempDir>) {
        match testing::fresh_postgres_database().unwrap() {
            Some(url) => (Store::connect(&url).unwrap(), Store::connect(&url).unwrap(), None),
            None => {
                let dir = tempfile::tempdir().unwrap();
                let p = dir.path().join("cove.db");
                (Store::open(&p).unwrap(), Store::open(&p).unwrap(), Some(dir))
            }
        }
    }

    /// Control planes starting together on one new database: one migrates, none fails.
    #[test]
    fn concurrent_opens_migrate_once() {
        let Some(url) = testing::fresh_postgres_database().unwrap() else {
            return; // SQLite: one file, opened by one server.
        };
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || Store::connect(&url).map(|s| s.org_count()))
            })
            .collect();
        for o in opens {
            assert_eq!(o.join().unwrap().unwrap().unwrap(), 0);
        }
    }

    #[test]
    fn migrations_are_idempotent() {
        let (a, b, _dir) = two_stores();
        a.create_org("a", None).unwrap();
        assert_eq!(b.org_count().unwrap(), 1);
    }

    #[test]
    fn stores_sharing_a_database_never_overshoot_the_limit() {
        let (a, b, _dir) = two_stores();
        let org = a.create_org("acme", None).unwrap();
        let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let s = if i % 2 == 0 { a.clone() } else { b.clone() };
                let org = org.id.clone();
                std::thread::spawn(move || {
                    (0..5)
                        .filter(|j| {
                            s.insert_sandbox(&rec(&org, &format!("s{i}-{j}"), SandboxState::Starting), 3)
                                .is_ok()
                        })
                        .count()
                })
            })
            .collect();
        let created: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(created, 3);
        assert_eq!(b.count_by_state().unwrap(), [("starting".to_string(), 3)]);
    }
}
