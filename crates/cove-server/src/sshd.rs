//! The SSH endpoint. A client logs in with an SSH access (`…/ssh/access`): its id is the
//! username, its password the password; nothing else authenticates. Each session channel is a
//! process in the sandbox, run by its agent, so no SSH server, key or credential is ever inside
//! the guest:
//!
//! - with a pseudo-terminal (`ssh host`, `ssh -t host cmd`): a terminal session of the agent
//!   (as `…/pty`), the login shell or `shell -lc cmd`, resized with the client's window;
//! - without (`ssh host cmd`, `ssh -T host`): a background process of the agent (as
//!   `…/process/start`), stdout and stderr apart, standard input as text, signals passed on.
//!
//! The exit status is the command's. When the client goes, the process goes with it. Logging in
//! resumes a paused sandbox; a pause while connected ends the session (status 255), as it
//! ends terminal WebSockets.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cove_api::process::{valid_env_name, OutputEvent, ProcessInput, ProcessStartRequest};
use cove_api::pty::{PtyCreateRequest, MAX_SIDE};
use cove_proto::routes;
use http_body_util::BodyExt;
use russh::keys::PrivateKey;
use russh::server::{Auth, Msg, Server as _, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, MethodKind, MethodSet};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::error::ApiError;
use crate::forward::open_stream;

/// Input chunks a terminal may have in flight to the agent.
const INPUT_QUEUE: usize = 64;
/// The shell of a session without a command.
const LOGIN_SHELL: &str = "if command -v bash >/dev/null; then exec bash -l; else exec sh -l; fi";
/// Exit status of a session the sandbox ended (paused, stopped, deleted) or that could not start.
const LOST: u32 = 255;

/// The host key at `path` (OpenSSH format), made (ed25519, mode 0600) if there is none.
pub fn host_key(path: &Path) -> Result<PrivateKey, String> {
    let at = |what: &str, e: &dyn std::fmt::Display| format!("{what} {}: {e}", path.display());
    if path.exists() {
        let pem = std::fs::read_to_string(path).map_err(|e| at("reading", &e))?;
        return PrivateKey::from_openssh(pem).map_err(|e| at("decoding", &e));
    }
    let seed: [u8; 32] = rand::random();
    let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed));
    let pem = key.to_openssh(russh::keys::ssh_key::LineEnding::LF).map_err(|e| at("encoding", &e))?;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| at("creating", &e))?;
    f.write_all(pem.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| at("writing", &e))?;
    tracing::info!(path = %path.display(), "SSH host key created");
    Ok(key)
}

/// Serves SSH on `listener` until `shutdown`.
pub async fn serve(core: Arc<Core>, listener: TcpListener, key: PrivateKey, shutdown: CancellationToken) {
    let config = russh::server::Config {
        methods: MethodSet::from(&[MethodKind::Password][..]),
        auth_rejection_time: Duration::from_secs(1),
        auth_rejection_time_initial: Some(Duration::from_millis(0)),
        max_auth_attempts: 3,
        inactivity_timeout: Some(Duration::from_secs(3600)),
        keepalive_interval: Some(Duration::from_secs(30)),
        keys: vec![key],
        ..Default::default()
    };
    let mut server = Sshd { core };
    let running = server.run_on_socket(Arc::new(config), &listener);
    let handle = running.handle();
    tokio::select! {
        r = running => if let Err(e) = r { tracing::error!(error = %e, "SSH endpoint stopped") },
        _ = shutdown.cancelled() => handle.shutdown("the server is shutting down".into()),
    }
}

#[derive(Clone)]
struct Sshd {
    core: Arc<Core>,
}

impl russh::server::Server for Sshd {
    type Handler = Connection;

    fn new_client(&mut self, peer: Option<std::net::SocketAddr>) -> Connection {
        Connection { core: self.core.clone(), peer, login: None }
    }
}

