//! The runner's side: any [`SandboxHost`] served to control planes over HTTP/2 on TLS.
//!
//! - `POST /host/v1/<method>`: the call's arguments as a JSON array, its [`Answer`] back
//!   (`build_template` answers with lines: progress as it comes, then the result).
//! - `/agent/<id>/<path>`: a request for the sandbox's agent, forwarded as it is, bodies
//!   streaming both ways.
//! - `CONNECT <id>:<port>`: a byte stream to a port of the guest.
//!
//! - `POST /host/v1/metadata_channel`: the metadata service's questions (`{"q":n,"id":…}`
//!   lines in the answer's body) and the control plane's answers (`{"q":n,"metadata":…}` lines
//!   in the request's body), for as long as the control plane keeps it open.
//!
//! Every request carries `Authorization: Bearer <token>`. Credential loans are held per
//! connection: a control plane that goes away returns them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::tls::Identity;
use super::wire::{Answer, BuildLine, Inventory, WireError, WireLoan, WireSource};
use crate::host::{AfterCapture, LoanGuard, MetadataSource, SandboxHost, SandboxMetadata};
use crate::{AgentBody, ImageManifest, RegistryCredentials, RunnerError, TemplateSource, VmRequest};

/// Serves `host` on `listener` until the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    identity: &Identity,
    host: Arc<dyn SandboxHost>,
    token: String,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config());
    let token = Arc::new(token);
    let asked = Arc::new(Asked::default());
    host.set_metadata_source(asked.clone());
    let boot = Arc::new(hex::encode(rand::random::<[u8; 8]>()));
    loop {
        let (tcp, peer) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (acceptor, host, token, asked, boot) =
            (acceptor.clone(), host.clone(), token.clone(), asked.clone(), boot.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "runner: TLS handshake failed");
                    return;
                }
            };
            let conn = Arc::new(Connection { host, token, asked, boot, loans: Mutex::default() });
            let service = hyper::service::service_fn(move |req| {
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(conn.handle(req).await) }
            });
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder.initial_stream_window_size(4 << 20).initial_connection_window_size(16 << 20);
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, error = %e, "runner: connection ended");
            }
        });
    }
}

/// Largest arguments of a call (a VM request with its mounts and policy is a few KiB).
const MAX_ARGUMENTS: usize = 16 << 20;

/// One control plane's connection.
struct Connection {
    host: Arc<dyn SandboxHost>,
    token: Arc<String>,
    asked: Arc<Asked>,
    boot: Arc<String>,
    /// Loans of credentials in force, by id; dropped (returned) with the connection.
    loans: Mutex<HashMap<String, LoanGuard>>,
}

pub(super) fn body(bytes: impl Into<Bytes>) -> AgentBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// A body that streams what is sent on the channel, until every sender is gone.
pub(super) fn channel_body() -> (tokio::sync::mpsc::UnboundedSender<Bytes>, AgentBody) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(b)), rx))
    });
    (tx, BodyExt::boxed_unsync(StreamBody::new(stream)))
}

