//! SSH accesses: a username (the id) and the hash of a password, bound to one sandbox.

use crate::*;

pub(crate) const MIGRATION: &str = "CREATE TABLE ssh_access (
        id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL REFERENCES orgs(id),
        sandbox_id TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX ssh_access_sandbox ON ssh_access(sandbox_id);";

/// An SSH access as stored: the password itself is never kept.
#[derive(Debug, Clone, PartialEq)]
pub struct SshAccessRecord {
    pub id: String,
    pub org_id: String,
    pub sandbox_id: String,
    /// Seconds since the epoch.
    pub expires_at: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, org_id, sandbox_id, expires_at, created_at, updated_at, password_hash";

/// A row, and whether its password hash is `hash`.
fn row(r: &Row, hash: &str) -> Result<(SshAccessRecord, bool), StoreError> {
    let rec = SshAccessRecord {
        id: r.get(0)?,
        org_id: r.get(1)?,
        sandbox_id: r.get(2)?,
        expires_at: r.get(3)?,
        created_at: parse_ts(&r.get::<String>(4)?)?,
        updated_at: parse_ts(&r.get::<String>(5)?)?,
    };
    Ok((rec, r.get::<String>(6)? == hash))
}

impl Store {
    pub fn insert_ssh_access(&self, a: &SshAccessRecord, password: &str) -> Result<(), StoreError> {
        self.with(|db| {
            Ok(db.execute(
                "INSERT INTO ssh_access (id, org_id, sandbox_id, password_hash, expires_at, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    &a.id,
                    &a.org_id,
                    &a.sandbox_id,
                    hash_key(password),
                    a.expires_at,
                    ts(&a.created_at),
                    ts(&a.updated_at)
                ],
            )?)
        })?;
        Ok(())
    }

    pub fn ssh_access(
        &self,
        org_id: &str,
        sandbox_id: &str,
        id: &str,
        password: &str,
    ) -> Result<Option<(SshAccessRecord, bool)>, StoreError> {
        let sql =
            format!("SELECT {COLUMNS} FROM ssh_access WHERE id = ?1 AND org_id = ?2 AND sandbox_id = ?3");
        let hash = hash_key(password);
        self.with(|db| {
            db.query_opt(&sql, params![id, org_id, sandbox_id])?.map(|r| row(&r, &hash)).transpose()
        })
    }

    pub fn ssh_login(
        &self,
        id: &str,
        password: &str,
        now_unix: i64,
    ) -> Result<Option<SshAccessRecord>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM ssh_access WHERE id = ?1 AND expires_at > ?2");
        let hash = hash_key(password);
        let found =
            self.with(|db| db.query_opt(&sql, params![id, now_unix])?.map(|r| row(&r, &hash)).transpose())?;
        Ok(found.and_then(|(rec, matches)| matches.then_some(rec)))
    }

    pub fn renew_ssh_access(&self, a: &SshAccessRecord, password: &str) -> Result<(), StoreError> {
        let n = self.with(|db| {
            Ok(db.execute(
                "UPDATE ssh_access SET password_hash = ?4, expires_at = ?5, updated_at = ?6
                 WHERE id = ?1 AND org_id = ?2 AND sandbox_id = ?3",
                params![&a.id, &a.org_id, &a.sandbox_id, hash_key(password), a.expires_at, ts(&a.updated_at)],
            )?)
        })?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub fn delete_ssh_access(&self, org_id: &str, sandbox_id: &str, id: &str) -> Result<(), StoreError> {
        let n = self.with(|db| {
            Ok(db.execute(
                "DELETE FROM ssh_access WHERE id = ?1 AND org_id = ?2 AND sandbox_id = ?3",
                params![id, org_id, sandbox_id],
            )?)
        })?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}
