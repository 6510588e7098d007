//! The control plane's lifecycle on a simulated host: every action end to end, then every
//! action broken at every step it takes on the host, by an error and by a crash, with the
//! restarted server's recovery checked against what the host holds. No root, no VM: these run
//! in seconds. What only a guest can show stays in the real-VM suite (`crates/cove/tests`).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::http::StatusCode;
use common::{eventually, App};
use cove_api::sandbox::SandboxState as S;
use cove_store::{Op, SnapshotQuery};
use serde_json::{json, Value};

/// Waits until `f` holds (the host's background deletes run on tasks of their own).

#[tokio::test]
async fn a_sandbox_lives_its_whole_life() {
    let app = App::new().await;
    let id = app.create(json!({"env_vars": {"GREETING": "hello"}})).await;
    assert_eq!(app.host.census().vms.get(&id), Some(&true));
    assert_eq!(app.exec(&id, "echo hi there").await, (StatusCode::OK, 0, "hi there\n".into()));
    assert_eq!(app.exec(&id, "printenv GREETING").await.2, "hello\n");
    assert_eq!(app.exec(&id, "hostname").await.2, format!("{id}\n"));
    assert_eq!(app.write(&id, "/home/user/a.txt", b"one").await, StatusCode::NO_CONTENT);
    assert_eq!(app.read(&id, "/home/user/a.txt").await, (StatusCode::OK, b"one".to_vec()));
    app.exec(&id, "worker &").await;

    // Pause: the VM is gone, its image complete; a guest call resumes it with memory intact.
    let (s, v) = app.call("POST", &format!("/v1/sandbox/{id}/pause"), "").await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::CREATED, Some("paused")));
    let census = app.host.census();
    assert!(!census.vms.contains_key(&id) && !census.disks.contains(&id), "{census:?}");
    assert_eq!(census.images.values().collect::<Vec<_>>(), vec![&true]);
    assert_eq!(app.read(&id, "a.txt").await, (StatusCode::OK, b"one".to_vec()));
    assert_eq!(app.state(&id).await.as_deref(), Some("running"));
    assert_eq!(app.exec(&id, "ps").await.2, "worker\n");
    eventually("the spent pause image is deleted", || app.host.census().images.is_empty()).await;

    // A snapshot, then a change: the restored sandbox has the snapshot's files and processes.
    let (s, v) = app.call("POST", &format!("/v1/sandbox/{id}/snapshot/create"), r#"{"name":"s1"}"#).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(app.state(&id).await.as_deref(), Some("running"));
    app.write(&id, "a.txt", b"two").await;
    let (s, v) = app.call("POST", "/v1/snapshot/restore", r#"{"snapshot_name":"s1"}"#).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let copy = v["id"].as_str().unwrap().to_string();
    assert_ne!(copy, id);
    assert_eq!(app.read(&copy, "a.txt").await.1, b"one");
    assert_eq!(app.exec(&copy, "ps").await.2, "worker\n");
    assert_eq!(app.exec(&copy, "hostname").await.2, format!("{copy}\n"));

    // Stop keeps the disk only; start boots afresh on it.
    let (s, v) = app.call("POST", &format!("/v1/sandbox/{id}/stop"), "").await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("stopped")));
    assert!(app.host.census().disks.contains(&id));
    let (s, v) =
        app.call("POST", &format!("/v1/sandbox/{id}/process/execute"), r#"{"command":"true"}"#).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["message"].as_str().unwrap().contains("stopped"), "{v}");
    let (s, _) = app.call("POST", &format!("/v1/sandbox/{id}/start"), "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(app.read(&id, "a.txt").await.1, b"two");
    assert_eq!(app.exec(&id, "ps").await.2, "");

    // Deletes leave nothing on the host.
    for sandbox in [&id, &copy] {
        let (s, _) = app.call("DELETE", &format!("/v1/sandbox/{sandbox}"), "").await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        assert_eq!(app.state(sandbox).await, None);
    }
    let snapshot = app.store.snapshot(&org(&app), "s1").unwrap().unwrap();
    let (s, _) = app.call("DELETE", &format!("/v1/snapshot/{}", snapshot.id), "").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(app.host.census(), Default::default());

    // The metrics saw it all: one pause by the API, one resume by a guest call (none by the
    // API), and no sandbox left.
    let metrics = cove_server::metrics::router(app.core.clone());
    let (s, text) = common::request(&metrics, "", "GET", "/metrics", "text/plain", Vec::new()).await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(text).unwrap();
    for line in [
        r#"cove_sandbox_operation_seconds_count{operation="pause",outcome="ok"} 1"#,
        r#"cove_sandbox_operation_seconds_count{operation="resume",outcome="ok"} 1"#,
        r#"cove_http_request_duration_seconds_count{method="POST",route="/v1/sandbox/{sandboxID}/pause",status="201"} 1"#,
        r#"cove_http_request_duration_seconds_count{method="POST",route="/v1/sandbox/{sandboxID}/start",status="200"} 1"#,
        r#"cove_sandboxes{state="running"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    assert!(!text.contains(r#"route="/v1/sandbox/{sandboxID}/resume""#), "{text}");
}

fn org(app: &App) -> String {
    app.store.authenticate(&app.key).unwrap().unwrap()
}

/// A lifecycle action, with what it needs done first.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Case {
    Create,
    Pause,
    Resume,
    Snapshot,
    SnapshotAndKill,
    Restore,
    Stop,
    Start,
    Delete,
    DeletePaused,
}

const CASES: [Case; 10] = [
    Case::Create,
    Case::Pause,
    Case::Resume,
    Case::Snapshot,
    Case::SnapshotAndKill,
    Case::Restore,
    Case::Stop,
    Case::Start,
    Case::Delete,
    Case::DeletePaused,
];

/// The sandbox a case acts on (none for a create), made with a file and a process in it.
async fn prepare(app: &App, case: Case) -> Option<String> {
    if case == Case::Create {
        return None;
    }
    let id = app.create(json!({})).await;
    app.write(&id, "kept.txt", b"kept").await;
    app.exec(&id, "worker &").await;
    let then = |path: &str| format!("/v1/sandbox/{id}/{path}");
    match case {
        Case::Resume | Case::DeletePaused => {
            assert!(app.call("POST", &then("pause"), "").await.0.is_success())
        }
        Case::Start => assert!(app.call("POST", &then("stop"), "").await.0.is_success()),
        Case::Restore => {
            let (s, _) = app.call("POST", &then("snapshot/create"), r#"{"name":"base"}"#).await;
            assert!(s.is_success());
        }
        _ => {}
    }
    // Let background deletes finish before the action's steps are recorded.
    tokio::time::sleep(Duration::from_millis(10)).await;
    app.host.passed();
    Some(id)
}

/// Runs the case's action; its status and body.
async fn act(app: &App, case: Case, id: Option<&str>) -> (StatusCode, Value) {
    let on = |path: &str| format!("/v1/sandbox/{}/{path}", id.unwrap_or_default());
    match case {
        Case::Create => {
            app.call("POST", "/v1/sandbox", r#"{"template_name":"system/debian:bookworm"}"#).await
        }
        Case::Pause => app.call("POST", &on("pause"), "").await,
        Case::Resume => app.call("POST", &on("resume"), "").await,
        Case::Snapshot => app.call("POST", &on("snapshot/create"), r#"{"name":"snap"}"#).await,
        Case::SnapshotAndKill => {
            app.call("POST", &on("snapshot/create"), r#"{"name":"snap","kill_sandbox_after":true}"#).await
        }
        Case::Restore => app.call("POST", "/v1/snapshot/restore", r#"{"snapshot_name":"base"}"#).await,
        Case::Stop => app.call("POST", &on("stop"), "").await,
        Case::Start => app.call("POST", &on("start"), "").await,
        Case::Delete | Case::DeletePaused => {
            app.call("DELETE", &format!("/v1/sandbox/{}", id.unwrap_or_default()), "").await
        }
    }
}

/// The host points a case passes when nothing goes wrong.
async fn steps(case: Case) -> Vec<String> {
    let app = App::new().await;
    let id = prepare(&app, case).await;
    let (s, v) = act(&app, case, id.as_deref()).await;
    assert!(s.is_success(), "{case:?}: {s} {v}");
    tokio::time::sleep(Duration::from_millis(10)).await;
    let steps = app.host.passed();
    assert!(!steps.is_empty(), "{case:?} took no step on the host");
    steps
}

/// Store and host agree, and every sandbox does what its state promises: a running one runs
/// commands and has its files, a paused one resumes, a stopped one starts; nothing on the
/// host belongs to no record. Images nobody refers to are garbage that the next recovery
/// removes: with `garbage_ok` they may remain.
async fn check_consistent(app: &App, context: &str, garbage_ok: bool) {
    let org = org(app);
    let records = app.store.sandboxes_on_runner("local").unwrap();
    let all =
        SnapshotQuery { name: None, sort_by_template: false, descending: false, page: 1, page_size: 100 };
    let snapshots = app.store.list_snapshots(&org, &all).unwrap().0;
    assert_eq!(app.store.unsettled_snapshots().unwrap().len(), 0, "{context}: a snapshot left unsettled");
    let snapshot_images: BTreeSet<String> = snapshots.iter().map(|s| s.image.clone()).collect();
    // Spent images are deleted in the background.
    eventually(&format!("{context}: images are those referenced"), || {
        let records = app.store.sandboxes_on_runner("local").unwrap();
        let referenced: BTreeSet<String> =
            records.iter().filter_map(|r| r.image.clone()).chain(snapshot_images.iter().cloned()).collect();
        let stored: BTreeSet<String> = app.host.census().images.keys().cloned().collect();
        if garbage_ok {
            stored.is_superset(&referenced)
        } else {
            stored == referenced
        }
    })
    .await;
    let census = app.host.census();
    for r in &records {
        match r.state {
            S::Running => assert_eq!(census.vms.get(&r.id), Some(&true), "{context}: {} running", r.id),
            S::Paused => {
                assert!(!census.vms.contains_key(&r.id), "{context}: {} paused with a VM", r.id);
                assert_eq!(
                    census.images.get(r.image.as_ref().unwrap()),
                    Some(&true),
                    "{context}: paused image"
                );
            }
            S::Stopped => {
                assert!(!census.vms.contains_key(&r.id), "{context}: {} stopped with a VM", r.id);
                assert!(census.disks.contains(&r.id), "{context}: {} stopped without a disk", r.id);
            }
            other => panic!("{context}: {} left {other} ({:?})", r.id, r.op),
        }
    }
    let known: BTreeSet<&String> = records.iter().map(|r| &r.id).collect();
    for id in census.vms.keys().chain(census.disks.iter()) {
        assert!(known.contains(id), "{context}: {id} is on the host without a record: {census:?}");
    }
    for s in &snapshots {
        assert_eq!(
            census.images.get(&s.image),
            Some(&true),
            "{context}: snapshot {} without its image",
            s.name
        );
    }
    for r in &records {
        let then = |path: &str| format!("/v1/sandbox/{}/{path}", r.id);
        if r.state == S::Stopped {
            assert!(app.call("POST", &then("start"), "").await.0.is_success(), "{context}: start");
        }
        // A paused one resumes on this call.
        let (s, body) = app.read(&r.id, "kept.txt").await;
        assert_eq!((s, body.as_slice()), (StatusCode::OK, b"kept".as_slice()), "{context}: {} files", r.id);
    }
}

/// No client-visible message names a host path, QEMU or the error chain behind it.
fn check_message(v: &Value, context: &str) {
    let text = v.to_string();
    for leak in ["/var/lib", "QEMU", "qemu"] {
        assert!(!text.contains(leak), "{context}: answer leaks {leak:?}: {text}");
    }
}

#[tokio::test]
async fn a_host_error_at_any_step_leaves_a_consistent_sandbox() {
    let mut tried = 0;
    for case in CASES {
        for point in steps(case).await {
            // A host reports an error only with nothing done (a capture: with the VM running
            // on); once a step's effect is in place only a crash can stop it (next test).
            if point.ends_with(".done") || point.ends_with(".started") || point == "capture.stored" {
                continue;
            }
            let context = format!("{case:?} failing at {point}");
            let app = App::new().await;
            let id = prepare(&app, case).await;
            app.host.fail_at(&point);
            let (s, v) = act(&app, case, id.as_deref()).await;
            check_message(&v, &context);
            if !s.is_success() {
                assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{context}: {s} {v}");
            }
            // A delete that failed is left `deleting`, and a second one finishes it.
            if let Some(id) = &id {
                if app.state(id).await.as_deref() == Some("deleting") {
                    let (s, v) = app.call("DELETE", &format!("/v1/sandbox/{id}"), "").await;
                    assert_eq!(s, StatusCode::NO_CONTENT, "{context}: delete again: {v}");
                }
            }
            check_consistent(&app, &context, true).await;
            let next = app.restarted().await;
            next.core.recover().await.unwrap_or_else(|e| panic!("{context}: recovery: {e}"));
            check_consistent(&next, &format!("{context}, then restarted"), false).await;
            tried += 1;
        }
    }
    eprintln!("{tried} host errors tried");
    assert!(tried >= 16, "only {tried} host errors tried");
}

/// What a recovery starts from: the state and operation in flight, whether the capture's
/// image was complete, whether the VM is there.
fn row(app: &App, rec: &cove_store::SandboxRecord) -> String {
    let op = match &rec.op {
        None => "none".to_string(),
        Some(Op::Pause { image }) | Some(Op::Snapshot { image, .. }) => {
            let complete = app.host.census().images.get(image) == Some(&true);
            let kind = if matches!(rec.op, Some(Op::Pause { .. })) { "pause" } else { "snapshot" };
            let kill = matches!(rec.op, Some(Op::Snapshot { kill_after: true, .. }));
            format!(
                "{kind}{} image {}",
                if kill { "+kill" } else { "" },
                if complete { "complete" } else { "partial" }
            )
        }
        Some(op) => format!("{op:?}").split([' ', '{']).next().unwrap_or_default().to_lowercase(),
    };
    let vm = match app.host.census().vms.get(&rec.id) {
        Some(true) => "vm",
        Some(false) => "stopped vm",
        None => "no vm",
    };
    format!("{} {op} ({vm})", rec.state)
}

#[tokio::test]
async fn a_crash_at_any_step_is_recovered_by_the_next_server() {
    let mut rows = BTreeSet::new();
    for power_lost in [false, true] {
        for case in CASES {
            for point in steps(case).await {
                let context =
                    format!("{case:?} crashing at {point}{}", if power_lost { ", power lost" } else { "" });
                let app = App::new().await;
                let id = prepare(&app, case).await;
                let reached = app.host.crash_at(&point);
                let task = {
                    let app = app.clone();
                    tokio::spawn(async move { act(&app, case, id.as_deref()).await })
                };
                if tokio::time::timeout(Duration::from_secs(5), reached.notified()).await.is_err() {
                    panic!("{context}: the point was not reached");
                }
                task.abort();
                let _ = task.await;
                if power_lost {
                    app.host.power_cycle();
                }
                for rec in app.store.sandboxes_on_runner("local").unwrap() {
                    rows.insert(row(&app, &rec));
                }
                let next = app.restarted().await;
                next.core.recover().await.unwrap_or_else(|e| panic!("{context}: recovery: {e}"));
                check_consistent(&next, &context, false).await;
            }
        }
    }
    // Every row of the recovery plan was met on the way, with each fact the host can report:
    // the VM running, there but stopped (mid-capture, or not yet answering), or gone.
    let (all, there, gone) =
        (&["vm", "stopped vm", "no vm"][..], &["vm", "no vm"][..], &["stopped vm", "no vm"][..]);
    let expected: BTreeSet<String> = [
        ("deleting none", there),
        ("running none", there),
        ("stopping stop", there),
        ("unpausing resume", all),
        ("starting create", all),
        ("starting restore", all),
        ("starting start", all),
        ("snapshotting pause image partial", all),
        ("snapshotting pause image complete", gone),
        ("snapshotting snapshot image partial", all),
        ("snapshotting snapshot image complete", all),
        ("snapshotting snapshot+kill image partial", all),
        ("snapshotting snapshot+kill image complete", gone),
    ]
    .iter()
    .flat_map(|(row, facts)| facts.iter().map(move |f| format!("{row} ({f})")))
    .collect();
    assert_eq!(rows, expected, "the rows crashes left sandboxes in");
}

/// Guest calls racing pauses: each call waits for a pause in progress and resumes the sandbox;
/// none fails.
#[tokio::test]
async fn guest_calls_racing_pauses_all_succeed() {
    let app = App::new().await;
    let id = app.create(json!({})).await;
    app.write(&id, "kept.txt", b"kept").await;
    let pauses = {
        let (app, id) = (app.clone(), id.clone());
        tokio::spawn(async move {
            let mut paused = 0;
            while paused < 50 {
                let (s, v) = app.call("POST", &format!("/v1/sandbox/{id}/pause"), "").await;
                match s {
                    StatusCode::CREATED => paused += 1,
                    // Already paused, and no client call has resumed it yet.
                    StatusCode::CONFLICT => {
                        app.call("POST", &format!("/v1/sandbox/{id}/resume"), "").await;
                    }
                    other => panic!("pause: {other} {v}"),
                }
            }
        })
    };
    let clients: Vec<_> = (0..2)
        .map(|n| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move {
                let mut calls = 0;
                while calls < 200 {
                    if n == 0 {
                        assert_eq!(app.exec(&id, "echo ok").await, (StatusCode::OK, 0, "ok\n".into()));
                    } else {
                        assert_eq!(app.read(&id, "kept.txt").await, (StatusCode::OK, b"kept".to_vec()));
                    }
                    calls += 1;
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    pauses.await.unwrap();
    check_consistent(&app, "after the race", false).await;
}

#[tokio::test]
async fn mounts_and_policies_reach_the_host_and_their_secrets_only_the_host() {
    let app = App::new().await;
    let id = app.create(json!({})).await;
    let mount = json!({"type": "object-storage", "bucket": "bkt", "mount_path": "/data",
        "endpoint": "http://s3.test", "access_key_id": "AKID-PLAIN", "secret_access_key": "SK-PLAIN"});
    let (s, v) = app.call("POST", &format!("/v1/sandbox/{id}/mounts"), &mount.to_string()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let mount_id = v["id"].as_str().unwrap().to_string();
    assert_eq!(app.host.guest(&id).unwrap().mounts.get(&mount_id).map(String::as_str), Some("/data"));
    let policy = json!({"mode": "custom", "allow_domains": ["api.example.com"],
        "transforms": [{"domain": "api.example.com", "inject_headers": {"Authorization": "Bearer HDR-PLAIN"}}]});
    let (s, v) = app.call("PATCH", &format!("/v1/sandbox/{id}/network-policy"), &policy.to_string()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The host has them in plain; no answer, and not the store, has them so.
    let on_host = app.host.policy(&id).unwrap().unwrap();
    assert_eq!(on_host.transforms[0].inject_headers["Authorization"], "Bearer HDR-PLAIN");
    let (_, listed) = app.call("GET", &format!("/v1/sandbox/{id}"), "").await;
    let stored = format!("{:?}", app.store.sandbox(&org(&app), &id).unwrap().unwrap());
    for plain in ["AKID-PLAIN", "SK-PLAIN", "HDR-PLAIN"] {
        assert!(!listed.to_string().contains(plain) && !v.to_string().contains(plain), "{plain} answered");
        assert!(!stored.contains(plain), "{plain} stored in plain");
    }
    // Paused and resumed, the guest has its mount again, the host its policy.
    assert!(app.call("POST", &format!("/v1/sandbox/{id}/pause"), "").await.0.is_success());
    assert!(app.call("POST", &format!("/v1/sandbox/{id}/resume"), "").await.0.is_success());
    assert!(app.host.guest(&id).unwrap().mounts.contains_key(&mount_id));
    assert_eq!(app.host.policy(&id).unwrap(), Some(on_host));
    let (s, _) = app.call("DELETE", &format!("/v1/sandbox/{id}/mounts/{mount_id}"), "").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(app.host.guest(&id).unwrap().mounts.is_empty());
    // git credentials: lent to the host for the one command (for a push, to the URL the
    // guest's remote has), never sent to the guest, returned when git is done.
    let clone = json!({"url": "https://git.example/org/repo.git", "path": "repo", "username": "u",
        "password": "GIT-PLAIN"});
    let (s, v) = app.call("POST", &format!("/v1/sandbox/{id}/git/clone"), &clone.to_string()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let push = json!({"path": "repo", "password": "GIT-PLAIN"});
    let (s, v) = app.call("POST", &format!("/v1/sandbox/{id}/git/push"), &push.to_string()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = app.call("POST", &format!("/v1/sandbox/{id}/git/status"), r#"{"path":"repo"}"#).await;
    assert_eq!(s, StatusCode::OK);
    let repo = (id.clone(), "git.example:443/org/repo.git/".to_string());
    assert_eq!(app.host.lent(), [repo.clone(), repo]);
    assert!(app.host.loans().is_empty(), "a loan outlived its command");
    let calls = app.host.guest(&id).unwrap().git;
    let ops: Vec<(&str, bool)> = calls.iter().map(|(op, _, proxy)| (op.as_str(), *proxy)).collect();
    assert_eq!(ops, [("clone", true), ("remote-url", false), ("push", true), ("status", false)]);
    assert!(
        calls.iter().all(|(_, body, _)| !body.contains("GIT-PLAIN") && !body.contains("\"u\"")),
        "{calls:?}"
    );
    // A host that cannot apply a policy: 503, the old one stays.
    app.host.fail_at("set_network_policy");
    let (s, v) =
        app.call("PATCH", &format!("/v1/sandbox/{id}/network-policy"), r#"{"mode":"deny-all"}"#).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    check_message(&v, "policy");
    let (_, v) = app.call("GET", &format!("/v1/sandbox/{id}"), "").await;
    assert_eq!(v["network_policy"]["mode"], "custom");
}

#[tokio::test]
async fn ssh_accesses_open_their_sandbox_until_regenerated_revoked_or_deleted() {
    let app = App::new().await;
    let id = app.create(json!({})).await;
    let (s, a) = app.call("POST", &format!("/v1/sandbox/{id}/ssh/access"), "").await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    let (user, password) =
        (a["id"].as_str().unwrap().to_string(), a["password"].as_str().unwrap().to_string());
    assert_eq!(a["ssh_command"], format!("ssh -p 2222 {user}@ssh.test"));
    let expires = chrono::DateTime::parse_from_rfc3339(a["expires_at"].as_str().unwrap()).unwrap();
    let created = chrono::DateTime::parse_from_rfc3339(a["created_at"].as_str().unwrap()).unwrap();
    assert_eq!((expires - created).num_seconds(), cove_api::ssh::ACCESS_LIFETIME_SECS);
    let org = org(&app);
    assert_eq!(app.core.ssh_login(&user, &password), Some((org.clone(), id.clone())));
    assert_eq!(app.core.ssh_login(&user, "wrong"), None);
    assert_eq!(app.core.ssh_login("sshnobody", &password), None);
    // Only a hash is kept.
    let dump = format!("{:?}", app.store.ssh_access(&org, &id, &user, "").unwrap());
    assert!(!dump.contains(&password), "{dump}");
    // An empty password is refused with its field.
    let (s, _) =
        app.call("POST", &format!("/v1/sandbox/{id}/ssh/{user}/validate"), r#"{"password":""}"#).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Regenerated: the old password no longer opens it.
    let (s, b) = app.call("POST", &format!("/v1/sandbox/{id}/ssh/{user}/regen"), "").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let renewed = b["password"].as_str().unwrap().to_string();
    assert_eq!(app.core.ssh_login(&user, &password), None);
    assert!(app.core.ssh_login(&user, &renewed).is_some());
    // A second access, then the sandbox goes: so do its accesses.
    let (_, second) = app.call("POST", &format!("/v1/sandbox/{id}/ssh/access"), "").await;
    let (s, _) = app.call("DELETE", &format!("/v1/sandbox/{id}/ssh/{user}"), "").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(app.core.ssh_login(&user, &renewed), None);
    let (s, _) = app.call("DELETE", &format!("/v1/sandbox/{id}/ssh/{user}"), "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (second_user, second_pw) = (second["id"].as_str().unwrap(), second["password"].as_str().unwrap());
    assert!(app.core.ssh_login(second_user, second_pw).is_some());
    assert!(app.call("DELETE", &format!("/v1/sandbox/{id}"), "").await.0.is_success());
    eventually("the sandbox is gone", || app.store.sandbox(&org, &id).unwrap().is_none()).await;
    assert_eq!(app.core.ssh_login(second_user, second_pw), None);
    let (s, _) = app.call("POST", "/v1/sandbox/sbx-none/ssh/access", "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn timeouts_pause_or_delete_and_conflicts_name_the_state() {
    let app = App::new().await;
    let keep = app.create(json!({"auto_pause": true})).await;
    let gone = app.create(json!({})).await;
    for id in [&keep, &gone] {
        let past = cove_store::Change::to(S::Running).timeout_at(0);
        app.store.update(id, &[S::Running], past).unwrap();
    }
    app.core.expire().await;
    let mut states = (None, None);
    for _ in 0..200 {
        states = (app.state(&keep).await, app.state(&gone).await);
        if states == (Some("paused".into()), None) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(states, (Some("paused".into()), None));
    for (action, wanted) in [("pause", "running"), ("stop", "running"), ("start", "stopped")] {
        let (s, v) = app.call("POST", &format!("/v1/sandbox/{keep}/{action}"), "").await;
        assert_eq!(s, StatusCode::CONFLICT, "{action}: {v}");
        let message = v["message"].as_str().unwrap();
        assert!(message.contains("paused") && message.contains(wanted), "{action}: {message}");
    }
    // The organization's limit counts sandboxes holding a VM (8 here), not paused ones.
    for _ in 0..8 {
        app.create(json!({})).await;
    }
    // The contract answers a create over the limit with 409, a resume or start with 429.
    let (s, v) = app.call("POST", "/v1/sandbox", r#"{"template_name":"system/debian:bookworm"}"#).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["message"].as_str().unwrap().contains("limit"), "{v}");
    let (s, v) = app.call("POST", &format!("/v1/sandbox/{keep}/resume"), "").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(app.state(&keep).await.as_deref(), Some("paused"));
    let (_, v) = app.call("GET", "/v1/sandboxes?state=running", "").await;
    let running = v["items"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(app.call("DELETE", &format!("/v1/sandbox/{running}"), "").await.0, StatusCode::NO_CONTENT);
    let (s, v) = app.call("POST", &format!("/v1/sandbox/{keep}/resume"), "").await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("running")), "{v}");
}

/// A host takes sandboxes up to the memory it offers, the one being placed counted once: its
/// own record (made before it is placed) is not also counted as load beside it.
#[tokio::test]
async fn a_host_takes_sandboxes_up_to_the_memory_it_offers() {
    let host = cove_server::sim::SimHost::new();
    host.set_info(cove_runner::HostInfo {
        vcpus: 4,
        memory_mib: 2048,
        compat: "sim".into(),
        ..cove_runner::HostInfo::default()
    });
    let app = App::with_host(host).await;
    let first = app.create(json!({"memory": 1024})).await;
    app.create(json!({"memory": 1024})).await;
    let full = r#"{"template_name":"system/debian:bookworm","memory":1024}"#;
    let (s, v) = app.call("POST", "/v1/sandbox", full).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["message"].as_str().unwrap().contains("no runner has room"), "{v}");
    // A paused sandbox holds no memory: room for another, and its own resume then finds none.
    assert!(app.call("POST", &format!("/v1/sandbox/{first}/pause"), "").await.0.is_success());
    app.create(json!({"memory": 1024})).await;
    let (s, v) = app.call("POST", &format!("/v1/sandbox/{first}/resume"), "").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(app.state(&first).await.as_deref(), Some("paused"));
}

#[tokio::test]
async fn templates_are_built_used_and_removed_and_a_crash_mid_build_leaves_nothing() {
    let app = App::new().await;
    let (s, v) = app.call("POST", "/v1/template", r#"{"name":"mine","uri":"registry.test/app:1"}"#).await;
    assert!(s.is_success(), "{s} {v}");
    let template = v["id"].as_str().unwrap().to_string();
    let (_, v) = app.call("GET", "/v1/templates", "").await;
    let names: Vec<&str> = v["items"].as_array().unwrap().iter().filter_map(|t| t["name"].as_str()).collect();
    assert!(names.contains(&"mine"), "{v}");
    let id = app.create(json!({"template_name": "mine"})).await;
    assert_eq!(app.exec(&id, "echo from mine").await.2, "from mine\n");
    let (s, v) = app.call("DELETE", &format!("/v1/template/{template}"), "").await;
    assert_eq!(s, StatusCode::CONFLICT, "in use: {v}");
    assert_eq!(app.call("DELETE", &format!("/v1/sandbox/{id}"), "").await.0, StatusCode::NO_CONTENT);
    assert_eq!(app.call("DELETE", &format!("/v1/template/{template}"), "").await.0, StatusCode::NO_CONTENT);
    use cove_runner::SandboxHost;
    assert_eq!(app.host.template_disk_mib(&template), None);

    // An image that is not there: 400 on `uri`, nothing kept.
    let (s, v) = app.call("POST", "/v1/template", r#"{"name":"nope","uri":"registry.test/missing:1"}"#).await;
    assert_eq!((s, v["errors"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("uri")), "{v}");

    // A crash after the image is converted: the next server removes the half-made template.
    for point in ["build_template.done", "prepare_template"] {
        let reached = app.host.crash_at(point);
        let task = {
            let app = app.clone();
            tokio::spawn(async move {
                app.call("POST", "/v1/template", r#"{"name":"half","uri":"r.test/a:1"}"#).await
            })
        };
        tokio::time::timeout(Duration::from_secs(5), reached.notified()).await.unwrap();
        task.abort();
        let half =
            app.store.list_templates(&org(&app)).unwrap().into_iter().find(|t| t.name == "half").unwrap();
        assert!(app.host.template_disk_mib(&half.id).is_some(), "{point}: the build got as far as the disk");
        let next = app.restarted().await;
        next.core.recover().await.unwrap();
        assert!(next.store.list_templates(&org(&next)).unwrap().is_empty(), "{point}");
        assert_eq!(next.host.template_disk_mib(&half.id), None, "{point}");
    }
}
