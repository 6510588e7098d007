//! The host end of the agent channel: handshake on the VM's virtio-serial socket, then an HTTP/2
//! client whose requests multiplex over that one byte stream.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cove_api::process::{ExecuteRequest, ExecuteResponse};
use cove_proto::routes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Body of requests sent to the agent.
pub type AgentBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent unreachable: {0}")]
    Connect(String),
    #[error("agent speaks protocol {0}, this runner speaks {1}")]
    Version(u32, u32),
    #[error("agent request failed: {0}")]
    Request(String),
    /// The agent answered with an error status.
    #[error("{message}")]
    Status { status: StatusCode, message: String, field: Option<String> },
}

/// How long a health check that proves a new session may take (see [`AgentClient::prove`]).
const PROVE_WAIT: Duration = Duration::from_secs(10);

/// A connected agent. Cheap to clone; all clones share the one connection.
#[derive(Clone)]
pub struct AgentClient {
    sender: SendRequest<AgentBody>,
    /// Set when the agent is a remote runner's: requests go to `/agent/<id>/…` on the
    /// connection to that runner, with its token.
    via: Option<std::sync::Arc<Via>>,
}

struct Via {
    prefix: String,
    authorization: http::HeaderValue,
}

impl AgentClient {
    /// Connects and handshakes, retrying until `wait` runs out (the guest may still be booting).
    pub async fn connect(socket: &Path, wait: Duration) -> Result<AgentClient, AgentError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut last;
        let mut patience = Duration::from_secs(1);
        loop {
            let attempt_left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // A greeting can be lost to a guest-side connection that is still closing (after a
            // runner restart), so a silent attempt is retried; but each retry waits twice as
            // long, because abandoning a slow attempt (loaded host, cold guest) only makes the
            // guest answer a host that has gone.
            match tokio::time::timeout(attempt_left.min(patience), Self::try_connect(socket)).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e @ AgentError::Version(..))) => return Err(e),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => {
                    last = "handshake timed out".into();
                    patience *= 2;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AgentError::Connect(last));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// As [`connect`](Self::connect), to a guest that is booting. The attempts abandoned while
    /// it booted may still reach its agent as a host that has gone (connection events travel
    /// apart from the data) and cut the session that followed; seen as an `http2 error` on a
    /// template's first request. So the session is proven as a reconnect's is, and one that
    /// breaks is replaced by a reconnect (which parks the agent first).
    pub async fn connect_booting(socket: &Path, wait: Duration) -> Result<AgentClient, AgentError> {
        let deadline = tokio::time::Instant::now() + wait;
        let client = Self::connect(socket, wait).await?;
        let proved = match crate::sandbox::fault_injected("agent.first-session") {
            true => Err(AgentError::Connect("COVE_FAULT: the first session broke".into())),
            false => client.prove().await,
        };
        match proved {
            Ok(()) => Ok(client),
            Err(e) => {
                tracing::warn!(error = %e, "the first session with a booted guest's agent broke; connecting again");
                // Closed first: QEMU serves one connection to the port at a time, and a guest
                // that was only slow to answer keeps this one alive, so a new one would wait
                // unaccepted until the reconnect gave up (a template upload that hung 180 s).
                drop(client);
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                Self::reconnect(socket, left.max(Duration::from_secs(10))).await
            }
        }
    }

    /// Proves the session works end to end, twice, before it is handed out: if late news of an
    /// earlier connection cuts it, that happens now, not to a caller's exec. A cut session fails
    /// at once; the limit is for a guest that answers nothing, and is generous because a guest
    /// just booted on a loaded host runs its first request slowly (a reconnect is slower still).
    async fn prove(&self) -> Result<(), AgentError> {
        for pause in [0, 50] {
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let health =
                self.call::<(), cove_proto::AgentInfo>(Method::GET, cove_proto::routes::HEALTH, None);
            tokio::time::timeout(PROVE_WAIT, health)
                .await
                .map_err(|_| AgentError::Connect("health check timed out".into()))??;
        }
        Ok(())
    }

    async fn try_connect(socket: &Path) -> Result<AgentClient, AgentError> {
        Self::greet(socket).await?.finish().await
    }

    /// Connects and sends the greeting, without waiting for the answer. Done before a restored
    /// VM runs, the guest resumes with its host already connected and the greeting waiting.
    pub async fn greet(socket: &Path) -> Result<Greeting, AgentError> {
        Self::greet_as(socket, cove_proto::PROTOCOL_VERSION).await
    }

    /// As [`greet`](Self::greet), with the greeting that brings the guest the time and fresh
    /// entropy ([`cove_proto::CLOCK_VERSION`]): once the guest runs, [`Greeting::send_clock`].
    pub async fn greet_with_clock(socket: &Path) -> Result<Greeting, AgentError> {
        Self::greet_as(socket, cove_proto::CLOCK_VERSION).await
    }

    /// As [`greet`](Self::greet), with the greeting that brings the guest its whole identity
    /// ([`cove_proto::IDENTITY_VERSION`]): once the guest runs, [`Greeting::send_identity`].
    pub async fn greet_with_identity(socket: &Path) -> Result<Greeting, AgentError> {
        Self::greet_as(socket, cove_proto::IDENTITY_VERSION).await
    }

    async fn greet_as(socket: &Path, version: u32) -> Result<Greeting, AgentError> {
        let stream = UnixStream::connect(socket).await.map_err(|e| AgentError::Connect(e.to_string()))?;
        Greeting::send(stream, version).await
    }

    /// Sends the greeting on a socket already open, e.g. the one a VM was parked on while it
    /// was saved: the guest never saw a disconnect, so no stale news can cut the new session.
    pub async fn greet_on(stream: UnixStream) -> Result<Greeting, AgentError> {
        Greeting::send(stream, cove_proto::PROTOCOL_VERSION).await
    }
}

