//! The control plane's side: a [`SandboxHost`] that is a runner on another machine, reached over
//! one HTTP/2 connection on TLS (made again when it breaks), the runner's certificate pinned.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::Bytes;
use cove_api::sandbox::{MountConfig, NetworkPolicy};
use cove_api::template::TemplateProgress;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::server::{body, channel_body, Lines};
use super::wire::{Answer, BuildLine, Inventory, WireLoan, WireSource};
use crate::host::{AfterCapture, GuestStream, Loan, LoanGuard, MetadataSource, SandboxHost, VmRequest};
use crate::{
    AgentBody, AgentClient, BuiltTemplate, CaptureStats, ImageManifest, RegistryCredentials, RunnerError,
    TemplateSource,
};

/// A runner on another machine.
pub struct RemoteHost {
    /// `host:port` of the runner.
    addr: String,
    tls: tokio_rustls::TlsConnector,
    authorization: http::HeaderValue,
    sender: tokio::sync::Mutex<Option<SendRequest<AgentBody>>>,
    inventory: RwLock<Inventory>,
    /// Itself, for the loans it hands out (which return themselves when dropped).
    me: std::sync::Weak<RemoteHost>,
    restart_listener: std::sync::OnceLock<Arc<dyn Fn() + Send + Sync>>,
    /// Told of every new connection after the first.
    reconnects: Arc<tokio::sync::Notify>,
}

/// The I/O half of a connection to a runner.
type Connection = hyper::client::conn::http2::Connection<
    TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    AgentBody,
    TokioExecutor,
>;

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn unreachable(addr: &str, e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Network(format!("runner {addr}: {e}"))
}

