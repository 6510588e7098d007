//! Named snapshots: `creating` until their image is stored, `ready`, `deleting`.

use crate::sandboxes::{all, mounts_json};
use crate::*;

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

pub(crate) const SNAPSHOT_COLUMNS: &str =
    "id, org_id, name, template, vcpu, memory, disk, network_policy, env, \
     source_sandbox, image, state, stored_bytes, created_at, mounts";

pub(crate) fn snapshot_row(r: &Row) -> Result<SnapshotRecord, StoreError> {
    let state: String = r.get(11)?;
    Ok(SnapshotRecord {
        id: r.get(0)?,
        org_id: r.get(1)?,
        name: r.get(2)?,
        template: r.get(3)?,
        vcpu: r.get(4)?,
        memory: r.get(5)?,
        disk: r.get(6)?,
        network_policy: r.get::<Option<String>>(7)?.map(|p| json(&p)).transpose()?,
        env: json(&r.get::<String>(8)?)?,
        source_sandbox: r.get(9)?,
        image: r.get(10)?,
        state: SnapshotState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown snapshot state {state:?}")))?,
        stored_bytes: r.get(12)?,
        created_at: parse_ts(&r.get::<String>(13)?)?,
        mounts: json(&r.get::<String>(14)?)?,
    })
}

impl Store {
    pub fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        let r = self.with(|db| {
            Ok(db.execute(
                "INSERT INTO snapshots (id, org_id, name, template, vcpu, memory, disk, network_policy, env,
                    source_sandbox, image, state, stored_bytes, created_at, mounts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                params![
                    &s.id,
                    &s.org_id,
                    &s.name,
                    &s.template,
                    s.vcpu,
                    s.memory as i64,
                    s.disk as i64,
                    s.network_policy.as_ref().map(|p| serde_json::to_string(p).unwrap_or_default()),
                    serde_json::to_string(&s.env).unwrap_or_default(),
                    &s.source_sandbox,
                    &s.image,
                    s.state.as_str(),
                    s.stored_bytes as i64,
                    ts(&s.created_at),
                    mounts_json(&s.mounts),
                ],
            )?)
        });
        match r {
            Err(StoreError::Db(e)) if e.is_unique_violation() => {
                Err(StoreError::DuplicateName(s.name.clone()))
            }
            r => r.map(drop),
        }
    }

    pub fn snapshot(&self, org_id: &str, id_or_name: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        self.with(|db| {
            db.query_opt(
                &format!(
                    "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE org_id = ?1 AND (id = ?2 OR name = ?2)
                     ORDER BY id = ?2 DESC LIMIT 1"
                ),
                params![org_id, id_or_name],
            )?
            .map(|r| snapshot_row(&r))
            .transpose()
        })
    }

    pub fn snapshot_ready(&self, id: &str, stored_bytes: u64) -> Result<(), StoreError> {
        self.with(|db| {
            Ok(db.execute(
                "UPDATE snapshots SET state = 'ready', stored_bytes = ?2 WHERE id = ?1",
                params![id, stored_bytes as i64],
            )?)
        })?;
        Ok(())
    }

    pub fn begin_snapshot_delete(&self, org_id: &str, id: &str) -> Result<SnapshotRecord, StoreError> {
        self.write(|db| {
            let snap = db
                .query_opt(
                    &format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE org_id = ?1 AND id = ?2"),
                    params![org_id, id],
                )?
                .ok_or(StoreError::NotFound)?;
            let snap = snapshot_row(&snap)?;
            if snap.state == SnapshotState::Creating {
                return Err(StoreError::InUse(format!("snapshot {} is still being created", snap.id)));
            }
            let restoring = db.query_opt(
                "SELECT id FROM sandboxes WHERE snapshot_id = ?1 AND state = 'starting' LIMIT 1",
                params![id],
            )?;
            if let Some(sbx) = restoring {
                let sbx: String = sbx.get(0)?;
                return Err(StoreError::InUse(format!("sandbox {sbx} is being restored from snapshot {id}")));
            }
            db.execute("UPDATE snapshots SET state = 'deleting' WHERE id = ?1", params![id])?;
            Ok(snap)
        })
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        self.with(|db| Ok(db.execute("DELETE FROM snapshots WHERE id = ?1", params![id])?))?;
        Ok(())
    }

    pub fn unsettled_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.with(|db| {
            let rows =
                db.query(&format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE state != 'ready'"), &[])?;
            all(rows, snapshot_row)
        })
    }

    pub fn list_snapshots(
        &self,
        org_id: &str,
        q: &SnapshotQuery,
    ) -> Result<(Vec<SnapshotRecord>, u64), StoreError> {
        let pattern = q.name.as_ref().map(|n| {
            let escaped = n.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            format!("%{escaped}%")
        });
        // Case-insensitive in both backends (SQLite's LIKE is, for ASCII; Postgres's is not).
        let filter =
            "org_id = ?1 AND state = 'ready' AND (CAST(?2 AS TEXT) IS NULL OR LOWER(name) LIKE LOWER(?2) ESCAPE '\\')";
        let dir = if q.descending { "DESC" } else { "ASC" };
        let order = if q.sort_by_template {
            format!("template {dir}, created_at {dir}, id {dir}")
        } else {
            format!("created_at {dir}, id {dir}")
        };
        let offset = (q.page.max(1) - 1).saturating_mul(q.page_size);
        self.with(|db| {
            let total: u64 = db
                .query_one(&format!("SELECT COUNT(*) FROM snapshots WHERE {filter}"), params![org_id, pattern.as_ref()])?
                .get(0)?;
            let rows = db.query(
                &format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE {filter} ORDER BY {order} LIMIT ?3 OFFSET ?4"),
                params![org_id, pattern.as_ref(), q.page_size as i64, offset.min(i64::MAX as u64) as i64],
            )?;
            Ok((all(rows, snapshot_row)?, total))
        })
    }
}