/// The host's wall-clock time (ns since the epoch) and fresh entropy, as a guest is told them.
pub(crate) fn host_clock() -> (u128, [u8; 32]) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    (now, rand::random())
}

/// A connection whose greeting has been sent; `finish` waits for the answer.
pub struct Greeting {
    stream: UnixStream,
    nonce: u64,
    version: u32,
}

impl Greeting {
    async fn send(mut stream: UnixStream, version: u32) -> Result<Greeting, AgentError> {
        let nonce: u64 = rand::random();
        stream
            .write_all(cove_proto::hello_line_of(version, nonce).as_bytes())
            .await
            .map_err(|e| AgentError::Connect(e.to_string()))?;
        Ok(Greeting { stream, nonce, version })
    }

    /// Whether this greeting brings the guest its whole identity (else at most the clock).
    pub fn tells_identity(&self) -> bool {
        self.version == cove_proto::IDENTITY_VERSION
    }

    /// Sends the time and fresh entropy that a clock greeting promised: called once the guest
    /// runs, so that the time is the host's when the guest reads it. A no-op for a plain
    /// greeting.
    pub async fn send_clock(&mut self) -> Result<(), AgentError> {
        if self.version != cove_proto::CLOCK_VERSION {
            return Ok(());
        }
        let (now, entropy) = host_clock();
        let line = cove_proto::clock_line(now, &entropy);
        self.stream.write_all(line.as_bytes()).await.map_err(|e| AgentError::Connect(e.to_string()))
    }

    /// Sends the identity that an identity greeting promised, with the host's time and fresh
    /// entropy as of now: called once the guest runs (and sees its disk at its size). A no-op
    /// for another greeting.
    pub async fn send_identity(&mut self, identity: &cove_proto::Identity) -> Result<(), AgentError> {
        if self.version != cove_proto::IDENTITY_VERSION {
            return Ok(());
        }
        let (now, entropy) = host_clock();
        let identity =
            cove_proto::Identity { unix_time_ns: now, entropy_hex: hex::encode(entropy), ..identity.clone() };
        let message = cove_proto::identity_message(&identity)
            .ok_or_else(|| AgentError::Request("the identity is too large for a greeting".into()))?;
        self.stream.write_all(&message).await.map_err(|e| AgentError::Connect(e.to_string()))
    }

    pub async fn finish(self) -> Result<AgentClient, AgentError> {
        Ok(self.finish_told().await?.0)
    }

