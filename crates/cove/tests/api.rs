//! Real-VM tests of the HTTP API's rules: authentication, validation, the sandbox limit,
//! organization isolation, listing, command timeouts, sandbox timeouts and API keys.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::{assert_field, fields, Api, Resp, TestServer};
use serde_json::{json, Value};

/// Tests that run VMs take turns (the host has few cores and QEMU runs under TCG); the others
/// run alongside. A static semaphore works across the tests' separate runtimes.
static VM_TURN: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Sandboxes a test created; whatever is still listed when it is dropped (a failed assertion)
/// is deleted from a thread of its own, since a panicking async test cannot await.
struct Cleanup {
    url: String,
    key: String,
    ids: Mutex<Vec<String>>,
}

impl Cleanup {
    fn new(api: &Api) -> Cleanup {
        Cleanup { url: api.url.clone(), key: api.key.clone(), ids: Mutex::new(Vec::new()) }
    }

    fn add(&self, id: &str) {
        self.ids.lock().unwrap().push(id.to_string());
    }

    /// Deletes a sandbox now, expecting 204.
    async fn delete(&self, api: &Api, id: &str) {
        let r = api.delete(&format!("/v1/sandbox/{id}")).await;
        assert_eq!(r.status, 204, "deleting {id}: {}", r.text());
        self.ids.lock().unwrap().retain(|x| x != id);
    }

    async fn delete_all(&self, api: &Api) {
        let ids = self.ids.lock().unwrap().clone();
        for id in ids {
            self.delete(api, &id).await;
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap_or_else(|e| e.into_inner()));
        if ids.is_empty() {
            return;
        }
        let (url, key) = (self.url.clone(), self.key.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let http = reqwest::Client::new();
                for id in ids {
                    let _ = http.delete(format!("{url}/v1/sandbox/{id}")).bearer_auth(&key).send().await;
                }
            });
        })
        .join();
    }
}

/// Creates a sandbox and registers it for clean-up.
async fn create(api: &Api, cleanup: &Cleanup, extra: Value) -> String {
    let id = api.create(extra).await;
    cleanup.add(&id);
    id
}

/// A request with no key at all.
async fn anonymous(api: &Api, method: reqwest::Method, path: &str, body: Option<Value>) -> Resp {
    let mut r = api.http.request(method, format!("{}{path}", api.url));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("request failed");
    let status = resp.status().as_u16();
    let content_type =
        resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = resp.bytes().await.expect("body").to_vec();
    Resp { status, body, content_type }
}

/// A GET with the key in a header of one's choosing.
async fn get_with(api: &Api, path: &str, header: &str, value: &str) -> Resp {
    let r = api.http.get(format!("{}{path}", api.url)).header(header, value);
    let resp = r.send().await.expect("request failed");
    let status = resp.status().as_u16();
    let content_type =
        resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = resp.bytes().await.expect("body").to_vec();
    Resp { status, body, content_type }
}

fn assert_message(r: &Resp, status: u16) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let m = v["message"].as_str().unwrap_or_else(|| panic!("no message: {v}")).to_string();
    assert!(!m.is_empty());
    m
}

fn ids(list: &Value) -> Vec<String> {
    list["items"].as_array().expect("items").iter().map(|i| i["id"].as_str().unwrap().to_string()).collect()
}

fn qemu_pid(server: &TestServer, id: &str) -> String {
    let pid_file = server.data_dir.join("sandboxes").join(id).join("run/qemu.pid");
    std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
        .trim()
        .to_string()
}

