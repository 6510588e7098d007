//! Templates made from container images: upload (pull, convert, first boot), rename, delete,
//! and the names sandboxes are created from.

use cove_api::sandbox::{DEFAULT_MEMORY_MIB, DEFAULT_VCPU};
use cove_api::template::{
    system_template, ImageConfig, RenameTemplateRequest, Template, TemplateProgress, UploadTemplateRequest,
    DEFAULT_FREE_MIB, SYSTEM_TEMPLATES,
};
use cove_runner::{RegistryCredentials, TemplateSource};
use cove_store::{TemplateRecord, TemplateState};
use tracing::Instrument;

use super::Core;
use crate::error::{error_chain, ApiError};

/// The template a sandbox is made from, as the runner knows it.
pub struct Resolved {
    /// `system/debian:bookworm`, or a user template's id.
    pub id: String,
    pub disk_mib: u64,
}

/// The port `https://<id>.<sandbox domain>` reaches: the template's service port (a system
/// template with a service, such as the code interpreter), else the sandbox's `PORT`.
pub fn default_port(template: &str, env: &std::collections::BTreeMap<String, String>) -> Option<u16> {
    system_template(template)
        .and_then(|t| t.service_port)
        .or_else(|| env.get("PORT").and_then(|p| p.trim().parse().ok()).filter(|p| *p > 0))
}

pub fn template_response(t: &TemplateRecord) -> Template {
    let env = (!t.image_config.env.is_empty()).then(|| {
        t.image_config
            .env
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.clone(), String::new()),
            })
            .collect()
    });
    Template {
        id: t.id.clone(),
        name: t.name.clone(),
        digest: t.digest.clone(),
        image_config: ImageConfig {
            entrypoint: t.image_config.entrypoint.clone(),
            cmd: t.image_config.cmd.clone(),
            working_dir: t.image_config.working_dir.clone(),
            user: t.image_config.user.clone(),
            env,
        },
        is_system: false,
        created_at: t.created_at,
        uri: t.uri.clone(),
        disk: t.disk,
        state: t.state.as_str().into(),
        progress: None,
    }
}

impl Core {
    /// A system template, if this host has it (`cove setup` built it).
    fn system_template(&self, name: &str) -> Option<Template> {
        let t = system_template(name)?;
        let disk = self.host.template_disk_mib(t.name)?;
        Some(Template {
            id: t.name.into(),
            name: t.name.into(),
            digest: String::new(),
            image_config: ImageConfig {
                user: cove_api::template::SYSTEM_USER.into(),
                working_dir: cove_api::template::SYSTEM_WORKDIR.into(),
                ..Default::default()
            },
            is_system: true,
            created_at: self
                .host
                .system_template_built_at(t.name)
                .map_or(chrono::DateTime::UNIX_EPOCH, Into::into),
            uri: String::new(),
            disk,
            state: TemplateState::Ready.as_str().into(),
            progress: None,
        })
    }

    /// The template `name` (a name or an id) of `org` that a sandbox can be made from.
    pub fn resolve_template(&self, org: &str, name: &str) -> Result<Resolved, ApiError> {
        let unknown = || ApiError::field("template_name", format!("unknown template {name:?}"));
        if system_template(name).is_some() {
            if self.cluster.members().is_empty() {
                return Err(ApiError::Unavailable("no runner is connected yet; try again later".into()));
            }
            let disk_mib = self.host.template_disk_mib(name).ok_or_else(unknown)?;
            return Ok(Resolved { id: name.to_string(), disk_mib });
        }
        match self.store.template(org, name)? {
            Some(t) if t.state == TemplateState::Ready => Ok(Resolved { id: t.id, disk_mib: t.disk }),
            Some(t) if t.state == TemplateState::Building => Err(ApiError::Conflict(format!(
                "template {name:?} is still being built; try again when its upload has answered"
            ))),
            _ => Err(unknown()),
        }
    }

    /// Pulls and converts an image, boots it once and saves the template snapshot sandboxes
    /// start from; answers once all of that is done. Runs to its end (or its rollback) even if
    /// the client goes away.
    pub async fn upload_template(
        self: &std::sync::Arc<Self>,
        org: &str,
        req: UploadTemplateRequest,
    ) -> Result<TemplateRecord, ApiError> {
        let name = req.name.clone();
        let uri = req.uri.trim().to_string();
        let rec = self.store.insert_template(org, &name, &uri, self.cfg.template_limit)?;
        let credentials = match req.credentials.as_ref().and_then(|c| c.basic()) {
            Some((username, password)) => {
                RegistryCredentials::Basic { username: username.into(), password: password.into() }
            }
            None => RegistryCredentials::Anonymous,
        };
        let source = TemplateSource {
            id: rec.id.clone(),
            uri,
            credentials,
            free_mib: req.disk_free_mib.unwrap_or(DEFAULT_FREE_MIB),
        };
        let core = self.clone();
        let span = tracing::info_span!("template", template_id = %rec.id);
        self.set_progress(&rec.id, Some(TemplateProgress { stage: "pulling".into(), ..Default::default() }));
        let id = rec.id.clone();
        let task = tokio::spawn(
            async move {
                let built = core.build_template(source).await;
                core.set_progress(&id, None);
                built
            }
            .instrument(span),
        );
        task.await.map_err(ApiError::internal)??;
        self.store.template(org, &rec.id)?.ok_or_else(|| ApiError::NotFound("template deleted".into()))
    }