    /// Waits for the answer; also says whether the guest applied what the greeting brought
    /// (the clock, or the identity). An agent that does not know that greeting refuses it by
    /// name: it is greeted again the plain way, and nothing is then applied.
    pub async fn finish_told(self) -> Result<(AgentClient, bool), AgentError> {
        let told = self.version;
        let Greeting { mut stream, mut nonce, mut version } = self;
        loop {
            let text = read_line(&mut stream).await?;
            if let Some(start) = text.find(cove_proto::READY) {
                if let Some((answered, got)) = cove_proto::parse_handshake(&text[start..], cove_proto::READY)
                {
                    if got != format!("{nonce:016x}") {
                        continue;
                    }
                    if answered != version {
                        return Err(AgentError::Version(answered, version));
                    }
                    break;
                }
            } else if let Some(rest) = text.strip_prefix(cove_proto::ERROR).and_then(|r| r.strip_prefix(' '))
            {
                if version != cove_proto::PROTOCOL_VERSION
                    && format!("{text}\n") == cove_proto::unsupported_line(version)
                {
                    nonce = rand::random();
                    version = cove_proto::PROTOCOL_VERSION;
                    // After a newline: the identity's JSON (no newline of its own) may have
                    // gone before, and must not run into the greeting.
                    stream
                        .write_all(format!("\n{}", cove_proto::hello_line(nonce)).as_bytes())
                        .await
                        .map_err(|e| AgentError::Connect(e.to_string()))?;
                    continue;
                }
                return Err(AgentError::Connect(rest.to_string()));
            }
        }
        let client = AgentClient::over(crate::trace::Traced(stream)).await?;
        Ok((client, told != cove_proto::PROTOCOL_VERSION && version == told))
    }
}

impl AgentClient {
    /// The HTTP/2 session on a stream whose handshake is done (or that needs none: the control
    /// plane's simulated host serves its guests over in-memory pipes).
    pub async fn over<IO>(io: IO) -> Result<AgentClient, AgentError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .max_frame_size(1 << 20)
            // A connection the guest stopped answering (see `reconnect`) fails its requests
            // within seconds instead of hanging them; the next request reconnects.
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(5)))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let (sender, conn) = builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| AgentError::Connect(format!("HTTP/2 handshake: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(AgentClient { sender, via: None })
    }

    /// The agent of sandbox `id` on a remote runner, through the connection `sender` to it.
    pub(crate) fn via_runner(
        sender: SendRequest<AgentBody>,
        id: &str,
        authorization: http::HeaderValue,
    ) -> AgentClient {
        let via = Via { prefix: format!("https://cove-runner/agent/{id}"), authorization };
        AgentClient { sender, via: Some(std::sync::Arc::new(via)) }
    }
}

impl AgentClient {
    /// Leaves the agent waiting for a greeting, reading its port, and returns the open socket:
    /// the host must keep it open until the VM is saved. Retries, because an HTTP/2 connection
    /// that is still closing in the guest may swallow the first request.
    pub async fn park(socket: &Path, wait: Duration) -> Result<UnixStream, AgentError> {
        let mut stream = UnixStream::connect(socket).await.map_err(|e| AgentError::Connect(e.to_string()))?;
        park_on(&mut stream, wait).await?;
        Ok(stream)
    }

    /// Connects to the agent of a VM that has been running, e.g. after a runner restart.
    ///
    /// The guest learns about a host disconnect and a new connection through a control queue
    /// that is not ordered with the data queue, so a greeting sent right away can land before
    /// the guest has seen the old connection go, and the late news then cuts the new one. The
    /// agent is parked first, twice with a pause between, so that stale news has arrived before
    /// the greeting is sent.
    pub async fn reconnect(socket: &Path, wait: Duration) -> Result<AgentClient, AgentError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut last = String::from("no attempt");
        while tokio::time::Instant::now() < deadline {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = async {
                let mut stream =
                    UnixStream::connect(socket).await.map_err(|e| AgentError::Connect(e.to_string()))?;
                park_on(&mut stream, left).await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
                park_on(&mut stream, left).await?;
                let client = AgentClient::greet_on(stream).await?.finish().await?;
                client.prove().await?;
                Ok(client)
            };
            match tokio::time::timeout(left, attempt).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e @ AgentError::Version(..))) => return Err(e),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "handshake timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(AgentError::Connect(last))
    }
}

