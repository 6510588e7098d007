//! Templates made from container images, per organization. A template is `building` while its
//! image is pulled and converted (not usable, and removed by recovery if the server dies
//! meanwhile), `ready` after, and `deleting` once a delete has begun.

use crate::db::{params, Row};
use crate::sandboxes::all;
use crate::{json, new_id, parse_ts, ts, Store, StoreError};
use chrono::{DateTime, Utc};
use cove_proto::image::ImageConfig;

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

fn row(r: &Row) -> Result<TemplateRecord, StoreError> {
    let state: String = r.get(7)?;
    Ok(TemplateRecord {
        id: r.get(0)?,
        org_id: r.get(1)?,
        name: r.get(2)?,
        uri: r.get(3)?,
        digest: r.get(4)?,
        image_config: json(&r.get::<String>(5)?)?,
        disk: r.get(6)?,
        state: TemplateState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("template state {state:?}")))?,
        created_at: parse_ts(&r.get::<String>(8)?)?,
    })
}

fn name_taken(e: StoreError, name: &str) -> StoreError {
    match e {
        StoreError::Db(e) if e.is_unique_violation() => StoreError::TemplateNameTaken(name.to_string()),
        e => e,
    }
}

impl Store {
    pub fn insert_template(
        &self,
        org_id: &str,
        name: &str,
        uri: &str,
        limit: u64,
    ) -> Result<TemplateRecord, StoreError> {
        self.write(|db| {
            let count: u64 =
                db.query_one("SELECT COUNT(*) FROM templates WHERE org_id = ?1", params![org_id])?.get(0)?;
            if count >= limit {
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
            db.execute(
                "INSERT INTO templates (id, org_id, name, uri, state, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![&rec.id, &rec.org_id, &rec.name, &rec.uri, rec.state.as_str(), ts(&rec.created_at)],
            )
            .map_err(|e| name_taken(e.into(), name))?;
            Ok(rec)
        })
    }

    pub fn template_ready(
        &self,
        id: &str,
        digest: &str,
        config: &ImageConfig,
        disk: u64,
    ) -> Result<(), StoreError> {
        let config = serde_json::to_string(config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let n = self.with(|db| {
            Ok(db.execute(
                "UPDATE templates SET state = 'ready', digest = ?2, image_config = ?3, disk = ?4
                 WHERE id = ?1 AND state = 'building'",
                params![id, digest, config, disk as i64],
            )?)
        })?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub fn template(&self, org_id: &str, id_or_name: &str) -> Result<Option<TemplateRecord>, StoreError> {
        self.with(|db| {
            db.query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM templates WHERE org_id = ?1 AND (id = ?2 OR name = ?2)
                     ORDER BY id = ?2 DESC LIMIT 1"
                ),
                params![org_id, id_or_name],
            )?
            .map(|r| row(&r))
            .transpose()
        })
    }

    pub fn template_by_id(&self, id: &str) -> Result<Option<TemplateRecord>, StoreError> {
        self.with(|db| {
            db.query_opt(&format!("SELECT {COLUMNS} FROM templates WHERE id = ?1"), params![id])?
                .map(|r| row(&r))
                .transpose()
        })
    }

    pub fn list_templates(&self, org_id: &str) -> Result<Vec<TemplateRecord>, StoreError> {
        self.with(|db| {
            let rows = db.query(
                &format!("SELECT {COLUMNS} FROM templates WHERE org_id = ?1 ORDER BY created_at, id"),
                params![org_id],
            )?;
            all(rows, row)
        })
    }

    pub fn rename_template(&self, org_id: &str, id: &str, name: &str) -> Result<(), StoreError> {
        let n = self
            .with(|db| {
                Ok(db.execute(
                    "UPDATE templates SET name = ?3 WHERE org_id = ?1 AND id = ?2 AND state != 'deleting'",
                    params![org_id, id, name],
                )?)
            })
            .map_err(|e| name_taken(e, name))?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub fn begin_template_delete(&self, org_id: &str, id: &str) -> Result<TemplateRecord, StoreError> {
        self.write(|db| {
            let t = db
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM templates WHERE org_id = ?1 AND id = ?2"),
                    params![org_id, id],
                )?
                .ok_or(StoreError::NotFound)?;
            let t = row(&t)?;
            if t.state == TemplateState::Building {
                return Err(StoreError::InUse(format!("template {} is still being built", t.id)));
            }
            for (table, what) in [("sandboxes", "sandbox"), ("snapshots", "snapshot")] {
                let rows = db.query(
                    &format!("SELECT id FROM {table} WHERE template = ?1 ORDER BY created_at LIMIT 4"),
                    params![id],
                )?;
                let users: Vec<String> = all(rows, |r| r.get(0))?;
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
            db.execute("UPDATE templates SET state = 'deleting' WHERE id = ?1", params![id])?;
            Ok(t)
        })
    }

    pub fn delete_template(&self, id: &str) -> Result<(), StoreError> {
        self.with(|db| Ok(db.execute("DELETE FROM templates WHERE id = ?1", params![id])?))?;
        Ok(())
    }

    pub fn unsettled_templates(&self) -> Result<Vec<TemplateRecord>, StoreError> {
        self.with(|db| {
            let rows = db.query(&format!("SELECT {COLUMNS} FROM templates WHERE state != 'ready'"), &[])?;
            all(rows, row)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use crate::tests::sandbox;

    #[test]
    fn names_limits_and_users() {
        let s = testing::store();
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
