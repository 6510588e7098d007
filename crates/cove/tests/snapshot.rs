//! Real-VM tests of named snapshots: a restored sandbox carries the snapshot's memory, processes
//! and files, yet is a new machine (id, hostname, entropy, clock) isolated from its siblings;
//! and the API's rules for creating, listing, restoring and deleting snapshots.

mod common;

use std::collections::BTreeSet;

use common::{
    assert_counts_on, assert_field, assert_guest_clock, counter_beyond, counter_lines, qemu_pids, rand_hex,
    start_counter, stored_images, Api, Leftovers, Resp, TestServer,
};
use serde_json::{json, Value};

/// The VM tests of this file take turns: the host has few cores and QEMU runs under TCG, and
/// some checks compare the image directories before and after an action.
static VM_TURN: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

fn images(server: &TestServer) -> BTreeSet<String> {
    stored_images(&server.data_dir).into_iter().collect()
}

/// Creates a snapshot of `id` (body `body`, or none); panics unless 201. Returns the snapshot
/// and the name of its new image directory.
async fn snapshot(
    server: &TestServer,
    api: &Api,
    left: &Leftovers,
    id: &str,
    body: Option<Value>,
) -> (Value, String) {
    let before = images(server);
    let r = api.req(reqwest::Method::POST, &format!("/v1/sandbox/{id}/snapshot/create"), body).await;
    assert_eq!(r.status, 201, "snapshot of {id}: {}", r.text());
    let snap = r.json();
    left.snapshot(snap["id"].as_str().unwrap());
    let new: Vec<String> = images(server).difference(&before).cloned().collect();
    assert_eq!(new.len(), 1, "one new image expected: {new:?}");
    assert!(new[0].starts_with("snap-"), "{new:?}");
    (snap, new[0].clone())
}

/// Restores snapshot `name`; panics unless 201 and running. Returns the new sandbox.
async fn restore(api: &Api, left: &Leftovers, name: &str) -> Value {
    let r = api.post("/v1/snapshot/restore", json!({ "snapshot_name": name })).await;
    assert_eq!(r.status, 201, "restore {name}: {}", r.text());
    let sbx = r.json();
    left.sandbox(sbx["id"].as_str().unwrap());
    assert_eq!(sbx["state"], "running");
    sbx
}

fn message(r: &Resp, status: u16) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    r.json()["message"].as_str().unwrap_or_else(|| panic!("no message: {}", r.text())).to_string()
}

