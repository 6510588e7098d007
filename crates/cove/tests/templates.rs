//! Templates from container images, end to end: images built here are pushed to a real
//! registry (Debian's docker-registry on loopback), uploaded through the API, and checked from
//! inside the sandboxes made from them.

mod common;

use common::{Api, TestServer};
use cove_oci::testing::{host_programs, Image, Layer, Registry};
use serde_json::{json, Value};

const APP: (u64, u64) = (1001, 1001);

/// A server that pulls from these registries over plain HTTP.
fn server(registries: &[&Registry], extra: &[&str]) -> TestServer {
    let mut args: Vec<String> = Vec::new();
    for r in registries {
        args.push("--insecure-registry".into());
        args.push(r.addr.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestServer::start(&args)
}

async fn upload(api: &Api, name: &str, uri: &str, credentials: Option<Value>) -> common::Resp {
    let mut body = json!({ "name": name, "uri": uri });
    if let Some(c) = credentials {
        body["credentials"] = c;
    }
    api.post("/v1/template", body).await
}

/// Templates of a `GET /v1/templates` answer that are not system templates.
fn user_templates(list: &Value) -> usize {
    list["items"].as_array().unwrap().iter().filter(|t| t["is_system"] != true).count()
}

async fn sh(api: &Api, id: &str, cmd: &str) -> String {
    let (code, out, err) = api.exec(id, cmd).await;
    assert_eq!(code, 0, "{cmd}: {out}{err}");
    out
}

/// A glibc userland (this host's Debian binaries) over three layers that replace, delete and
/// hide files, with an unprivileged user, a setuid binary, an xattr, and hard and symbolic
/// links.
fn debian_like() -> Image {
    let base = Layer::default()
        .dir("usr", 0o755, (0, 0))
        .dir("usr/bin", 0o755, (0, 0))
        .dir("usr/lib", 0o755, (0, 0))
        .dir("usr/lib64", 0o755, (0, 0))
        .symlink("bin", "usr/bin")
        .symlink("lib", "usr/lib")
        .symlink("lib64", "usr/lib64")
        .dir("etc", 0o755, (0, 0))
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1001:1001:app:/srv/app:/bin/sh\n",
            0o644,
            (0, 0),
        )
        .file("etc/group", b"root:x:0:\napp:x:1001:\n", 0o644, (0, 0))
        .dir("srv", 0o755, (0, 0))
        .dir("srv/app", 0o755, APP)
        .dir("data", 0o755, (0, 0))
        .file("data/keep.txt", b"kept\n", 0o644, (0, 0))
        .file("data/gone.txt", b"deleted later\n", 0o644, (0, 0))
        .dir("data/tree", 0o755, (0, 0))
        .dir("data/tree/sub", 0o755, (0, 0))
        .file("data/tree/sub/deep.txt", b"deep\n", 0o644, (0, 0))
        .dir("opq", 0o755, (0, 0))
        .file("opq/old.txt", b"hidden by an opaque dir\n", 0o644, (0, 0))
        .file("replace.txt", b"version 1\n", 0o644, (0, 0))
        .dir("hard", 0o755, (0, 0))
        .file("hard/a", b"linked\n", 0o644, (0, 0));
    let base = host_programs(
        base,
        &[
            "sh",
            "bash",
            "id",
            "pwd",
            "env",
            "cat",
            "ls",
            "stat",
            "test",
            "getfattr",
            "sleep",
            "readlink",
            "sha256sum",
        ],
    );
    let second = Layer::default()
        .whiteout("data/gone.txt")
        .whiteout("data/tree")
        // Below a deleted directory, as some builders write it: nothing to do.
        .whiteout("data/tree/sub")
        .opaque("opq")
        .file("opq/new.txt", b"new\n", 0o644, (0, 0))
        .file("replace.txt", b"version 2\n", 0o640, APP)
        .hardlink("hard/b", "hard/a")
        .symlink("data/link", "/data/keep.txt")
        .file("usr/bin/suid-id", &std::fs::read("/usr/bin/id").unwrap(), 0o4755, (0, 0))
        .file_with_xattrs("data/xattr.txt", b"x\n", 0o644, &[("user.cove", b"hello")]);
    let third = Layer::default().file("srv/app/owned.txt", b"mine\n", 0o600, APP);
    Image {
        layers: vec![base.finish(), second.finish(), third.finish()],
        env: vec!["PATH=/usr/bin:/bin".into(), "GREETING=hello-from-image".into()],
        working_dir: "/srv/app".into(),
        user: "app".into(),
        // The image's service: started at the template's boot, as the image's user.
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
        cmd: Some(vec![
            "echo started $GREETING as $(id -u) in $(pwd) > /tmp/service.txt; exec sleep 1000000".into(),
        ]),
        ..Default::default()
    }
}

/// Pids of the image's service (its `sleep`), as seen in the guest.
async fn service_pids(api: &Api, id: &str) -> String {
    sh(api, id, "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = sleep ] && echo ${p#/proc/}; done; true").await
}

/// The static busybox of Debian's busybox-static: an Alpine-like userland, no libc files.
fn busybox_like(with_shell: bool) -> Image {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (apt-get install busybox-static)");
    let mut layer = Layer::default().dir("bin", 0o755, (0, 0)).file("bin/busybox", &busybox, 0o755, (0, 0));
    if with_shell {
        for applet in ["sh", "id", "pwd", "cat", "ls", "echo"] {
            layer = layer.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    Image { layers: vec![layer.finish()], env: vec!["PATH=/bin".into()], ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_becomes_a_template_its_sandboxes_run() {
    let registry = Registry::start(None);
    let srv = server(&[&registry], &[]);
    let api = srv.new_org(None);
    let digest = registry.push("team/app:v1", &debian_like()).await;

    // While the upload runs, the template shows how far it has come (and is not listed).
    let uploading = {
        let (api, uri) = (api.clone(), registry.uri("team/app:v1"));
        tokio::spawn(async move { upload(&api, "app:v1", &uri, None).await })
    };
    let mut stages = Vec::new();
    while !uploading.is_finished() {
        let t = api.get("/v1/template/app:v1").await;
        if t.status == 200 && t.json()["state"] == "building" {
            let p = t.json()["progress"].clone();
            assert!(p["layers_total"] == 0 || p["layers_total"] == 3, "{p}");
            let stage = p["stage"].as_str().unwrap_or("").to_string();
            if stages.last() != Some(&stage) {
                stages.push(stage);
            }
            if p["stage"] == "booting" {
                assert_eq!((&p["layers_done"], &p["bytes_done"]), (&json!(3), &p["bytes_total"]), "{p}");
            }
            let listed = api.get("/v1/templates").await.text();
            assert!(!listed.contains("app:v1"), "a building template is listed: {listed}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(stages.contains(&"booting".to_string()), "progress seen: {stages:?}");
    let r = uploading.await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["state"], "ready");
    assert!(r.json().get("progress").is_none(), "{}", r.text());
    let t = r.json();
    let tid = t["id"].as_str().unwrap().to_string();
    assert!(tid.starts_with("tpl-"), "{t}");
    assert_eq!(
        (t["name"].as_str(), t["digest"].as_str(), t["is_system"].as_bool()),
        (Some("app:v1"), Some(digest.as_str()), Some(false))
    );
    assert_eq!(t["image_config"]["user"], "app");
    assert_eq!(t["image_config"]["working_dir"], "/srv/app");
    assert_eq!(t["image_config"]["env"]["GREETING"], "hello-from-image");
    assert_eq!(t["image_config"]["entrypoint"], json!(["/bin/sh", "-c"]));
    assert!(t["disk"].as_u64().unwrap() > 0, "{t}");
    let list = api.get("/v1/templates").await.json();
    let names: Vec<&str> =
        list["items"].as_array().unwrap().iter().filter_map(|t| t["name"].as_str()).collect();
    assert!(names.contains(&"app:v1") && names.contains(&"system/debian:bookworm"), "{list}");

    let id = api.create(json!({ "template_name": "app:v1", "env_vars": { "FROM_CREATE": "yes" } })).await;
    let sbx = api.get(&format!("/v1/sandbox/{id}")).await.json();
    assert_eq!(sbx["template_id"], tid.as_str());

    // The image's service runs, started at the template's boot.
    assert_eq!(sh(&api, &id, "cat /tmp/service.txt").await, "started hello-from-image as 1001 in /srv/app\n");
    let service = service_pids(&api, &id).await;
    assert_eq!(service.lines().count(), 1, "{service:?}");

    // The image config: user, working directory and environment apply to commands.
    let out = sh(&api, &id, "id -u; id -g; pwd; echo $GREETING $FROM_CREATE; echo $PATH").await;
    assert_eq!(out, "1001\n1001\n/srv/app\nhello-from-image yes\n/usr/bin:/bin\n");
    let home = api.get(&format!("/v1/sandbox/{id}/system/workdir")).await.json();
    assert_eq!(home["workdir"], "/srv/app", "{home}");

    // The final view of the layers, with owners and modes.
    let out = sh(
        &api,
        &id,
        "cd /; for f in data/keep.txt replace.txt opq/new.txt srv/app/owned.txt hard/a hard/b usr/bin/suid-id data/xattr.txt; \
         do echo \"$f $(stat -c '%a %u %g %h' $f)\"; done; \
         cat data/keep.txt replace.txt 2>&1; readlink data/link; cat data/link; ls -A opq; \
         for f in data/gone.txt data/tree opq/old.txt; do test -e $f && echo \"$f still there\"; done; \
         getfattr --only-values -n user.cove data/xattr.txt; echo",
    )
    .await;
    let want = "data/keep.txt 644 0 0 1\nreplace.txt 640 1001 1001 1\nopq/new.txt 644 0 0 1\n\
        srv/app/owned.txt 600 1001 1001 1\nhard/a 644 0 0 2\nhard/b 644 0 0 2\nusr/bin/suid-id 4755 0 0 1\n\
        data/xattr.txt 644 0 0 1\n\
        kept\nversion 2\n/data/keep.txt\nkept\nnew.txt\nhello\n";
    assert_eq!(out, want);
    // The setuid bit works: the binary runs as root for the unprivileged user.
    assert_eq!(sh(&api, &id, "/usr/bin/suid-id -u").await, "0\n");

    // Pause/resume and snapshot/restore keep the template's settings.
    assert_eq!(api.action(&id, "pause").await.status, 201);
    assert_eq!(sh(&api, &id, "id -un; pwd").await, "app\n/srv/app\n");
    assert_eq!(service_pids(&api, &id).await, service, "the service did not survive pause/resume");
    let snap = api
        .post(
            &format!("/v1/sandbox/{id}/snapshot/create"),
            json!({ "name": format!("s-{}", common::rand_hex()) }),
        )
        .await;
    assert_eq!(snap.status, 201, "{}", snap.text());
    let snap = snap.json();
    assert_eq!(snap["template_id"], tid.as_str());

    // Rename; in use → 409 naming the users; delete once unused.
    let r = api
        .req(reqwest::Method::PATCH, &format!("/v1/template/{tid}"), Some(json!({ "name": "app:v2" })))
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(api.get(&format!("/v1/template/{tid}")).await.json()["name"], "app:v2");
    let r = api.post("/v1/sandbox", json!({ "template_name": "app:v1" })).await;
    common::assert_field(&r, "template_name");
    let r = api.delete(&format!("/v1/template/{tid}")).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains(&id), "{}", r.text());
    let restored = api.post("/v1/snapshot/restore", json!({ "snapshot_name": snap["name"] })).await;
    assert_eq!(restored.status, 201, "{}", restored.text());
    let restored = restored.json()["id"].as_str().unwrap().to_string();
    assert_eq!(sh(&api, &restored, "id -un; cat /data/keep.txt").await, "app\nkept\n");
    assert_eq!(service_pids(&api, &restored).await, service, "the restored sandbox lost the service");
    for sbx in [&id, &restored] {
        assert_eq!(api.delete(&format!("/v1/sandbox/{sbx}")).await.status, 204);
    }
    let r = api.delete(&format!("/v1/template/{tid}")).await;
    assert_eq!(r.status, 409, "the snapshot still uses it: {}", r.text());
    assert!(r.text().contains(snap["id"].as_str().unwrap()), "{}", r.text());
    assert_eq!(api.delete(&format!("/v1/snapshot/{}", snap["id"].as_str().unwrap())).await.status, 204);
    assert_eq!(api.delete(&format!("/v1/template/{tid}")).await.status, 204);
    assert_eq!(api.delete(&format!("/v1/template/{tid}")).await.status, 404);
    assert!(!srv.data_dir.join("templates").join(&tid).exists(), "template files left behind");
    common::assert_field(
        &api.post("/v1/sandbox", json!({ "template_name": "app:v2" })).await,
        "template_name",
    );
}

/// An image whose command is `/sbin/init`: this host's systemd (merged /usr, as Debian has it),
/// busybox for a shell, and one unit of the image's own, wanted by the default target.
fn systemd_like() -> Image {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (apt-get install busybox-static)");
    let mut layer = Layer::default()
        .dir("usr", 0o755, (0, 0))
        .dir("usr/bin", 0o755, (0, 0))
        .dir("usr/sbin", 0o755, (0, 0))
        .dir("usr/lib", 0o755, (0, 0))
        .dir("usr/lib64", 0o755, (0, 0))
        .symlink("bin", "usr/bin")
        .symlink("sbin", "usr/sbin")
        .symlink("lib", "usr/lib")
        .symlink("lib64", "usr/lib64")
        .file("usr/bin/busybox", &busybox, 0o755, (0, 0));
    for applet in ["sh", "cat", "echo", "sleep", "grep"] {
        layer = layer.symlink(&format!("usr/bin/{applet}"), "busybox");
    }
    let layer = host_programs(layer, &["/lib/systemd/systemd", "systemctl"])
        .symlink("usr/sbin/init", "/lib/systemd/systemd")
        .dir("etc", 0o755, (0, 0))
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644, (0, 0))
        .file("etc/group", b"root:x:0:\n", 0o644, (0, 0))
        .file("etc/os-release", b"ID=cove-test\nNAME=\"Cove systemd test\"\n", 0o644, (0, 0))
        .dir("etc/systemd", 0o755, (0, 0))
        .dir("etc/systemd/system", 0o755, (0, 0))
        .file(
            "etc/systemd/system/default.target",
            b"[Unit]\nDescription=Cove test target\nWants=hello.service\n",
            0o644,
            (0, 0),
        )
        .file(
            "etc/systemd/system/hello.service",
            b"[Service]\nExecStart=/bin/sh -c 'echo up as $$ > /run/hello.txt; exec sleep 1000000'\n",
            0o644,
            (0, 0),
        );
    Image {
        layers: vec![layer.finish()],
        env: vec!["PATH=/usr/bin:/usr/sbin".into()],
        cmd: Some(vec!["/sbin/init".into()]),
        ..Default::default()
    }
}

/// Polls `cmd` in the sandbox until it succeeds, for up to `secs` seconds; its output.
async fn sh_eventually(api: &Api, id: &str, cmd: &str, secs: u64) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let (code, out, err) = api.exec(id, cmd).await;
        if code == 0 {
            return out;
        }
        if std::time::Instant::now() >= deadline {
            let log = api.exec(id, "cat /var/log/cove-service.log").await.1;
            panic!("{cmd}: still failing after {secs}s: {out}{err}\nservice log:\n{log}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpine_distroless_and_systemd_images_run() {
    let registry = Registry::start(None);
    let srv = server(&[&registry], &[]);
    let api = srv.new_org(None);
    registry.push("busybox:1", &busybox_like(true)).await;
    registry.push("distroless:1", &busybox_like(false)).await;
    registry.push("systemd:1", &systemd_like()).await;
    // A list with another platform first: the linux/amd64 entry is the one used.
    let mut arm = busybox_like(true);
    arm.platform = Some(("linux".into(), "arm64".into()));
    let arm_digest = registry.push("multi:arm", &arm).await;
    let amd_digest = registry.push("multi:amd", &busybox_like(true)).await;
    registry.push_index("multi:1", &[(&arm_digest, "linux/arm64"), (&amd_digest, "linux/amd64")]).await;

    let name = |n: &str| format!("{n}-{}", common::rand_hex());
    let (bb, dl, multi, sd) = (name("busybox"), name("distroless"), name("multi"), name("systemd"));
    for (n, uri) in [(&bb, "busybox:1"), (&dl, "distroless:1"), (&multi, "multi:1"), (&sd, "systemd:1")] {
        let r = upload(&api, n, &registry.uri(uri), None).await;
        assert_eq!(r.status, 201, "{uri}: {}", r.text());
        if uri == "multi:1" {
            assert_eq!(r.json()["digest"], amd_digest.as_str());
        }
    }

    // Alpine-like: no /etc/passwd, no user in the config: root, at /.
    let id = api.create(json!({ "template_name": bb })).await;
    assert_eq!(sh(&api, &id, "id -u; echo $PATH").await, "0\n/bin\n");
    api.put_file(&id, "/tmp/f.txt", b"through the agent").await;
    assert_eq!(sh(&api, &id, "cat /tmp/f.txt").await, "through the agent");

    // Distroless-like: no shell, so commands fail clearly; files work.
    let dl_id = api.create(json!({ "template_name": dl })).await;
    let r = api.post(&format!("/v1/sandbox/{dl_id}/process/execute"), json!({ "command": "true" })).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("no /bin/sh"), "{}", r.text());
    let r = api.fs(&dl_id, "exists", json!({ "path": "/bin/busybox" })).await;
    assert_eq!(r.json()["exists"], true, "{}", r.text());

    // systemd boots as PID 1 of its own namespace and starts the image's unit; commands run
    // beside it (it is their PID 1, systemctl reaches it); a pause and resume keep it running.
    let sd_id = api.create(json!({ "template_name": sd })).await;
    let hello = sh_eventually(&api, &sd_id, "cat /run/hello.txt", 180).await;
    assert_eq!(sh(&api, &sd_id, "cat /proc/1/comm").await, "systemd\n");
    let active = sh_eventually(&api, &sd_id, "systemctl is-active hello.service", 60).await;
    assert_eq!(active, "active\n");
    let r = api.post(&format!("/v1/sandbox/{sd_id}/pause"), json!({})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(sh(&api, &sd_id, "cat /run/hello.txt").await, hello, "the unit ran again");
    assert_eq!(sh(&api, &sd_id, "systemctl is-active hello.service").await, "active\n");

    for sbx in [&id, &dl_id, &sd_id] {
        assert_eq!(api.delete(&format!("/v1/sandbox/{sbx}")).await.status, 204);
    }
    for n in [&bb, &dl, &multi, &sd] {
        let t = api.get(&format!("/v1/template/{n}")).await.json();
        assert_eq!(api.delete(&format!("/v1/template/{}", t["id"].as_str().unwrap())).await.status, 204);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_images_and_registries_get_clear_errors() {
    let registry = Registry::start(None);
    let private = Registry::start(Some(("puller", "s3cret-registry-pass")));
    let srv = server(&[&registry, &private], &["--template-limit", "2"]);
    let api = srv.new_org(None);
    registry.push("ok:1", &busybox_like(true)).await;
    private.push("private:1", &busybox_like(true)).await;
    let mut arm = busybox_like(true);
    arm.platform = Some(("linux".into(), "arm64".into()));
    registry.push("arm:1", &arm).await;
    let mut corrupt = busybox_like(true);
    corrupt.wrong_diff_ids = true;
    registry.push("corrupt:1", &corrupt).await;

    let field = |r: &common::Resp| common::fields(r);
    let ok = registry.uri("ok:1");
    for (name, uri, want) in [
        ("system/mine", ok.as_str(), "name"),
        ("has space", &ok, "name"),
        ("n", "", "uri"),
        ("n", "UPPER CASE", "uri"),
    ] {
        let r = upload(&api, name, uri, None).await;
        assert_eq!(field(&r), [want], "{name} {uri}: {}", r.text());
    }
    let r = upload(
        &api,
        "n",
        "ok:1",
        Some(json!({ "type": "aws", "aws_access_key_id": "a", "aws_secret_access_key": "b" })),
    )
    .await;
    assert_eq!(field(&r), ["credentials.type"], "{}", r.text());

    // What the registry says, as the field at fault.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    for (uri, creds, want, says) in [
        (registry.uri("nope:1"), None, "uri", "not found"),
        (registry.uri("ok:nope"), None, "uri", "not found"),
        (format!("{closed}/x:1"), None, "uri", "unreachable"),
        (registry.uri("arm:1"), None, "uri", "linux/amd64"),
        (registry.uri("corrupt:1"), None, "uri", "corrupt"),
        (private.uri("private:1"), None, "credentials", "credentials"),
        (
            private.uri("private:1"),
            Some(json!({ "type": "basic", "username": "puller", "password": "wrong" })),
            "credentials",
            "refused",
        ),
    ] {
        let r = upload(&api, &format!("bad-{}", common::rand_hex()), &uri, creds).await;
        assert_eq!(r.status, 400, "{uri}: {}", r.text());
        assert_eq!(field(&r), [want], "{uri}: {}", r.text());
        assert!(r.text().contains(says), "{uri}: {}", r.text());
        assert!(!r.text().contains("/tmp/") && !r.text().contains("wrong"), "{}", r.text());
    }
    let none = api.get("/v1/templates").await.json();
    assert_eq!(user_templates(&none), 0, "failed uploads left templates: {none}");
    assert!(
        std::fs::read_dir(srv.data_dir.join("templates")).map_or(true, |d| d.count() == 0),
        "files left behind"
    );

    // The right credentials pull; they are kept nowhere.
    let creds = json!({ "type": "basic", "username": "puller", "password": "s3cret-registry-pass" });
    let r = upload(&api, "private", &private.uri("private:1"), Some(creds)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(!r.text().contains("s3cret"), "{}", r.text());
    // Names are unique; the limit holds.
    let r = upload(&api, "private", &registry.uri("ok:1"), None).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let r = upload(&api, "second", &registry.uri("ok:1"), None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = upload(&api, "third", &registry.uri("ok:1"), None).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("limit"), "{}", r.text());
    let second = api.get("/v1/template/second").await.json();
    let r = api
        .req(
            reqwest::Method::PATCH,
            &format!("/v1/template/{}", second["id"].as_str().unwrap()),
            Some(json!({ "name": "private" })),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.text());
    let r = api.req(reqwest::Method::PATCH, "/v1/template/tpl-0000", Some(json!({ "name": "x" }))).await;
    assert_eq!(r.status, 404, "{}", r.text());
    // Another organization sees none of them.
    let other = srv.new_org(None);
    assert_eq!(other.delete(&format!("/v1/template/{}", second["id"].as_str().unwrap())).await.status, 404);
    common::assert_field(
        &other.post("/v1/sandbox", json!({ "template_name": "second" })).await,
        "template_name",
    );

    let log = srv.data_dir.join("server.log");
    assert!(!common::file_contains(&log, b"s3cret-registry-pass"), "the registry password is in the log");
    let stored = common::stored_metadata(&srv.data_dir);
    assert!(!stored.is_empty());
    assert!(
        memchr::memmem::find(&stored, b"s3cret-registry-pass").is_none(),
        "the registry password is in the metadata store"
    );
    for n in ["private", "second"] {
        let t = api.get(&format!("/v1/template/{n}")).await.json();
        assert_eq!(api.delete(&format!("/v1/template/{}", t["id"].as_str().unwrap())).await.status, 204);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_upload_leaves_nothing_half_made() {
    let registry = Registry::start(None);
    registry.push("busybox:1", &busybox_like(true)).await;
    let uri = registry.uri("busybox:1");
    let insecure = ["--insecure-registry", registry.addr.as_str()];
    for point in ["template.unpacked", "template.booted"] {
        let data_dir = std::env::temp_dir().join(format!("cove-test-tplcrash-{}", common::rand_hex()));
        let srv = TestServer::start_with(data_dir.clone(), &insecure, &[("COVE_FAULT", point)]);
        let api = srv.new_org(None);
        let body = json!({ "name": "survivor", "uri": uri });
        let sent =
            api.http.post(format!("{}/v1/template", api.url)).bearer_auth(&api.key).json(&body).send().await;
        assert!(sent.is_err(), "{point}: the server answered instead of dying: {sent:?}");
        srv.wait_exit();

        let srv = TestServer::start_in(data_dir.clone(), &insecure);
        let api = api.on(&srv);
        let list = api.get("/v1/templates").await.json();
        assert_eq!(user_templates(&list), 0, "{point}: {list}");
        let left: Vec<_> =
            std::fs::read_dir(data_dir.join("templates")).into_iter().flatten().flatten().collect();
        assert!(left.is_empty(), "{point}: template files left: {left:?}");
        let data = data_dir.to_string_lossy().into_owned();
        let vms: Vec<_> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&data))
            })
            .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with("qemu")))
            .collect();
        assert!(vms.is_empty(), "{point}: a template VM is left running");
        // This data dir's RAM directory (named as cove_runner::RunnerConfig::sandbox_shm_dir does).
        let shm_dir = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::canonicalize(&data_dir).unwrap().hash(&mut h);
            std::path::Path::new("/dev/shm/cove").join(format!("{:016x}", h.finish())).join("templates")
        };
        let shm: Vec<_> = std::fs::read_dir(&shm_dir).into_iter().flatten().flatten().collect();
        assert!(shm.is_empty(), "{point}: template RAM left: {shm:?}");
        // The name is free again, and the template works.
        let r = upload(&api, "survivor", &uri, None).await;
        assert_eq!(r.status, 201, "{point}: {}", r.text());
        let tid = r.json()["id"].as_str().unwrap().to_string();
        // Its RAM is on disk beside its frozen disk (a host reboot keeps both); the boot's RAM
        // file, where the check above looked, is gone.
        let ram = std::fs::read_dir(&shm_dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(ram, 0, "{point}: the template's boot RAM was left on tmpfs");
        let snapshots = data_dir.join("templates").join(&tid).join("snapshots");
        let on_disk = std::fs::read_dir(&snapshots)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("memory").exists() && e.path().join("disk.qcow2").exists())
            .count();
        assert_eq!(on_disk, 1, "{point}: no snapshot with its RAM on disk in {}", snapshots.display());
        let id = api.create(json!({ "template_name": "survivor" })).await;
        assert_eq!(sh(&api, &id, "id -u").await, "0\n");
        assert_eq!(api.delete(&format!("/v1/sandbox/{id}")).await.status, 204);
        assert_eq!(api.delete(&format!("/v1/template/{tid}")).await.status, 204);
        srv.kill(libc::SIGTERM);
    }
}