impl RemoteHost {
    /// The runner at `addr` (`host:port`) whose certificate has SHA-256 `fingerprint`, with its
    /// token; connects, and learns which system templates it has.
    pub async fn connect(addr: &str, fingerprint: &str, token: &str) -> Result<Arc<RemoteHost>, RunnerError> {
        let mut authorization = http::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| RunnerError::Network("the runner token is not a header value".into()))?;
        authorization.set_sensitive(true);
        let host = Arc::new_cyclic(|me| RemoteHost {
            addr: addr.to_string(),
            tls: tokio_rustls::TlsConnector::from(super::tls::client_config(fingerprint)),
            authorization,
            sender: tokio::sync::Mutex::new(None),
            inventory: RwLock::default(),
            me: me.clone(),
            restart_listener: std::sync::OnceLock::new(),
            reconnects: Arc::default(),
        });
        host.refresh_inventory().await?;
        // After a reconnect: if another run of the runner's process answers, its VMs are to be
        // adopted again.
        let (me, reconnects) = (Arc::downgrade(&host), host.reconnects.clone());
        tokio::spawn(async move {
            loop {
                reconnects.notified().await;
                let Some(host) = me.upgrade() else { return };
                match host.restarted().await {
                    Ok(false) => {}
                    Ok(true) => {
                        tracing::warn!(runner = %host.addr, "the runner restarted; adopting its sandboxes again");
                        if let Some(listener) = host.restart_listener.get() {
                            listener();
                        }
                    }
                    Err(e) => tracing::warn!(runner = %host.addr, error = %e, "asking a reconnected runner"),
                }
            }
        });
        Ok(host)
    }

    /// The connection, made (again) if there is none or it broke.
    async fn sender(&self) -> Result<SendRequest<AgentBody>, RunnerError> {
        let mut slot = self.sender.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        // A runner that cannot be reached fails the call in seconds, not after TCP's retries.
        let (sender, conn) = tokio::time::timeout(CONNECT_TIMEOUT, self.handshake())
            .await
            .map_err(|_| unreachable(&self.addr, "no answer within 10 s"))??;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let reconnected = slot.is_some();
        *slot = Some(sender.clone());
        if reconnected {
            // The runner may have restarted meanwhile (see `connect`).
            self.reconnects.notify_one();
        }
        Ok(sender)
    }

    /// TCP, TLS (the pinned certificate) and HTTP/2 to the runner.
    async fn handshake(&self) -> Result<(SendRequest<AgentBody>, Connection), RunnerError> {
        let tcp = tokio::net::TcpStream::connect(&self.addr).await.map_err(|e| unreachable(&self.addr, e))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from("cove-runner").expect("a DNS name");
        let tls = self.tls.connect(name, tcp).await.map_err(|e| unreachable(&self.addr, e))?;
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(std::time::Duration::from_secs(5)))
            .keep_alive_timeout(std::time::Duration::from_secs(10))
            .keep_alive_while_idle(true);
        builder.handshake(TokioIo::new(tls)).await.map_err(|e| unreachable(&self.addr, e))
    }

    async fn send(
        &self,
        req: Request<AgentBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, RunnerError> {
        let mut sender = self.sender().await?;
        sender.ready().await.map_err(|e| unreachable(&self.addr, e))?;
        sender.send_request(req).await.map_err(|e| unreachable(&self.addr, e))
    }

    fn request(&self, method: Method, path: &str, payload: Vec<u8>) -> Request<AgentBody> {
        let mut req = Request::new(body(payload));
        *req.method_mut() = method;
        *req.uri_mut() = format!("https://cove-runner{path}").parse().expect("a runner URI");
        req.headers_mut().insert(http::header::AUTHORIZATION, self.authorization.clone());
        req
    }

    /// One host call: `args` (a tuple, sent as a JSON array) in, its answer out.
    async fn call<A: Serialize, R: DeserializeOwned>(&self, method: &str, args: A) -> Result<R, RunnerError> {
        let payload = serde_json::to_vec(&args).map_err(|e| unreachable(&self.addr, e))?;
        let resp = self.send(self.request(Method::POST, &format!("/host/v1/{method}"), payload)).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| unreachable(&self.addr, e))?.to_bytes();
        if status != StatusCode::OK {
            return Err(unreachable(
                &self.addr,
                format!("{method}: {status}: {}", String::from_utf8_lossy(&bytes)),
            ));
        }
        match serde_json::from_slice::<Answer<R>>(&bytes) {
            Ok(Answer::Ok(v)) => Ok(v),
            Ok(Answer::Err(e)) => Err(e.into()),
            Err(e) => Err(unreachable(&self.addr, format!("{method}: unreadable answer: {e}"))),
        }
    }

    /// Asks the runner again; whether it is another run of its process than before.
    async fn restarted(&self) -> Result<bool, RunnerError> {
        let before = self.boot();
        self.refresh_inventory().await?;
        Ok(self.boot() != before)
    }

    fn boot(&self) -> String {
        self.inventory.read().unwrap_or_else(|p| p.into_inner()).boot.clone()
    }

    async fn refresh_inventory(&self) -> Result<(), RunnerError> {
        let inv: Inventory = self.call("inventory", ()).await?;
        *self.inventory.write().unwrap_or_else(|p| p.into_inner()) = inv;
        Ok(())
    }
}