fn names(list: &Value) -> Vec<String> {
    list["items"].as_array().expect("items").iter().map(|i| i["name"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn restored_sandboxes_carry_the_snapshot_state_and_are_new_machines() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let source = api.create(json!({ "env_vars": { "SNAP_ENV": "carried" } })).await;
    left.sandbox(&source);
    let counter = start_counter(&api, &source).await;
    api.put_file(&source, "/home/user/state.txt", b"as of the snapshot\n").await;
    let at_snapshot = assert_counts_on(&counter_lines(&api, &source).await, counter);

    let name = format!("state-{}", rand_hex());
    let (snap, image) = snapshot(server, &api, &left, &source, Some(json!({ "name": name }))).await;
    assert_eq!(snap["name"], name);
    assert!(snap["id"].as_str().is_some_and(|s| !s.is_empty() && s != name), "{snap}");
    let src = api.get(&format!("/v1/sandbox/{source}")).await.json();
    for field in ["template_id", "vcpu", "memory", "disk", "network_policy"] {
        assert_eq!(snap[field], src[field], "{field}: {snap} vs {src}");
    }
    assert!(snap["created_at"].is_string(), "{snap}");

    // The source runs on, and changes after the snapshot.
    assert_eq!(src["state"], "running");
    api.sh_ok(
        &source,
        "echo changed after > /home/user/state.txt && (setsid nohup sleep 1234 >/dev/null 2>&1 </dev/null &)",
    )
    .await;

    let first = restore(&api, &left, &name).await;
    let second = restore(&api, &left, &name).await;
    let (a, b) = (first["id"].as_str().unwrap().to_string(), second["id"].as_str().unwrap().to_string());
    let ids: BTreeSet<&str> = [source.as_str(), a.as_str(), b.as_str()].into();
    assert_eq!(ids.len(), 3, "restored sandboxes are new sandboxes");
    for r in [&first, &second] {
        for field in ["template_id", "vcpu", "memory", "disk"] {
            assert_eq!(r[field], snap[field], "{field} of the restored {r}");
        }
    }

    // Both map the snapshot's RAM copy-on-write from one sealed memfd: no RAM file of their
    // own, the pages neither wrote held once, and what one writes in memory the other does not
    // see.
    for id in [&a, &b] {
        let pid = qemu_pids(id)[0];
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
        assert!(smaps.contains("/memfd:cove-tmpl-snap-"), "{id} does not map its snapshot's RAM");
        let (_, shared_kb) = common::cloned_ram_mapping(pid);
        assert!(shared_kb >= 8 << 10, "{id} shares only {shared_kb} kB of the snapshot's pages");
        assert!(common::guest_ram_files(id).is_empty(), "{id} has a RAM file of its own");
    }
    api.sh_ok(&a, "echo from-a > /dev/shm/mine").await;
    assert_eq!(api.exec(&b, "cat /dev/shm/mine").await.0, 1, "b sees what a wrote in memory");

    let mut randoms = BTreeSet::new();
    for id in [&a, &b] {
        let out = api
            .sh_ok(
                id,
                "cat /home/user/state.txt; hostname; echo $SNAP_ENV; pgrep -c -f 'sleep 123[4]' || true",
            )
            .await;
        assert_eq!(out, format!("as of the snapshot\n{id}\ncarried\n0\n"), "state of restored {id}");
        assert_guest_clock(&api, id).await;
        // The counter process carried on from where it was, with its memory.
        let lines = counter_beyond(&api, id, at_snapshot).await;
        assert_counts_on(&lines, counter);
        assert_eq!(api.sh_ok(id, &format!("kill -0 {counter} && echo alive")).await, "alive\n");
        randoms.insert(api.sh_ok(id, "head -c 16 /dev/urandom | od -An -tx1").await);
        assert_eq!(qemu_pids(id).len(), 1);
    }
    randoms.insert(api.sh_ok(&source, "head -c 16 /dev/urandom | od -An -tx1").await);
    assert_eq!(randoms.len(), 3, "/dev/urandom gives the same bytes in two sandboxes: {randoms:?}");
    assert_eq!(
        api.sh_ok(&source, "cat /home/user/state.txt; hostname; pgrep -c -f 'sleep 123[4]'").await,
        format!("changed after\n{source}\n1\n")
    );

    // Each restored sandbox has its own disk.
    api.sh_ok(&a, "echo only in the first > /home/user/mine.txt").await;
    for id in [&b, &source] {
        let (code, _, _) = api.exec(id, "test -e /home/user/mine.txt").await;
        assert_eq!(code, 1, "a file written in {a} is visible in {id}");
    }
    left.delete_sandbox(&b).await;
    left.delete_sandbox(&source).await;

    // Deleting the snapshot removes its image; the sandboxes restored from it do not need it.
    left.delete_snapshot(snap["id"].as_str().unwrap()).await;
    assert!(!images(server).contains(&image), "image {image} of the deleted snapshot left");
    let r = api.post("/v1/snapshot/restore", json!({ "snapshot_name": name })).await;
    message(&r, 404);
    message(&api.delete(&format!("/v1/snapshot/{name}")).await, 404);
    assert_eq!(api.sh_ok(&a, "cat /home/user/mine.txt").await, "only in the first\n");
    let r = api.action(&a, "pause").await;
    assert_eq!(r.status, 201, "pause of {a}: {}", r.text());
    assert_eq!(
        api.sh_ok(&a, "cat /home/user/state.txt /home/user/mine.txt /dev/shm/mine; hostname").await,
        format!("as of the snapshot\nonly in the first\nfrom-a\n{a}\n"),
        "a restored sandbox paused and resumed (its RAM made from the snapshot's and its own pages)"
    );
    assert_eq!(api.state_of(&a).await, "running");
    left.delete_sandbox(&a).await;
}

#[tokio::test]
async fn snapshot_rules_and_listing() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({})).await;
    left.sandbox(&id);
    let prefix = format!("rules-{}", rand_hex());

    // Three named snapshots, and one without a body: its name is generated.
    let mut made = Vec::new();
    for suffix in ["a", "b", "c"] {
        let (snap, _) =
            snapshot(server, &api, &left, &id, Some(json!({ "name": format!("{prefix}-{suffix}") }))).await;
        made.push(snap);
    }
    // A command sent while a snapshot is taken waits for it (or runs before it) and succeeds.
    let (unnamed, exec) = futures::join!(snapshot(server, &api, &left, &id, None), async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        api.exec(&id, "echo during").await
    });
    let (unnamed, _) = unnamed;
    assert_eq!((exec.0, exec.1.as_str()), (0, "during\n"), "{}", exec.2);
    assert!(unnamed["name"].as_str().is_some_and(|n| !n.trim().is_empty()), "{unnamed}");
    assert_eq!(api.state_of(&id).await, "running");

    let r = api
        .post(&format!("/v1/sandbox/{id}/snapshot/create"), json!({ "name": format!("{prefix}-b") }))
        .await;
    assert!(message(&r, 409).contains(&format!("{prefix}-b")), "{}", r.text());
    let r = api.post(&format!("/v1/sandbox/{id}/snapshot/create"), json!({ "name": "" })).await;
    assert_field(&r, "name");
    let r = api.post("/v1/sandbox/sbx-00000000000000000000/snapshot/create", json!({})).await;
    message(&r, 404);
    let r = api.post("/v1/snapshot/restore", json!({ "snapshot_name": format!("{prefix}-none") })).await;
    message(&r, 404);
    let r = api.post("/v1/snapshot/restore", json!({})).await;
    assert_eq!(r.status, 400, "{}", r.text());

    // Listing: filter, order, paging.
    let list = |q: String| {
        let api = api.clone();
        async move {
            let r = api.get(&format!("/v1/snapshots?{q}")).await;
            assert_eq!(r.status, 200, "{q}: {}", r.text());
            r.json()
        }
    };
    let all = list(String::new()).await;
    assert_eq!(all["total_items"], 4, "{all}");
    let v = list(format!("query={prefix}&order-by=asc")).await;
    assert_eq!(names(&v), [format!("{prefix}-a"), format!("{prefix}-b"), format!("{prefix}-c")]);
    assert_eq!(v["total_items"], 3);
    let v = list(format!("query={prefix}")).await;
    assert_eq!(
        names(&v),
        [format!("{prefix}-c"), format!("{prefix}-b"), format!("{prefix}-a")],
        "desc by default"
    );
    let v = list(format!("query={}-B", prefix.to_uppercase())).await;
    assert_eq!(names(&v), [format!("{prefix}-b")], "query is a case-insensitive substring");
    let v = list(format!("query={prefix}&order-by=asc&page-size=2&page=1")).await;
    assert_eq!(
        (names(&v), v["total_items"].clone()),
        (vec![format!("{prefix}-a"), format!("{prefix}-b")], json!(3))
    );
    let v = list(format!("query={prefix}&order-by=asc&page-size=2&page=2")).await;
    assert_eq!((names(&v), v["total_items"].clone()), (vec![format!("{prefix}-c")], json!(3)));
    let v = list(format!("query={prefix}&order-by=asc&page-size=2&page=3")).await;
    assert_eq!(names(&v), Vec::<String>::new());
    let v = list(format!("query={prefix}&sort=template_id&order-by=asc&page-size=100")).await;
    assert_eq!(v["total_items"], 3);
    assert!(
        v["items"].as_array().unwrap().iter().all(|i| i["template_id"] == "system/debian:bookworm"),
        "{v}"
    );
    let v = list(format!("query={prefix}&sort=created_at&order-by=desc")).await;
    assert_eq!(names(&v)[0], format!("{prefix}-c"));
    let item = &list(format!("query={prefix}-a")).await["items"][0];
    assert_eq!(item, &made[0], "a listed snapshot is as create returned it");
    let v = list("query=no-such-snapshot-anywhere".into()).await;
    assert_eq!((v["total_items"].clone(), names(&v)), (json!(0), Vec::<String>::new()));
    for (q, field) in [
        ("sort=name", "sort"),
        ("order-by=up", "order-by"),
        ("page=0", "page"),
        ("page-size=101", "page-size"),
    ] {
        let r = api.get(&format!("/v1/snapshots?{q}")).await;
        assert_field(&r, field);
    }
    // Another organization sees none of them.
    let other = server.new_org(None);
    let r = other.get("/v1/snapshots").await;
    assert_eq!(r.json()["total_items"], 0, "{}", r.text());
    message(
        &other.post("/v1/snapshot/restore", json!({ "snapshot_name": format!("{prefix}-a") })).await,
        404,
    );
    message(&other.delete(&format!("/v1/snapshot/{prefix}-a")).await, 404);

    // Only a running sandbox can be snapshotted.
    let r = api.action(&id, "pause").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = api
        .post(&format!("/v1/sandbox/{id}/snapshot/create"), json!({ "name": format!("{prefix}-p") }))
        .await;
    assert!(message(&r, 409).contains("paused"), "{}", r.text());
    assert_eq!(api.state_of(&id).await, "paused", "a refused snapshot does not resume");
    let r = api.action(&id, "resume").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = api.action(&id, "stop").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = api
        .post(&format!("/v1/sandbox/{id}/snapshot/create"), json!({ "name": format!("{prefix}-s") }))
        .await;
    assert!(message(&r, 409).contains("stopped"), "{}", r.text());
    left.delete_sandbox(&id).await;
    let v = list(format!("query={prefix}")).await;
    assert_eq!(
        v["total_items"], 3,
        "the failed snapshots left no record; the source's deletion kept the others"
    );

    // Deleting by id and by name.
    for (snap, key) in [(&made[0], "id"), (&made[1], "name"), (&made[2], "id"), (&unnamed, "id")] {
        left.delete_snapshot(snap[key].as_str().unwrap()).await;
        message(&api.delete(&format!("/v1/snapshot/{}", snap[key].as_str().unwrap())).await, 404);
    }
    assert_eq!(list(String::new()).await["total_items"], 0);
    assert_eq!(images(server).iter().filter(|i| i.starts_with("snap-")).count(), 0, "{:?}", images(server));
}

#[tokio::test]
async fn kill_sandbox_after_deletes_the_source() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let source = api.create(json!({})).await;
    left.sandbox(&source);
    api.sh_ok(&source, "echo last words > /home/user/will.txt").await;
    let name = format!("final-{}", rand_hex());
    let (snap, _) =
        snapshot(server, &api, &left, &source, Some(json!({ "name": name, "kill_sandbox_after": true })))
            .await;
    assert_eq!(snap["name"], name);
    message(&api.get(&format!("/v1/sandbox/{source}")).await, 404);
    left.forget(&format!("/v1/sandbox/{source}"));
    assert_eq!(qemu_pids(&source), Vec::<u32>::new(), "QEMU of the killed source still runs");
    assert!(!server.data_dir.join("sandboxes").join(&source).exists(), "source's files left");

    let restored = restore(&api, &left, &name).await;
    let id = restored["id"].as_str().unwrap();
    assert_ne!(id, source);
    assert_eq!(api.sh_ok(id, "cat /home/user/will.txt; hostname").await, format!("last words\n{id}\n"));
    left.delete_sandbox(id).await;
    left.delete_snapshot(&name).await;
}
