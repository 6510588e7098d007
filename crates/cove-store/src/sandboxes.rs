//! Sandboxes: records, compare-and-set state changes, the organization's limit.

use crate::*;

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

pub(crate) const SANDBOX_COLUMNS: &str =
    "id, org_id, template, vcpu, memory, disk, timeout, auto_pause, network_policy, env, state, \
     runner_id, created_at, launch_time, state_changed_at, timeout_at, op, image, snapshot_id, mounts";

pub(crate) fn mounts_json(mounts: &[MountConfig]) -> String {
    serde_json::to_string(mounts).unwrap_or_else(|_| "[]".into())
}

pub(crate) fn op_json(op: &Op) -> String {
    serde_json::to_string(op).unwrap_or_default()
}

/// Fails with `LimitReached` if the organization has `default_limit` (or its own limit)
/// sandboxes in states that count against it.
pub(crate) fn check_limit(db: &mut Db, org_id: &str, default_limit: u64) -> Result<(), StoreError> {
    let limit: Option<i64> =
        match db.query_opt("SELECT sandbox_limit FROM orgs WHERE id = ?1", params![org_id])? {
            Some(r) => r.get(0)?,
            None => None,
        };
    let limit = limit.map_or(default_limit, |l| l.max(0) as u64);
    let counting: Vec<&str> =
        SandboxState::ALL.iter().filter(|s| s.counts_against_limit()).map(|s| s.as_str()).collect();
    let placeholders = counting.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(",");
    let count: u64 = db
        .query_one(
            &format!("SELECT COUNT(*) FROM sandboxes WHERE org_id = ?1 AND state IN ({placeholders})"),
            params![org_id],
        )?
        .get(0)?;
    if count >= limit {
        return Err(StoreError::LimitReached { count, limit });
    }
    Ok(())
}

pub(crate) fn sandbox_row(r: &Row) -> Result<SandboxRecord, StoreError> {
    let state: String = r.get(10)?;
    Ok(SandboxRecord {
        id: r.get(0)?,
        org_id: r.get(1)?,
        template: r.get(2)?,
        vcpu: r.get(3)?,
        memory: r.get(4)?,
        disk: r.get(5)?,
        timeout: r.get(6)?,
        auto_pause: r.get(7)?,
        network_policy: r.get::<Option<String>>(8)?.map(|p| json(&p)).transpose()?,
        env: json(&r.get::<String>(9)?)?,
        state: SandboxState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown state {state:?}")))?,
        runner_id: r.get(11)?,
        created_at: parse_ts(&r.get::<String>(12)?)?,
        launch_time: r.get::<Option<String>>(13)?.map(|s| parse_ts(&s)).transpose()?,
        state_changed_at: parse_ts(&r.get::<String>(14)?)?,
        timeout_at: r.get(15)?,
        op: r.get::<Option<String>>(16)?.map(|o| json(&o)).transpose()?,
        image: r.get(17)?,
        snapshot_id: r.get(18)?,
        mounts: json(&r.get::<String>(19)?)?,
    })
}

/// Every row of `rows` through `f`.
pub(crate) fn all<T>(
    rows: Vec<Row>,
    f: impl Fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(f).collect()
}

impl Store {
    /// Inserts a sandbox unless its organization already has `default_limit` (or its own
    /// limit) sandboxes in states that count (see `SandboxState::counts_against_limit`).
    pub fn insert_sandbox(&self, rec: &SandboxRecord, default_limit: u64) -> Result<(), StoreError> {
        self.write(|db| {
            check_limit(db, &rec.org_id, default_limit)?;
            if rec.template.starts_with(templates::ID_PREFIX) {
                // A sandbox holds its template: it must be ready now, and a delete checks for this row.
                let state = db.query_opt("SELECT state FROM templates WHERE id = ?1", params![&rec.template])?;
                if state.map(|r| r.get::<String>(0)).transpose()?.as_deref() != Some(TemplateState::Ready.as_str()) {
                    return Err(StoreError::NotFound);
                }
            }
            if let Some(snap) = &rec.snapshot_id {
                // Restoring holds the snapshot: it must be ready now, and a delete checks for this row.
                let state = db.query_opt("SELECT state FROM snapshots WHERE id = ?1", params![snap])?;
                if state.map(|r| r.get::<String>(0)).transpose()?.as_deref() != Some(SnapshotState::Ready.as_str()) {
                    return Err(StoreError::NotFound);
                }
            }
            db.execute(
                "INSERT INTO sandboxes (id, org_id, template, vcpu, memory, disk, timeout, auto_pause, network_policy, env,
                    state, runner_id, created_at, launch_time, state_changed_at, timeout_at, op, image, snapshot_id, mounts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
                params![
                    &rec.id,
                    &rec.org_id,
                    &rec.template,
                    rec.vcpu,
                    rec.memory as i64,
                    rec.disk as i64,
                    rec.timeout as i64,
                    rec.auto_pause,
                    rec.network_policy.as_ref().map(|p| serde_json::to_string(p).unwrap_or_default()),
                    serde_json::to_string(&rec.env).unwrap_or_default(),
                    rec.state.as_str(),
                    &rec.runner_id,
                    ts(&rec.created_at),
                    rec.launch_time.as_ref().map(ts),
                    ts(&rec.state_changed_at),
                    rec.timeout_at,
                    rec.op.as_ref().map(op_json),
                    rec.image.as_ref(),
                    rec.snapshot_id.as_ref(),
                    mounts_json(&rec.mounts),
                ],
            )?;
            Ok(())
        })
    }

    pub fn sandbox(&self, org_id: &str, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        self.with(|db| {
            db.query_opt(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1 AND org_id = ?2"),
                params![id, org_id],
            )?
            .map(|r| sandbox_row(&r))
            .transpose()
        })
    }