#[tokio::test]
async fn authentication() {
    let server = TestServer::shared();
    let api = server.new_org(None);
    let path = "/v1/sandboxes";

    let r = anonymous(&api, reqwest::Method::GET, path, None).await;
    assert_message(&r, 401);
    assert!(r.content_type.starts_with("application/json"), "{}", r.content_type);
    let r = get_with(&api, path, "authorization", "Bearer cove_not_a_real_key").await;
    assert_message(&r, 401);
    let r = get_with(&api, path, "authorization", "Bearer ").await;
    assert_message(&r, 401);
    let r = get_with(&api, path, "leap0-authorization", "Bearer wrong").await;
    assert_message(&r, 401);

    for (header, value) in [
        ("authorization", format!("Bearer {}", api.key)),
        ("authorization", api.key.clone()),
        ("leap0-authorization", format!("Bearer {}", api.key)),
        ("leap0-authorization", api.key.clone()),
    ] {
        let r = get_with(&api, path, header, &value).await;
        assert_eq!(r.status, 200, "{header}: {value}: {}", r.text());
        assert_eq!(r.json(), json!({ "items": [], "total_items": 0 }));
    }

    // Every sandbox route wants a key, whether the sandbox exists or not.
    for (method, p) in [
        (reqwest::Method::POST, "/v1/sandbox".to_string()),
        (reqwest::Method::GET, "/v1/sandbox/sbx-00000000000000000000".to_string()),
        (reqwest::Method::DELETE, "/v1/sandbox/sbx-00000000000000000000".to_string()),
        (reqwest::Method::POST, "/v1/sandbox/sbx-00000000000000000000/process/execute".to_string()),
        (reqwest::Method::POST, "/v1/sandbox/sbx-00000000000000000000/filesystem/ls".to_string()),
        (reqwest::Method::GET, "/v1/keys".to_string()),
    ] {
        let r = anonymous(&api, method, &p, Some(json!({}))).await;
        assert_message(&r, 401);
    }
}

#[tokio::test]
async fn create_validation_names_the_field() {
    let server = TestServer::shared();
    let api = server.new_org(Some(1));
    let cleanup = Cleanup::new(&api);
    let t = "system/debian:bookworm";
    let cases = [
        (json!({ "template_name": t, "vcpu": 9 }), "vcpu"),
        (json!({ "template_name": t, "vcpu": 0 }), "vcpu"),
        (json!({ "template_name": t, "memory": 513 }), "memory"),
        (json!({ "template_name": t, "memory": 100 }), "memory"),
        (json!({ "template_name": t, "memory": 8194 }), "memory"),
        (json!({ "template_name": t, "timeout": 0 }), "timeout"),
        (json!({ "template_name": t, "timeout": 28801 }), "timeout"),
        (json!({ "template_name": t, "disk": 0 }), "disk"),
        (json!({ "template_name": t, "disk": 300 * 1024 }), "disk"),
        // Smaller than the template's disk.
        (json!({ "template_name": t, "disk": 64 }), "disk"),
        (json!({ "vcpu": 1 }), "template_name"),
        (json!({ "template_name": "" }), "template_name"),
        (json!({ "template_name": t, "vcpu": "two" }), "vcpu"),
        (json!({ "template_name": t, "timeout": -5 }), "timeout"),
        (json!({ "template_name": 7 }), "template_name"),
        (json!({ "template_name": t, "env_vars": { "A=B": "x" } }), "env_vars.A=B"),
        (json!("system/debian:bookworm"), "body"),
        (json!(42), "body"),
    ];
    for (body, field) in cases {
        let r = api.post("/v1/sandbox", body.clone()).await;
        if r.status == 201 {
            cleanup.add(r.json()["id"].as_str().unwrap());
        }
        let f = fields(&r);
        assert!(f.iter().any(|x| x == field), "{body}: expected field {field:?} in {f:?}: {}", r.text());
    }
    // Several violations are all reported.
    let r =
        api.post("/v1/sandbox", json!({ "template_name": t, "vcpu": 9, "memory": 513, "timeout": 0 })).await;
    let f = fields(&r);
    for want in ["vcpu", "memory", "timeout"] {
        assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
    }

    // Malformed or missing bodies.
    for raw in ["{not json", "{\"template_name\": ", "", "null"] {
        let r = api
            .raw(
                api.http
                    .post(format!("{}/v1/sandbox", api.url))
                    .header("content-type", "application/json")
                    .body(raw),
            )
            .await;
        assert_field(&r, "body");
    }

    // An unknown template is the caller's mistake, explained, never a 500.
    let r = api.post("/v1/sandbox", json!({ "template_name": "nobody/nothing:latest" })).await;
    if r.status == 201 {
        cleanup.add(r.json()["id"].as_str().unwrap());
    }
    assert!((400..500).contains(&r.status), "unknown template: {} {}", r.status, r.text());
    let text = r.text();
    assert!(text.contains("nobody/nothing:latest") && text.contains("template"), "{text}");
    assert!(r.json()["message"].is_string());
    assert_eq!(r.json()["errors"][0]["field"], "template_name", "{text}");

    // Nothing was created by any of this.
    let r = api.get("/v1/sandboxes").await;
    assert_eq!(r.json()["total_items"], 0, "{}", r.text());
    cleanup.delete_all(&api).await;
}

