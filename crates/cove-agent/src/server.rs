//! Routing of the agent's HTTP/2 requests.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use cove_api::Validate;
use cove_proto::routes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;

use crate::fs::Fs;
use crate::reaper::Reaper;
use crate::reply::{self, Body};
use crate::user::{Names, SandboxUser};

/// Largest JSON request body the agent reads.
const MAX_JSON_BODY: usize = 16 << 20;

pub struct State {
    reaper: Arc<Reaper>,
    user: SandboxUser,
    fs: Fs,
    /// The sandbox's environment: the image's, overridden by what the host sets with each
    /// identity.
    env: RwLock<BTreeMap<String, String>>,
    image_env: BTreeMap<String, String>,
    /// The image's `Entrypoint` + `Cmd`, run as a service (empty for none).
    image_command: Vec<String>,
    is_init: bool,
    started: Instant,
    mounts: crate::mounts::Mounts,
    ptys: crate::pty::Ptys,
    procs: crate::procs::Procs,
    lsps: crate::lsp::Lsps,
}

impl State {
    pub fn new(reaper: Arc<Reaper>, is_init: bool) -> Self {
        // A template made from an image says how its commands run (read at every boot; a
        // restored guest keeps what its template's boot read).
        let image: Option<cove_proto::image::ImageConfig> = is_init
            .then(|| std::fs::read(cove_proto::image::CONFIG_PATH).ok())
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let user = SandboxUser::load(image.as_ref());
        let image_env: BTreeMap<String, String> = image
            .iter()
            .flat_map(|c| c.env.iter())
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        let fs = Fs { user: user.clone(), names: Names::load() };
        State {
            reaper,
            user,
            fs,
            env: RwLock::new(image_env.clone()),
            image_env,
            image_command: image.map(|c| c.command()).unwrap_or_default(),
            is_init,
            started: Instant::now(),
            mounts: Default::default(),
            ptys: Default::default(),
            procs: Default::default(),
            lsps: Default::default(),
        }
    }

    pub fn start_mount_client(&self) {
        self.mounts.start_client();
    }

    /// Starts the image's command as a service (see `service`), if it has one.
    pub fn start_service(&self) {
        let command = self.image_command.clone();
        crate::service::start(self.reaper.clone(), self.user.clone(), self.image_env.clone(), command);
    }

