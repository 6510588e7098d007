//! git in a sandbox, end to end: a real VM, and a real git server (`git http-backend` behind
//! basic authentication on the offline test internet, `cove_net::testing`). The whole cycle
//! runs through the API: clone with credentials, branch, edit, stage, diff, commit, push, pull,
//! log, show, reset, delete. The credentials must reach the git server and nothing in the
//! guest: not its files, its processes' environments, its memory, and not the server's log.

mod common;

use std::path::Path;

use base64::Engine as _;
use std::process::Command;

use common::{Api, Leftovers, TestServer};
use cove_net::testing::{Internet, ALLOWED_IP, GIT_PASSWORD, GIT_USER};
use serde_json::{json, Value};

const REMOTE: &str = "https://git.test/git/project.git";

fn host_git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Host")
        .env("GIT_AUTHOR_EMAIL", "host@test")
        .env("GIT_COMMITTER_NAME", "Host")
        .env("GIT_COMMITTER_EMAIL", "host@test")
        .output()
        .expect("git on the host");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A bare repository `project.git` on the git server with one commit on `main`, and a working
/// clone of it on the host to make upstream commits with.
fn make_remote(inet: &Internet) -> std::path::PathBuf {
    let bare = inet.git_root().join("project.git");
    let _ = std::fs::remove_dir_all(&bare);
    host_git(inet.git_root(), &["init", "-q", "--bare", "-b", "main", "project.git"]);
    let work = std::env::temp_dir().join(format!("cove-git-work-{}", common::rand_hex()));
    host_git(Path::new("/"), &["clone", "-q", bare.to_str().unwrap(), work.to_str().unwrap()]);
    std::fs::write(work.join("README"), "hello from the remote\n").unwrap();
    host_git(&work, &["add", "README"]);
    host_git(&work, &["commit", "-q", "-m", "initial"]);
    host_git(&work, &["push", "-q", "origin", "HEAD:main"]);
    work
}

async fn git(api: &Api, id: &str, op: &str, body: Value) -> Value {
    let r = api.post(&format!("/v1/sandbox/{id}/git/{op}"), body).await;
    assert_eq!(r.status, 200, "git {op}: {}", r.text());
    r.json()
}

