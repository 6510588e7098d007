//! Runners: the hosts of a cluster. A runner registers by renewing its lease; one whose lease
//! lapses is marked lost, and so are the running sandboxes it held.

use crate::sandboxes::{all, sandbox_row, SANDBOX_COLUMNS};
use crate::*;

pub(crate) const MIGRATION: &str = "CREATE TABLE runners (
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        max_sandboxes INTEGER NOT NULL,
        compat TEXT NOT NULL,
        templates TEXT NOT NULL,
        state TEXT NOT NULL,
        lease_until INTEGER NOT NULL,
        registered_at TEXT NOT NULL
    );
    ALTER TABLE templates ADD COLUMN runner_id TEXT;";

/// What a runner says of itself when it renews its lease.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunnerLease {
    /// `runner-<first 16 hex digits of its certificate's fingerprint>`.
    pub id: String,
    /// `host:port` control planes reach it at.
    pub address: String,
    /// SHA-256 of its TLS certificate, hex.
    pub fingerprint: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Most sandboxes it takes at once; 0: as many as fit in its memory.
    #[serde(default)]
    pub max_sandboxes: u32,
    /// What its saved VMs need of another host (`cove_runner::HostInfo::compat`).
    pub compat: String,
    /// The template versions it holds (`cove_runner::HostInfo::templates`).
    #[serde(default)]
    pub templates: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerState {
    /// Its lease is renewed.
    Active,
    /// Its lease lapsed; its running sandboxes are lost until it comes back.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerRecord {
    pub lease: RunnerLease,
    pub state: RunnerState,
    /// Unix milliseconds until which its lease holds.
    pub lease_until: i64,
    pub registered_at: DateTime<Utc>,
}

/// A runner's load: the sandboxes placed on it that hold (or are getting) a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunnerLoad {
    pub sandboxes: u64,
    pub vcpus: u64,
    pub memory_mib: u64,
}

const COLUMNS: &str =
    "id, address, fingerprint, vcpus, memory_mib, compat, state, lease_until, registered_at, max_sandboxes, templates";

