//! Named snapshots: `creating` until their image is stored, `ready`, `deleting`.

use crate::sandboxes::mounts_json;
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

pub(crate) fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRecord> {
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

impl Store {
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
}