fn answer_with(status: StatusCode, bytes: impl Into<Bytes>) -> Response<AgentBody> {
    let mut resp = Response::new(body(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

/// An error of the runner itself, in the shape the agent's errors have.
fn refusal(status: StatusCode, message: &str) -> Response<AgentBody> {
    answer_with(status, serde_json::json!({ "message": message }).to_string())
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn answer<T: Serialize>(result: Result<T, RunnerError>) -> Vec<u8> {
    match result {
        Ok(v) => json(&Answer::Ok(v)),
        Err(e) => json(&Answer::<T>::Err(WireError::from(&e))),
    }
}

/// `a == b` in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Connection {
    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<AgentBody> {
        let presented = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(presented.as_bytes(), self.token.as_bytes()) {
            return refusal(StatusCode::UNAUTHORIZED, "this runner wants its token");
        }
        if req.method() == Method::CONNECT {
            return self.connect(&mut req).await;
        }
        let path = req.uri().path().to_string();
        if let Some(rest) = path.strip_prefix("/agent/") {
            return self.forward(rest, req).await;
        }
        let Some(method) = path.strip_prefix("/host/v1/").map(str::to_string) else {
            return refusal(StatusCode::NOT_FOUND, "no such route");
        };
        if method == "metadata_channel" {
            return self.asked.open(req.into_body());
        }
        let bytes = match http_body_util::Limited::new(req.into_body(), MAX_ARGUMENTS).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return refusal(StatusCode::BAD_REQUEST, &format!("reading the request: {e}")),
        };
        if method == "build_template" {
            return match serde_json::from_slice(&bytes) {
                Ok(args) => self.build(args),
                Err(e) => refusal(StatusCode::BAD_REQUEST, &format!("build_template: {e}")),
            };
        }
        // In a task of its own: a call that changes a VM runs to its end even if the control
        // plane goes away meanwhile (its recovery then finds a settled host, not a half-done
        // step), as it would on a host in the control plane's own process.
        let conn = self.clone();
        match tokio::spawn(async move { conn.call(&method, &bytes).await }).await {
            Ok(Ok(out)) => answer_with(StatusCode::OK, out),
            Ok(Err((status, message))) => refusal(status, &message),
            Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, &format!("the call failed: {e}")),
        }
    }

    /// A plain-data call: its arguments in, its answer out; or why it was refused.
    async fn call(&self, method: &str, bytes: &[u8]) -> Result<Vec<u8>, (StatusCode, String)> {
        fn args<T: DeserializeOwned>(method: &str, bytes: &[u8]) -> Result<T, (StatusCode, String)> {
            serde_json::from_slice(bytes)
                .map_err(|e| (StatusCode::BAD_REQUEST, format!("arguments of {method}: {e}")))
        }
        let h = &self.host;
        Ok(match method {
            "inventory" => answer(Ok(inventory(h.as_ref(), &self.boot))),
            "prepare_template" => {
                let (template, vcpus, memory_mib): (String, u32, u64) = args(method, bytes)?;
                answer(h.prepare_template(&template, vcpus, memory_mib).await)
            }
            "remove_template" => {
                let (id,): (String,) = args(method, bytes)?;
                answer(h.remove_template(&id).await)
            }
            "create" => {
                let (vm,): (VmRequest,) = args(method, bytes)?;
                answer(h.create(&vm).await)
            }
            "create_from_image" => {
                let (vm, image): (VmRequest, String) = args(method, bytes)?;
                answer(h.create_from_image(&vm, &image).await)
            }
            "boot" => {
                let (vm,): (VmRequest,) = args(method, bytes)?;
                answer(h.boot(&vm).await)
            }
            "capture" => {
                let (vm, image, release): (VmRequest, String, bool) = args(method, bytes)?;
                let after = if release { AfterCapture::Release } else { AfterCapture::Continue };
                answer(h.capture(&vm, &image, after).await)
            }
            "stop" | "end_vm" | "destroy" | "run_again" | "agent_ready" => {
                let (id,): (String,) = args(method, bytes)?;
                answer(match method {
                    "stop" => h.stop(&id).await,
                    "end_vm" => h.end_vm(&id).await,
                    "destroy" => h.destroy(&id).await,
                    "run_again" => h.run_again(&id).await,
                    _ => h.agent(&id).await.map(drop),
                })
            }
            "adopt" => {
                let (vms,): (Vec<VmRequest>,) = args(method, bytes)?;
                answer(Ok(h.adopt(&vms).await))
            }
            "sandboxes_on_host" => answer(Ok(h.sandboxes_on_host().await)),
            "reidentify" => {
                let (vm,): (VmRequest,) = args(method, bytes)?;
                answer(h.reidentify(&vm).await)
            }
            "check_mount" => {
                let (mount,): (cove_api::sandbox::MountConfig,) = args(method, bytes)?;
                answer(h.check_mount(&mount).await)
            }
            "add_mount" => {
                let (id, mount): (String, cove_api::sandbox::MountConfig) = args(method, bytes)?;
                answer(h.add_mount(&id, &mount).await)
            }
            "update_mount" => {
                let (id, mount, remount): (String, cove_api::sandbox::MountConfig, bool) =
                    args(method, bytes)?;
                answer(h.update_mount(&id, &mount, remount).await)
            }
            "remove_mount" => {
                let (id, mount_id): (String, String) = args(method, bytes)?;
                answer(h.remove_mount(&id, &mount_id).await)
            }
            "set_network_policy" => {
                let (id, policy): (String, Option<cove_api::sandbox::NetworkPolicy>) = args(method, bytes)?;
                answer(h.set_network_policy(&id, policy.as_ref()).await)
            }
            "lend_credentials" => {
                let (id, loan): (String, WireLoan) = args(method, bytes)?;
                answer(self.lend(&id, loan).await)
            }
            "return_loan" => {
                let (loan,): (String,) = args(method, bytes)?;
                self.loans.lock().unwrap_or_else(|p| p.into_inner()).remove(&loan);
                answer(Ok(()))
            }
            "can_restore" => {
                let (manifest,): (ImageManifest,) = args(method, bytes)?;
                answer(h.can_restore(&manifest).await)
            }
            "find_image" => {
                let (image,): (String,) = args(method, bytes)?;
                answer(h.find_image(&image).await)
            }
            "delete_image" => {
                let (image,): (String,) = args(method, bytes)?;
                answer(h.delete_image(&image).await)
            }
            "stored_images" => answer(h.stored_images().await),
            other => return Err((StatusCode::NOT_FOUND, format!("no host method {other:?}"))),
        })
    }

    async fn lend(&self, id: &str, loan: WireLoan) -> Result<String, RunnerError> {
        let authorization = http::HeaderValue::from_str(&loan.authorization)
            .map_err(|_| RunnerError::Network("a loan's authorization is not a header value".into()))?;
        let loan = crate::host::Loan {
            host: loan.host,
            port: loan.port,
            path_prefix: loan.path_prefix,
            authorization,
        };
        let guard = self.host.lend_credentials(id, loan).await?;
        let loan_id = hex::encode(rand::random::<[u8; 12]>());
        self.loans.lock().unwrap_or_else(|p| p.into_inner()).insert(loan_id.clone(), guard);
        Ok(loan_id)
    }

    /// `build_template`: progress lines as the build goes, then its result.
    fn build(&self, (source,): (WireSource,)) -> Response<AgentBody> {
        let (tx, lines) = channel_body();
        let host = self.host.clone();
        tokio::spawn(async move {
            let line = |l: &BuildLine| {
                let mut v = json(l);
                v.push(b'\n');
                Bytes::from(v)
            };
            let progress_tx = tx.clone();
            let progress = move |p: &cove_api::template::TemplateProgress| {
                let _ = progress_tx.send(line(&BuildLine::Progress(p.clone())));
            };
            let credentials = match (source.username, source.password) {
                (Some(username), Some(password)) => RegistryCredentials::Basic { username, password },
                _ => RegistryCredentials::Anonymous,
            };
            let source =
                TemplateSource { id: source.id, uri: source.uri, credentials, free_mib: source.free_mib };
            let done = match host.build_template(&source, &progress).await {
                Ok(b) => Answer::Ok(b),
                Err(e) => Answer::Err(WireError::from(&e)),
            };
            let _ = tx.send(line(&BuildLine::Done(done)));
        });
        let mut resp = Response::new(lines);
        resp.headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-ndjson"));
        resp
    }

    /// `/agent/<id>/<path>`: the request, as it came, to the sandbox's agent.
    async fn forward(&self, rest: &str, req: Request<Incoming>) -> Response<AgentBody> {
        let (id, path) = rest.split_once('/').map_or((rest, ""), |(id, p)| (id, p));
        let agent = match self.host.agent(id).await {
            Ok(a) => a,
            Err(e) => return refusal(StatusCode::BAD_GATEWAY, &e.to_string()),
        };
        let (mut parts, incoming) = req.into_parts();
        let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        parts.uri = match format!("http://agent/{path}{query}").parse() {
            Ok(uri) => uri,
            Err(_) => return refusal(StatusCode::BAD_REQUEST, "not a path"),
        };
        parts.headers.remove(http::header::AUTHORIZATION);
        let body =
            incoming.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>).boxed_unsync();
        match agent.send(Request::from_parts(parts, body)).await {
            Ok(resp) => resp.map(|b| {
                b.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>).boxed_unsync()
            }),
            Err(e) => refusal(StatusCode::BAD_GATEWAY, &e.to_string()),
        }
    }

    /// `CONNECT <id>:<port>`: a stream to the guest's port.
    async fn connect(&self, req: &mut Request<Incoming>) -> Response<AgentBody> {
        let Some((id, port)) =
            req.uri().authority().and_then(|a| Some((a.host().to_string(), a.port_u16()?)))
        else {
            return refusal(StatusCode::BAD_REQUEST, "CONNECT wants <sandbox id>:<port>");
        };
        let guest = match self.host.connect_guest(&id, port).await {
            Ok(g) => g,
            Err(e) => return answer_with(StatusCode::BAD_GATEWAY, answer::<()>(Err(e))),
        };
        let upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            let mut guest = guest;
            match upgrade.await {
                Ok(upgraded) => {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut guest).await;
                }
                Err(e) => tracing::debug!(sandbox_id = %id, port, error = %e, "runner: CONNECT not upgraded"),
            }
        });
        Response::new(body(Bytes::new()))
    }
}