#[tokio::test]
async fn sandbox_limit() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(None);
    let cleanup = Cleanup::new(&api);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(create(&api, &cleanup, json!({})).await);
    }
    let r = api.post("/v1/sandbox", json!({ "template_name": "system/debian:bookworm" })).await;
    if r.status == 201 {
        cleanup.add(r.json()["id"].as_str().unwrap());
    }
    let m = assert_message(&r, 409);
    assert!(m.contains("limit"), "{m}");
    assert_eq!(api.get("/v1/sandboxes").await.json()["total_items"], 3);

    cleanup.delete(&api, &ids[0]).await;
    let again = create(&api, &cleanup, json!({})).await;
    let (code, out, _) = api.exec(&again, "echo alive").await;
    assert_eq!((code, out.as_str()), (0, "alive\n"));
    cleanup.delete_all(&api).await;
}

#[tokio::test]
async fn organizations_are_isolated() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let a = server.new_org(None);
    let b = server.new_org(None);
    let cleanup = Cleanup::new(&a);
    let id = create(&a, &cleanup, json!({})).await;

    for r in [
        b.get(&format!("/v1/sandbox/{id}")).await,
        b.delete(&format!("/v1/sandbox/{id}")).await,
        b.post(&format!("/v1/sandbox/{id}/process/execute"), json!({ "command": "id" })).await,
        b.fs(&id, "ls", json!({ "path": "/" })).await,
        b.fs(&id, "read-file", json!({ "path": "/etc/hostname" })).await,
        b.get(&format!("/v1/sandbox/{id}/system/user-home-dir")).await,
        b.raw(b.http.post(format!("{}/v1/sandbox/{id}/filesystem/write-file?path=/tmp/x", b.url)).body("x"))
            .await,
    ] {
        let m = assert_message(&r, 404);
        assert!(!m.contains(&a.key), "{m}");
    }
    let r = b.get("/v1/sandboxes").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({ "items": [], "total_items": 0 }));
    let r = a.get("/v1/sandboxes").await;
    assert_eq!(ids(&r.json()), [id.as_str()]);

    // A's sandbox is untouched.
    let (code, _, _) = a.exec(&id, "test ! -e /tmp/x").await;
    assert_eq!(code, 0, "B wrote into A's sandbox");
    assert_eq!(a.get(&format!("/v1/sandbox/{id}")).await.json()["state"], "running");
    cleanup.delete_all(&a).await;
}

#[tokio::test]
async fn listing_and_trailing_slashes() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(Some(2));
    let cleanup = Cleanup::new(&api);
    let first = create(&api, &cleanup, json!({})).await;

    // The trailing-slash forms.
    let r =
        api.post("/v1/sandbox/", json!({ "template_name": "system/debian:bookworm", "timeout": 600 })).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let second = r.json()["id"].as_str().unwrap().to_string();
    cleanup.add(&second);
    let v = r.json();
    assert_eq!(
        (v["state"].as_str(), v["timeout"].as_u64(), v["vcpu"].as_u64(), v["memory"].as_u64()),
        (Some("running"), Some(600), Some(1), Some(1024))
    );
    assert_eq!(v["template_id"], "system/debian:bookworm");
    let r = api.get(&format!("/v1/sandbox/{second}/")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], second);

    let list = |query: &'static str| {
        let api = api.clone();
        async move {
            let r = api.get(&format!("/v1/sandboxes{query}")).await;
            assert_eq!(r.status, 200, "{query}: {}", r.text());
            r.json()
        }
    };
    let v = list("").await;
    assert_eq!(v["total_items"], 2);
    assert_eq!(ids(&v), [second.clone(), first.clone()], "newest first by default");
    let item = &v["items"][0];
    assert_eq!(
        (item["state"].as_str(), item["template_id"].as_str()),
        (Some("running"), Some("system/debian:bookworm"))
    );
    assert!(item["created_at"].is_string() && item["pod_id"].is_string(), "{item}");
    assert!(item["timeout_at"].as_i64().is_some(), "{item}");
    assert_eq!(ids(&list("?sort=created_at&order-by=asc").await), [first.clone(), second.clone()]);
    assert_eq!(ids(&list("?sort=created_at&order-by=desc").await), [second.clone(), first.clone()]);
    assert_eq!(ids(&list("?state=running&sort=state").await).len(), 2);
    assert_eq!(list("?state=paused").await, json!({ "items": [], "total_items": 0 }));
    let v = list("?order-by=asc&page-size=1").await;
    assert_eq!((ids(&v), v["total_items"].as_u64()), (vec![first.clone()], Some(2)));
    let v = list("?order-by=asc&page-size=1&page=2").await;
    assert_eq!((ids(&v), v["total_items"].as_u64()), (vec![second.clone()], Some(2)));
    let v = list("?page=3&page-size=1").await;
    assert_eq!((ids(&v).len(), v["total_items"].as_u64()), (0, Some(2)));
    let v = list("?page-size=100").await;
    assert_eq!(ids(&v).len(), 2);

    for (query, field) in [
        ("?page-size=101", "page-size"),
        ("?page-size=0", "page-size"),
        ("?page-size=ten", "page-size"),
        ("?page=0", "page"),
        ("?page=-1", "page"),
        ("?state=bogus", "state"),
        ("?sort=name", "sort"),
        ("?order-by=up", "order-by"),
    ] {
        let r = api.get(&format!("/v1/sandboxes{query}")).await;
        let f = fields(&r);
        assert!(f.iter().any(|x| x == field), "{query}: expected {field:?} in {f:?}");
    }

    let r = api.delete(&format!("/v1/sandbox/{second}/")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    cleanup.ids.lock().unwrap().retain(|x| *x != second);
    assert_eq!(api.get(&format!("/v1/sandbox/{second}/")).await.status, 404);
    let m = assert_message(&api.delete(&format!("/v1/sandbox/{second}")).await, 404);
    assert!(m.contains(&second), "{m}");
    assert_eq!(ids(&list("").await), [first.as_str()]);
    cleanup.delete_all(&api).await;
}

