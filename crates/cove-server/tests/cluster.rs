//! Several runners behind one control plane, on simulated machines that share an image store:
//! registration and leases through the API, placement, a paused sandbox resumed on another
//! runner, a lost runner's sandboxes, a runner that comes back, a control-plane restart.
//! The same with real VMs on runners in their own network namespaces is
//! `crates/cove/tests/cluster.rs`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{eventually, App, SYSTEM};
use cove_runner::remote::lease;
use cove_runner::HostInfo;
use cove_server::cluster::Cluster;
use cove_server::sim::SimHost;
use cove_server::{router, Core, CoreConfig};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

const TOKEN: &str = "cluster-token-for-tests";
const LEASE: Duration = Duration::from_millis(600);

/// The runners' machines, by fingerprint letter; the control plane "connects" to a registered
/// runner by finding its machine here (through the wire with `COVE_TEST_HOST=remote`).
type Machines = Arc<Mutex<HashMap<String, Arc<SimHost>>>>;

struct Plane {
    app: App,
    cluster: Arc<Cluster>,
    /// Connections made to registered runners.
    connects: Arc<std::sync::atomic::AtomicUsize>,
}

fn fingerprint(letter: char) -> String {
    letter.to_string().repeat(64)
}

fn runner_id(letter: char) -> String {
    cove_server::cluster::runner_id(&fingerprint(letter))
}

async fn plane(store: Arc<cove_store::Store>, key: &str, machines: &Machines) -> Plane {
    let mut cfg = CoreConfig::local(8);
    cfg.runner_id = String::new();
    cfg.cluster_token = Some(TOKEN.into());
    let cluster = Cluster::new(store.clone());
    cluster.set_lease(LEASE);
    let core = Arc::new(Core::clustered(
        store.clone(),
        cluster.clone(),
        cfg,
        cove_store::sealed::Sealer::ephemeral(),
    ));
    core.serve_metadata();
    core.watch_host_restarts();
    core.recover().await.unwrap();
    let machines = machines.clone();
    let connects = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connects.clone();
    cluster.watch(Arc::new(move |r: cove_store::RunnerRecord| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let host = machines.lock().unwrap().get(&r.lease.fingerprint).cloned();
        Box::pin(async move {
            let host = host.ok_or_else(|| cove_runner::RunnerError::Network("no such machine".into()))?;
            Ok(common::seam(host).await)
        })
    }));
    let app =
        App { router: router(core.clone()), core, host: Arc::new(SimHost::new()), store, key: key.into() };
    Plane { app, cluster, connects }
}

/// Renews runner `letter`'s lease through the API; the answer's status.
async fn renew(app: &App, letter: char, signed_with: &str) -> (StatusCode, Value) {
    renew_from(app, letter, signed_with, 8081, &[]).await
}