/// Sends PARK until the agent answers PARKED (see `AgentClient::park`).
async fn park_on(stream: &mut UnixStream, wait: Duration) -> Result<(), AgentError> {
    let deadline = tokio::time::Instant::now() + wait;
    // A PARK that reaches the guest while its agent is still leaving its last session is lost,
    // so it is sent again; soon at first (that is the common case right after a detach), then
    // less often. Extra answers carry other nonces and are skipped.
    let mut patience = Duration::from_millis(10);
    loop {
        let nonce: u64 = rand::random();
        stream
            .write_all(cove_proto::park_line(nonce).as_bytes())
            .await
            .map_err(|e| AgentError::Connect(e.to_string()))?;
        let want = format!("{nonce:016x}");
        let answer = tokio::time::timeout(patience, async {
            loop {
                let line = read_line(stream).await?;
                if let Some(start) = line.find(cove_proto::PARKED) {
                    if cove_proto::parse_handshake(&line[start..], cove_proto::PARKED)
                        .is_some_and(|(_, n)| n == want)
                    {
                        return Ok::<(), AgentError>(());
                    }
                }
            }
        })
        .await;
        match answer {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(AgentError::Connect("the agent did not park".into()))
            }
            Err(_) => patience = (patience * 2).min(Duration::from_millis(300)),
        }
    }
}

impl AgentClient {
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Sends a request as is; the response body streams.
    pub async fn send(
        &self,
        mut req: Request<AgentBody>,
    ) -> Result<Response<hyper::body::Incoming>, AgentError> {
        if let Some(via) = &self.via {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() = format!("{}{path}", via.prefix)
                .parse()
                .map_err(|e| AgentError::Request(format!("agent path: {e}")))?;
            req.headers_mut().insert(http::header::AUTHORIZATION, via.authorization.clone());
        }
        let mut sender = self.sender.clone();
        sender.ready().await.map_err(|e| AgentError::Request(e.to_string()))?;
        sender.send_request(req).await.map_err(|e| AgentError::Request(e.to_string()))
    }

    /// JSON in, JSON out; error statuses become `AgentError::Status`.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Resp, AgentError> {
        let bytes = self.call_raw(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Request(format!("bad answer from agent: {e}")))
    }

    /// Like `call`, for answers without a body.
    async fn call_raw<Req: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Bytes, AgentError> {
        let payload = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| AgentError::Request(e.to_string()))?,
            None => Vec::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(format!("http://agent{path}"))
            .header("content-type", "application/json")
            .body(full(payload))
            .map_err(|e| AgentError::Request(e.to_string()))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        let bytes =
            resp.into_body().collect().await.map_err(|e| AgentError::Request(e.to_string()))?.to_bytes();
        if !status.is_success() {
            return Err(AgentError::from_answer(status, &bytes));
        }
        Ok(bytes)
    }
}

/// The agent's routes, typed: every guest call the host makes goes through one of these (the
/// filesystem operations, forwarded as the API received them, through [`AgentClient::send`]).
impl AgentClient {
    pub async fn health(&self) -> Result<cove_proto::AgentInfo, AgentError> {
        self.call::<(), _>(Method::GET, routes::HEALTH, None).await
    }

    /// Hostname, environment, clock, entropy, trusted CA and disk size, after every boot and
    /// restore.
    pub async fn set_identity(&self, id: &cove_proto::Identity) -> Result<(), AgentError> {
        self.call_raw(Method::POST, routes::IDENTITY, Some(id)).await.map(drop)
    }

    pub async fn exec(&self, req: &ExecuteRequest) -> Result<ExecuteResponse, AgentError> {
        self.call(Method::POST, routes::EXEC, Some(req)).await
    }

    pub async fn system(&self) -> Result<cove_proto::SystemInfo, AgentError> {
        self.call::<(), _>(Method::GET, routes::SYSTEM, None).await
    }

    /// Mounts the host's source `id` at `path` (a no-op if it is there already).
    pub async fn mount(&self, id: &str, path: &str) -> Result<(), AgentError> {
        let body = cove_proto::fs::MountRequest { id: id.to_string(), path: path.to_string() };
        self.call_raw(Method::POST, cove_proto::fs::MOUNTS_ROUTE, Some(&body)).await.map(drop)
    }

    pub async fn unmount(&self, id: &str) -> Result<(), AgentError> {
        let body = cove_proto::fs::UnmountRequest { id: id.to_string() };
        self.call_raw(Method::POST, cove_proto::fs::UNMOUNT_ROUTE, Some(&body)).await.map(drop)
    }

    /// The URL `remote` of the repository at `path` fetches from (in the output; a non-zero
    /// exit code when there is no such remote or repository).
    pub async fn git_remote_url(
        &self,
        path: &str,
        remote: &str,
    ) -> Result<cove_api::git::GitResult, AgentError> {
        let body = cove_proto::GitRemoteRequest { path: path.to_string(), remote: remote.to_string() };
        self.call(Method::POST, &format!("{}remote-url", routes::GIT_PREFIX), Some(&body)).await
    }