/// The metadata source of a runner's sandboxes: questions to the control plane that holds the
/// metadata channel open, answered within a few seconds or not at all.
#[derive(Default)]
struct Asked {
    channel: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Bytes>>>,
    pending: Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Option<SandboxMetadata>>>>>,
    next: std::sync::atomic::AtomicU64,
}

#[derive(Serialize, serde::Deserialize)]
struct MetadataQuestion {
    q: u64,
    id: String,
}

#[derive(Serialize, serde::Deserialize)]
struct MetadataAnswer {
    q: u64,
    metadata: Option<SandboxMetadata>,
}

impl Asked {
    /// A control plane's channel: it replaces any earlier one.
    fn open(&self, answers: Incoming) -> Response<AgentBody> {
        let (tx, questions) = channel_body();
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let pending = self.pending.clone();
        tokio::spawn(async move {
            let mut lines = Lines::default();
            let mut answers = answers;
            while let Some(Ok(frame)) = answers.frame().await {
                let Some(data) = frame.data_ref() else { continue };
                for line in lines.push(data) {
                    if let Ok(a) = serde_json::from_slice::<MetadataAnswer>(&line) {
                        if let Some(waiting) = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&a.q)
                        {
                            let _ = waiting.send(a.metadata);
                        }
                    }
                }
            }
        });
        Response::new(questions)
    }
}