struct Connection {
    core: Arc<Core>,
    peer: Option<std::net::SocketAddr>,
    /// (organization, sandbox) once logged in.
    login: Option<(String, String)>,
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        match self.core.ssh_login(user, password) {
            Some(login) => {
                tracing::info!(ssh_id = user, sandbox_id = %login.1, peer = ?self.peer, "SSH login");
                self.login = Some(login);
                Ok(Auth::Accept)
            }
            None => {
                tracing::info!(ssh_id = user, peer = ?self.peer, "SSH login refused");
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some((org, id)) = self.login.clone() else { return Ok(()) };
        reply.accept().await;
        tokio::spawn(run_channel(self.core.clone(), org, id, channel));
        Ok(())
    }

    // The requests are acted on by the channel's task (`run_channel`); here they are answered.
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _cmd: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::info!(subsystem = name, "SSH subsystem refused");
        session.channel_failure(channel)
    }
}

/// What a channel asked for before its shell or command.
#[derive(Default)]
struct Request {
    /// Terminal type, columns, rows.
    pty: Option<(String, u16, u16)>,
    env: BTreeMap<String, String>,
}

fn side(n: u32, default: u16) -> u16 {
    match u16::try_from(n) {
        Ok(0) | Err(_) => default,
        Ok(n) => n.min(MAX_SIDE),
    }
}

/// Runs one session channel: waits for its shell or exec request, runs it, reports its exit.
async fn run_channel(core: Arc<Core>, org: String, id: String, channel: Channel<Msg>) {
    let (mut read, write) = channel.split();
    let mut req = Request::default();
    let command = loop {
        match read.wait().await {
            Some(ChannelMsg::RequestPty { term, col_width, row_height, .. }) => {
                req.pty = Some((term, side(col_width, 80), side(row_height, 24)));
            }
            Some(ChannelMsg::SetEnv { variable_name, variable_value, .. }) => {
                if valid_env_name(&variable_name) {
                    req.env.insert(variable_name, variable_value);
                }
            }
            Some(ChannelMsg::RequestShell { .. }) => break None,
            Some(ChannelMsg::Exec { command, .. }) => {
                break Some(String::from_utf8_lossy(&command).into_owned())
            }
            Some(ChannelMsg::Close) | None => return,
            Some(_) => {}
        }
    };
    let ran = match req.pty.take() {
        Some(pty) => terminal(&core, &org, &id, &mut read, &write, pty, req.env, command).await,
        None => process(&core, &org, &id, &mut read, &write, req.env, command).await,
    };
    let status = match ran {
        Ok(status) => status,
        Err(message) => {
            tracing::info!(sandbox_id = %id, message, "SSH session ended");
            let _ = write.extended_data_bytes(1, Bytes::from(format!("cove: {message}\r\n"))).await;
            LOST
        }
    };
    let _ = write.exit_status(status).await;
    let _ = write.eof().await;
    let _ = write.close().await;
}

fn public(e: impl Into<cove_runner::RunnerError>) -> String {
    ApiError::from(e.into()).to_string()
}