    pub async fn pty_create(
        &self,
        req: &cove_api::pty::PtyCreateRequest,
    ) -> Result<cove_api::pty::PtySessionInfo, AgentError> {
        self.call(Method::POST, routes::PTY, Some(req)).await
    }

    pub async fn pty_info(&self, id: &str) -> Result<cove_api::pty::PtySessionInfo, AgentError> {
        self.call::<(), _>(Method::GET, &format!("{}/{id}", routes::PTY), None).await
    }

    pub async fn pty_resize(&self, id: &str, cols: u16, rows: u16) -> Result<(), AgentError> {
        let body = cove_api::pty::PtyResizeRequest { cols, rows };
        self.call_raw(Method::POST, &format!("{}/{id}/resize", routes::PTY), Some(&body)).await.map(drop)
    }

    /// Ends a terminal session and everything its shell started.
    pub async fn pty_delete(&self, id: &str) -> Result<(), AgentError> {
        self.call_raw::<()>(Method::DELETE, &format!("{}/{id}", routes::PTY), None).await.map(drop)
    }

    pub async fn process_start(
        &self,
        req: &cove_api::process::ProcessStartRequest,
    ) -> Result<cove_api::process::ProcessInfo, AgentError> {
        self.call(Method::POST, routes::PROCESSES, Some(req)).await
    }

    pub async fn process_input(
        &self,
        pid: u32,
        input: &cove_api::process::ProcessInput,
    ) -> Result<(), AgentError> {
        self.call_raw(Method::POST, &format!("{}/{pid}/stdin", routes::PROCESSES), Some(input))
            .await
            .map(drop)
    }

    pub async fn process_signal(&self, pid: u32, signal: &str) -> Result<(), AgentError> {
        let body = cove_api::process::ProcessSignal { signal: signal.to_string() };
        self.call_raw(Method::POST, &format!("{}/{pid}/signal", routes::PROCESSES), Some(&body))
            .await
            .map(drop)
    }

    /// Kills a background process and everything it started, and forgets it.
    pub async fn process_delete(&self, pid: u32) -> Result<(), AgentError> {
        self.call_raw::<()>(Method::DELETE, &format!("{}/{pid}", routes::PROCESSES), None).await.map(drop)
    }

    /// Asks the agent to finish the requests in flight and wait for a new host (before a
    /// capture).
    pub async fn detach(&self) -> Result<(), AgentError> {
        self.call_raw::<()>(Method::POST, routes::DETACH, None).await.map(drop)
    }
}

pub fn full(bytes: impl Into<Bytes>) -> AgentBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

impl AgentError {
    /// An error answer of the agent: its message and field, or the body as the message.
    pub fn from_answer(status: StatusCode, bytes: &[u8]) -> AgentError {
        match serde_json::from_slice::<cove_proto::AgentError>(bytes) {
            Ok(e) => AgentError::Status { status, message: e.message, field: e.field },
            Err(_) => AgentError::Status {
                status,
                message: String::from_utf8_lossy(bytes).into_owned(),
                field: None,
            },
        }
    }
}

