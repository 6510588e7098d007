//! Language servers: one process per language and project, run as the sandbox user, spoken to
//! over its standard input and output with LSP's JSON-RPC framing (`Content-Length` headers).
//! The agent does the `initialize` handshake, answers the server's own requests
//! (`workspace/configuration` and the like) with defaults, and relays the API's requests,
//! returning the server's answers as they are. Servers live in the guest's memory, so they
//! outlive a pause.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cove_api::lsp::{uri_path, LspJsonRpcResponse, MAX_SERVERS};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::exec::ExecCgroup;
use crate::reaper::Reaper;
use crate::user::SandboxUser;

/// Longest the `initialize` handshake may take (a cold pyright under emulation takes seconds).
const INITIALIZE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest any other request may take (tsserver's first answer loads the standard library's
/// declarations: a minute and more under emulation).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// Largest message accepted from a server.
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LspError {
    #[error("{0}")]
    Invalid(String),
    #[error("path_to_project {0}: not a directory")]
    NoProject(String),
    #[error("no {language} language server in this sandbox: {program} is not installed ({hint})")]
    NotInstalled { language: String, program: &'static str, hint: &'static str },
    #[error("no {0} language server runs for {1}: start one with lsp/start")]
    NotRunning(String, String),
    #[error("{0} language servers run in this sandbox already; stop one first")]
    TooMany(usize),
    #[error("{0}: no such file")]
    NoDocument(String),
    #[error("the language server did not answer {0} within {1} s")]
    Timeout(String, u64),
    #[error("the language server exited{0}")]
    Exited(String),
    #[error("starting the language server: {0}")]
    Spawn(std::io::Error),
}

/// The program serving a language, its arguments, and how to install it.
fn program(language: &str) -> (&'static str, &'static [&'static str], &'static str) {
    match language {
        "python" => ("pyright-langserver", &["--stdio"], "npm install -g pyright"),
        _ => (
            "typescript-language-server",
            &["--stdio"],
            "npm install -g typescript typescript-language-server",
        ),
    }
}

/// What a server is told at `initialize`: typescript-language-server runs one tsserver (not a
/// second for syntax alone) and fetches no type packages from the network.
fn initialization_options(language: &str) -> Value {
    match program(language).0 {
        "typescript-language-server" => json!({
            "disableAutomaticTypingAcquisition": true,
            "tsserver": {"useSyntaxServer": "never"},
        }),
        _ => json!({}),
    }
}

/// Servers are shared by the languages one program serves (TypeScript and JavaScript).
fn server_key(language: &str, project: &Path) -> (&'static str, PathBuf) {
    (program(language).0, project.to_path_buf())
}

#[derive(Default)]
pub struct Lsps {
    servers: Mutex<HashMap<(&'static str, PathBuf), Arc<Server>>>,
}

struct Server {
    stdin: tokio::sync::Mutex<tokio::net::unix::pipe::Sender>,
    pending: Mutex<HashMap<i64, tokio::sync::oneshot::Sender<Value>>>,
    next_id: AtomicI64,
    cgroup: Option<ExecCgroup>,
    /// The last lines the server wrote to its standard error, for when it dies.
    stderr_tail: Arc<Mutex<Vec<String>>>,
    exited: tokio_util::sync::CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

impl Lsps {
    /// Starts (or finds running) the server for `language` in `project`, initialized.
    pub async fn start(
        &self,
        reaper: &Reaper,
        user: &SandboxUser,
        env: &BTreeMap<String, String>,
        language: &str,
        project: &str,
    ) -> Result<(), LspError> {
        let root = user.resolve(project);
        if !root.is_dir() {
            return Err(LspError::NoProject(root.display().to_string()));
        }
        let key = server_key(language, &root);
        if lock(&self.servers).get(&key).is_some_and(|s| !s.exited.is_cancelled()) {
            return Ok(());
        }
        if lock(&self.servers).values().filter(|s| !s.exited.is_cancelled()).count() >= MAX_SERVERS {
            return Err(LspError::TooMany(MAX_SERVERS));
        }
        let (server, stdout) = Server::spawn(reaper, user, env, language, &root)?;
        let server = Arc::new(server);
        server.read_from(stdout);
        let init = json!({
            "processId": null,
            "initializationOptions": initialization_options(language),
            "clientInfo": {"name": "cove"},
            "rootUri": file_uri(&root),
            "rootPath": root.display().to_string(),
            "workspaceFolders": [{"uri": file_uri(&root), "name": root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()}],
            "capabilities": {
                "textDocument": {
                    "synchronization": {"dynamicRegistration": false},
                    "completion": {"completionItem": {"snippetSupport": false, "documentationFormat": ["plaintext", "markdown"]}},
                    "documentSymbol": {"hierarchicalDocumentSymbolSupport": true},
                },
                "workspace": {"configuration": true, "workspaceFolders": true},
            },
        });
        let answer = match server.request("initialize", init, INITIALIZE_TIMEOUT).await {
            Ok(a) => a,
            Err(e) => {
                server.kill();
                return Err(e);
            }
        };
        if let Some(err) = answer.get("error") {
            server.kill();
            return Err(LspError::Exited(format!(" after refusing initialize: {err}")));
        }
        server.notify("initialized", json!({})).await?;
        let replaced = lock(&self.servers).insert(key, server);
        if let Some(old) = replaced {
            old.kill();
        }
        tracing::info!(language, project = %root.display(), "language server started");
        Ok(())
    }

    fn get(&self, user: &SandboxUser, language: &str, project: &str) -> Result<Arc<Server>, LspError> {
        let root = user.resolve(project);
        let found = lock(&self.servers).get(&server_key(language, &root)).cloned();
        found
            .filter(|s| !s.exited.is_cancelled())
            .ok_or_else(|| LspError::NotRunning(language.to_string(), root.display().to_string()))
    }

    /// Shuts the server down (`shutdown`, `exit`), then ends whatever is left of it.
    pub async fn stop(&self, user: &SandboxUser, language: &str, project: &str) -> Result<(), LspError> {
        let server = self.get(user, language, project)?;
        let root = user.resolve(project);
        lock(&self.servers).remove(&server_key(language, &root));
        let _ = server.request("shutdown", Value::Null, Duration::from_secs(10)).await;
        let _ = server.notify("exit", Value::Null).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), server.exited.cancelled()).await;
        server.kill();
        Ok(())
    }

    /// A request to a running server; its answer as it gave it.
    pub async fn request(
        &self,
        user: &SandboxUser,
        language: &str,
        project: &str,
        method: &str,
        params: Value,
    ) -> Result<LspJsonRpcResponse, LspError> {
        let server = self.get(user, language, project)?;
        let answer = server.request(method, params, REQUEST_TIMEOUT).await?;
        serde_json::from_value(answer)
            .map_err(|e| LspError::Exited(format!(" after a malformed answer: {e}")))
    }

    /// `textDocument/didOpen`, with the file's text when the request has none.
    pub async fn did_open(
        &self,
        user: &SandboxUser,
        req: cove_api::lsp::LspDidOpenRequest,
    ) -> Result<(), LspError> {
        let server = self.get(user, &req.language_id, &req.path_to_project)?;
        let text = match req.text {
            Some(t) => t,
            None => {
                let path =
                    uri_path(&req.uri).ok_or_else(|| LspError::Invalid("uri: not a file URI".into()))?;
                tokio::fs::read_to_string(&path).await.map_err(|_| LspError::NoDocument(path))?
            }
        };
        let doc = json!({"uri": req.uri, "languageId": req.language_id, "version": req.version.unwrap_or(1), "text": text});
        server.notify("textDocument/didOpen", json!({ "textDocument": doc })).await
    }

    pub async fn notify(
        &self,
        user: &SandboxUser,
        language: &str,
        project: &str,
        method: &str,
        params: Value,
    ) -> Result<(), LspError> {
        self.get(user, language, project)?.notify(method, params).await
    }
}

impl Server {
    fn spawn(
        reaper: &Reaper,
        user: &SandboxUser,
        env: &BTreeMap<String, String>,
        language: &str,
        root: &Path,
    ) -> Result<(Server, tokio::net::unix::pipe::Receiver), LspError> {
        let (program, args, hint) = program(language);
        let cgroup = ExecCgroup::create();
        let procs_fd = cgroup.as_ref().and_then(|c| c.procs_fd());
        let mut cmd = crate::exec::user_command(user, program, args, env.iter(), root, procs_fd, false);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let (mut child, exited) = reaper.spawn(&mut cmd).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                LspError::NotInstalled { language: language.into(), program, hint }
            }
            _ => LspError::Spawn(e),
        })?;
        let pipe = |fd: Option<OwnedFd>| fd.ok_or_else(|| LspError::Spawn(std::io::Error::other("no pipe")));
        let stdin =
            tokio::net::unix::pipe::Sender::from_owned_fd(pipe(child.stdin.take().map(OwnedFd::from))?)
                .map_err(LspError::Spawn)?;
        let stdout =
            tokio::net::unix::pipe::Receiver::from_owned_fd(pipe(child.stdout.take().map(OwnedFd::from))?)
                .map_err(LspError::Spawn)?;
        let stderr = child.stderr.take().map(OwnedFd::from);
        let server = Server {
            stdin: tokio::sync::Mutex::new(stdin),
            pending: Mutex::default(),
            next_id: AtomicI64::new(1),
            cgroup,
            stderr_tail: Arc::default(),
            exited: tokio_util::sync::CancellationToken::new(),
        };
        let tail = server.stderr_tail.clone();
        tokio::spawn(crate::exec::read_pipe(stderr, move |bytes| {
            let mut t = lock(&tail);
            t.extend(String::from_utf8_lossy(bytes).lines().map(str::to_string));
            let excess = t.len().saturating_sub(20);
            t.drain(..excess);
        }));
        let done = server.exited.clone();
        tokio::spawn(async move {
            let _ = exited.await;
            done.cancel();
        });
        Ok((server, stdout))
    }

    /// Starts the task that reads the server's messages; `self` must be shared already.
    fn read_from(self: &Arc<Self>, stdout: tokio::net::unix::pipe::Receiver) {
        let server = Arc::downgrade(self);
        let exited = self.exited.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout);
            loop {
                let msg = tokio::select! {
                    m = read_message(&mut reader) => m,
                    _ = exited.cancelled() => None,
                };
                let (Some(msg), Some(server)) = (msg, server.upgrade()) else { break };
                server.dispatch(msg).await;
            }
            exited.cancel();
            if let Some(server) = server.upgrade() {
                // Waiting callers learn the server is gone.
                lock(&server.pending).clear();
            }
        });
    }

    async fn dispatch(&self, msg: Value) {
        match (msg.get("id"), msg.get("method").and_then(Value::as_str)) {
            // An answer to one of ours.
            (Some(id), None) => {
                if let Some(tx) = id.as_i64().and_then(|id| lock(&self.pending).remove(&id)) {
                    let _ = tx.send(msg);
                }
            }
            // A request of the server's: defaults (no settings, nothing to show).
            (Some(id), Some(method)) => {
                let result = match method {
                    "workspace/configuration" => {
                        let n = msg["params"]["items"].as_array().map_or(0, Vec::len);
                        Value::Array(vec![Value::Null; n])
                    }
                    "workspace/workspaceFolders" => Value::Array(Vec::new()),
                    _ => Value::Null,
                };
                let _ = self.send(&json!({"jsonrpc": "2.0", "id": id, "result": result})).await;
            }
            // Notifications (diagnostics, logs, progress) are not kept.
            _ => {}
        }
    }

    async fn send(&self, msg: &Value) -> Result<(), LspError> {
        let body = serde_json::to_vec(msg).map_err(|e| LspError::Invalid(e.to_string()))?;
        let mut stdin = self.stdin.lock().await;
        let head = format!("Content-Length: {}\r\n\r\n", body.len());
        let written = async {
            stdin.write_all(head.as_bytes()).await?;
            stdin.write_all(&body).await
        };
        written.await.map_err(|_| self.gone())
    }

    fn gone(&self) -> LspError {
        let tail = lock(&self.stderr_tail).join("\n");
        LspError::Exited(if tail.is_empty() { String::new() } else { format!(": {tail}") })
    }

    async fn request(
        self: &Arc<Self>,
        method: &str,
        params: Value,
        limit: Duration,
    ) -> Result<Value, LspError> {
        if self.exited.is_cancelled() {
            return Err(self.gone());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.pending).insert(id, tx);
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})).await?;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(self.gone()),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(LspError::Timeout(method.to_string(), limit.as_secs()))
            }
        }
    }

    async fn notify(&self, method: &str, params: Value) -> Result<(), LspError> {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params})).await
    }

    fn kill(&self) {
        if let Some(cg) = &self.cgroup {
            cg.kill();
            cg.remove_if_empty();
        }
        self.exited.cancel();
    }
}

/// One message: `Content-Length` (and other) headers, a blank line, the JSON body. `None` at
/// the end of the stream or on a malformed message.
async fn read_message<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<Value> {
    let mut length = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let length = length.filter(|n| *n <= MAX_MESSAGE)?;
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).await.ok()?;
    serde_json::from_slice(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_are_framed_by_content_length() {
        let raw =
            b"Content-Length: 17\r\nContent-Type: x\r\n\r\n{\"id\":1,\"a\":[2]}\nContent-Length: 2\r\n\r\n{}";
        let mut r = BufReader::new(&raw[..]);
        assert_eq!(read_message(&mut r).await, Some(json!({"id": 1, "a": [2]})));
        assert_eq!(read_message(&mut r).await, Some(json!({})));
        assert_eq!(read_message(&mut r).await, None);
        let huge = format!("Content-Length: {}\r\n\r\n", MAX_MESSAGE + 1);
        assert_eq!(read_message(&mut BufReader::new(huge.as_bytes())).await, None);
    }
}
