//! Templates made from container images, per organization. A template is `building` while its
//! image is pulled and converted (not usable, and removed by recovery if the server dies
//! meanwhile), `ready` after, and `deleting` once a delete has begun.

use chrono::{DateTime, Utc};
use cove_proto::image::ImageConfig;
use rusqlite::{params, OptionalExtension, Row};

use crate::{new_id, parse_ts, ts, Store, StoreError};

/// Template ids start with this; system templates are named, not numbered.
pub const ID_PREFIX: &str = "tpl-";

pub(crate) const MIGRATION: &str = "CREATE TABLE templates (
        id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL REFERENCES orgs(id),
        name TEXT NOT NULL,
        uri TEXT NOT NULL,
        digest TEXT NOT NULL DEFAULT '',
        image_config TEXT NOT NULL DEFAULT '{}',
        disk INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (org_id, name)
    );";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateState {
    Building,
    Ready,
    Deleting,
}

impl TemplateState {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateState::Building => "building",
            TemplateState::Ready => "ready",
            TemplateState::Deleting => "deleting",
        }
    }

    fn parse(s: &str) -> Option<TemplateState> {
        [TemplateState::Building, TemplateState::Ready, TemplateState::Deleting]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

#[derive(Debug, Clone)]
pub struct TemplateRecord {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub uri: String,
    /// Digest of the image manifest it was made from (empty while building).
    pub digest: String,
    pub image_config: ImageConfig,
    /// Size of its sandboxes' disk, MiB (0 while building).
    pub disk: u64,
    pub state: TemplateState,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, org_id, name, uri, digest, image_config, disk, state, created_at";

fn row(r: &Row<'_>) -> rusqlite::Result<TemplateRecord> {
    let config: String = r.get(5)?;
    let state: String = r.get(7)?;
    Ok(TemplateRecord {
        id: r.get(0)?,
        org_id: r.get(1)?,
        name: r.get(2)?,
        uri: r.get(3)?,
        digest: r.get(4)?,
        image_config: serde_json::from_str(&config).map_err(crate::conversion)?,
        disk: r.get::<_, i64>(6)? as u64,
        state: TemplateState::parse(&state)
            .ok_or_else(|| crate::conversion(StoreError::Corrupt(format!("template state {state:?}"))))?,
        created_at: parse_ts(&r.get::<_, String>(8)?)?,
    })
}

fn name_taken(e: rusqlite::Error, name: &str) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            StoreError::TemplateNameTaken(name.to_string())
        }
        e => e.into(),
    }
}