/// As `renew`, the runner listening on `port` and holding the template versions `templates`
/// (none listed: it is asked about each image).
async fn renew_from(
    app: &App,
    letter: char,
    signed_with: &str,
    port: u16,
    templates: &[&str],
) -> (StatusCode, Value) {
    let body = json!({
        "id": runner_id(letter),
        "address": format!("192.88.99.{}:{port}", letter as u8),
        "fingerprint": fingerprint(letter),
        "vcpus": 4,
        "memory_mib": 8192,
        "compat": "sim",
        "templates": templates,
    })
    .to_string();
    let req = Request::builder()
        .method("POST")
        .uri(lease::PATH)
        .header("content-type", "application/json")
        .header("authorization", lease::sign(signed_with, cove_store::now_ms(), body.as_bytes()))
        .body(Body::from(body))
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Renews the leases of `letters` every 100 ms until dropped.
fn keep_renewing(app: &App, letters: &'static [char]) -> tokio::task::JoinHandle<()> {
    let app = app.clone();
    tokio::spawn(async move {
        loop {
            for l in letters {
                renew(&app, *l, TOKEN).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

async fn succeeds(app: &App, method: &str, path: &str) {
    let (s, v) = app.call(method, path, "").await;
    assert!(s.is_success(), "{method} {path}: {s} {v}");
}

/// Renews both runners' leases from now on (until [`stop`]); answers once both have joined.
async fn both_joined(p: &Plane) -> tokio::task::JoinHandle<()> {
    let renewing = keep_renewing(&p.app, &['a', 'b']);
    eventually("both runners to join", || p.cluster.members().len() == 2).await;
    renewing
}

async fn stop(renewing: tokio::task::JoinHandle<()>) {
    renewing.abort();
    let _ = renewing.await;
}

fn placed_on(app: &App, id: &str) -> String {
    app.store.sandbox_by_id(id).unwrap().unwrap().runner_id
}

fn machine(info_mib: u64, compat: &str, template_from: Option<&SimHost>) -> Arc<SimHost> {
    let m = match template_from {
        Some(other) => other.beside(),
        None => SimHost::new(),
    };
    m.set_info(HostInfo { vcpus: 4, memory_mib: info_mib, compat: compat.into(), ..HostInfo::default() });
    Arc::new(m)
}

async fn setup(a_mib: u64, b_mib: u64, b_compat: &str) -> (Plane, Machines, Arc<SimHost>, Arc<SimHost>) {
    let store = Arc::new(cove_store::testing::store());
    let org = store.create_org("test", None).unwrap();
    let key = cove_store::generate_key();
    store.add_key(&org.id, "test", &key).unwrap();
    let a = machine(a_mib, "sim", None);
    let b = machine(b_mib, b_compat, Some(&a));
    let machines: Machines = Arc::default();
    machines.lock().unwrap().insert(fingerprint('a'), a.clone());
    machines.lock().unwrap().insert(fingerprint('b'), b.clone());
    let p = plane(store, &key, &machines).await;
    (p, machines, a, b)
}

#[tokio::test]
async fn runners_register_with_a_signed_lease() {
    let (p, _, _, _) = setup(4096, 4096, "sim").await;
    let app = &p.app;
    // No runner yet: a create has nowhere to go.
    let (s, v) = app.call("POST", "/v1/sandbox", &json!({"template_name": SYSTEM}).to_string()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["message"].as_str().unwrap().contains("no runner"), "{v}");

    assert_eq!(renew(app, 'a', "not-the-token").await.0, StatusCode::UNAUTHORIZED);
    let mut bad = json!({"id": "runner-x", "address": "h:1", "fingerprint": fingerprint('a'), "vcpus": 1,
        "memory_mib": 1, "compat": ""})
    .to_string();
    let req = Request::builder()
        .method("POST")
        .uri(lease::PATH)
        .header("authorization", lease::sign(TOKEN, cove_store::now_ms(), bad.as_bytes()))
        .body(Body::from(std::mem::take(&mut bad)))
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(v.to_string().contains("\"id\""), "{v}");
    assert!(p.cluster.members().is_empty());

    let (s, v) = renew(app, 'a', TOKEN).await;
    assert_eq!((s, v["lease_ms"].as_u64()), (StatusCode::OK, Some(LEASE.as_millis() as u64)));
    eventually("runner a to join", || p.cluster.member(&runner_id('a')).is_some()).await;
    let id = app.create(json!({})).await;
    assert_eq!(placed_on(app, &id), runner_id('a'));

    // Renewals from where it was reached change nothing; one from elsewhere (restarted on
    // another port) is connected to again.
    let connects = || p.connects.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(renew(app, 'a', TOKEN).await.0, StatusCode::OK);
    tokio::time::sleep(LEASE).await;
    assert_eq!(connects(), 1);
    assert_eq!(renew_from(app, 'a', TOKEN, 9091, &[]).await.0, StatusCode::OK);
    eventually("runner a to be reached at its new address", || connects() == 2).await;
    assert_eq!(app.exec(&id, "true").await.0, StatusCode::OK);
}

/// Creates land on the runner with the most free memory; a paused sandbox resumes where it
/// was while that runner has room, and on the other one when it is gone, its memory and
/// files intact; the gone runner's running sandboxes are lost (never made again elsewhere);
/// when it comes back they run on, and nothing runs twice.
#[tokio::test]
async fn placement_loss_and_resume_on_another_runner() {
    let (p, _, a, b) = setup(3072, 5120, "sim").await;
    let app = &p.app;
    let renewing = both_joined(&p).await;

    // b has 5 GiB free, a 3 GiB: the first two (1 GiB each) go to b, then they are even
    // (3 GiB each) and the one with fewer sandboxes, a, comes next.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.create(json!({"memory": 1024})).await);
    }
    let on: Vec<String> = ids.iter().map(|id| placed_on(app, id)).collect();
    assert_eq!(on, [runner_id('b'), runner_id('b'), runner_id('a')]);
    let (moving, staying) = (&ids[0], &ids[1]);
    assert!(b.census().vms.contains_key(moving.as_str()) && !a.census().vms.contains_key(moving.as_str()));

    // State in memory (a process) and on disk.
    assert_eq!(app.exec(moving, "worker &").await.0, StatusCode::OK);
    assert_eq!(app.write(moving, "/tmp/kept", b"on disk").await, StatusCode::NO_CONTENT);
    assert_eq!(app.exec(staying, "keeper &").await.0, StatusCode::OK);

    // Paused and resumed while b has room: back on b.
    succeeds(app, "POST", &format!("/v1/sandbox/{moving}/pause")).await;
    succeeds(app, "POST", &format!("/v1/sandbox/{moving}/resume")).await;
    assert_eq!(placed_on(app, moving), runner_id('b'));
    succeeds(app, "POST", &format!("/v1/sandbox/{moving}/pause")).await;

    // b stops renewing (killed, or cut off): lost after its lease, with its running sandbox.
    stop(renewing).await;
    let renewing = keep_renewing(app, &['a']);
    eventually("b to be lost", || p.cluster.member(&runner_id('b')).is_none()).await;
    let lost_state = || app.store.sandbox_by_id(staying).unwrap().unwrap().state.as_str().to_string();
    eventually("its running sandbox to be lost", || lost_state() == "lost").await;
    assert_eq!(app.state(staying).await.as_deref(), Some("lost"));
    let (s, v) = app
        .call(
            "POST",
            &format!("/v1/sandbox/{staying}/process/execute"),
            &json!({"command": "ps"}).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["message"].as_str().unwrap().contains("lost"), "{v}");
    assert_eq!(app.state(moving).await.as_deref(), Some("paused"));

    // A request to the paused one resumes it on a: process and file intact.
    let (s, _, out) = app.exec(moving, "ps").await;
    assert_eq!(s, StatusCode::OK);
    assert!(out.contains("worker"), "{out}");
    assert_eq!(app.read(moving, "/tmp/kept").await, (StatusCode::OK, b"on disk".to_vec()));
    assert_eq!(placed_on(app, moving), runner_id('a'));
    assert!(a.census().vms.contains_key(moving.as_str()));

    // b comes back (the partition heals): its sandbox runs on, with its process; nothing of
    // the moved sandbox runs there.
    stop(renewing).await;
    let _renewing = keep_renewing(app, &['a', 'b']);
    eventually("b to join again", || p.cluster.member(&runner_id('b')).is_some()).await;
    eventually("its sandbox to run again", || lost_state() == "running").await;
    let (s, _, out) = app.exec(staying, "ps").await;
    assert_eq!(s, StatusCode::OK);
    assert!(out.contains("keeper"), "{out}");
    for id in &ids {
        let vms = [&a, &b].iter().filter(|m| m.census().vms.contains_key(id.as_str())).count();
        assert_eq!(vms, 1, "{id} runs on {vms} machines");
    }
}

/// A runner lost with its sandbox deleted meanwhile, and one that comes back rebooted: the
/// deleted sandbox's VM is removed there, the rebooted one's sandbox is stopped (its disk kept)
/// and starts again on it.
#[tokio::test]
async fn a_returning_runner_is_reconciled() {
    let (p, _, _a, b) = setup(1024, 4096, "sim").await;
    let app = &p.app;
    let renewing = both_joined(&p).await;
    let deleted = app.create(json!({"memory": 1024})).await;
    let rebooted = app.create(json!({"memory": 1024})).await;
    assert_eq!(app.write(&rebooted, "/tmp/disk", b"kept").await, StatusCode::NO_CONTENT);
    assert!([&deleted, &rebooted].iter().all(|id| placed_on(app, id) == runner_id('b')));

    stop(renewing).await;
    let renewing = keep_renewing(app, &['a']);
    eventually("b to be lost", || p.cluster.member(&runner_id('b')).is_none()).await;
    eventually("its sandboxes to be lost", || {
        [&deleted, &rebooted]
            .iter()
            .all(|id| app.store.sandbox_by_id(id).unwrap().unwrap().state.as_str() == "lost")
    })
    .await;
    // A lost sandbox can be deleted while its runner is away.
    succeeds(app, "DELETE", &format!("/v1/sandbox/{deleted}")).await;
    b.power_cycle();
    assert!(b.census().vms.is_empty());

    stop(renewing).await;
    let _renewing = keep_renewing(app, &['a', 'b']);
    eventually("b to join again", || p.cluster.member(&runner_id('b')).is_some()).await;
    eventually("the rebooted sandbox to be stopped", || {
        app.store.sandbox_by_id(&rebooted).unwrap().unwrap().state.as_str() == "stopped"
    })
    .await;
    eventually("the deleted sandbox's disk to go", || !b.census().disks.contains(deleted.as_str())).await;
    succeeds(app, "POST", &format!("/v1/sandbox/{rebooted}/start")).await;
    assert_eq!(placed_on(app, &rebooted), runner_id('b'));
    assert_eq!(app.read(&rebooted, "/tmp/disk").await, (StatusCode::OK, b"kept".to_vec()));
}

/// A paused sandbox whose runner is gone, and one other runner that cannot restore its image
/// (`b_compat`, `b_templates` in its lease): the resume fails with `reason`, and the sandbox
/// stays paused.
async fn resume_is_refused_by_b(b_compat: &str, b_templates: &'static [&'static str], reason: &str) {
    let (p, _, _, _) = setup(4096, 2048, b_compat).await;
    let app = &p.app;
    let renewing = both_joined(&p).await;
    let id = app.create(json!({})).await;
    assert_eq!(placed_on(app, &id), runner_id('a'));
    succeeds(app, "POST", &format!("/v1/sandbox/{id}/pause")).await;
    stop(renewing).await;
    let b_only = {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                renew_from(&app, 'b', TOKEN, 8081, b_templates).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    eventually("a to be lost", || p.cluster.member(&runner_id('a')).is_none()).await;
    let (s, v) = app.call("POST", &format!("/v1/sandbox/{id}/resume"), "").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["message"].as_str().unwrap().contains(reason), "{v}");
    assert_eq!(app.state(&id).await.as_deref(), Some("paused"));
    stop(b_only).await;
}

/// An image restores only on a runner with the same CPU and QEMU (the runner says so).
#[tokio::test]
async fn a_resume_never_lands_on_an_incompatible_runner() {
    resume_is_refused_by_b("another cpu", &[], "another CPU or QEMU").await;
}

/// A runner whose lease lists its template versions, without the image's, is passed over.
#[tokio::test]
async fn a_resume_skips_a_runner_without_the_template_version() {
    resume_is_refused_by_b("sim", &["another-version"], "template version").await;
}

/// A control plane killed and started again on the same store finds the registered runners
/// and their sandboxes, running ones adopted with their memory.
#[tokio::test]
async fn a_restarted_control_plane_finds_the_runners_and_their_sandboxes() {
    let (p, machines, a, b) = setup(4096, 4096, "sim").await;
    let app = &p.app;
    let renewing = both_joined(&p).await;
    let ids = [app.create(json!({})).await, app.create(json!({})).await];
    for id in &ids {
        assert_eq!(app.exec(id, "worker &").await.0, StatusCode::OK);
    }
    let mut on: Vec<String> = ids.iter().map(|id| placed_on(app, id)).collect();
    on.sort();
    assert_eq!(on, [runner_id('a'), runner_id('b')]);

    // The next process: new views of the same machines, nothing adopted.
    stop(renewing).await;
    let (store, key) = (app.store.clone(), app.key.clone());
    drop(p);
    for (letter, m) in [('a', &a), ('b', &b)] {
        machines.lock().unwrap().insert(fingerprint(letter), Arc::new(m.restarted()));
    }
    let p2 = plane(store, &key, &machines).await;
    let _renewing = keep_renewing(&p2.app, &['a', 'b']);
    eventually("both runners to join the new control plane", || p2.cluster.members().len() == 2).await;
    for id in &ids {
        let (s, _, out) = p2.app.exec(id, "ps").await;
        assert_eq!(s, StatusCode::OK, "{id}");
        assert!(out.contains("worker"), "{out}");
    }
}

/// A control plane killed in the middle of a pause on a registered runner: when that runner
/// joins the next control plane, the pause is finished (its image was complete), not left
/// `snapshotting` for ever.
#[tokio::test]
async fn an_operation_cut_by_a_crash_is_settled_when_its_runner_joins() {
    let (p, machines, a, _) = setup(4096, 1024, "sim").await;
    let app = &p.app;
    let renewing = both_joined(&p).await;
    let id = app.create(json!({})).await;
    assert_eq!(placed_on(app, &id), runner_id('a'));
    let reached = a.crash_at("capture.stored");
    let pausing = {
        let (app, id) = (app.clone(), id.clone());
        tokio::spawn(async move { app.call("POST", &format!("/v1/sandbox/{id}/pause"), "").await })
    };
    reached.notified().await;
    pausing.abort();
    stop(renewing).await;
    let (store, key) = (app.store.clone(), app.key.clone());
    assert_eq!(store.sandbox_by_id(&id).unwrap().unwrap().state.as_str(), "snapshotting");
    drop(p);

    machines.lock().unwrap().insert(fingerprint('a'), Arc::new(a.restarted()));
    let p2 = plane(store, &key, &machines).await;
    let _renewing = keep_renewing(&p2.app, &['a', 'b']);
    eventually("the pause to be finished", || {
        p2.app.store.sandbox_by_id(&id).unwrap().unwrap().state.as_str() == "paused"
    })
    .await;
    let (s, _, out) = p2.app.exec(&id, "hostname").await;
    assert_eq!((s, out.trim()), (StatusCode::OK, id.as_str()));
}

/// A paused sandbox resumes where it was while that runner has room for it, and on another
/// when it has not (filled meanwhile).
#[tokio::test]
async fn a_resume_goes_elsewhere_when_its_runner_is_full() {
    let (p, _, a, b) = setup(2048, 1536, "sim").await;
    let app = &p.app;
    let _renewing = both_joined(&p).await;
    let id = app.create(json!({"memory": 1024})).await;
    assert_eq!(placed_on(app, &id), runner_id('a'));
    assert_eq!(app.write(&id, "/tmp/kept", b"moved").await, StatusCode::NO_CONTENT);
    succeeds(app, "POST", &format!("/v1/sandbox/{id}/pause")).await;
    // a has 2048 MiB free, b 1536: the next lands on a and leaves it 512.
    let filler = app.create(json!({"memory": 1536})).await;
    assert_eq!(placed_on(app, &filler), runner_id('a'));
    a.passed();
    succeeds(app, "POST", &format!("/v1/sandbox/{id}/resume")).await;
    assert_eq!(placed_on(app, &id), runner_id('b'));
    assert!(b.census().vms.contains_key(id.as_str()));
    // a is told to drop what its pause kept there (a real runner's warm entry and namespace).
    assert!(a.passed().contains(&"destroy.done".to_string()), "a still holds the moved sandbox's files");
    assert_eq!(app.read(&id, "/tmp/kept").await, (StatusCode::OK, b"moved".to_vec()));
    // Both full now: a create has nowhere to go, and says so.
    let (s, v) =
        app.call("POST", "/v1/sandbox", &json!({"template_name": SYSTEM, "memory": 1024}).to_string()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["message"].as_str().unwrap().contains("no runner has room"), "{v}");
}

/// A deleted snapshot is dropped by every runner, not only by the one that deleted its image:
/// any of them may hold its RAM from a restore.
#[tokio::test]
async fn every_runner_drops_a_deleted_snapshot() {
    let (p, _, a, b) = setup(4096, 4096, "sim").await;
    let app = &p.app;
    let _renewing = both_joined(&p).await;
    let id = app.create(json!({})).await;
    let (s, v) = app.call("POST", &format!("/v1/sandbox/{id}/snapshot/create"), "{}").await;
    assert!(s.is_success(), "{s} {v}");
    let snapshot = v["id"].as_str().unwrap().to_string();
    a.passed();
    b.passed();
    succeeds(app, "DELETE", &format!("/v1/snapshot/{snapshot}")).await;
    for (name, runner) in [("a", &a), ("b", &b)] {
        assert!(runner.passed().contains(&"delete_image.done".to_string()), "runner {name} was not told");
    }
}

/// A runner that takes at most N sandboxes gets no more, whatever memory it has left.
#[tokio::test]
async fn a_runner_takes_no_more_sandboxes_than_it_says() {
    let (p, _, a, _) = setup(8192, 2048, "sim").await;
    a.set_info(HostInfo {
        vcpus: 4,
        memory_mib: 8192,
        max_sandboxes: 1,
        compat: "sim".into(),
        ..HostInfo::default()
    });
    let app = &p.app;
    let _renewing = both_joined(&p).await;
    let first = app.create(json!({"memory": 512})).await;
    let second = app.create(json!({"memory": 512})).await;
    assert_eq!(placed_on(app, &first), runner_id('a'));
    assert_eq!(placed_on(app, &second), runner_id('b'), "a said it takes one");
}
