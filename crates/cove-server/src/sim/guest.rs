//! A simulated guest: files on a disk, processes and identity in memory, and an agent that
//! speaks the real agent's HTTP/2 protocol (`cove_proto::routes`) over an in-memory pipe, so
//! the control plane's guest calls and filesystem forwarding run unchanged.
//!
//! Commands are a tiny shell, enough for the API's semantics: `echo … [> path]`, `cat path`,
//! `printenv NAME`, `hostname`, `pwd`, `sleep secs`, `true`, `false`, `exit N`, `ps`, and
//! `name &` (a background process: it lives in memory, so it survives a pause or snapshot and
//! not a stop). git requests are recorded and succeed with no output.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cove_api::filesystem::*;
use cove_api::process::{ExecuteRequest, ExecuteResponse};
use cove_proto::routes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;

/// What a guest keeps on its disk.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Disk {
    pub files: BTreeMap<String, Vec<u8>>,
    pub dirs: BTreeSet<String>,
}

/// A guest: its disk and what lives in its memory.
#[derive(Debug, Clone, Default)]
pub struct Guest {
    pub disk: Disk,
    pub processes: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub hostname: String,
    /// Mount id → path, as the host asked.
    pub mounts: BTreeMap<String, String>,
    /// git requests received: (operation, body, through the credential proxy).
    pub git: Vec<(String, String, bool)>,
}

/// The URL every simulated repository's remote has.
pub const GIT_REMOTE: &str = "https://git.example/org/repo.git";

pub const HOME: &str = "/home/user";

impl Guest {
    /// A guest booted from a template's disk.
    pub fn booted(disk: Disk) -> Guest {
        Guest { disk, ..Guest::default() }
    }

    /// A template's disk as it comes out of the image.
    pub fn template_disk(config: &cove_proto::image::ImageConfig) -> Disk {
        let mut disk = Disk::default();
        for d in ["/", "/etc", "/home", HOME, "/tmp"] {
            disk.dirs.insert(d.to_string());
        }
        if !config.working_dir.is_empty() {
            disk.dirs.insert(config.working_dir.clone());
        }
        disk.files.insert("/etc/hostname".into(), b"sim\n".to_vec());
        disk
    }
}

pub type Shared = Arc<Mutex<Guest>>;

/// An agent session with `guest`, served in memory until `ends` is cancelled (the VM stopped
/// or ended: requests in flight then fail, as they would with a real VM).
pub async fn connect(
    guest: Shared,
    ends: tokio_util::sync::CancellationToken,
) -> Result<cove_runner::AgentClient, cove_runner::AgentError> {
    let (host_end, guest_end) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| {
            let guest = guest.clone();
            async move { Ok::<_, Infallible>(answer(&guest, req).await) }
        });
        let serve = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(guest_end), service);
        tokio::select! {
            _ = serve => {}
            _ = ends.cancelled() => {}
        }
    });
    cove_runner::AgentClient::over(host_end).await
}

type Answer = Response<Full<Bytes>>;

fn json(status: StatusCode, v: &impl Serialize) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec(v).unwrap_or_default())));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", "application/json".parse().expect("static header"));
    r
}

fn done() -> Answer {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn fail(status: StatusCode, message: impl Into<String>) -> Answer {
    json(status, &cove_proto::AgentError { message: message.into(), field: None })
}

fn lock(guest: &Shared) -> std::sync::MutexGuard<'_, Guest> {
    guest.lock().unwrap_or_else(|p| p.into_inner())
}

