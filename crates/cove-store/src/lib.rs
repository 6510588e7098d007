//! Metadata store: organizations, API keys (hashed) and sandboxes.
//!
//! SQLite, embedded, is the default; every write that depends on a read (the sandbox limit)
//! happens in one immediate transaction, so concurrent creates cannot overshoot it. Schema
//! changes are numbered migrations applied at open.

pub mod sealed;
mod templates;
use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use cove_api::sandbox::{ListSandboxes, MountConfig, NetworkPolicy, SandboxState, SortKey};
use rusqlite::{params, Connection, OptionalExtension, Row};
use sha2::{Digest, Sha256};
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
];

/// A presigned URL as stored: the token itself is never kept.
#[derive(Debug, Clone)]
pub struct PresignedRecord {
    pub id: String,
    pub org_id: String,
    pub sandbox_id: String,
    pub port: u16,
    pub expires_at: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Org {
    pub id: String,
    pub name: String,
    pub sandbox_limit: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct ApiKeyInfo {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct SandboxRecord {
    pub id: String,
    pub org_id: String,
    pub template: String,
    pub vcpu: u32,
    pub memory: u64,
    pub disk: u64,
    pub timeout: u64,
    pub auto_pause: bool,
    pub network_policy: Option<NetworkPolicy>,
    /// Credentials in here are as the caller gave them (the control plane seals them).
    pub mounts: Vec<MountConfig>,
    pub env: std::collections::BTreeMap<String, String>,
    pub state: SandboxState,
    pub runner_id: String,
    pub created_at: DateTime<Utc>,
    pub launch_time: Option<DateTime<Utc>>,
    pub state_changed_at: DateTime<Utc>,
    /// Unix seconds at which the sandbox expires.
    pub timeout_at: Option<i64>,
    /// The lifecycle operation in flight, written before its first side effect, so that a
    /// restarted server knows what to finish or undo.
    pub op: Option<Op>,
    /// Blob prefix of the image a paused sandbox resumes from.
    pub image: Option<String>,
    /// The snapshot this sandbox was restored from.
    pub snapshot_id: Option<String>,
}

/// An operation in flight on a sandbox (see `SandboxRecord::op`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Op {
    /// A new sandbox from a template.
    Create,
    /// A new sandbox from a snapshot.
    Restore { snapshot_id: String },
    /// Fresh boot of a stopped sandbox on its kept disk.
    Start,
    /// Capture into `image`, then release the VM.
    Pause { image: String },
    /// Bring a paused sandbox back from `image`.
    Resume { image: String },
    /// Capture into the snapshot's image; the VM runs on unless `kill_after`.
    Snapshot { snapshot_id: String, image: String, kill_after: bool },
    /// Guest sync, then the VM is ended; the disk is kept.
    Stop,
}

/// A state change of a sandbox, applied only from the states given to `Store::update`.
#[derive(Debug, Clone)]
pub struct Change {
    pub to: SandboxState,
    /// The operation now in flight; `None` when `to` is a settled state.
    pub op: Option<Op>,
    /// `Some(x)` sets the image column to `x`; `None` leaves it.
    pub image: Option<Option<String>>,
    /// `Some(t)` sets the expiry.
    pub timeout_at: Option<i64>,
    /// When set, the change is refused with `LimitReached` if the organization already has this
    /// many sandboxes (or its own limit) in states that count.
    pub limit: Option<u64>,
}

impl Change {
    pub fn to(to: SandboxState) -> Change {
        Change { to, op: None, image: None, timeout_at: None, limit: None }
    }
    pub fn op(mut self, op: Op) -> Change {
        self.op = Some(op);
        self
    }
    pub fn image(mut self, image: Option<String>) -> Change {
        self.image = Some(image);
        self
    }
    pub fn timeout_at(mut self, t: i64) -> Change {
        self.timeout_at = Some(t);
        self
    }
    pub fn limit(mut self, limit: u64) -> Change {
        self.limit = Some(limit);
        self
    }
}

/// A named snapshot: an image plus the compute settings it was taken with.
#[derive(Debug, Clone)]
pub struct SnapshotRecord {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub template: String,
    pub vcpu: u32,
    pub memory: u64,
    pub disk: u64,
    pub network_policy: Option<NetworkPolicy>,
    pub mounts: Vec<MountConfig>,
    pub env: std::collections::BTreeMap<String, String>,
    pub source_sandbox: String,
    /// Blob prefix of the image.
    pub image: String,
    pub state: SnapshotState,
    pub stored_bytes: u64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    /// Being captured: not restorable yet.
    Creating,
    Ready,
    /// Being deleted: not restorable any more.
    Deleting,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Ready => "ready",
            SnapshotState::Deleting => "deleting",
        }
    }
    fn parse(s: &str) -> Option<SnapshotState> {
        [SnapshotState::Creating, SnapshotState::Ready, SnapshotState::Deleting]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// `GET /v1/snapshots` parameters, already validated.
#[derive(Debug, Clone)]
pub struct SnapshotQuery {
    /// Case-insensitive substring of the name.
    pub name: Option<String>,
    pub sort_by_template: bool,
    pub descending: bool,
    pub page: u64,
    pub page_size: u64,
}

pub struct Store {
    conn: Mutex<Connection>,
}

/// SHA-256 of an API key, hex. Keys are 256-bit random values, so a fast hash is enough: there
/// is nothing to brute-force.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random API key.
pub fn generate_key() -> String {
    format!("cove_{}", hex::encode(rand::random::<[u8; 32]>()))
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

    // ── organizations and keys ──

    pub fn org_count(&self) -> Result<u64, StoreError> {
        Ok(self.conn().query_row("SELECT COUNT(*) FROM orgs", [], |r| r.get::<_, i64>(0))? as u64)
    }

    pub fn create_org(&self, name: &str, sandbox_limit: Option<u64>) -> Result<Org, StoreError> {
        let org = Org { id: new_id("org"), name: name.to_string(), sandbox_limit };
        self.conn().execute(
            "INSERT INTO orgs (id, name, sandbox_limit, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![org.id, org.name, sandbox_limit.map(|l| l as i64), ts(&Utc::now())],
        )?;
        Ok(org)
    }

    pub fn set_org_limit(&self, org_id: &str, limit: Option<u64>) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE orgs SET sandbox_limit = ?2 WHERE id = ?1",
            params![org_id, limit.map(|l| l as i64)],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Stores the hash of `key` for `org_id`. The key itself is never stored.
    pub fn add_key(&self, org_id: &str, name: &str, key: &str) -> Result<ApiKeyInfo, StoreError> {
        let info = ApiKeyInfo {
            id: new_id("key"),
            org_id: org_id.to_string(),
            name: name.to_string(),
            prefix: key.chars().take(12).collect(),
            created_at: Utc::now(),
        };
        self.conn().execute(
            "INSERT INTO api_keys (id, org_id, name, key_hash, prefix, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![info.id, info.org_id, info.name, hash_key(key), info.prefix, ts(&info.created_at)],
        )?;
        Ok(info)
    }

    pub fn list_keys(&self, org_id: &str) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, org_id, name, prefix, created_at FROM api_keys WHERE org_id = ?1 ORDER BY created_at",
        )?;
        let rows = stmt
            .query_map([org_id], |r| {
                Ok(ApiKeyInfo {
                    id: r.get(0)?,
                    org_id: r.get(1)?,
                    name: r.get(2)?,
                    prefix: r.get(3)?,
                    created_at: parse_ts(&r.get::<_, String>(4)?)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn delete_key(&self, org_id: &str, key_id: &str) -> Result<(), StoreError> {
        let n =
            self.conn().execute("DELETE FROM api_keys WHERE id = ?1 AND org_id = ?2", [key_id, org_id])?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// The organization an API key belongs to.
    pub fn authenticate(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT org_id FROM api_keys WHERE key_hash = ?1", [hash_key(key)], |r| r.get(0))
            .optional()?)
    }

    // ── sandboxes ──

    /// Inserts a sandbox unless its organization already has `default_limit` (or its own
    /// limit) sandboxes in states that count (see `SandboxState::counts_against_limit`).
    pub fn insert_sandbox(&self, rec: &SandboxRecord, default_limit: u64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        check_limit(&tx, &rec.org_id, default_limit)?;
        if rec.template.starts_with(templates::ID_PREFIX) {
            // A sandbox holds its template: it must be ready now, and a delete checks for this row.
            let state: Option<String> = tx
                .query_row("SELECT state FROM templates WHERE id = ?1", [&rec.template], |r| r.get(0))
                .optional()?;
            if state.as_deref() != Some(TemplateState::Ready.as_str()) {
                return Err(StoreError::NotFound);
            }
        }
        if let Some(snap) = &rec.snapshot_id {
            // Restoring holds the snapshot: it must be ready now, and a delete checks for this row.
            let state: Option<String> =
                tx.query_row("SELECT state FROM snapshots WHERE id = ?1", [snap], |r| r.get(0)).optional()?;
            if state.as_deref() != Some(SnapshotState::Ready.as_str()) {
                return Err(StoreError::NotFound);
            }
        }
        tx.execute(
            "INSERT INTO sandboxes (id, org_id, template, vcpu, memory, disk, timeout, auto_pause, network_policy, env,
                state, runner_id, created_at, launch_time, state_changed_at, timeout_at, op, image, snapshot_id, mounts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
            params![
                rec.id,
                rec.org_id,
                rec.template,
                rec.vcpu,
                rec.memory as i64,
                rec.disk as i64,
                rec.timeout as i64,
                rec.auto_pause,
                rec.network_policy.as_ref().map(|p| serde_json::to_string(p).unwrap_or_default()),
                serde_json::to_string(&rec.env).unwrap_or_default(),
                rec.state.as_str(),
                rec.runner_id,
                ts(&rec.created_at),
                rec.launch_time.as_ref().map(ts),
                ts(&rec.state_changed_at),
                rec.timeout_at,
                rec.op.as_ref().map(op_json),
                rec.image,
                rec.snapshot_id,
                mounts_json(&rec.mounts),
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn sandbox(&self, org_id: &str, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1 AND org_id = ?2"),
                [id, org_id],
                sandbox_row,
            )
            .optional()?)
    }

    /// Moves a sandbox from one of `from` to `to`, ending any operation in flight; returns the
    /// record as it was before, or `None` if it was not in one of `from` (someone else moved it
    /// first).
    pub fn transition(
        &self,
        id: &str,
        from: &[SandboxState],
        to: SandboxState,
    ) -> Result<Option<SandboxRecord>, StoreError> {
        self.update(id, from, Change::to(to))
    }

    /// Applies `change` if the sandbox is in one of `from` (compare-and-set, in one immediate
    /// transaction); returns the record as it was before, `None` if it was in another state.
    pub fn update(
        &self,
        id: &str,
        from: &[SandboxState],
        change: Change,
    ) -> Result<Option<SandboxRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let rec = tx
            .query_row(&format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"), [id], sandbox_row)
            .optional()?;
        let Some(rec) = rec else {
            return Err(StoreError::NotFound);
        };
        if !from.contains(&rec.state) {
            return Ok(None);
        }
        if let Some(limit) = change.limit {
            if !rec.state.counts_against_limit() && change.to.counts_against_limit() {
                check_limit(&tx, &rec.org_id, limit)?;
            }
        }
        let now = ts(&Utc::now());
        let launch = if change.to == SandboxState::Running && rec.launch_time.is_none() {
            Some(now.clone())
        } else {
            rec.launch_time.as_ref().map(ts)
        };
        let image = match change.image {
            Some(i) => i,
            None => rec.image.clone(),
        };
        tx.execute(
            "UPDATE sandboxes SET state = ?2, state_changed_at = ?3, launch_time = ?4, op = ?5, image = ?6,
                timeout_at = ?7 WHERE id = ?1",
            params![
                id,
                change.to.as_str(),
                now,
                launch,
                change.op.as_ref().map(op_json),
                image,
                change.timeout_at.or(rec.timeout_at),
            ],
        )?;
        tx.commit()?;
        Ok(Some(rec))
    }

    /// Replaces a sandbox's egress policy (`None`: allow-all).
    pub fn set_network_policy(&self, id: &str, policy: Option<&NetworkPolicy>) -> Result<(), StoreError> {
        let json = policy.map(|p| serde_json::to_string(p).unwrap_or_default());
        self.conn()
            .execute("UPDATE sandboxes SET network_policy = ?2 WHERE id = ?1", rusqlite::params![id, json])?;
        Ok(())
    }

    /// Replaces a sandbox's mounts.
    pub fn set_mounts(&self, id: &str, mounts: &[MountConfig]) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET mounts = ?2 WHERE id = ?1",
            rusqlite::params![id, mounts_json(mounts)],
        )?;
        Ok(())
    }

    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM presigned_urls WHERE sandbox_id = ?1", [id])?;
        tx.execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// Stores a presigned URL under the hash of its token.
    pub fn insert_presigned(&self, p: &PresignedRecord, token: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO presigned_urls (id, org_id, sandbox_id, port, token_hash, expires_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            rusqlite::params![
                p.id,
                p.org_id,
                p.sandbox_id,
                p.port,
                hash_key(token),
                p.expires_at,
                ts(&p.created_at)
            ],
        )?;
        Ok(())
    }

    /// The presigned URL a token opens, if it exists and has not expired at `now_unix`.
    pub fn presigned_by_token(
        &self,
        token: &str,
        now_unix: i64,
    ) -> Result<Option<PresignedRecord>, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT id, org_id, sandbox_id, port, expires_at, created_at FROM presigned_urls
                 WHERE token_hash = ?1 AND expires_at > ?2",
                rusqlite::params![hash_key(token), now_unix],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(id, org_id, sandbox_id, port, expires_at, created)| {
            Ok(PresignedRecord {
                id,
                org_id,
                sandbox_id,
                port: u16::try_from(port).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                expires_at,
                created_at: parse_ts(&created)?,
            })
        })
        .transpose()
    }

    /// Revokes presigned URL `id` of a sandbox; `NotFound` if there is none.
    pub fn delete_presigned(&self, org_id: &str, sandbox_id: &str, id: &str) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "DELETE FROM presigned_urls WHERE id = ?1 AND org_id = ?2 AND sandbox_id = ?3",
            [id, org_id, sandbox_id],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Sandboxes of one organization, filtered, sorted and paged; and the total before paging.
    pub fn list_sandboxes(
        &self,
        org_id: &str,
        q: &ListSandboxes,
    ) -> Result<(Vec<SandboxRecord>, u64), StoreError> {
        let conn = self.conn();
        let state = q.state.map(|s| s.as_str().to_string());
        let filter = "org_id = ?1 AND (?2 IS NULL OR state = ?2)";
        let total: i64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM sandboxes WHERE {filter}"),
            params![org_id, state],
            |r| r.get(0),
        )?;
        let dir = if q.descending { "DESC" } else { "ASC" };
        let order = match q.sort {
            SortKey::CreatedAt => format!("created_at {dir}, id {dir}"),
            SortKey::State => format!("state {dir}, created_at {dir}"),
        };
        let offset = (q.page - 1).saturating_mul(q.page_size);
        let mut stmt = conn.prepare(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE {filter} ORDER BY {order} LIMIT ?3 OFFSET ?4"
        ))?;
        let rows = stmt
            .query_map(
                params![org_id, state, q.page_size as i64, offset.min(i64::MAX as u64) as i64],
                sandbox_row,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok((rows, total as u64))
    }

    /// Every sandbox placed on `runner_id`, in any state (for recovery after a restart).
    pub fn sandboxes_on_runner(&self, runner_id: &str) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE runner_id = ?1"))?;
        let rows = stmt.query_map([runner_id], sandbox_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Every image prefix a sandbox or snapshot refers to (anything else under the image prefix
    /// is garbage).
    pub fn referenced_images(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let conn = self.conn();
        let mut out = std::collections::HashSet::new();
        let mut stmt = conn.prepare(
            "SELECT image FROM sandboxes WHERE image IS NOT NULL UNION SELECT image FROM snapshots",
        )?;
        for img in stmt.query_map([], |r| r.get::<_, String>(0))? {
            out.insert(img?);
        }
        let mut stmt = conn.prepare("SELECT op FROM sandboxes WHERE op IS NOT NULL")?;
        for op in stmt.query_map([], |r| r.get::<_, String>(0))? {
            match serde_json::from_str::<Op>(&op?).map_err(conversion)? {
                Op::Pause { image } | Op::Resume { image } | Op::Snapshot { image, .. } => {
                    out.insert(image);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    // ── snapshots ──

    /// Inserts a snapshot in state `creating`; `DuplicateName` if the organization has one of
    /// that name already.
    pub fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        let r = self.conn().execute(
            "INSERT INTO snapshots (id, org_id, name, template, vcpu, memory, disk, network_policy, env,
                source_sandbox, image, state, stored_bytes, created_at, mounts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                s.id,
                s.org_id,
                s.name,
                s.template,
                s.vcpu,
                s.memory as i64,
                s.disk as i64,
                s.network_policy.as_ref().map(|p| serde_json::to_string(p).unwrap_or_default()),
                serde_json::to_string(&s.env).unwrap_or_default(),
                s.source_sandbox,
                s.image,
                s.state.as_str(),
                s.stored_bytes as i64,
                ts(&s.created_at),
                mounts_json(&s.mounts),
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::DuplicateName(s.name.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A snapshot of `org_id` by id, or by name when no id matches.
    pub fn snapshot(&self, org_id: &str, id_or_name: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE org_id = ?1 AND (id = ?2 OR name = ?2)
                     ORDER BY id = ?2 DESC LIMIT 1"
                ),
                [org_id, id_or_name],
                snapshot_row,
            )
            .optional()?)
    }

    /// Marks a snapshot ready with its stored size.
    pub fn snapshot_ready(&self, id: &str, stored_bytes: u64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE snapshots SET state = 'ready', stored_bytes = ?2 WHERE id = ?1",
            params![id, stored_bytes as i64],
        )?;
        Ok(())
    }

    /// Starts deleting a snapshot: refused with `InUse` while a restore from it is in flight.
    pub fn begin_snapshot_delete(&self, org_id: &str, id: &str) -> Result<SnapshotRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let snap = tx
            .query_row(
                &format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE org_id = ?1 AND id = ?2"),
                [org_id, id],
                snapshot_row,
            )
            .optional()?
            .ok_or(StoreError::NotFound)?;
        if snap.state == SnapshotState::Creating {
            return Err(StoreError::InUse(format!("snapshot {} is still being created", snap.id)));
        }
        let restoring: Option<String> = tx
            .query_row(
                "SELECT id FROM sandboxes WHERE snapshot_id = ?1 AND state = 'starting' LIMIT 1",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(sbx) = restoring {
            return Err(StoreError::InUse(format!("sandbox {sbx} is being restored from snapshot {id}")));
        }
        tx.execute("UPDATE snapshots SET state = 'deleting' WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(snap)
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        self.conn().execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Snapshots not `ready` (for recovery after a restart).
    pub fn unsettled_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE state != 'ready'"))?;
        let rows = stmt.query_map([], snapshot_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Ready snapshots of one organization, filtered, sorted and paged; and the total.
    pub fn list_snapshots(
        &self,
        org_id: &str,
        q: &SnapshotQuery,
    ) -> Result<(Vec<SnapshotRecord>, u64), StoreError> {
        let conn = self.conn();
        let pattern = q.name.as_ref().map(|n| {
            let escaped = n.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            format!("%{escaped}%")
        });
        let filter = "org_id = ?1 AND state = 'ready' AND (?2 IS NULL OR name LIKE ?2 ESCAPE '\\')";
        let total: i64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM snapshots WHERE {filter}"),
            params![org_id, pattern],
            |r| r.get(0),
        )?;
        let dir = if q.descending { "DESC" } else { "ASC" };
        let order = if q.sort_by_template {
            format!("template {dir}, created_at {dir}, id {dir}")
        } else {
            format!("created_at {dir}, id {dir}")
        };
        let offset = (q.page.max(1) - 1).saturating_mul(q.page_size);
        let mut stmt = conn.prepare(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE {filter} ORDER BY {order} LIMIT ?3 OFFSET ?4"
        ))?;
        let rows = stmt
            .query_map(
                params![org_id, pattern, q.page_size as i64, offset.min(i64::MAX as u64) as i64],
                snapshot_row,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok((rows, total as u64))
    }

    /// Running sandboxes whose timeout has passed.
    pub fn expired(&self, now_unix: i64) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE timeout_at IS NOT NULL AND timeout_at <= ?1 AND state = 'running'"
        ))?;
        let rows = stmt.query_map([now_unix], sandbox_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

const SANDBOX_COLUMNS: &str =
    "id, org_id, template, vcpu, memory, disk, timeout, auto_pause, network_policy, env, state, \
     runner_id, created_at, launch_time, state_changed_at, timeout_at, op, image, snapshot_id, mounts";

const SNAPSHOT_COLUMNS: &str = "id, org_id, name, template, vcpu, memory, disk, network_policy, env, \
     source_sandbox, image, state, stored_bytes, created_at, mounts";

fn mounts_json(mounts: &[MountConfig]) -> String {
    serde_json::to_string(mounts).unwrap_or_else(|_| "[]".into())
}

fn op_json(op: &Op) -> String {
    serde_json::to_string(op).unwrap_or_default()
}

/// Fails with `LimitReached` if the organization has `default_limit` (or its own limit)
/// sandboxes in states that count against it.
fn check_limit(tx: &rusqlite::Transaction<'_>, org_id: &str, default_limit: u64) -> Result<(), StoreError> {
    let limit: Option<i64> = tx
        .query_row("SELECT sandbox_limit FROM orgs WHERE id = ?1", [org_id], |r| r.get(0))
        .optional()?
        .flatten();
    let limit = limit.map_or(default_limit, |l| l.max(0) as u64);
    let counting: Vec<&str> =
        SandboxState::ALL.iter().filter(|s| s.counts_against_limit()).map(|s| s.as_str()).collect();
    let placeholders = counting.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(",");
    let count: i64 = tx.query_row(
        &format!("SELECT COUNT(*) FROM sandboxes WHERE org_id = ?1 AND state IN ({placeholders})"),
        [org_id],
        |r| r.get(0),
    )?;
    if count as u64 >= limit {
        return Err(StoreError::LimitReached { count: count as u64, limit });
    }
    Ok(())
}

fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRecord> {
    let policy: Option<String> = r.get(7)?;
    let env: String = r.get(8)?;
    let state: String = r.get(11)?;
    Ok(SnapshotRecord {
        id: r.get(0)?,
        org_id: r.get(1)?,
        name: r.get(2)?,
        template: r.get(3)?,
        vcpu: r.get(4)?,
        memory: r.get::<_, i64>(5)? as u64,
        disk: r.get::<_, i64>(6)? as u64,
        network_policy: policy.map(|p| serde_json::from_str(&p)).transpose().map_err(conversion)?,
        env: serde_json::from_str(&env).map_err(conversion)?,
        source_sandbox: r.get(9)?,
        image: r.get(10)?,
        state: SnapshotState::parse(&state)
            .ok_or_else(|| conversion(StoreError::Corrupt(format!("unknown snapshot state {state:?}"))))?,
        stored_bytes: r.get::<_, i64>(12)? as u64,
        created_at: parse_ts(&r.get::<_, String>(13)?)?,
        mounts: serde_json::from_str(&r.get::<_, String>(14)?).map_err(conversion)?,
    })
}

fn sandbox_row(r: &Row<'_>) -> rusqlite::Result<SandboxRecord> {
    let state: String = r.get(10)?;
    let policy: Option<String> = r.get(8)?;
    let env: String = r.get(9)?;
    Ok(SandboxRecord {
        id: r.get(0)?,
        org_id: r.get(1)?,
        template: r.get(2)?,
        vcpu: r.get(3)?,
        memory: r.get::<_, i64>(4)? as u64,
        disk: r.get::<_, i64>(5)? as u64,
        timeout: r.get::<_, i64>(6)? as u64,
        auto_pause: r.get(7)?,
        network_policy: policy.map(|p| serde_json::from_str(&p)).transpose().map_err(conversion)?,
        mounts: serde_json::from_str(&r.get::<_, String>(19)?).map_err(conversion)?,
        env: serde_json::from_str(&env).map_err(conversion)?,
        state: SandboxState::parse(&state)
            .ok_or_else(|| conversion(StoreError::Corrupt(format!("unknown state {state:?}"))))?,
        runner_id: r.get(11)?,
        created_at: parse_ts(&r.get::<_, String>(12)?)?,
        launch_time: r.get::<_, Option<String>>(13)?.map(|s| parse_ts(&s)).transpose()?,
        state_changed_at: parse_ts(&r.get::<_, String>(14)?)?,
        timeout_at: r.get(15)?,
        op: r
            .get::<_, Option<String>>(16)?
            .map(|o| serde_json::from_str(&o))
            .transpose()
            .map_err(conversion)?,
        image: r.get(17)?,
        snapshot_id: r.get(18)?,
    })
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