    /// A sandbox by id alone, whatever its organization (for answers that come from the host
    /// side, such as the metadata service, which knows the sandbox and not its organization).
    pub fn sandbox_by_id(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        self.with(|db| {
            db.query_opt(&format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"), params![id])?
                .map(|r| sandbox_row(&r))
                .transpose()
        })
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

    /// Applies `change` if the sandbox is in one of `from` (compare-and-set, in one write
    /// transaction); returns the record as it was before, `None` if it was in another state.
    pub fn update(
        &self,
        id: &str,
        from: &[SandboxState],
        change: Change,
    ) -> Result<Option<SandboxRecord>, StoreError> {
        self.write(|db| {
            let rec = db.query_opt(&format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"), params![id])?;
            let rec = sandbox_row(&rec.ok_or(StoreError::NotFound)?)?;
            if !from.contains(&rec.state) {
                return Ok(None);
            }
            if let Some(limit) = change.limit {
                if !rec.state.counts_against_limit() && change.to.counts_against_limit() {
                    check_limit(db, &rec.org_id, limit)?;
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
            db.execute(
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
            Ok(Some(rec))
        })
    }

    /// Replaces a sandbox's egress policy (`None`: allow-all).
    pub fn set_network_policy(&self, id: &str, policy: Option<&NetworkPolicy>) -> Result<(), StoreError> {
        let json = policy.map(|p| serde_json::to_string(p).unwrap_or_default());
        self.with(|db| {
            Ok(db.execute("UPDATE sandboxes SET network_policy = ?2 WHERE id = ?1", params![id, json])?)
        })?;
        Ok(())
    }

    /// Replaces a sandbox's mounts.
    pub fn set_mounts(&self, id: &str, mounts: &[MountConfig]) -> Result<(), StoreError> {
        self.with(|db| {
            Ok(db.execute(
                "UPDATE sandboxes SET mounts = ?2 WHERE id = ?1",
                params![id, mounts_json(mounts)],
            )?)
        })?;
        Ok(())
    }

    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.write(|db| {
            db.execute("DELETE FROM presigned_urls WHERE sandbox_id = ?1", params![id])?;
            db.execute("DELETE FROM ssh_access WHERE sandbox_id = ?1", params![id])?;
            db.execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
            Ok(())
        })
    }

    /// Sandboxes of one organization, filtered, sorted and paged; and the total before paging.
    pub fn list_sandboxes(
        &self,
        org_id: &str,
        q: &ListSandboxes,
    ) -> Result<(Vec<SandboxRecord>, u64), StoreError> {
        let state = q.state.map(|s| s.as_str().to_string());
        let filter = "org_id = ?1 AND (CAST(?2 AS TEXT) IS NULL OR state = ?2)";
        let dir = if q.descending { "DESC" } else { "ASC" };
        let order = match q.sort {
            SortKey::CreatedAt => format!("created_at {dir}, id {dir}"),
            SortKey::State => format!("state {dir}, created_at {dir}"),
        };
        let offset = (q.page - 1).saturating_mul(q.page_size);
        self.with(|db| {
            let total: u64 = db
                .query_one(&format!("SELECT COUNT(*) FROM sandboxes WHERE {filter}"), params![org_id, state.as_ref()])?
                .get(0)?;
            let rows = db.query(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE {filter} ORDER BY {order} LIMIT ?3 OFFSET ?4"),
                params![org_id, state.as_ref(), q.page_size as i64, offset.min(i64::MAX as u64) as i64],
            )?;
            Ok((all(rows, sandbox_row)?, total))
        })
    }

    /// How many sandboxes are in each state, over all organizations (states with none left out).
    pub fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.with(|db| {
            let rows = db.query("SELECT state, COUNT(*) FROM sandboxes GROUP BY state", &[])?;
            all(rows, |r| Ok((r.get(0)?, r.get(1)?)))
        })
    }

    /// Every sandbox with an operation in flight, on any runner.
    pub fn sandboxes_in_flight(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        self.with(|db| {
            let rows =
                db.query(&format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE op IS NOT NULL"), &[])?;
            all(rows, sandbox_row)
        })
    }

    /// Every sandbox placed on `runner_id`, in any state (for recovery after a restart).
    pub fn sandboxes_on_runner(&self, runner_id: &str) -> Result<Vec<SandboxRecord>, StoreError> {
        self.with(|db| {
            let rows = db.query(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE runner_id = ?1 ORDER BY id"),
                params![runner_id],
            )?;
            all(rows, sandbox_row)
        })
    }

    /// Every image prefix a sandbox or snapshot refers to (anything else under the image prefix
    /// is garbage).
    pub fn referenced_images(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        self.with(|db| {
            let mut out = std::collections::HashSet::new();
            let rows = db.query(
                "SELECT image FROM sandboxes WHERE image IS NOT NULL UNION SELECT image FROM snapshots",
                &[],
            )?;
            for r in rows {
                out.insert(r.get(0)?);
            }
            for r in db.query("SELECT op FROM sandboxes WHERE op IS NOT NULL", &[])? {
                match json::<Op>(&r.get::<String>(0)?)? {
                    Op::Pause { image } | Op::Resume { image } | Op::Snapshot { image, .. } => {
                        out.insert(image);
                    }
                    _ => {}
                }
            }
            Ok(out)
        })
    }

    /// Running sandboxes whose timeout has passed.
    pub fn expired(&self, now_unix: i64) -> Result<Vec<SandboxRecord>, StoreError> {
        self.with(|db| {
            let rows = db.query(
                &format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE timeout_at IS NOT NULL AND timeout_at <= ?1 AND state = 'running'"
                ),
                params![now_unix],
            )?;
            all(rows, sandbox_row)
        })
    }
}