async fn answer(guest: &Shared, req: Request<hyper::body::Incoming>) -> Answer {
    let path = req.uri().path().to_string();
    let uri = req.uri().clone();
    let via_proxy = req.headers().contains_key(routes::GIT_VIA_PROXY);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return fail(StatusCode::BAD_REQUEST, e.to_string()),
    };
    macro_rules! parse {
        ($t:ty) => {
            match serde_json::from_slice::<$t>(&body) {
                Ok(v) => v,
                Err(e) => return fail(StatusCode::BAD_REQUEST, format!("bad request: {e}")),
            }
        };
    }
    match path.as_str() {
        routes::HEALTH => json(
            StatusCode::OK,
            &cove_proto::AgentInfo {
                protocol: cove_proto::PROTOCOL_VERSION,
                agent_version: "sim".into(),
                uptime_secs: 1.0,
            },
        ),
        routes::IDENTITY => {
            let id = parse!(cove_proto::Identity);
            let mut g = lock(guest);
            g.env = id.env;
            g.hostname = id.hostname;
            done()
        }
        routes::SYSTEM => {
            json(StatusCode::OK, &cove_proto::SystemInfo { user_home_dir: HOME.into(), workdir: HOME.into() })
        }
        routes::DETACH => done(),
        routes::EXEC => {
            let req = parse!(ExecuteRequest);
            json(StatusCode::OK, &exec(guest, &req).await)
        }
        cove_proto::fs::MOUNTS_ROUTE => {
            let m = parse!(cove_proto::fs::MountRequest);
            let mut g = lock(guest);
            g.disk.dirs.insert(m.path.clone());
            g.mounts.insert(m.id, m.path);
            done()
        }
        cove_proto::fs::UNMOUNT_ROUTE => {
            let m = parse!(cove_proto::fs::UnmountRequest);
            let mut g = lock(guest);
            if let Some(path) = g.mounts.remove(&m.id) {
                g.disk.dirs.remove(&path);
            }
            done()
        }
        p if p.starts_with(routes::GIT_PREFIX) => {
            let op = p[routes::GIT_PREFIX.len()..].to_string();
            let output = if op == "remote-url" { format!("{GIT_REMOTE}\n") } else { String::new() };
            lock(guest).git.push((op, String::from_utf8_lossy(&body).into_owned(), via_proxy));
            json(StatusCode::OK, &cove_api::git::GitResult { output, exit_code: 0 })
        }
        p => match p.strip_prefix(routes::FS_PREFIX) {
            Some("write-file") => {
                let Ok(axum::extract::Query(q)) = axum::extract::Query::<WriteFileQuery>::try_from_uri(&uri)
                else {
                    return fail(StatusCode::BAD_REQUEST, "path is required");
                };
                let mut g = lock(guest);
                let path = absolute(&q.path);
                add_parents(&mut g.disk, &path);
                g.disk.files.insert(path, body.to_vec());
                done()
            }
            Some("read-file") => {
                let r = parse!(ReadFileRequest);
                let g = lock(guest);
                match g.disk.files.get(&absolute(&r.path)) {
                    Some(bytes) => {
                        let start = (r.offset.unwrap_or(0) as usize).min(bytes.len());
                        let end = r.limit.map_or(bytes.len(), |l| (start + l as usize).min(bytes.len()));
                        let mut resp = Response::new(Full::new(Bytes::copy_from_slice(&bytes[start..end])));
                        resp.headers_mut().insert(
                            "content-type",
                            "application/octet-stream".parse().expect("static header"),
                        );
                        resp
                    }
                    None => fail(StatusCode::NOT_FOUND, format!("{}: no such file", r.path)),
                }
            }
            Some("exists") => {
                let r = parse!(ExistsRequest);
                let g = lock(guest);
                let path = absolute(&r.path);
                let exists = g.disk.files.contains_key(&path) || g.disk.dirs.contains(&path);
                json(StatusCode::OK, &ExistsResponse { exists })
            }
            Some("stat") => {
                let r = parse!(StatRequest);
                match info(&lock(guest).disk, &absolute(&r.path)) {
                    Some(i) => json(StatusCode::OK, &i),
                    None => fail(StatusCode::NOT_FOUND, format!("{}: no such file or directory", r.path)),
                }
            }
            Some("ls") => {
                let r = parse!(LsRequest);
                let g = lock(guest);
                let dir = absolute(&r.path);
                if !g.disk.dirs.contains(&dir) {
                    return fail(StatusCode::NOT_FOUND, format!("{}: no such directory", r.path));
                }
                let items = children(&g.disk, &dir).filter_map(|p| info(&g.disk, &p)).collect();
                json(StatusCode::OK, &LsResponse { items })
            }
            Some("mkdir") => {
                let r = parse!(MkdirRequest);
                let mut g = lock(guest);
                let path = absolute(&r.path);
                add_parents(&mut g.disk, &path);
                g.disk.dirs.insert(path);
                done()
            }
            Some("delete") => {
                let r = parse!(DeleteRequest);
                let mut g = lock(guest);
                let path = absolute(&r.path);
                if g.disk.files.remove(&path).is_none() && !g.disk.dirs.remove(&path) {
                    return fail(StatusCode::NOT_FOUND, format!("{}: no such file or directory", r.path));
                }
                let below = format!("{path}/");
                g.disk.files.retain(|p, _| !p.starts_with(&below));
                g.disk.dirs.retain(|p| !p.starts_with(&below));
                done()
            }
            _ => fail(StatusCode::NOT_IMPLEMENTED, format!("{p} is not simulated")),
        },
    }
}