fn row(r: &Row) -> Result<RunnerRecord, StoreError> {
    let state = match r.get::<String>(6)?.as_str() {
        "active" => RunnerState::Active,
        "lost" => RunnerState::Lost,
        other => return Err(StoreError::Corrupt(format!("runner state {other:?}"))),
    };
    Ok(RunnerRecord {
        lease: RunnerLease {
            id: r.get(0)?,
            address: r.get(1)?,
            fingerprint: r.get(2)?,
            vcpus: r.get(3)?,
            memory_mib: r.get(4)?,
            max_sandboxes: r.get(9)?,
            compat: r.get(5)?,
            templates: json(&r.get::<String>(10)?)?,
        },
        state,
        lease_until: r.get(7)?,
        registered_at: parse_ts(&r.get::<String>(8)?)?,
    })
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

impl Store {
    /// Registers a runner or renews its lease until `until_ms`; it is active from now on.
    /// Returns the state it had (`None` for a new runner): a lost runner that renews has come
    /// back.
    pub fn renew_runner(
        &self,
        lease: &RunnerLease,
        until_ms: i64,
    ) -> Result<Option<RunnerState>, StoreError> {
        self.write(|db| {
            let before = db.query_opt(&format!("SELECT {COLUMNS} FROM runners WHERE id = ?1"), params![&lease.id])?;
            let before = before.as_ref().map(row).transpose()?;
            // The registration time goes last: an update leaves it as it was.
            let mut params = params![
                &lease.id,
                &lease.address,
                &lease.fingerprint,
                lease.vcpus,
                lease.memory_mib as i64,
                &lease.compat,
                until_ms,
                lease.max_sandboxes,
                serde_json::to_string(&lease.templates).unwrap_or_default(),
                ts(&Utc::now())
            ]
            .to_vec();
            if before.is_some() {
                params.pop();
                db.execute(
                    "UPDATE runners SET address = ?2, fingerprint = ?3, vcpus = ?4, memory_mib = ?5, compat = ?6,
                        state = 'active', lease_until = ?7, max_sandboxes = ?8, templates = ?9 WHERE id = ?1",
                    &params,
                )?;
            } else {
                db.execute(
                    &format!("INSERT INTO runners ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'active', ?7, ?10, ?8, ?9)"),
                    &params,
                )?;
            }
            Ok(before.map(|b| b.state))
        })
    }

    pub fn runners(&self) -> Result<Vec<RunnerRecord>, StoreError> {
        self.with(|db| all(db.query(&format!("SELECT {COLUMNS} FROM runners ORDER BY id"), &[])?, row))
    }

    /// Marks a runner lost if its lease lapsed before `now_ms` (compare-and-set: one control
    /// plane of several does it); whether it was marked now.
    pub fn lose_runner(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let n = self.with(|db| {
            Ok(db.execute(
                "UPDATE runners SET state = 'lost' WHERE id = ?1 AND state = 'active' AND lease_until < ?2",
                params![id, now_ms],
            )?)
        })?;
        Ok(n > 0)
    }

    /// Marks `lost` the running sandboxes placed on a lost runner (those in the middle of an
    /// operation settle first, then are caught by the next call); returns them.
    pub fn lose_sandboxes_on(&self, runner_id: &str) -> Result<Vec<SandboxRecord>, StoreError> {
        // Asked every round for every lost runner: the writers' lock only when there is work.
        let running = self.with(|db| {
            let n: u64 = db
                .query_one(
                    "SELECT COUNT(*) FROM sandboxes WHERE runner_id = ?1 AND state = 'running'",
                    params![runner_id],
                )?
                .get(0)?;
            Ok(n)
        })?;
        if running == 0 {
            return Ok(Vec::new());
        }
        self.write(|db| {
            let lost = db.query_opt(
                "SELECT id FROM runners WHERE id = ?1 AND state = 'lost'",
                params![runner_id],
            )?;
            if lost.is_none() {
                return Ok(Vec::new());
            }
            let rows = db.query(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE runner_id = ?1 AND state = 'running'"),
                params![runner_id],
            )?;
            let recs = all(rows, sandbox_row)?;
            db.execute(
                "UPDATE sandboxes SET state = 'lost', state_changed_at = ?2 WHERE runner_id = ?1 AND state = 'running'",
                params![runner_id, ts(&Utc::now())],
            )?;
            Ok(recs)
        })
    }

    /// Each runner's load, by runner id (runners without sandboxes left out).
    pub fn runner_loads(&self) -> Result<HashMap<String, RunnerLoad>, StoreError> {
        self.runner_loads_without("")
    }

    /// Each runner's load without sandbox `id`'s own record: the load it is placed beside.
    pub fn runner_loads_without(&self, id: &str) -> Result<HashMap<String, RunnerLoad>, StoreError> {
        let counting: Vec<String> = SandboxState::ALL
            .iter()
            .filter(|s| s.counts_against_limit())
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        self.with(|db| {
            let rows = db.query(
                &format!(
                    "SELECT runner_id, COUNT(*), CAST(SUM(vcpu) AS BIGINT), CAST(SUM(memory) AS BIGINT) FROM sandboxes
                     WHERE state IN ({}) AND id != ?1 GROUP BY runner_id",
                    counting.join(",")
                ),
                params![id],
            )?;
            let mut loads = HashMap::new();
            for r in rows {
                let load = RunnerLoad { sandboxes: r.get(1)?, vcpus: r.get(2)?, memory_mib: r.get(3)? };
                loads.insert(r.get::<String>(0)?, load);
            }
            Ok(loads)
        })
    }

    /// Records the runner that built a user template (its disk is there).
    pub fn set_template_runner(&self, template_id: &str, runner_id: &str) -> Result<(), StoreError> {
        self.with(|db| {
            Ok(db.execute(
                "UPDATE templates SET runner_id = ?2 WHERE id = ?1",
                params![template_id, runner_id],
            )?)
        })?;
        Ok(())
    }

    /// The runner that built a user template; `None` if unknown (built before this was kept).
    pub fn template_runner(&self, template_id: &str) -> Result<Option<String>, StoreError> {
        self.with(|db| {
            let row = db.query_opt("SELECT runner_id FROM templates WHERE id = ?1", params![template_id])?;
            Ok(match row {
                Some(r) => r.get::<Option<String>>(0)?,
                None => None,
            })
        })
    }

    /// Records the runner a sandbox's VM is placed on, before it is brought up there.
    pub fn place_sandbox(&self, id: &str, runner_id: &str) -> Result<(), StoreError> {
        self.with(|db| {
            Ok(db.execute("UPDATE sandboxes SET runner_id = ?2 WHERE id = ?1", params![id, runner_id])?)
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::sandbox;

    fn lease(id: &str) -> RunnerLease {
        RunnerLease {
            id: id.into(),
            address: "192.88.99.2:8081".into(),
            fingerprint: "ab".repeat(32),
            vcpus: 2,
            memory_mib: 4096,
            max_sandboxes: 0,
            compat: "qemu; tcg".into(),
            templates: vec!["system-debian-bookworm-1c-1024m-0123456789ab".into()],
        }
    }

    #[test]
    fn a_lapsed_lease_loses_the_runner_and_its_running_sandboxes_once() {
        let s = testing::store();
        let org = s.create_org("acme", None).unwrap();
        assert_eq!(s.renew_runner(&lease("runner-a"), now_ms() + 10_000).unwrap(), None);
        let mut running = sandbox(&org.id);
        running.runner_id = "runner-a".into();
        let mut paused = sandbox(&org.id);
        paused.runner_id = "runner-a".into();
        paused.state = SandboxState::Paused;
        s.insert_sandbox(&running, 10).unwrap();
        s.insert_sandbox(&paused, 10).unwrap();
        assert_eq!(
            s.runner_loads().unwrap()["runner-a"],
            RunnerLoad { sandboxes: 1, vcpus: 1, memory_mib: 1024 }
        );
        assert!(!s.runner_loads_without(&running.id).unwrap().contains_key("runner-a"));

        // Within its lease: not lost, and nothing of it is.
        assert!(!s.lose_runner("runner-a", now_ms()).unwrap());
        assert!(s.lose_sandboxes_on("runner-a").unwrap().is_empty());
        // Lapsed: lost once.
        assert!(s.lose_runner("runner-a", now_ms() + 20_000).unwrap());
        assert!(!s.lose_runner("runner-a", now_ms() + 20_000).unwrap());
        assert_eq!(s.runners().unwrap()[0].state, RunnerState::Lost);
        let lost = s.lose_sandboxes_on("runner-a").unwrap();
        assert_eq!(lost.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), [running.id.as_str()]);
        assert_eq!(s.sandbox_by_id(&running.id).unwrap().unwrap().state, SandboxState::Lost);
        assert_eq!(s.sandbox_by_id(&paused.id).unwrap().unwrap().state, SandboxState::Paused);
        assert!(!s.runner_loads().unwrap().contains_key("runner-a"));

        // It comes back: active again, told it was lost.
        let mut moved = lease("runner-a");
        moved.address = "192.88.99.3:8081".into();
        assert_eq!(s.renew_runner(&moved, now_ms() + 10_000).unwrap(), Some(RunnerState::Lost));
        let back = &s.runners().unwrap()[0];
        assert_eq!((back.state, back.lease.address.as_str()), (RunnerState::Active, "192.88.99.3:8081"));
        assert_eq!(back.lease, moved);
        s.place_sandbox(&paused.id, "runner-b").unwrap();
        assert_eq!(s.sandbox_by_id(&paused.id).unwrap().unwrap().runner_id, "runner-b");
    }
}