#[async_trait::async_trait]
impl MetadataSource for Asked {
    async fn sandbox_metadata(&self, sandbox_id: &str) -> Option<SandboxMetadata> {
        let q = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(q, tx);
        let mut line = json(&MetadataQuestion { q, id: sandbox_id.to_string() });
        line.push(b'\n');
        let sent = self
            .channel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|c| c.send(line.into()).is_ok());
        let answer = if sent {
            tokio::time::timeout(std::time::Duration::from_secs(5), rx).await.ok().and_then(Result::ok)
        } else {
            None
        };
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&q);
        answer.flatten()
    }
}

/// Splits a stream of bytes into lines.
#[derive(Default)]
pub(super) struct Lines(Vec<u8>);

impl Lines {
    /// The complete lines `data` ends, without their newlines.
    pub(super) fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.0.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(end) = self.0.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.0.drain(..=end).collect();
            line.pop();
            out.push(line);
        }
        out
    }
}

/// What this host has of the system templates.
fn inventory(host: &dyn SandboxHost, boot: &str) -> Inventory {
    let mut inv = Inventory { boot: boot.to_string(), info: host.info(), ..Default::default() };
    for t in cove_api::template::SYSTEM_TEMPLATES {
        if let Some(disk) = host.template_disk_mib(t.name) {
            let built = host
                .system_template_built_at(t.name)
                .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64);
            inv.templates.insert(t.name.to_string(), (disk, built));
        }
    }
    inv
}