    async fn build_template(&self, source: TemplateSource) -> Result<(), ApiError> {
        let id = source.id.clone();
        tracing::info!(uri = %source.uri, "building template");
        let built = async {
            let built =
                self.host.build_template(&source, &|p| self.set_progress(&id, Some(p.clone()))).await?;
            // The first boot: sandboxes of the default shape start from this snapshot.
            let booting =
                TemplateProgress { stage: "booting".into(), ..self.progress(&id).unwrap_or_default() };
            self.set_progress(&id, Some(booting));
            self.host.prepare_template(&id, DEFAULT_VCPU, DEFAULT_MEMORY_MIB).await?;
            cove_runner::fault_point("template.booted");
            Ok::<_, cove_runner::RunnerError>(built)
        }
        .await;
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "template build failed");
                self.discard_template(&id).await;
                return Err(match e {
                    cove_runner::RunnerError::Oci(o) => match o.field() {
                        Some(field) => ApiError::field(field, o.to_string()),
                        None => ApiError::internal(error_chain(&o)),
                    },
                    cove_runner::RunnerError::Agent(_) => ApiError::field(
                        "uri",
                        "the image did not boot as a sandbox (the agent never answered); see the server log",
                    ),
                    cove_runner::RunnerError::Vmm(_) => ApiError::Unavailable(
                        "the template's VM could not be started; see the server log".into(),
                    ),
                    other => other.into(),
                });
            }
        };
        self.store.template_ready(&id, &built.digest, &built.config, built.disk_mib)?;
        tracing::info!(digest = %built.digest, disk_mib = built.disk_mib, "template ready");
        Ok(())
    }

    fn set_progress(&self, id: &str, progress: Option<TemplateProgress>) {
        let mut building = self.building.lock().unwrap_or_else(|p| p.into_inner());
        match progress {
            Some(p) => building.insert(id.to_string(), p),
            None => building.remove(id),
        };
    }

    fn progress(&self, id: &str) -> Option<TemplateProgress> {
        self.building.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// Removes a template's files and record (a failed build, or what a crash left).
    async fn discard_template(&self, id: &str) {
        if let Err(e) = self.host.remove_template(id).await {
            tracing::warn!(template_id = %id, error = %error_chain(&e), "removing template files");
        }
        if let Err(e) = self.store.delete_template(id) {
            tracing::warn!(template_id = %id, error = %e, "removing template record");
        }
    }

    pub fn templates(&self, org: &str) -> Result<Vec<Template>, ApiError> {
        let mut all: Vec<Template> =
            SYSTEM_TEMPLATES.iter().filter_map(|t| self.system_template(t.name)).collect();
        all.extend(
            self.store
                .list_templates(org)?
                .iter()
                .filter(|t| t.state == TemplateState::Ready)
                .map(template_response),
        );
        Ok(all)
    }

    pub fn template(&self, org: &str, id: &str) -> Result<Template, ApiError> {
        if system_template(id).is_some() {
            return self
                .system_template(id)
                .ok_or_else(|| ApiError::NotFound(format!("template {id} not found")));
        }
        match self.store.template(org, id)? {
            Some(t) if t.state == TemplateState::Ready => Ok(template_response(&t)),
            // An upload in flight: shown with how far it has come.
            Some(t) if t.state == TemplateState::Building => {
                // Recorded a moment before its build reports anything.
                let progress = self
                    .progress(&t.id)
                    .unwrap_or_else(|| TemplateProgress { stage: "pulling".into(), ..Default::default() });
                Ok(Template { progress: Some(progress), ..template_response(&t) })
            }
            _ => Err(ApiError::NotFound(format!("template {id} not found"))),
        }
    }

    pub fn rename_template(&self, org: &str, id: &str, req: &RenameTemplateRequest) -> Result<(), ApiError> {
        if id.starts_with(cove_api::template::SYSTEM_PREFIX) {
            return Err(ApiError::Conflict("system templates cannot be renamed".into()));
        }
        self.store.rename_template(org, id, &req.name).map_err(|e| match e {
            cove_store::StoreError::NotFound => ApiError::NotFound(format!("template {id} not found")),
            other => other.into(),
        })
    }

    /// Deletes a template no sandbox or snapshot uses (409 naming them otherwise).
    pub async fn delete_template(&self, org: &str, id: &str) -> Result<(), ApiError> {
        if id.starts_with(cove_api::template::SYSTEM_PREFIX) {
            return Err(ApiError::Conflict("system templates cannot be deleted".into()));
        }
        let t = self.store.begin_template_delete(org, id).map_err(|e| match e {
            cove_store::StoreError::NotFound => ApiError::NotFound(format!("template {id} not found")),
            other => other.into(),
        })?;
        self.host.remove_template(&t.id).await?;
        self.store.delete_template(&t.id)?;
        Ok(())
    }

    /// After a restart: a build cut short is removed, and so is a delete's remainder.
    pub(super) async fn recover_templates(&self) -> Result<(), ApiError> {
        for t in self.store.unsettled_templates()? {
            tracing::info!(template_id = %t.id, state = t.state.as_str(), "removing an unfinished template");
            self.discard_template(&t.id).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::default_port;

    #[test]
    fn a_template_service_port_comes_before_the_port_variable() {
        let env =
            |port: Option<&str>| port.map(|p| ("PORT".to_string(), p.to_string())).into_iter().collect();
        let ci = "system/code-interpreter:v0.1.0";
        assert_eq!(default_port(ci, &env(Some("8080"))), Some(cove_api::template::CODE_INTERPRETER_PORT));
        assert_eq!(default_port(ci, &env(None)), Some(cove_api::template::CODE_INTERPRETER_PORT));
        let debian = cove_api::sandbox::DEFAULT_TEMPLATE;
        assert_eq!(default_port(debian, &env(Some(" 8080 "))), Some(8080));
        for bad in [None, Some("0"), Some("http"), Some("70000")] {
            assert_eq!(default_port(debian, &env(bad)), None, "{bad:?}");
            assert_eq!(default_port("tpl-abc", &env(bad)), None, "{bad:?}");
        }
    }
}