impl RemoteHost {
    /// One metadata channel, until it ends: each question answered from `source`.
    async fn answer_metadata(&self, source: &dyn MetadataSource) -> Result<(), RunnerError> {
        let (tx, answers) = channel_body();
        let mut req = self.request(Method::POST, "/host/v1/metadata_channel", Vec::new());
        *req.body_mut() = answers;
        let mut questions = self.send(req).await?.into_body();
        let mut lines = Lines::default();
        while let Some(frame) = questions.frame().await {
            let frame = frame.map_err(|e| unreachable(&self.addr, e))?;
            let Some(data) = frame.data_ref() else { continue };
            for line in lines.push(data) {
                let Ok(q) = serde_json::from_slice::<serde_json::Value>(&line) else { continue };
                let (Some(n), Some(id)) = (q["q"].as_u64(), q["id"].as_str()) else { continue };
                let metadata = source.sandbox_metadata(id).await;
                let mut answer = serde_json::to_vec(&serde_json::json!({ "q": n, "metadata": metadata }))
                    .map_err(|e| unreachable(&self.addr, e))?;
                answer.push(b'\n');
                if tx.send(answer.into()).is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// A loan of credentials on the runner, returned when dropped.
struct RemoteLoan {
    host: std::sync::Weak<RemoteHost>,
    id: String,
}

impl Drop for RemoteLoan {
    fn drop(&mut self) {
        let (Some(host), Ok(rt)) = (self.host.upgrade(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let id = std::mem::take(&mut self.id);
        rt.spawn(async move {
            if let Err(e) = host.call::<_, ()>("return_loan", (id,)).await {
                tracing::warn!(error = %e, "returning a credential loan to the runner");
            }
        });
    }
}

#[async_trait]
impl SandboxHost for RemoteHost {
    fn info(&self) -> crate::HostInfo {
        self.inventory.read().unwrap_or_else(|p| p.into_inner()).info.clone()
    }

    async fn can_restore(&self, manifest: &ImageManifest) -> Result<(), RunnerError> {
        self.call("can_restore", (manifest,)).await
    }

    fn template_disk_mib(&self, template: &str) -> Option<u64> {
        self.inventory.read().unwrap_or_else(|p| p.into_inner()).templates.get(template).map(|t| t.0)
    }

    fn system_template_built_at(&self, template: &str) -> Option<std::time::SystemTime> {
        let inv = self.inventory.read().unwrap_or_else(|p| p.into_inner());
        let ms = inv.templates.get(template)?.1?;
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
    }

    async fn prepare_template(&self, template: &str, vcpus: u32, memory_mib: u64) -> Result<(), RunnerError> {
        let r = self.call("prepare_template", (template, vcpus, memory_mib)).await;
        self.refresh_inventory().await?;
        r
    }

    async fn build_template(
        &self,
        source: &TemplateSource,
        progress: &(dyn for<'p> Fn(&'p TemplateProgress) + Send + Sync),
    ) -> Result<BuiltTemplate, RunnerError> {
        let (username, password) = match &source.credentials {
            RegistryCredentials::Basic { username, password } => {
                (Some(username.clone()), Some(password.clone()))
            }
            RegistryCredentials::Anonymous => (None, None),
        };
        let args = (WireSource {
            id: source.id.clone(),
            uri: source.uri.clone(),
            username,
            password,
            free_mib: source.free_mib,
        },);
        let payload = serde_json::to_vec(&args).map_err(|e| unreachable(&self.addr, e))?;
        let resp = self.send(self.request(Method::POST, "/host/v1/build_template", payload)).await?;
        let mut body = resp.into_body();
        let mut lines = Lines::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| unreachable(&self.addr, e))?;
            let Some(data) = frame.data_ref() else { continue };
            for line in lines.push(data) {
                match serde_json::from_slice::<BuildLine>(&line) {
                    Ok(BuildLine::Progress(p)) => progress(&p),
                    Ok(BuildLine::Done(Answer::Ok(built))) => return Ok(built),
                    Ok(BuildLine::Done(Answer::Err(e))) => return Err(e.into()),
                    Err(e) => return Err(unreachable(&self.addr, format!("build_template: {e}"))),
                }
            }
        }
        Err(unreachable(&self.addr, "build_template: the answer ended early"))
    }

    async fn remove_template(&self, id: &str) -> Result<(), RunnerError> {
        self.call("remove_template", (id,)).await
    }

    async fn create(&self, req: &VmRequest) -> Result<(), RunnerError> {
        self.call("create", (req,)).await
    }

    async fn create_from_image(&self, req: &VmRequest, image: &str) -> Result<(), RunnerError> {
        self.call("create_from_image", (req, image)).await
    }

    async fn boot(&self, req: &VmRequest) -> Result<(), RunnerError> {
        self.call("boot", (req,)).await
    }

    async fn capture(
        &self,
        req: &VmRequest,
        image: &str,
        after: AfterCapture,
    ) -> Result<(ImageManifest, CaptureStats), RunnerError> {
        let release = after == AfterCapture::Release;
        self.call("capture", (req, image, release)).await
    }

    async fn stop(&self, id: &str) -> Result<(), RunnerError> {
        self.call("stop", (id,)).await
    }

    async fn end_vm(&self, id: &str) -> Result<(), RunnerError> {
        self.call("end_vm", (id,)).await
    }

    async fn destroy(&self, id: &str) -> Result<(), RunnerError> {
        self.call("destroy", (id,)).await
    }

    async fn adopt(&self, sandboxes: &[VmRequest]) -> Vec<String> {
        match self.call("adopt", (sandboxes,)).await {
            Ok(gone) => gone,
            Err(e) => {
                // Nothing is known to be gone: the sandboxes stay as recorded, and calls about
                // them fail until the runner answers again.
                tracing::warn!(error = %e, "adopting the runner's sandboxes");
                Vec::new()
            }
        }
    }

    async fn run_again(&self, id: &str) -> Result<(), RunnerError> {
        self.call("run_again", (id,)).await
    }

    async fn sandboxes_on_host(&self) -> Vec<String> {
        self.call("sandboxes_on_host", ()).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "listing the runner's sandboxes");
            Vec::new()
        })
    }