/// One handshake line (without the newline), bounded in length.
async fn read_line(stream: &mut UnixStream) -> Result<String, AgentError> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if stream.read(&mut b).await.map_err(|e| AgentError::Connect(e.to_string()))? == 0 {
            return Err(AgentError::Connect("closed during handshake".into()));
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() < cove_proto::MAX_HANDSHAKE_LINE {
            line.push(b[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, BufReader};

    use super::*;

    /// Plays an agent on `guest`: answers each handshake line it reads with `answer(line)`, if
    /// any, until the host starts HTTP/2; returns the lines it read before.
    fn agent(guest: UnixStream, answer: fn(&str) -> Option<String>) -> tokio::task::JoinHandle<Vec<String>> {
        tokio::spawn(async move {
            let (r, mut w) = guest.into_split();
            let mut lines = BufReader::new(r).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("PRI * HTTP/2.0") {
                    break;
                }
                if let Some(a) = answer(&line) {
                    w.write_all(a.as_bytes()).await.unwrap();
                }
                seen.push(line);
            }
            seen
        })
    }

    fn nonce_of(line: &str) -> &str {
        line.rsplit(' ').next().unwrap()
    }

    /// An agent that knows the clock greeting answers it once the clock line came.
    #[tokio::test]
    async fn a_clock_greeting_sets_the_clock() {
        let (host, guest) = UnixStream::pair().unwrap();
        let seen = agent(guest, |line| {
            line.starts_with(cove_proto::HELLO).then(|| cove_proto::ready_line_of(2, nonce_of(line)))
        });
        let mut g = Greeting::send(host, cove_proto::CLOCK_VERSION).await.unwrap();
        g.send_clock().await.unwrap();
        let (_, clock_set) = g.finish_told().await.unwrap();
        assert!(clock_set);
        let seen = seen.await.unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0].starts_with("COVE-HELLO 2 "), "{seen:?}");
        let (time, entropy) = cove_proto::parse_clock(&seen[1]).expect("a clock line");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        assert!(now - time < 10_000_000_000, "the host's time: {time} vs {now}");
        assert_eq!(entropy.len(), 32);
    }

    /// An older agent refuses version 2 by name: it is greeted again with version 1, and the
    /// caller learns that the clock is not set.
    #[tokio::test]
    async fn an_agent_without_the_clock_greeting_is_greeted_the_plain_way() {
        let (host, guest) = UnixStream::pair().unwrap();
        let seen = agent(guest, |line| match cove_proto::parse_handshake(line, cove_proto::HELLO) {
            Some((1, nonce)) => Some(cove_proto::ready_line(nonce)),
            Some((v, _)) => Some(cove_proto::unsupported_line(v)),
            None => None,
        });
        let mut g = Greeting::send(host, cove_proto::CLOCK_VERSION).await.unwrap();
        g.send_clock().await.unwrap();
        let (_, clock_set) = g.finish_told().await.unwrap();
        assert!(!clock_set);
        let seen = seen.await.unwrap();
        assert!(seen[0].starts_with("COVE-HELLO 2 ") && seen[1].starts_with("COVE-CLOCK "), "{seen:?}");
        assert!(seen.len() == 4 && seen[2].is_empty() && seen[3].starts_with("COVE-HELLO 1 "), "{seen:?}");
    }

    /// An agent that knows the identity greeting gets the identity, with the host's time, as
    /// JSON of the length its header says; an older one is greeted again the plain way, on a
    /// line of its own.
    #[tokio::test]
    async fn an_identity_greeting_brings_the_identity() {
        let identity = cove_proto::Identity {
            hostname: "sbx-9".into(),
            disk_bytes: Some(1 << 30),
            ..cove_proto::Identity::default()
        };
        for knows in [true, false] {
            let (host, guest) = UnixStream::pair().unwrap();
            let seen = if knows {
                agent(guest, |line| {
                    let (v, nonce) = cove_proto::parse_handshake(line, cove_proto::HELLO)?;
                    Some(cove_proto::ready_line_of(v, nonce))
                })
            } else {
                agent(guest, |line| match cove_proto::parse_handshake(line, cove_proto::HELLO) {
                    Some((1, nonce)) => Some(cove_proto::ready_line(nonce)),
                    Some((v, _)) => Some(cove_proto::unsupported_line(v)),
                    None => None,
                })
            };
            let mut g = Greeting::send(host, cove_proto::IDENTITY_VERSION).await.unwrap();
            g.send_identity(&identity).await.unwrap();
            let (_, told) = g.finish_told().await.unwrap();
            assert_eq!(told, knows);
            let seen = seen.await.unwrap();
            assert!(seen[0].starts_with("COVE-HELLO 3 "), "{seen:?}");
            let len = cove_proto::parse_identity_header(&seen[1]).expect("an identity header");
            let got: cove_proto::Identity = serde_json::from_str(&seen[2][..len]).unwrap();
            assert_eq!((got.hostname.as_str(), got.disk_bytes), ("sbx-9", Some(1 << 30)));
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
            assert!(
                now - got.unix_time_ns < 10_000_000_000,
                "the host's time: {} vs {now}",
                got.unix_time_ns
            );
            assert_eq!(got.entropy_hex.len(), 64);
            if !knows {
                assert!(
                    seen.len() == 4 && seen[2].len() == len && seen[3].starts_with("COVE-HELLO 1 "),
                    "{seen:?}"
                );
            }
        }
    }
}
