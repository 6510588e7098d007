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
}