    /// Answers one request. `detach` asks the connection to end once its requests are done;
    /// `detached` is cancelled when it does, which ends the streams that would outlive it.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        detach: tokio::sync::mpsc::Sender<()>,
        detached: tokio_util::sync::CancellationToken,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, routes::HEALTH) => reply::json(
                StatusCode::OK,
                &cove_proto::AgentInfo {
                    protocol: cove_proto::PROTOCOL_VERSION,
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                    uptime_secs: self.started.elapsed().as_secs_f64(),
                },
            ),
            (Method::POST, routes::IDENTITY) => self.identity(req).await,
            (Method::POST, routes::DETACH) => {
                let _ = detach.try_send(());
                reply::empty(StatusCode::NO_CONTENT)
            }
            (Method::GET, routes::SYSTEM) => reply::json(
                StatusCode::OK,
                &cove_proto::SystemInfo {
                    user_home_dir: self.user.home.display().to_string(),
                    workdir: self.user.workdir.display().to_string(),
                },
            ),
            (Method::POST, routes::EXEC) => self.exec(req).await,
            (Method::POST, cove_proto::fs::MOUNTS_ROUTE) => {
                let body: cove_proto::fs::MountRequest = match read_json(req).await {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                match self.mounts.mount(body).await {
                    Ok(()) => reply::empty(StatusCode::NO_CONTENT),
                    Err(e) => reply::error(StatusCode::INTERNAL_SERVER_ERROR, format!("mounting: {e}")),
                }
            }
            (Method::POST, cove_proto::fs::UNMOUNT_ROUTE) => {
                let body: cove_proto::fs::UnmountRequest = match read_json(req).await {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                match self.mounts.unmount(&body.id).await {
                    Ok(()) => reply::empty(StatusCode::NO_CONTENT),
                    Err(e) => reply::error(StatusCode::INTERNAL_SERVER_ERROR, format!("unmounting: {e}")),
                }
            }
            (Method::POST, p) if p.starts_with(routes::FS_PREFIX) => {
                let op = p[routes::FS_PREFIX.len()..].to_string();
                self.fs.handle(&op, req).await
            }
            (Method::POST, p) if p.starts_with(routes::GIT_PREFIX) => {
                let op = p[routes::GIT_PREFIX.len()..].to_string();
                let via_proxy = req.headers().contains_key(routes::GIT_VIA_PROXY);
                let body = match read_body(req.into_body(), MAX_JSON_BODY).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                let git =
                    crate::git::Git { reaper: &self.reaper, user: &self.command_user(), env: self.env() };
                git.handle(&op, &body, via_proxy).await
            }
            (Method::POST, p) if p.starts_with(routes::LSP_PREFIX) => {
                let op = p[routes::LSP_PREFIX.len()..].to_string();
                match read_body(req.into_body(), MAX_JSON_BODY).await {
                    Ok(body) => self.lsp(&op, &body).await.unwrap_or_else(lsp_error),
                    Err(r) => r,
                }
            }
            (_, p) if p == routes::PROCESSES || p.starts_with(&format!("{}/", routes::PROCESSES)) => {
                let rest = p[routes::PROCESSES.len()..].trim_start_matches('/').to_string();
                self.processes(&rest, req, detached).await
            }
            (_, p) if p == routes::PTY || p.starts_with(&format!("{}/", routes::PTY)) => {
                let rest = p[routes::PTY.len()..].trim_start_matches('/').to_string();
                self.pty(&rest, req, detached).await
            }
            _ => reply::error(StatusCode::NOT_FOUND, format!("no route {path}")),
        }
    }

    /// Applies what a greeting told: the clock and entropy of a resumed guest, or a whole
    /// identity (the system part is a no-op when the agent is not the guest's init, as in tests).
    pub(crate) fn tell(
        self: Arc<Self>,
        told: crate::channel::Told,
    ) -> futures::future::BoxFuture<'static, std::io::Result<()>> {
        Box::pin(async move {
            match told {
                crate::channel::Told::Clock(time, entropy) if self.is_init => {
                    crate::init::apply_clock(time, &entropy)
                }
                crate::channel::Told::Clock(..) => Ok(()),
                crate::channel::Told::Identity(id) => self.apply_identity(*id).await,
            }
        })
    }

    /// Takes `id`: the environment of later processes, and (as the guest's init) the system's
    /// hostname, clock, trust store and root filesystem size.
    async fn apply_identity(&self, id: cove_proto::Identity) -> std::io::Result<()> {
        let mut env = self.image_env.clone();
        env.extend(id.env.clone());
        if self.is_init {
            // Growing the disk waits for the guest to see it grown: off the async threads.
            let applied = tokio::task::spawn_blocking(move || crate::init::apply_identity(&id)).await;
            applied.map_err(std::io::Error::other)??;
        }
        *self.env.write().unwrap_or_else(|p| p.into_inner()) = env;
        Ok(())
    }

    async fn identity(&self, req: Request<Incoming>) -> Response<Body> {
        let id: cove_proto::Identity = match read_json(req).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        match self.apply_identity(id).await {
            Ok(()) => reply::empty(StatusCode::NO_CONTENT),
            Err(e) => reply::error(StatusCode::INTERNAL_SERVER_ERROR, format!("applying identity: {e}")),
        }
    }

    async fn exec(&self, req: Request<Incoming>) -> Response<Body> {
        let body: cove_api::process::ExecuteRequest = match read_json(req).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        if let Err(errors) = body.validate() {
            return invalid(&errors);
        }
        let env = self.env();
        match crate::exec::run(&self.reaper, &self.command_user(), &env, &body).await {
            Ok(r) => reply::json(StatusCode::OK, &r),
            Err(e @ (crate::exec::ExecError::BadCwd(_) | crate::exec::ExecError::NoShell)) => {
                reply::error(StatusCode::BAD_REQUEST, e.to_string())
            }
            Err(e) => reply::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl State {
    fn env(&self) -> BTreeMap<String, String> {
        self.env.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whom commands and shells run as: the sandbox user; when the agent is not PID 1 (tests),
    /// itself.
    fn command_user(&self) -> SandboxUser {
        if self.is_init {
            self.user.clone()
        } else {
            SandboxUser { uid: 0, gid: 0, ..self.user.clone() }
        }
    }

    /// `rest` is the path after `/v1/pty`: empty (list, create), `<id>` (get, delete),
    /// `<id>/resize`, `<id>/attach`.
    async fn pty(
        &self,
        rest: &str,
        req: Request<Incoming>,
        detached: tokio_util::sync::CancellationToken,
    ) -> Response<Body> {
        use crate::pty::PtyError;
        let answer = |r: Result<cove_api::pty::PtySessionInfo, PtyError>, status| match r {
            Ok(info) => reply::json(status, &info),
            Err(e) => pty_error(e),
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match (req.method().clone(), parts.as_slice()) {
            (Method::GET, [""]) => {
                reply::json(StatusCode::OK, &cove_api::pty::PtyListResponse { items: self.ptys.list() })
            }
            (Method::POST, [""]) => {
                let body: cove_api::pty::PtyCreateRequest = match read_json(req).await {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                if let Err(errors) = body.validate() {
                    return invalid(&errors);
                }
                let created = self.ptys.create(&self.reaper, &self.command_user(), &self.env(), body);
                answer(created, StatusCode::CREATED)
            }
            (Method::GET, [id]) => answer(self.ptys.info(id), StatusCode::OK),
            (Method::DELETE, [id]) => match self.ptys.delete(id) {
                Ok(()) => reply::empty(StatusCode::NO_CONTENT),
                Err(e) => pty_error(e),
            },
            (Method::POST, [id, "resize"]) => {
                let body: cove_api::pty::PtyResizeRequest = match read_json(req).await {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                if let Err(errors) = body.validate() {
                    return invalid(&errors);
                }
                answer(self.ptys.resize(id, body.cols, body.rows), StatusCode::OK)
            }
            (Method::POST, [id, "attach"]) => {
                match self.ptys.attach(&self.reaper, id, req.into_body(), detached) {
                    Ok(body) => reply::bytes(StatusCode::OK, "application/octet-stream", body),
                    Err(e) => pty_error(e),
                }
            }
            _ => reply::error(StatusCode::NOT_FOUND, format!("no route {}/{rest}", routes::PTY)),
        }
    }
}

impl State {
    /// `rest` is the path after `/v1/processes`: empty (list, start), `<pid>` (get, delete),
    /// `<pid>/stdin`, `<pid>/signal`, `<pid>/output`.
    async fn processes(
        &self,
        rest: &str,
        req: Request<Incoming>,
        detached: tokio_util::sync::CancellationToken,
    ) -> Response<Body> {
        use cove_api::process::{ProcessInput, ProcessSignal, ProcessStartRequest};
        let parts: Vec<&str> = rest.split('/').collect();
        let pid = parts.first().and_then(|p| p.parse::<u32>().ok());
        let result = match (req.method().clone(), parts.as_slice(), pid) {
            (Method::GET, [""], _) => Ok(reply::json(
                StatusCode::OK,
                &cove_api::process::ProcessListResponse { items: self.procs.list() },
            )),
            (Method::POST, [""], _) => {
                let body: ProcessStartRequest = match read_json(req).await {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                if let Err(errors) = body.validate() {
                    return invalid(&errors);
                }
                let started = self.procs.start(&self.reaper, &self.command_user(), &self.env(), body);
                started.map(|info| reply::json(StatusCode::CREATED, &info))
            }
            (Method::GET, [_], Some(pid)) => self.procs.info(pid).map(|i| reply::json(StatusCode::OK, &i)),
            (Method::DELETE, [_], Some(pid)) => {
                self.procs.delete(pid).map(|()| reply::empty(StatusCode::NO_CONTENT))
            }
            (Method::POST, [_, "stdin"], Some(pid)) => {
                let body: ProcessInput = match read_json(req).await {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                self.procs.input(pid, body).await.map(|()| reply::empty(StatusCode::NO_CONTENT))
            }
            (Method::POST, [_, "signal"], Some(pid)) => {
                let body: ProcessSignal = match read_json(req).await {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                let Some(name) = body.name() else {
                    return reply::field_error(StatusCode::BAD_REQUEST, Some("signal"), "unknown signal");
                };
                self.procs.signal(pid, name).map(|i| reply::json(StatusCode::OK, &i))
            }
            (Method::GET, [_, "output"], Some(pid)) => {
                let follow = req.uri().query().is_none_or(|q| !q.split('&').any(|kv| kv == "follow=false"));
                self.procs
                    .output(pid, follow, detached)
                    .map(|body| reply::bytes(StatusCode::OK, "text/event-stream", body))
            }
            _ => {
                return reply::error(StatusCode::NOT_FOUND, format!("no route {}/{rest}", routes::PROCESSES))
            }
        };
        result.unwrap_or_else(proc_error)
    }
}

impl State {
    /// One LSP operation (`op` is the public API's name).
    async fn lsp(&self, op: &str, body: &[u8]) -> Result<Response<Body>, crate::lsp::LspError> {
        use crate::lsp::LspError;
        use cove_api::lsp::*;
        fn parse<T: DeserializeOwned + Validate>(body: &[u8]) -> Result<T, LspError> {
            let req: T = serde_json::from_slice(body)
                .map_err(|e| LspError::Invalid(format!("invalid JSON body: {e}")))?;
            req.validate().map_err(|errors| LspError::Invalid(describe(&errors)))?;
            Ok(req)
        }
        let user = self.command_user();
        let ok = || reply::json(StatusCode::OK, &LspSuccessResponse { success: true });
        let doc = |uri: &str| serde_json::json!({ "uri": uri });
        Ok(match op {
            "start" => {
                let r: LspServerRequest = parse(body)?;
                self.lsps.start(&self.reaper, &user, &self.env(), &r.language_id, &r.path_to_project).await?;
                ok()
            }
            "stop" => {
                let r: LspServerRequest = parse(body)?;
                self.lsps.stop(&user, &r.language_id, &r.path_to_project).await?;
                ok()
            }
            "completions" => {
                let r: LspCompletionRequest = parse(body)?;
                let ctx = r.context.unwrap_or_default();
                let mut context = serde_json::json!({ "triggerKind": ctx.trigger_kind.unwrap_or(1) });
                if let Some(c) = ctx.trigger_character {
                    context["triggerCharacter"] = c.into();
                }
                let params = serde_json::json!({
                    "textDocument": doc(&r.uri),
                    "position": {"line": r.position.line, "character": r.position.character},
                    "context": context,
                });
                let answer = self
                    .lsps
                    .request(&user, &r.language_id, &r.path_to_project, "textDocument/completion", params)
                    .await?;
                reply::json(StatusCode::OK, &answer)
            }
            "document-symbols" => {
                let r: LspDocumentRequest = parse(body)?;
                let params = serde_json::json!({ "textDocument": doc(&r.uri) });
                let answer = self
                    .lsps
                    .request(&user, &r.language_id, &r.path_to_project, "textDocument/documentSymbol", params)
                    .await?;
                reply::json(StatusCode::OK, &answer)
            }
            "did-open" => {
                let r: LspDidOpenRequest = parse(body)?;
                self.lsps.did_open(&user, r).await?;
                reply::empty(StatusCode::NO_CONTENT)
            }
            "did-close" => {
                let r: LspDocumentRequest = parse(body)?;
                let params = serde_json::json!({ "textDocument": doc(&r.uri) });
                self.lsps
                    .notify(&user, &r.language_id, &r.path_to_project, "textDocument/didClose", params)
                    .await?;
                reply::empty(StatusCode::NO_CONTENT)
            }
            _ => reply::error(StatusCode::NOT_FOUND, format!("no LSP operation {op:?}")),
        })
    }
}

fn lsp_error(e: crate::lsp::LspError) -> Response<Body> {
    use crate::lsp::LspError as E;
    let field = match &e {
        E::NoProject(_) => Some("path_to_project"),
        E::NoDocument(_) => Some("uri"),
        _ => None,
    };
    let status = match &e {
        E::Invalid(_) | E::NoProject(_) | E::NotInstalled { .. } | E::NoDocument(_) => {
            StatusCode::BAD_REQUEST
        }
        E::NotRunning(..) => StatusCode::NOT_FOUND,
        E::TooMany(_) => StatusCode::CONFLICT,
        E::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
        E::Exited(_) | E::Spawn(_) => StatusCode::BAD_GATEWAY,
    };
    reply::field_error(status, field, e.to_string())
}

fn proc_error(e: crate::procs::ProcError) -> Response<Body> {
    use crate::exec::ExecError;
    use crate::procs::ProcError as E;
    match e {
        E::NotFound(_) => reply::error(StatusCode::NOT_FOUND, e.to_string()),
        E::TooMany | E::StdinClosed(_) => reply::error(StatusCode::CONFLICT, e.to_string()),
        E::Exec(ExecError::BadCwd(_)) => {
            reply::field_error(StatusCode::BAD_REQUEST, Some("cwd"), e.to_string())
        }
        E::Exec(ExecError::NoShell) => reply::error(StatusCode::BAD_REQUEST, e.to_string()),
        E::Exec(ExecError::Spawn(_)) => reply::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn pty_error(e: crate::pty::PtyError) -> Response<Body> {
    use crate::pty::PtyError as E;
    match e {
        E::NotFound(_) => reply::error(StatusCode::NOT_FOUND, e.to_string()),
        E::Exists(_) | E::TooMany => reply::error(StatusCode::CONFLICT, e.to_string()),
        E::Cwd(_) => reply::field_error(StatusCode::BAD_REQUEST, Some("cwd"), e.to_string()),
        E::NoShell => reply::error(StatusCode::BAD_REQUEST, e.to_string()),
        E::Io(_) => reply::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub fn invalid(errors: &[cove_api::FieldError]) -> Response<Body> {
    reply::error(StatusCode::BAD_REQUEST, describe(errors))
}

/// `field: error; field: error`.
pub fn describe(errors: &[cove_api::FieldError]) -> String {
    errors.iter().map(|e| format!("{}: {}", e.field, e.error)).collect::<Vec<_>>().join("; ")
}

/// Reads a JSON body of bounded size.
pub async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Body>> {
    let bytes = read_body(req.into_body(), MAX_JSON_BODY).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| reply::error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

pub async fn read_body(body: Incoming, max: usize) -> Result<Bytes, Response<Body>> {
    let limited = http_body_util::Limited::new(body, max);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(reply::error(StatusCode::BAD_REQUEST, format!("reading body: {e}"))),
    }
}