    async fn agent(&self, id: &str) -> Result<AgentClient, RunnerError> {
        // Errors (no VM, an agent that does not answer) surface here, as they do on this host.
        self.call::<_, ()>("agent_ready", (id,)).await?;
        Ok(AgentClient::via_runner(self.sender().await?, id, self.authorization.clone()))
    }

    async fn reidentify(&self, req: &VmRequest) -> Result<(), RunnerError> {
        self.call("reidentify", (req,)).await
    }

    async fn connect_guest(&self, id: &str, port: u16) -> Result<GuestStream, RunnerError> {
        let mut req = Request::new(body(Bytes::new()));
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = format!("{id}:{port}").parse().map_err(|_| RunnerError::NoVm(id.to_string()))?;
        req.headers_mut().insert(http::header::AUTHORIZATION, self.authorization.clone());
        let resp = self.send(req).await?;
        if resp.status() != StatusCode::OK {
            let bytes = resp.into_body().collect().await.map_err(|e| unreachable(&self.addr, e))?.to_bytes();
            return Err(match serde_json::from_slice::<Answer<()>>(&bytes) {
                Ok(Answer::Err(e)) => e.into(),
                _ => unreachable(&self.addr, format!("CONNECT: {}", String::from_utf8_lossy(&bytes))),
            });
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(|e| unreachable(&self.addr, e))?;
        Ok(Box::new(TokioIo::new(upgraded)))
    }

    async fn check_mount(&self, mount: &MountConfig) -> Result<(), RunnerError> {
        self.call("check_mount", (mount,)).await
    }

    async fn add_mount(&self, id: &str, mount: &MountConfig) -> Result<(), RunnerError> {
        self.call("add_mount", (id, mount)).await
    }

    async fn update_mount(&self, id: &str, mount: &MountConfig, remount: bool) -> Result<(), RunnerError> {
        self.call("update_mount", (id, mount, remount)).await
    }

    async fn remove_mount(&self, id: &str, mount_id: &str) -> Result<(), RunnerError> {
        self.call("remove_mount", (id, mount_id)).await
    }

    async fn set_network_policy(&self, id: &str, policy: Option<&NetworkPolicy>) -> Result<(), RunnerError> {
        self.call("set_network_policy", (id, policy)).await
    }

    /// Holds the runner's metadata channel open (made again when it breaks, for as long as
    /// this host lives) and answers its questions from `source`.
    fn set_metadata_source(&self, source: Arc<dyn MetadataSource>) {
        let me = self.me.clone();
        tokio::spawn(async move {
            while let Some(host) = me.upgrade() {
                if let Err(e) = host.answer_metadata(source.as_ref()).await {
                    tracing::debug!(runner = %host.addr, error = %e, "metadata channel");
                }
                drop(host);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }

    fn set_restart_listener(&self, listener: Arc<dyn Fn() + Send + Sync>) {
        let _ = self.restart_listener.set(listener);
    }

    async fn lend_credentials(&self, id: &str, loan: Loan) -> Result<LoanGuard, RunnerError> {
        let wire = WireLoan {
            host: loan.host,
            port: loan.port,
            path_prefix: loan.path_prefix,
            authorization: loan
                .authorization
                .to_str()
                .map_err(|_| RunnerError::Network("a loan's authorization is not text".into()))?
                .to_string(),
        };
        let loan_id: String = self.call("lend_credentials", (id, wire)).await?;
        Ok(Box::new(RemoteLoan { host: self.me.clone(), id: loan_id }))
    }

    async fn find_image(&self, image: &str) -> Result<Option<ImageManifest>, RunnerError> {
        self.call("find_image", (image,)).await
    }

    async fn delete_image(&self, image: &str) -> Result<(), RunnerError> {
        self.call("delete_image", (image,)).await
    }

    async fn stored_images(&self) -> Result<Vec<String>, RunnerError> {
        self.call("stored_images", ()).await
    }
}