#[tokio::test]
async fn exec_rules_and_unimplemented_routes() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(Some(1));
    let cleanup = Cleanup::new(&api);
    let id = create(&api, &cleanup, json!({})).await;
    let exec = |body: Value| {
        let api = api.clone();
        let id = id.clone();
        async move { api.post(&format!("/v1/sandbox/{id}/process/execute"), body).await }
    };

    // A timeout kills the command and everything it started.
    let r = exec(json!({ "command": "sleep 100 & sleep 100", "timeout": 2 })).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["exit_code"], 124, "{v}");
    assert!(v["stderr"].as_str().unwrap().contains("timed out"), "{v}");
    let (code, out, err) = api.exec(&id, "pgrep -a sleep; echo rc=$?").await;
    assert_eq!((code, out.as_str()), (0, "rc=1\n"), "sleep survived the timeout: {out}{err}");

    // A detached daemon started by a command that timed out dies with it too.
    let r = exec(json!({ "command": "setsid sh -c 'sleep 200' >/dev/null 2>&1 & sleep 100", "timeout": 1 }))
        .await;
    assert_eq!(r.json()["exit_code"], 124, "{}", r.text());
    let (_, out, _) = api.exec(&id, "pgrep -a sleep; echo rc=$?").await;
    assert_eq!(out, "rc=1\n", "a setsid child survived the timeout");

    // cwd
    let r = exec(json!({ "command": "pwd", "cwd": "/home/user/does/not/exist" })).await;
    assert_field(&r, "cwd");
    let r = exec(json!({ "command": "pwd", "cwd": "/etc/hostname" })).await;
    assert_field(&r, "cwd");
    let r = exec(json!({ "command": "pwd", "cwd": "/tmp" })).await;
    assert_eq!(r.json()["stdout"], "/tmp\n", "{}", r.text());
    let r = exec(json!({ "command": "pwd" })).await;
    assert_eq!(r.json()["stdout"], "/home/user\n", "{}", r.text());

    // Request validation.
    assert_field(&exec(json!({ "command": "" })).await, "command");
    assert_field(&exec(json!({})).await, "command");
    assert_field(&exec(json!({ "command": "true", "timeout": 0 })).await, "timeout");
    assert_field(&exec(json!({ "command": "true", "timeout": 28801 })).await, "timeout");
    assert_field(&exec(json!({ "command": "true", "timeout": "1" })).await, "timeout");
    assert_field(&exec(json!({ "command": "true", "cwd": "" })).await, "cwd");
    assert_field(&exec(json!({ "command": "true", "envs": { "": "x" } })).await, "envs.");
    let r = exec(json!({ "command": "echo out; echo err >&2; exit 3" })).await;
    assert_eq!(r.json(), json!({ "exit_code": 3, "stdout": "out\n", "stderr": "err\n" }));

    // system
    let r = api.get(&format!("/v1/sandbox/{id}/system/user-home-dir")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({ "user_home_dir": "/home/user" }));
    let r = api.get(&format!("/v1/sandbox/{id}/system/workdir")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["workdir"].is_string(), "{}", r.text());

    // An unknown route is a 404 with a message.
    assert_message(&api.get("/v1/nothing-here").await, 404);

    // The sandbox is still fine after all that.
    assert_eq!(api.exec(&id, "echo ok").await.1, "ok\n");
    // Each command had a cgroup of its own; none is left behind but the one listing them and
    // the one made ahead for the next command (removal follows the answer, hence the retries).
    let mut left = String::new();
    for _ in 0..50 {
        left = api.sh_ok(&id, "ls -d /sys/fs/cgroup/cove-exec/exec-* | wc -l").await;
        if left.trim().parse::<u32>().unwrap() <= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let detail = api
        .sh_ok(&id, "for d in /sys/fs/cgroup/cove-exec/exec-*; do echo $d $(cat $d/cgroup.procs | tr '\\n' ' ') $(grep populated $d/cgroup.events); done")
        .await;
    assert!(left.trim().parse::<u32>().unwrap() <= 2, "{left} exec cgroups left:\n{detail}");
    assert!(api.sh_ok(&id, "mount -t cgroup2").await.contains("favordynmods"));
    cleanup.delete_all(&api).await;
}