impl Store {
    /// Records a template being built, unless its organization already has `limit` of them or
    /// one of that name.
    pub fn insert_template(
        &self,
        org_id: &str,
        name: &str,
        uri: &str,
        limit: u64,
    ) -> Result<TemplateRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let count: i64 =
            tx.query_row("SELECT COUNT(*) FROM templates WHERE org_id = ?1", [org_id], |r| r.get(0))?;
        if count as u64 >= limit {
            return Err(StoreError::TemplateLimit { limit });
        }
        let rec = TemplateRecord {
            id: new_id(ID_PREFIX.trim_end_matches('-')),
            org_id: org_id.to_string(),
            name: name.to_string(),
            uri: uri.to_string(),
            digest: String::new(),
            image_config: ImageConfig::default(),
            disk: 0,
            state: TemplateState::Building,
            created_at: Utc::now(),
        };
        tx.execute(
            "INSERT INTO templates (id, org_id, name, uri, state, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![rec.id, rec.org_id, rec.name, rec.uri, rec.state.as_str(), ts(&rec.created_at)],
        )
        .map_err(|e| name_taken(e, name))?;
        tx.commit()?;
        Ok(rec)
    }

    /// Marks a built template ready, with what it was made of.
    pub fn template_ready(
        &self,
        id: &str,
        digest: &str,
        config: &ImageConfig,
        disk: u64,
    ) -> Result<(), StoreError> {
        let config = serde_json::to_string(config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let n = self.conn().execute(
            "UPDATE templates SET state = 'ready', digest = ?2, image_config = ?3, disk = ?4
             WHERE id = ?1 AND state = 'building'",
            params![id, digest, config, disk as i64],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// A template of `org_id` by id, or by name when no id matches.
    pub fn template(&self, org_id: &str, id_or_name: &str) -> Result<Option<TemplateRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM templates WHERE org_id = ?1 AND (id = ?2 OR name = ?2)
                     ORDER BY id = ?2 DESC LIMIT 1"
                ),
                [org_id, id_or_name],
                row,
            )
            .optional()?)
    }

    /// A template by id, whoever owns it (the runner's view).
    pub fn template_by_id(&self, id: &str) -> Result<Option<TemplateRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(&format!("SELECT {COLUMNS} FROM templates WHERE id = ?1"), [id], row)
            .optional()?)
    }

    /// The organization's templates, oldest first.
    pub fn list_templates(&self, org_id: &str) -> Result<Vec<TemplateRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {COLUMNS} FROM templates WHERE org_id = ?1 ORDER BY created_at, id"))?;
        let rows = stmt.query_map([org_id], row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn rename_template(&self, org_id: &str, id: &str, name: &str) -> Result<(), StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE templates SET name = ?3 WHERE org_id = ?1 AND id = ?2 AND state != 'deleting'",
                params![org_id, id, name],
            )
            .map_err(|e| name_taken(e, name))?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Starts deleting a template: refused with `InUse` (naming one user) while a sandbox or a
    /// snapshot was made from it, or while it is being built.
    pub fn begin_template_delete(&self, org_id: &str, id: &str) -> Result<TemplateRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let t = tx
            .query_row(
                &format!("SELECT {COLUMNS} FROM templates WHERE org_id = ?1 AND id = ?2"),
                [org_id, id],
                row,
            )
            .optional()?
            .ok_or(StoreError::NotFound)?;
        if t.state == TemplateState::Building {
            return Err(StoreError::InUse(format!("template {} is still being built", t.id)));
        }
        for (table, what) in [("sandboxes", "sandbox"), ("snapshots", "snapshot")] {
            let users: Vec<String> = tx
                .prepare(&format!("SELECT id FROM {table} WHERE template = ?1 ORDER BY created_at LIMIT 4"))?
                .query_map([id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            if !users.is_empty() {
                return Err(StoreError::InUse(format!(
                    "template {} is used by {what} {}{}; delete {} first",
                    t.id,
                    users[..users.len().min(3)].join(", "),
                    if users.len() > 3 { " and more" } else { "" },
                    if users.len() > 1 { "them" } else { "it" },
                )));
            }
        }
        tx.execute("UPDATE templates SET state = 'deleting' WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(t)
    }

    pub fn delete_template(&self, id: &str) -> Result<(), StoreError> {
        self.conn().execute("DELETE FROM templates WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Templates not `ready` (for recovery after a restart).
    pub fn unsettled_templates(&self) -> Result<Vec<TemplateRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM templates WHERE state != 'ready'"))?;
        let rows = stmt.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::sandbox;

    #[test]
    fn names_limits_and_users() {
        let s = Store::open_in_memory().unwrap();
        let org = s.create_org("o", None).unwrap();
        let other = s.create_org("p", None).unwrap();
        let t = s.insert_template(&org.id, "app", "alpine:3", 2).unwrap();
        assert!(matches!(s.insert_template(&org.id, "app", "x", 2), Err(StoreError::TemplateNameTaken(_))));
        // Names are per organization.
        s.insert_template(&other.id, "app", "x", 2).unwrap();
        let u = s.insert_template(&org.id, "other", "x", 2).unwrap();
        assert!(matches!(
            s.insert_template(&org.id, "third", "x", 2),
            Err(StoreError::TemplateLimit { limit: 2 })
        ));

        // Building: not deletable, and not usable by a sandbox.
        assert!(matches!(s.begin_template_delete(&org.id, &t.id), Err(StoreError::InUse(_))));
        let mut rec = sandbox(&org.id);
        rec.template = t.id.clone();
        assert!(matches!(s.insert_sandbox(&rec, 10), Err(StoreError::NotFound)));

        let config = ImageConfig { user: "app".into(), ..Default::default() };
        s.template_ready(&t.id, "sha256:abc", &config, 2048).unwrap();
        let got = s.template(&org.id, "app").unwrap().unwrap();
        assert_eq!(
            (got.state, got.disk, got.image_config.user.as_str()),
            (TemplateState::Ready, 2048, "app")
        );
        assert!(s.template(&other.id, &t.id).unwrap().is_none(), "another organization's template");

        assert!(matches!(s.rename_template(&org.id, &t.id, "other"), Err(StoreError::TemplateNameTaken(_))));
        s.rename_template(&org.id, &t.id, "renamed").unwrap();
        assert_eq!(s.template(&org.id, "renamed").unwrap().unwrap().id, t.id);

        s.insert_sandbox(&rec, 10).unwrap();
        let err = s.begin_template_delete(&org.id, &t.id).unwrap_err();
        assert!(err.to_string().contains(&rec.id), "{err}");
        s.delete_sandbox(&rec.id).unwrap();
        assert_eq!(s.begin_template_delete(&org.id, &t.id).unwrap().id, t.id);
        // This organization's deleting one and building one, and the other's building one.
        let mut unsettled: Vec<(bool, &str)> = Vec::new();
        let all = s.unsettled_templates().unwrap();
        for t in &all {
            unsettled.push((t.org_id == org.id, t.state.as_str()));
        }
        unsettled.sort();
        assert_eq!(unsettled, [(false, "building"), (true, "building"), (true, "deleting")]);
        s.delete_template(&t.id).unwrap();
        assert!(s.template(&org.id, &t.id).unwrap().is_none());
        assert_eq!(s.list_templates(&org.id).unwrap().iter().map(|t| &t.id).collect::<Vec<_>>(), [&u.id]);
    }
}
