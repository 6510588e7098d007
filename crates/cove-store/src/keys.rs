//! Organizations and their API keys (stored hashed).

use crate::*;

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

/// SHA-256 of an API key, hex. Keys are 256-bit random values, so a fast hash is enough: there
/// is nothing to brute-force.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random API key.
pub fn generate_key() -> String {
    format!("cove_{}", hex::encode(rand::random::<[u8; 32]>()))
}

impl Store {
    pub fn org_count(&self) -> Result<u64, StoreError> {
        self.with(|db| db.query_one("SELECT COUNT(*) FROM orgs", &[])?.get(0))
    }

    pub fn create_org(&self, name: &str, sandbox_limit: Option<u64>) -> Result<Org, StoreError> {
        let org = Org { id: new_id("org"), name: name.to_string(), sandbox_limit };
        self.with(|db| {
            Ok(db.execute(
                "INSERT INTO orgs (id, name, sandbox_limit, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![&org.id, &org.name, sandbox_limit.map(|l| l as i64), ts(&Utc::now())],
            )?)
        })?;
        Ok(org)
    }

    pub fn set_org_limit(&self, org_id: &str, limit: Option<u64>) -> Result<(), StoreError> {
        let n = self.with(|db| {
            Ok(db.execute(
                "UPDATE orgs SET sandbox_limit = ?2 WHERE id = ?1",
                params![org_id, limit.map(|l| l as i64)],
            )?)
        })?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub fn add_key(&self, org_id: &str, name: &str, key: &str) -> Result<ApiKeyInfo, StoreError> {
        let info = ApiKeyInfo {
            id: new_id("key"),
            org_id: org_id.to_string(),
            name: name.to_string(),
            prefix: key.chars().take(12).collect(),
            created_at: Utc::now(),
        };
        self.with(|db| {
            Ok(db.execute(
                "INSERT INTO api_keys (id, org_id, name, key_hash, prefix, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![&info.id, &info.org_id, &info.name, hash_key(key), &info.prefix, ts(&info.created_at)],
            )?)
        })?;
        Ok(info)
    }

    pub fn list_keys(&self, org_id: &str) -> Result<Vec<ApiKeyInfo>, StoreError> {
        self.with(|db| {
            let rows = db.query(
                "SELECT id, org_id, name, prefix, created_at FROM api_keys WHERE org_id = ?1 ORDER BY created_at",
                params![org_id],
            )?;
            sandboxes::all(rows, |r| {
                Ok(ApiKeyInfo {
                    id: r.get(0)?,
                    org_id: r.get(1)?,
                    name: r.get(2)?,
                    prefix: r.get(3)?,
                    created_at: parse_ts(&r.get::<String>(4)?)?,
                })
            })
        })
    }

    pub fn delete_key(&self, org_id: &str, key_id: &str) -> Result<(), StoreError> {
        let n = self.with(|db| {
            Ok(db.execute("DELETE FROM api_keys WHERE id = ?1 AND org_id = ?2", params![key_id, org_id])?)
        })?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub fn authenticate(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|db| {
            db.query_opt("SELECT org_id FROM api_keys WHERE key_hash = ?1", params![hash_key(key)])?
                .map(|r| r.get(0))
                .transpose()
        })
    }
}
