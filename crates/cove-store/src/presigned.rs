//! Presigned URLs: a hashed token per URL, bound to one port of one sandbox.

use crate::*;

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

impl Store {
    pub fn insert_presigned(&self, p: &PresignedRecord, token: &str) -> Result<(), StoreError> {
        self.with(|db| {
            Ok(db.execute(
                "INSERT INTO presigned_urls (id, org_id, sandbox_id, port, token_hash, expires_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![&p.id, &p.org_id, &p.sandbox_id, p.port, hash_key(token), p.expires_at, ts(&p.created_at)],
            )?)
        })?;
        Ok(())
    }

    pub fn presigned_by_token(
        &self,
        token: &str,
        now_unix: i64,
    ) -> Result<Option<PresignedRecord>, StoreError> {
        self.with(|db| {
            let row = db.query_opt(
                "SELECT id, org_id, sandbox_id, port, expires_at, created_at FROM presigned_urls
                 WHERE token_hash = ?1 AND expires_at > ?2",
                params![hash_key(token), now_unix],
            )?;
            row.map(|r| {
                let port: i64 = r.get(3)?;
                Ok(PresignedRecord {
                    id: r.get(0)?,
                    org_id: r.get(1)?,
                    sandbox_id: r.get(2)?,
                    port: u16::try_from(port).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    expires_at: r.get(4)?,
                    created_at: parse_ts(&r.get::<String>(5)?)?,
                })
            })
            .transpose()
        })
    }

    pub fn delete_presigned(&self, org_id: &str, sandbox_id: &str, id: &str) -> Result<(), StoreError> {
        let n = self.with(|db| {
            Ok(db.execute(
                "DELETE FROM presigned_urls WHERE id = ?1 AND org_id = ?2 AND sandbox_id = ?3",
                params![id, org_id, sandbox_id],
            )?)
        })?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}