/// A git call that must succeed: its output.
async fn git_ok(api: &Api, id: &str, op: &str, body: Value) -> String {
    let v = git(api, id, op, body).await;
    let result = if op == "commit" { &v["result"] } else { &v };
    assert_eq!(result["exit_code"], 0, "git {op}: {v}");
    result["output"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_round_trip_with_credentials_the_guest_never_sees() {
    let inet = Internet::shared();
    inet.set_record("git.test", ALLOWED_IP);
    let ca = inet.ca_path().display().to_string();
    let data = std::env::temp_dir().join(format!("cove-test-git-{}", common::rand_hex()));
    let srv = TestServer::start_with(
        data.clone(),
        &["--egress-dns", "192.88.99.53:53", "--egress-ca", &ca],
        &[("COVE_LOG", "info,cove_runner=debug,cove_net=debug,cove_server=debug")],
    );
    let api = srv.new_org(None);
    let left = Leftovers::new(&api);
    let upstream = make_remote(inet);
    let id = api.create(json!({})).await;
    left.sandbox(&id);
    let creds = json!({"username": GIT_USER, "password": GIT_PASSWORD});

    // Without credentials the server refuses, and git says so without prompting.
    let v = git(&api, &id, "clone", json!({"url": REMOTE, "path": "anon"})).await;
    assert_ne!(v["exit_code"], 0, "{v}");
    assert!(!inet.git_requests().iter().any(|r| r.authorized), "an anonymous clone was authorized");

    // With them it clones, and only requests for this repository carried them.
    let mut clone = json!({"url": REMOTE, "path": "project"});
    clone.as_object_mut().unwrap().extend(creds.as_object().unwrap().clone());
    git_ok(&api, &id, "clone", clone).await;
    let readme = api.sh_ok(&id, "cat project/README").await;
    assert_eq!(readme, "hello from the remote\n");
    let authorized: Vec<_> = inet.git_requests().into_iter().filter(|r| r.authorized).collect();
    assert!(!authorized.is_empty());
    assert!(authorized.iter().all(|r| r.path.starts_with("/project.git/")), "{authorized:?}");

    // The loan ended with the command: the proxy now refuses this host.
    let (_, out, err) = api
        .exec(
            &id,
            "curl -sS --max-time 20 -x http://10.250.0.1:15888 https://git.test/git/project.git/info/refs",
        )
        .await;
    assert!(format!("{out}{err}").contains("403"), "{out}{err}");

    // The guest holds no trace of the credentials.
    let origin = api.sh_ok(&id, "git -C project remote get-url origin").await;
    assert_eq!(origin.trim(), REMOTE);
    // (Each pattern ends in a bracket expression, so that the scan's own command line, which
    // /proc shows, does not match it.)
    let pattern = |s: &str| format!("{}[{}]", &s[..s.len() - 1], &s[s.len() - 1..]);
    let (user, password) = (pattern(GIT_USER), pattern(GIT_PASSWORD));
    let scan = format!(
        "grep -rl -e '{password}' -e '{user}' /home /root /tmp /etc /var 2>/dev/null; \
         cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | grep -c -a -e '{password}' || true"
    );
    assert_eq!(api.sh_ok(&id, &scan).await.trim(), "0", "credentials found in the guest");

    // Branch, edit, stage, diff, commit, push.
    let repo = "project";
    let branches = git_ok(&api, &id, "branches", json!({"path": repo})).await;
    assert!(branches.contains("main"), "{branches}");
    git_ok(&api, &id, "create-branch", json!({"path": repo, "name": "feature", "checkout": true})).await;
    api.sh_ok(&id, "echo 'a line from the sandbox' >> project/README && echo new > project/NEW").await;
    let status = git_ok(&api, &id, "status", json!({"path": repo})).await;
    assert!(status.contains("On branch feature") && status.contains("NEW"), "{status}");
    let unstaged = git_ok(&api, &id, "diff-unstaged", json!({"path": repo})).await;
    assert!(unstaged.contains("+a line from the sandbox"), "{unstaged}");
    git_ok(&api, &id, "add", json!({"path": repo, "files": ["README", "NEW"]})).await;
    let staged = git_ok(&api, &id, "diff-staged", json!({"path": repo, "context_lines": 0})).await;
    assert!(staged.contains("+a line from the sandbox") && staged.contains("+new"), "{staged}");
    assert_eq!(git_ok(&api, &id, "diff-unstaged", json!({"path": repo})).await, "");
    let commit = git(
        &api,
        &id,
        "commit",
        json!({"path": repo, "message": "sandbox change", "author": "Agent", "email": "agent@example.com"}),
    )
    .await;
    let sha = commit["sha"].as_str().unwrap().to_string();
    assert_eq!(sha.len(), 40, "{commit}");
    assert_eq!(api.sh_ok(&id, "git -C project rev-parse HEAD").await.trim(), sha);
    let author = api.sh_ok(&id, "git -C project log -1 --format='%an <%ae>'").await;
    assert_eq!(author.trim(), "Agent <agent@example.com>");
    let mut push = json!({"path": repo, "branch": "feature", "set_upstream": true});
    push.as_object_mut().unwrap().extend(creds.as_object().unwrap().clone());
    git_ok(&api, &id, "push", push).await;
    let bare = inet.git_root().join("project.git");
    assert_eq!(host_git(&bare, &["rev-parse", "feature"]), sha, "the push did not reach the server");

    // Pull a commit made upstream.
    std::fs::write(upstream.join("UPSTREAM"), "from upstream\n").unwrap();
    host_git(&upstream, &["add", "UPSTREAM"]);
    host_git(&upstream, &["commit", "-q", "-m", "upstream change"]);
    host_git(&upstream, &["push", "-q", "origin", "HEAD:main"]);
    git_ok(&api, &id, "checkout-branch", json!({"path": repo, "branch": "main"})).await;
    let mut pull = json!({"path": repo, "remote": "origin", "branch": "main"});
    pull.as_object_mut().unwrap().extend(creds.as_object().unwrap().clone());
    git_ok(&api, &id, "pull", pull).await;
    let log = git_ok(&api, &id, "log", json!({"path": repo, "max_count": 1})).await;
    assert!(log.contains("upstream change") && !log.contains("initial"), "{log}");
    let shown = git_ok(&api, &id, "show", json!({"path": repo, "revision": sha})).await;
    assert!(shown.contains("sandbox change") && shown.contains("+new"), "{shown}");
    let diff = git_ok(&api, &id, "diff", json!({"path": repo, "target": "feature"})).await;
    assert!(diff.contains("-a line from the sandbox"), "{diff}");

    // Reset unstages; a merged-nowhere branch needs force to go.
    api.sh_ok(&id, "echo staged > project/S").await;
    git_ok(&api, &id, "add", json!({"path": repo, "files": ["S"]})).await;
    git_ok(&api, &id, "reset", json!({"path": repo})).await;
    assert_eq!(git_ok(&api, &id, "diff-staged", json!({"path": repo})).await, "");
    git_ok(&api, &id, "create-branch", json!({"path": repo, "name": "scratch", "base_branch": "feature"}))
        .await;
    let refused = git(&api, &id, "delete-branch", json!({"path": repo, "name": "scratch"})).await;
    assert_ne!(refused["exit_code"], 0, "{refused}");
    git_ok(&api, &id, "delete-branch", json!({"path": repo, "name": "scratch", "force": true})).await;
    git_ok(&api, &id, "delete-branch", json!({"path": repo, "name": "feature"})).await;
    let left_branches = git_ok(&api, &id, "branches", json!({"path": repo, "branch_type": "all"})).await;
    assert!(!left_branches.contains(" feature") && !left_branches.contains("scratch"), "{left_branches}");
    assert!(left_branches.contains("remotes/origin/feature"), "{left_branches}");

    // Without credentials a push is refused by the server.
    let v = git(&api, &id, "push", json!({"path": repo, "branch": "main"})).await;
    assert_ne!(v["exit_code"], 0, "{v}");

    // Bad input names the field; an option cannot pass as a revision.
    let r = api
        .post(&format!("/v1/sandbox/{id}/git/show"), json!({"path": repo, "revision": "--output=/tmp/x"}))
        .await;
    common::assert_field(&r, "revision");
    let r = api.post(&format!("/v1/sandbox/{id}/git/status"), json!({"path": "/nonexistent"})).await;
    common::assert_field(&r, "path");
    let mut plain = json!({"url": "http://git.test/git/project.git", "path": "p2"});
    plain.as_object_mut().unwrap().extend(creds.as_object().unwrap().clone());
    let r = api.post(&format!("/v1/sandbox/{id}/git/clone"), plain).await;
    common::assert_field(&r, "url");

    // A policy that denies everything holds for the proxy too: nothing reaches the server.
    let before = inet.git_requests().len();
    let r = api
        .req(
            reqwest::Method::PATCH,
            &format!("/v1/sandbox/{id}/network-policy"),
            Some(json!({"mode": "deny-all"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut denied = json!({"url": REMOTE, "path": "denied"});
    denied.as_object_mut().unwrap().extend(creds.as_object().unwrap().clone());
    let v = git(&api, &id, "clone", denied).await;
    assert_ne!(v["exit_code"], 0, "{v}");
    assert_eq!(inet.git_requests().len(), before, "a denied sandbox reached the git server");

    // The guest's memory and the server's log hold no credential either.
    let marker = common::hold_marker(&api, &id).await;
    assert!(
        common::guest_memory_contains(&id, marker.as_bytes()),
        "the memory scan cannot see the guest's memory"
    );
    assert!(
        !common::guest_memory_contains(&id, GIT_PASSWORD.as_bytes()),
        "the password is in the guest's memory"
    );
    let log = common::server_log_lines(&data).join("\n");
    assert!(log.contains("credentials lent"), "the loan is not in the log");
    assert!(!log.contains(GIT_PASSWORD), "the password is in the server log");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{GIT_USER}:{GIT_PASSWORD}"));
    assert!(!log.contains(&basic), "the encoded credentials are in the server log");

    left.delete_sandbox(&id).await;
    let _ = std::fs::remove_dir_all(upstream);
}