#[tokio::test]
async fn sandbox_timeout_deletes_it() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(Some(1));
    let cleanup = Cleanup::new(&api);
    let id = create(&api, &cleanup, json!({ "timeout": 3 })).await;
    let pid = qemu_pid(server, &id);
    let r = api.get(&format!("/v1/sandbox/{id}")).await;
    assert_eq!(r.json()["timeout"], 3, "{}", r.text());

    // Poll rather than time: the sandbox must go, within a generous bound.
    let mut gone = false;
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let r = api.get(&format!("/v1/sandbox/{id}")).await;
        if r.status == 404 {
            gone = true;
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(gone, "sandbox {id} with timeout 3 still exists after 30 s");
    cleanup.ids.lock().unwrap().clear();
    let mut pid_gone = false;
    for _ in 0..40 {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            pid_gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(pid_gone, "QEMU {pid} of expired sandbox {id} still runs");
    assert!(!server.data_dir.join("sandboxes").join(&id).exists(), "sandbox dir left behind");
    assert_eq!(api.get("/v1/sandboxes").await.json()["total_items"], 0);
}

#[tokio::test]
async fn api_keys() {
    let server = TestServer::shared();
    let api = server.new_org(None);

    let r = api.post("/v1/keys", json!({ "name": "ci" })).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let key = created["key"].as_str().expect("the new key is shown").to_string();
    let key_id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["name"], "ci");
    assert!(created["created_at"].is_string());
    assert!(key.starts_with(created["prefix"].as_str().unwrap()), "{created}");
    assert_ne!(key, api.key);

    // The new key belongs to the same organization.
    let other = Api { key: key.clone(), ..api.clone() };
    let r = other.get("/v1/sandboxes").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = other.get("/v1/keys").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert!(!text.contains(&key) && !text.contains(&api.key), "a key is shown in the list: {text}");
    let listed = r.json();
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{listed}");
    assert!(items.iter().all(|k| k.get("key").is_none_or(Value::is_null)), "{listed}");
    assert!(items.iter().any(|k| k["id"] == key_id.as_str() && k["name"] == "ci"), "{listed}");

    // Another organization sees none of it.
    let stranger = server.new_org(None);
    let r = stranger.get("/v1/keys").await;
    assert_eq!(r.json()["items"].as_array().unwrap().len(), 1, "{}", r.text());
    assert_message(&stranger.delete(&format!("/v1/keys/{key_id}")).await, 404);

    assert_field(&api.post("/v1/keys", json!({ "name": "" })).await, "name");
    assert_field(&api.post("/v1/keys", json!({})).await, "name");
    assert_field(&api.post("/v1/keys", json!({ "name": "x".repeat(65) })).await, "name");

    let r = api.delete(&format!("/v1/keys/{key_id}")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_message(&other.get("/v1/sandboxes").await, 401);
    assert_message(&api.delete(&format!("/v1/keys/{key_id}")).await, 404);
    let r = api.get("/v1/keys").await;
    assert_eq!(r.json()["items"].as_array().unwrap().len(), 1, "{}", r.text());
    assert_eq!(api.get("/v1/sandboxes").await.status, 200, "the original key still works");
}
