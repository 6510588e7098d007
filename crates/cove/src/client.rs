//! Client subcommands: the API over HTTP, as any other client would use it.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Base URL of the Cove API.
    #[arg(long, env = "COVE_API_URL", default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// API key (or the file `<data-dir>/bootstrap-api-key` written by the server).
    #[arg(long, env = "COVE_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum SandboxCmd {
    /// Create a sandbox and print it.
    Create {
        #[arg(long, default_value = cove_api::sandbox::DEFAULT_TEMPLATE)]
        template: String,
        #[arg(long)]
        vcpu: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        memory: Option<u64>,
        /// Writable disk in MiB (default and least: the template's).
        #[arg(long)]
        disk: Option<u64>,
        /// Lifetime in seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// KEY=VALUE, repeatable.
        #[arg(long = "env", value_parser = parse_kv)]
        env: Vec<(String, String)>,
        /// Egress policy as JSON, e.g. '{"mode":"custom","allow_domains":["pypi.org"]}'.
        #[arg(long, value_parser = parse_json)]
        network_policy: Option<Value>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List sandboxes.
    List {
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one sandbox.
    Get {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a shell command in a sandbox, its output shown as it is written; exits with its exit
    /// code. Ctrl-C interrupts the command.
    Exec {
        id: String,
        /// The command, run with /bin/sh -c.
        #[arg(required = true, num_args = 1.., trailing_var_arg = true)]
        command: Vec<String>,
        #[arg(long)]
        cwd: Option<String>,
        #[arg(long)]
        timeout: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// An interactive shell in a sandbox (a terminal session of this terminal's size, deleted
    /// when its shell exits).
    Shell {
        id: String,
        /// Join this existing session instead of starting one.
        #[arg(long)]
        session: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete sandboxes.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Pause a sandbox (memory, processes and disk stored; the VM ends).
    Pause {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Resume a paused sandbox (any exec or file call also does).
    Resume {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop a sandbox, keeping only its disk.
    Stop {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Boot a stopped sandbox again on its disk.
    Start {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Replace a sandbox's egress policy; a running one loses the connections it forbids.
    NetworkPolicy {
        id: String,
        /// The policy as JSON, e.g. '{"mode":"deny-all"}'.
        #[arg(value_parser = parse_json)]
        policy: Value,
        #[command(flatten)]
        conn: Conn,
    },
    /// Attach an object-storage mount: JSON as in the API, inline or `@file` / `@-` (keeps
    /// credentials out of the command line), e.g. '{"type":"object-storage","bucket":"data",
    /// "mount_path":"/data","endpoint":"https://s3.example.com"}'.
    Mount {
        id: String,
        #[arg(value_parser = parse_json)]
        mount: Value,
        #[command(flatten)]
        conn: Conn,
    },
    /// Change a mount (omitted fields keep their value; "" clears prefix or a credential).
    MountUpdate {
        id: String,
        mount_id: String,
        #[arg(value_parser = parse_json)]
        update: Value,
        #[command(flatten)]
        conn: Conn,
    },
    /// Detach a mount; its path disappears in the sandbox.
    Unmount {
        id: String,
        mount_id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Make a public URL to a port of a sandbox (no API key needed; shown once).
    Share {
        id: String,
        port: u16,
        /// Lifetime in seconds (default 3600).
        #[arg(long)]
        expires_in: Option<i64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke a URL made by `share`.
    Unshare {
        id: String,
        /// The URL's id (`psu-…`).
        url_id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Snapshot a running sandbox and print the snapshot.
    Create {
        sandbox: String,
        #[arg(long)]
        name: Option<String>,
        /// Delete the sandbox once the snapshot is stored.
        #[arg(long)]
        kill: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List snapshots (optionally those whose name contains QUERY).
    List {
        query: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Create a sandbox from a snapshot and print it.
    Restore {
        name: String,
        /// Lifetime in seconds.
        #[arg(long)]
        timeout: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete snapshots (by id or name).
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// Make a template from a container image (pulled by the server) and print it. Answers
    /// once sandboxes can be created from it.
    Create {
        name: String,
        /// Image reference, e.g. `docker.io/library/python:3.12`.
        image: String,
        /// Username for a private registry; the password is read from standard input.
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the registry password from standard input (never from the command line).
        #[arg(long, requires = "username")]
        password_stdin: bool,
        /// Free space of the template's disk beyond the image's files, MiB.
        #[arg(long)]
        disk_free_mib: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the templates you can create sandboxes from.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Rename a template.
    Rename {
        id: String,
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete templates no sandbox or snapshot uses (by id).
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Create a key for your organization; it is shown once.
    Create {
        #[arg(long, default_value = "cli")]
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List your organization's keys (never the keys themselves).
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke a key by id.
    Rm {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// JSON given inline, or `@file` (`@-`: standard input), so that credentials in it need not
/// appear in the command line.
fn parse_json(s: &str) -> Result<Value, String> {
    let text = match s.strip_prefix('@') {
        Some("-") => std::io::read_to_string(std::io::stdin()).map_err(|e| format!("reading stdin: {e}"))?,
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?,
        None => s.to_string(),
    };
    serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub(crate) struct Api {
    http: reqwest::Client,
    pub url: String,
    pub key: String,
}

impl Api {
    pub fn new(conn: &Conn) -> Result<Api> {
        let key = match &conn.api_key {
            Some(k) => k.clone(),
            None => std::fs::read_to_string("/var/lib/cove/bootstrap-api-key")
                .map(|k| k.trim().to_string())
                .context("no API key: pass --api-key or set COVE_API_KEY")?,
        };
        Ok(Api { http: reqwest::Client::new(), url: conn.url.trim_end_matches('/').to_string(), key })
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Option<Value>> {
        let mut req = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("connecting to {}", self.url))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            let v: Value = serde_json::from_str(&text).unwrap_or(json!({ "message": text }));
            let mut msg = v["message"].as_str().unwrap_or("request failed").to_string();
            if let Some(errors) = v["errors"].as_array() {
                for e in errors {
                    msg.push_str(&format!(
                        "\n  {}: {}",
                        e["field"].as_str().unwrap_or("?"),
                        e["error"].as_str().unwrap_or("?")
                    ));
                }
            }
            bail!("{status}: {msg}");
        }
        Ok(if text.is_empty() { None } else { Some(serde_json::from_str(&text)?) })
    }
}

fn print(v: &Option<Value>) {
    if let Some(v) = v {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

pub fn sandbox(cmd: SandboxCmd) -> Result<()> {
    use reqwest::Method;
    block_on(async move {
        match cmd {
            SandboxCmd::Create { template, vcpu, memory, disk, timeout, env, network_policy, conn } => {
                let env: BTreeMap<String, String> = env.into_iter().collect();
                let body = json!({ "template_name": template, "vcpu": vcpu, "memory": memory, "disk": disk, "timeout": timeout,
                    "env_vars": env, "network_policy": network_policy });
                let body = strip_nulls(body);
                print(&Api::new(&conn)?.call(Method::POST, "/v1/sandbox", Some(body)).await?);
            }
            SandboxCmd::List { state, conn } => {
                let q = state.map(|s| format!("?state={s}")).unwrap_or_default();
                let v = Api::new(&conn)?.call(Method::GET, &format!("/v1/sandboxes{q}"), None).await?;
                let items = v.as_ref().and_then(|v| v["items"].as_array().cloned()).unwrap_or_default();
                println!("{:<28} {:<10} {:<24} CREATED", "ID", "STATE", "TEMPLATE");
                for i in items {
                    println!(
                        "{:<28} {:<10} {:<24} {}",
                        i["id"].as_str().unwrap_or(""),
                        i["state"].as_str().unwrap_or(""),
                        i["template_id"].as_str().unwrap_or(""),
                        i["created_at"].as_str().unwrap_or("")
                    );
                }
            }
            SandboxCmd::Get { id, conn } => {
                print(&Api::new(&conn)?.call(Method::GET, &format!("/v1/sandbox/{id}"), None).await?)
            }
            SandboxCmd::Exec { id, command, cwd, timeout, conn } => {
                let body =
                    strip_nulls(json!({ "command": command.join(" "), "cwd": cwd, "timeout": timeout }));
                let code = exec_streaming(&Api::new(&conn)?, &id, body).await?;
                if code != 0 {
                    std::process::exit(code.clamp(1, 255) as i32);
                }
            }
            SandboxCmd::Shell { id, session, conn } => {
                crate::shell::run(&Api::new(&conn)?, &id, session).await?
            }
            SandboxCmd::Rm { ids, conn } => delete_each(&conn, "/v1/sandbox", ids).await?,
            SandboxCmd::Pause { id, conn } => action(&conn, &id, "pause").await?,
            SandboxCmd::Resume { id, conn } => action(&conn, &id, "resume").await?,
            SandboxCmd::Stop { id, conn } => action(&conn, &id, "stop").await?,
            SandboxCmd::Start { id, conn } => action(&conn, &id, "start").await?,
            SandboxCmd::NetworkPolicy { id, policy, conn } => {
                let path = format!("/v1/sandbox/{id}/network-policy");
                print(&Api::new(&conn)?.call(Method::PATCH, &path, Some(policy)).await?)
            }
            SandboxCmd::Mount { id, mount, conn } => {
                let path = format!("/v1/sandbox/{id}/mounts");
                print(&Api::new(&conn)?.call(Method::POST, &path, Some(mount)).await?)
            }
            SandboxCmd::MountUpdate { id, mount_id, update, conn } => {
                let path = format!("/v1/sandbox/{id}/mounts/{mount_id}");
                print(&Api::new(&conn)?.call(Method::PATCH, &path, Some(update)).await?)
            }
            SandboxCmd::Unmount { id, mount_id, conn } => {
                let path = format!("/v1/sandbox/{id}/mounts/{mount_id}");
                Api::new(&conn)?.call(Method::DELETE, &path, None).await?;
            }
            SandboxCmd::Share { id, port, expires_in, conn } => {
                let body = strip_nulls(json!({ "port": port, "expires_in": expires_in }));
                let path = format!("/v1/sandbox/{id}/presigned-url");
                print(&Api::new(&conn)?.call(Method::POST, &path, Some(body)).await?)
            }
            SandboxCmd::Unshare { id, url_id, conn } => {
                let path = format!("/v1/sandbox/{id}/presigned-url/{url_id}");
                Api::new(&conn)?.call(Method::DELETE, &path, None).await?;
            }
        }
        Ok(())
    })
}

/// Starts a process and shows its output as it comes; its exit code. Ctrl-C sends it SIGINT.
async fn exec_streaming(api: &Api, id: &str, body: Value) -> Result<i64> {
    use futures::StreamExt;
    use std::io::Write;
    let started =
        api.call(reqwest::Method::POST, &format!("/v1/sandbox/{id}/process/start"), Some(body)).await?;
    let pid = started.as_ref().and_then(|v| v["pid"].as_u64()).context("no pid in the answer")?;
    let process = format!("/v1/sandbox/{id}/process/{pid}");
    let resp = api
        .http
        .get(format!("{}{process}/output", api.url))
        .bearer_auth(&api.key)
        .send()
        .await
        .with_context(|| format!("connecting to {}", api.url))?
        .error_for_status()?;
    let mut events = resp.bytes_stream();
    let mut pending = Vec::new();
    loop {
        let chunk = tokio::select! {
            c = events.next() => c,
            _ = tokio::signal::ctrl_c() => {
                api.call(reqwest::Method::POST, &format!("{process}/signal"), Some(json!({"signal": "INT"}))).await?;
                continue;
            }
        };
        let Some(chunk) = chunk else { bail!("the output stream ended before the process did") };
        pending.extend_from_slice(&chunk?);
        for event in cove_api::process::take_events(&mut pending) {
            use cove_api::process::OutputEvent as E;
            match event {
                E::Stdout(text) => {
                    print!("{text}");
                    std::io::stdout().flush()?;
                }
                E::Stderr(text) => eprint!("{text}"),
                E::Dropped(n) => eprintln!("[cove: {n} chunks of output dropped]"),
                E::Exit(code) => return Ok(code.into()),
                E::Detached(message) => bail!("{message} (process {pid})"),
            }
        }
    }
}

/// `DELETE <collection>/{id}` for each id, saying so for each.
async fn delete_each(conn: &Conn, collection: &str, ids: Vec<String>) -> Result<()> {
    let api = Api::new(conn)?;
    for id in ids {
        api.call(reqwest::Method::DELETE, &format!("{collection}/{id}"), None).await?;
        println!("deleted {id}");
    }
    Ok(())
}

/// `POST /v1/sandbox/{id}/{what}`, printing the sandbox it answers with.
async fn action(conn: &Conn, id: &str, what: &str) -> Result<()> {
    print(&Api::new(conn)?.call(reqwest::Method::POST, &format!("/v1/sandbox/{id}/{what}"), None).await?);
    Ok(())
}

pub fn snapshot(cmd: SnapshotCmd) -> Result<()> {
    use reqwest::Method;
    block_on(async move {
        match cmd {
            SnapshotCmd::Create { sandbox, name, kill, conn } => {
                let body = strip_nulls(json!({ "name": name, "kill_sandbox_after": kill }));
                let path = format!("/v1/sandbox/{sandbox}/snapshot/create");
                print(&Api::new(&conn)?.call(Method::POST, &path, Some(body)).await?);
            }
            SnapshotCmd::List { query, conn } => {
                let q = query.map(|q| format!("?query={}", q.replace('&', "%26"))).unwrap_or_default();
                let v = Api::new(&conn)?.call(Method::GET, &format!("/v1/snapshots{q}"), None).await?;
                let items = v.as_ref().and_then(|v| v["items"].as_array().cloned()).unwrap_or_default();
                println!("{:<26} {:<32} {:<24} CREATED", "ID", "NAME", "TEMPLATE");
                for i in items {
                    println!(
                        "{:<26} {:<32} {:<24} {}",
                        i["id"].as_str().unwrap_or(""),
                        i["name"].as_str().unwrap_or(""),
                        i["template_id"].as_str().unwrap_or(""),
                        i["created_at"].as_str().unwrap_or("")
                    );
                }
            }
            SnapshotCmd::Restore { name, timeout, conn } => {
                let body = strip_nulls(json!({ "snapshot_name": name, "timeout": timeout }));
                print(&Api::new(&conn)?.call(Method::POST, "/v1/snapshot/restore", Some(body)).await?);
            }
            SnapshotCmd::Rm { ids, conn } => delete_each(&conn, "/v1/snapshot", ids).await?,
        }
        Ok(())
    })
}

pub fn template(cmd: TemplateCmd) -> Result<()> {
    use reqwest::Method;
    block_on(async move {
        match cmd {
            TemplateCmd::Create { name, image, username, password_stdin, disk_free_mib, conn } => {
                let credentials = match (username, password_stdin) {
                    (Some(username), true) => {
                        let mut password = String::new();
                        std::io::stdin().read_line(&mut password).context("reading the password")?;
                        json!({ "type": "basic", "username": username, "password": password.trim_end_matches(['\r', '\n']) })
                    }
                    _ => Value::Null,
                };
                let body = strip_nulls(
                    json!({ "name": name, "uri": image, "credentials": credentials, "disk_free_mib": disk_free_mib }),
                );
                let api = Api::new(&conn)?;
                let call = api.call(Method::POST, "/v1/template", Some(body));
                print(&with_progress(&api, &name, call).await?);
            }
            TemplateCmd::List { conn } => {
                let v = Api::new(&conn)?.call(Method::GET, "/v1/templates", None).await?;
                let items = v.as_ref().and_then(|v| v["items"].as_array().cloned()).unwrap_or_default();
                println!("{:<24} {:<32} {:>8} {:<20} IMAGE", "ID", "NAME", "DISK MiB", "CREATED");
                for i in items {
                    println!(
                        "{:<24} {:<32} {:>8} {:<20} {}",
                        i["id"].as_str().unwrap_or(""),
                        i["name"].as_str().unwrap_or(""),
                        i["disk"].as_u64().unwrap_or(0),
                        i["created_at"].as_str().unwrap_or("").get(..19).unwrap_or(""),
                        i["uri"].as_str().unwrap_or("")
                    );
                }
            }
            TemplateCmd::Rename { id, name, conn } => {
                Api::new(&conn)?
                    .call(Method::PATCH, &format!("/v1/template/{id}"), Some(json!({ "name": name })))
                    .await?;
                println!("renamed {id} to {name}");
            }
            TemplateCmd::Rm { ids, conn } => delete_each(&conn, "/v1/template", ids).await?,
        }
        Ok(())
    })
}

/// Awaits the upload `f`, showing on a terminal's stderr how far the server has come with
/// template `name` (its stage, layers and bytes pulled) and for how long.
async fn with_progress<T>(api: &Api, name: &str, f: impl std::future::Future<Output = T>) -> T {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return f.await;
    }
    let started = std::time::Instant::now();
    let mut f = std::pin::pin!(f);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    let mut line = String::from("starting");
    loop {
        tokio::select! {
            out = &mut f => {
                eprintln!("\r\x1b[2K{name}: done in {:.1}s", started.elapsed().as_secs_f64());
                return out;
            }
            _ = tick.tick() => {
                let path = format!("/v1/template/{}", name.replace('/', "%2F"));
                if let Ok(Some(t)) = api.call(reqwest::Method::GET, &path, None).await {
                    if let Some(p) = t.get("progress").filter(|p| p.is_object()) {
                        line = progress_line(p);
                    }
                }
                eprint!("\r\x1b[2K{name}: {line}  {:.0}s", started.elapsed().as_secs_f64());
            }
        }
    }
}

/// `pulling [#######-------------] 2/4 layers, 80/211 MiB`.
fn progress_line(p: &Value) -> String {
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    let (done, total) = (n("bytes_done"), n("bytes_total"));
    let width = 20;
    let filled = (done.min(total) * width).checked_div(total).unwrap_or(0) as usize;
    format!(
        "{} [{}{}] {}/{} layers, {}/{} MiB",
        p["stage"].as_str().unwrap_or(""),
        "#".repeat(filled),
        "-".repeat(width as usize - filled),
        n("layers_done"),
        n("layers_total"),
        done >> 20,
        total >> 20
    )
}

pub fn keys(cmd: KeysCmd) -> Result<()> {
    use reqwest::Method;
    block_on(async move {
        match cmd {
            KeysCmd::Create { name, conn } => {
                print(&Api::new(&conn)?.call(Method::POST, "/v1/keys", Some(json!({ "name": name }))).await?)
            }
            KeysCmd::List { conn } => print(&Api::new(&conn)?.call(Method::GET, "/v1/keys", None).await?),
            KeysCmd::Rm { id, conn } => {
                Api::new(&conn)?.call(Method::DELETE, &format!("/v1/keys/{id}"), None).await?;
                println!("revoked {id}");
            }
        }
        Ok(())
    })
}

fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).collect()),
        other => other,
    }
}