/// A terminal session: the shell (or `shell -lc command`) on a pseudo-terminal of the agent.
#[allow(clippy::too_many_arguments)]
async fn terminal(
    core: &Core,
    org: &str,
    id: &str,
    read: &mut ChannelReadHalf,
    write: &ChannelWriteHalf<Msg>,
    (term, cols, rows): (String, u16, u16),
    mut env: BTreeMap<String, String>,
    command: Option<String>,
) -> Result<u32, String> {
    let guest = core.agent(org, id).await.map_err(|e| e.to_string())?;
    env.insert("TERM".into(), term);
    let sid = format!("ssh-{}", hex::encode(rand::random::<[u8; 6]>()));
    let create = PtyCreateRequest {
        id: Some(sid.clone()),
        envs: Some(env),
        cols: Some(cols),
        rows: Some(rows),
        command,
        ..Default::default()
    };
    guest.pty_create(&create).await.map_err(public)?;
    let (input, body) = crate::forward::fed_body(INPUT_QUEUE);
    let attach = hyper::Request::post(format!("http://agent{}/{sid}/attach", routes::PTY))
        .body(body)
        .map_err(|e| e.to_string())?;
    let client = (*guest).clone();
    let (agent, mut output) = match open_stream(guest, attach).await {
        Ok(opened) => opened,
        Err(e) => {
            let _ = client.pty_delete(&sid).await;
            return Err(e.to_string());
        }
    };
    let ended = loop {
        tokio::select! {
            msg = read.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if input.send(data).await.is_err() {
                        break Err("the terminal closed".to_string());
                    }
                }
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    let _ = agent.pty_resize(&sid, side(col_width, cols), side(row_height, rows)).await;
                }
                Some(ChannelMsg::Close) | None => break Ok(None),
                Some(_) => {}
            },
            frame = output.frame() => match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if write.data_bytes(data).await.is_err() {
                            break Ok(None);
                        }
                    }
                }
                None => break Ok(Some(())),
                Some(Err(_)) => break Err("the sandbox paused, stopped or went away".to_string()),
            },
        }
    };
    match ended {
        // The shell exited: its status.
        Ok(Some(())) => {
            // The terminal closes as the shell exits; its status follows a moment later.
            let mut code = None;
            for _ in 0..100 {
                code = agent.pty_info(&sid).await.map_err(public)?.exit_code;
                if code.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = agent.pty_delete(&sid).await;
            Ok(code.map_or(LOST, |c| c as u32))
        }
        // The client went: the shell goes too.
        Ok(None) => {
            let _ = agent.pty_delete(&sid).await;
            Ok(LOST)
        }
        Err(e) => Err(e),
    }
}

/// A command (or a login shell reading its standard input) without a terminal, as a background
/// process of the agent.
async fn process(
    core: &Core,
    org: &str,
    id: &str,
    read: &mut ChannelReadHalf,
    write: &ChannelWriteHalf<Msg>,
    env: BTreeMap<String, String>,
    command: Option<String>,
) -> Result<u32, String> {
    let guest = core.agent(org, id).await.map_err(|e| e.to_string())?;
    let start = ProcessStartRequest {
        command: command.unwrap_or_else(|| LOGIN_SHELL.to_string()),
        cwd: None,
        envs: Some(env),
        tag: Some("ssh".into()),
        timeout: None,
    };
    let pid = guest.process_start(&start).await.map_err(public)?.pid;
    let follow = hyper::Request::get(format!("http://agent{}/{pid}/output?follow=true", routes::PROCESSES))
        .body(cove_runner::agent::full(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let client = (*guest).clone();
    let (agent, mut output) = match open_stream(guest, follow).await {
        Ok(opened) => opened,
        Err(e) => {
            let _ = client.process_delete(pid).await;
            return Err(e.to_string());
        }
    };
    let mut pending = Vec::new();
    let ended = 'session: loop {
        tokio::select! {
            msg = read.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    let input = ProcessInput { data: String::from_utf8_lossy(&data).into_owned(), eof: false };
                    let _ = agent.process_input(pid, &input).await;
                }
                Some(ChannelMsg::Eof) => {
                    let _ = agent.process_input(pid, &ProcessInput { data: String::new(), eof: true }).await;
                }
                Some(ChannelMsg::Signal { signal }) => {
                    let name = format!("{signal:?}").to_ascii_uppercase();
                    let _ = agent.process_signal(pid, &name).await;
                }
                Some(ChannelMsg::Close) | None => break Ok(LOST),
                Some(_) => {}
            },
            frame = output.frame() => match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    pending.extend_from_slice(&data);
                    for event in cove_api::process::take_events(&mut pending) {
                        let sent = match event {
                            OutputEvent::Stdout(text) => write.data_bytes(Bytes::from(text)).await,
                            OutputEvent::Stderr(text) => write.extended_data_bytes(1, Bytes::from(text)).await,
                            OutputEvent::Exit(code) => break 'session Ok(code as u32),
                            OutputEvent::Detached(message) => break 'session Err(message),
                            OutputEvent::Dropped(_) => Ok(()),
                        };
                        if sent.is_err() {
                            break 'session Ok(LOST);
                        }
                    }
                }
                None | Some(Err(_)) => break Err("the sandbox paused, stopped or went away".to_string()),
            },
        }
    };
    if ended.is_ok() {
        let _ = agent.process_delete(pid).await;
    }
    ended
}