fn absolute(path: &str) -> String {
    let p = if path.starts_with('/') { path.to_string() } else { format!("{HOME}/{path}") };
    match p.trim_end_matches('/') {
        "" => "/".into(),
        t => t.to_string(),
    }
}

fn parent(path: &str) -> Option<&str> {
    match path.rfind('/') {
        Some(0) if path.len() > 1 => Some("/"),
        Some(0) | None => None,
        Some(i) => Some(&path[..i]),
    }
}

fn add_parents(disk: &mut Disk, path: &str) {
    let mut p = parent(path);
    while let Some(d) = p {
        disk.dirs.insert(d.to_string());
        p = parent(d);
    }
}

fn children<'a>(disk: &'a Disk, dir: &'a str) -> impl Iterator<Item = String> + 'a {
    let files = disk.files.keys();
    files.chain(disk.dirs.iter()).filter(move |p| parent(p) == Some(dir)).cloned()
}

fn info(disk: &Disk, path: &str) -> Option<FileInfo> {
    let (is_dir, size) = match disk.files.get(path) {
        Some(f) => (false, f.len() as u64),
        None if disk.dirs.contains(path) => (true, 0),
        None => return None,
    };
    Some(FileInfo {
        name: path.rsplit('/').next().unwrap_or_default().to_string(),
        path: path.to_string(),
        is_dir,
        size,
        mode: if is_dir { "755" } else { "644" }.into(),
        mtime: 0,
        owner: "user".into(),
        group: "user".into(),
        is_symlink: false,
        link_target: None,
    })
}

async fn exec(guest: &Shared, req: &ExecuteRequest) -> ExecuteResponse {
    let words: Vec<&str> = req.command.split_whitespace().collect();
    let out = |code: i32, stdout: String, stderr: String| ExecuteResponse { exit_code: code, stdout, stderr };
    let Some((&name, args)) = words.split_first() else {
        return out(0, String::new(), String::new());
    };
    if name == "sleep" {
        let secs: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(0.0);
        tokio::time::sleep(std::time::Duration::from_secs_f64(secs.min(req.timeout_secs() as f64))).await;
        return out(0, String::new(), String::new());
    }
    let mut g = lock(guest);
    if args.last() == Some(&"&") {
        g.processes.push(name.to_string());
        return out(0, String::new(), String::new());
    }
    let (args, into) = match args.iter().position(|a| *a == ">") {
        Some(i) => (&args[..i], args.get(i + 1).map(|p| absolute(p))),
        None => (args, None),
    };
    let (code, stdout, stderr) = match name {
        "echo" => (0, format!("{}\n", args.join(" ")), String::new()),
        "cat" => match args.first().and_then(|p| g.disk.files.get(&absolute(p))) {
            Some(bytes) => (0, String::from_utf8_lossy(bytes).into_owned(), String::new()),
            None => (1, String::new(), format!("cat: {}: No such file or directory\n", args.join(" "))),
        },
        "printenv" => {
            let value =
                args.first().and_then(|k| req.envs.as_ref().and_then(|e| e.get(*k)).or(g.env.get(*k)));
            match value {
                Some(v) => (0, format!("{v}\n"), String::new()),
                None => (1, String::new(), String::new()),
            }
        }
        "hostname" => (0, format!("{}\n", g.hostname), String::new()),
        "pwd" => (0, format!("{}\n", req.cwd.as_deref().unwrap_or(HOME)), String::new()),
        "ps" => (0, g.processes.iter().map(|p| format!("{p}\n")).collect(), String::new()),
        "true" => (0, String::new(), String::new()),
        "false" => (1, String::new(), String::new()),
        "exit" => (args.first().and_then(|c| c.parse().ok()).unwrap_or(0), String::new(), String::new()),
        other => (127, String::new(), format!("sh: {other}: not found\n")),
    };
    match into {
        Some(path) => {
            add_parents(&mut g.disk, &path);
            g.disk.files.insert(path, stdout.into_bytes());
            out(code, String::new(), stderr)
        }
        None => out(code, stdout, stderr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_against_home_and_list_by_parent() {
        assert_eq!(absolute("a/b"), "/home/user/a/b");
        assert_eq!(absolute("/"), "/");
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/"), None);
        let mut disk = Disk::default();
        add_parents(&mut disk, "/x/y/z.txt");
        disk.files.insert("/x/y/z.txt".into(), b"hi".to_vec());
        assert!(disk.dirs.contains("/x/y") && disk.dirs.contains("/x") && disk.dirs.contains("/"));
        assert_eq!(children(&disk, "/x/y").collect::<Vec<_>>(), vec!["/x/y/z.txt".to_string()]);
    }
}
