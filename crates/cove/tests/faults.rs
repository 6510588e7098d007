//! Crash and failure tests for pause and resume: the server is killed with SIGKILL at each step
//! of a pause and of a resume (`COVE_FAULT` makes it kill itself at exactly that point, as
//! `kill -9` would), restarted, and every sandbox must then be consistent: running with its
//! VM, or paused with a complete image and no VM, with the guest's processes and files intact.
//! And a blob store that fails during a pause leaves the sandbox running, and a server stopped
//! while it builds templates leaves nothing of the builds.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{qemu_pids, rand_hex, stored_images, Api, TestServer};
use serde_json::json;

/// A sandbox with a background process that appends a counter to a file.
async fn busy_sandbox(api: &Api) -> (String, String) {
    let id = api.create(json!({})).await;
    let script = "i=0; while true; do i=$((i+1)); echo $i >> /home/user/counter; sleep 0.1; done";
    let (code, _, err) = api
        .exec(&id, &format!("nohup setsid sh -c '{script}' >/dev/null 2>&1 & echo ok > /home/user/kept"))
        .await;
    assert_eq!(code, 0, "{err}");
    let (_, pid, _) = api.exec(&id, "sleep 0.5; pgrep -f 'while true' | head -1").await;
    assert!(!pid.trim().is_empty(), "background process did not start");
    (id, pid)
}

/// The invariants after a restart: running with one VM, or paused with one complete image and
/// no VM; then an exec works and finds the same process and files.
async fn assert_consistent(server: &TestServer, api: &Api, id: &str, pid: &str, point: &str) {
    let r = api.get(&format!("/v1/sandbox/{id}")).await;
    assert_eq!(r.status, 200, "{point}: {}", r.text());
    let state = r.json()["state"].as_str().unwrap().to_string();
    eprintln!("{point}: recovered as {state}");
    let images = stored_images(&server.data_dir);
    let ram = std::fs::read_dir("/dev/shm/cove")
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|d| d.path().join(format!("{id}.mem")).exists());
    match state.as_str() {
        "running" => {
            assert_eq!(qemu_pids(id).len(), 1, "{point}: running sandbox needs exactly one VM");
            assert!(images.is_empty(), "{point}: running sandbox left images behind: {images:?}");
        }
        "paused" => {
            assert!(qemu_pids(id).is_empty(), "{point}: paused sandbox still has a VM");
            assert!(!ram, "{point}: paused sandbox still holds its RAM file");
            assert_eq!(images.len(), 1, "{point}: paused sandbox needs exactly one image: {images:?}");
            let manifest = server.data_dir.join("blobs/images").join(&images[0]).join("manifest.json");
            assert!(manifest.exists(), "{point}: the image of a paused sandbox is incomplete");
        }
        other => panic!("{point}: sandbox left in state {other}"),
    }
    let (code, out, err) = api.exec(id, "pgrep -f 'while true' | head -1; cat /home/user/kept").await;
    assert_eq!(code, 0, "{point}: {err}");
    assert_eq!(out, format!("{pid}ok\n"), "{point}: the guest's process or files changed");
    // Whatever the recovery did, the guest's clock is the host's again.
    common::assert_guest_clock(api, id).await;
    // The counter's lines run on without a gap or a repeat: no lost or replayed disk writes.
    let (_, counter, _) = api.exec(id, "cat /home/user/counter").await;
    let n: Vec<u64> = counter.lines().map(|l| l.parse().unwrap()).collect();
    assert!(n.windows(2).all(|w| w[1] == w[0] + 1), "{point}: counter file has gaps or repeats");
    assert_eq!(api.get(&format!("/v1/sandbox/{id}")).await.json()["state"], "running", "{point}");
    assert_eq!(api.delete(&format!("/v1/sandbox/{id}")).await.status, 204, "{point}");
    assert!(stored_images(&server.data_dir).is_empty(), "{point}: delete left images behind");
}

fn fresh_dir() -> PathBuf {
    std::env::temp_dir().join(format!("cove-test-faults-{}", rand_hex()))
}

/// Sends a request that makes the server kill itself; returns once it is gone.
async fn request_into_crash(server: &TestServer, api: &Api, path: &str, body: serde_json::Value) {
    let r = api.http.post(format!("{}{path}", api.url)).bearer_auth(&api.key).json(&body).send().await;
    if let Ok(resp) = r {
        panic!("the server answered {} instead of crashing at its fault point", resp.status());
    }
    server.wait_exit();
}

#[tokio::test]
async fn crash_at_any_step_of_a_pause_leaves_a_consistent_sandbox() {
    for point in ["capture.saved", "capture.packed", "capture.stored", "pause.released"] {
        let dir = fresh_dir();
        let first = TestServer::start_with(dir.clone(), &[], &[("COVE_FAULT", point)]);
        let api = first.new_org(None);
        let (id, pid) = busy_sandbox(&api).await;
        request_into_crash(&first, &api, &format!("/v1/sandbox/{id}/pause"), json!({})).await;

        let second = TestServer::start_in(dir.clone(), &[]);
        let api = api.on(&second);
        assert_consistent(&second, &api, &id, &pid, point).await;
        second.kill(libc::SIGTERM);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test]
async fn crash_at_any_step_of_a_resume_leaves_a_consistent_sandbox() {
    for point in ["restore.unpacked", "resume.running"] {
        let dir = fresh_dir();
        let first = TestServer::start_with(dir.clone(), &[], &[("COVE_FAULT", point)]);
        let api = first.new_org(None);
        let (id, pid) = busy_sandbox(&api).await;
        let r = api.post(&format!("/v1/sandbox/{id}/pause"), json!({})).await;
        assert_eq!(r.status, 201, "{}", r.text());
        // The exec resumes the sandbox, and the server dies on the way.
        request_into_crash(
            &first,
            &api,
            &format!("/v1/sandbox/{id}/process/execute"),
            json!({"command": "true"}),
        )
        .await;

        let second = TestServer::start_in(dir.clone(), &[]);
        let api = api.on(&second);
        assert_consistent(&second, &api, &id, &pid, point).await;
        second.kill(libc::SIGTERM);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A blob store that runs out of space in the middle of a pause: the pause fails with a clear
/// error, the sandbox runs on with its processes, and no partial image is left.
#[tokio::test]
async fn a_failing_blob_store_leaves_the_sandbox_running() {
    let dir = fresh_dir();
    let blobs = dir.join("tiny-blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    // An idle guest's image takes tens of MiB: 16 MiB cannot hold it.
    mount(&["-t", "tmpfs", "-o", "size=16m", "tmpfs"], &blobs);
    let url = format!("file://{}", blobs.display());
    let server = TestServer::start_in(dir.clone(), &["--blob-url", &url]);
    let api = server.new_org(None);
    let (id, pid) = busy_sandbox(&api).await;

    let r = api.post(&format!("/v1/sandbox/{id}/pause"), json!({})).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("keeps running"), "{message}");
    assert_eq!(api.get(&format!("/v1/sandbox/{id}")).await.json()["state"], "running");
    assert_eq!(qemu_pids(&id).len(), 1);
    let (code, out, _) = api.exec(&id, "pgrep -f 'while true' | head -1; cat /home/user/kept").await;
    assert_eq!((code, out), (0, format!("{pid}ok\n")));
    let leftovers = walk(&blobs);
    assert!(leftovers.is_empty(), "a failed pause left blobs behind: {leftovers:?}");

    // Once there is room, the same sandbox pauses and comes back with the same process.
    mount(&["-o", "remount,size=1g"], &blobs);
    let r = api.post(&format!("/v1/sandbox/{id}/pause"), json!({})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let (code, out, _) = api.exec(&id, "pgrep -f 'while true' | head -1").await;
    assert_eq!((code, out), (0, pid.clone()));
    assert_eq!(api.delete(&format!("/v1/sandbox/{id}")).await.status, 204);
    server.kill(libc::SIGTERM);
    let _ = std::process::Command::new("umount").arg(&blobs).status();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pause image damaged in the store is refused on resume (every chunk is checksummed): the
/// request fails with a clear error, the sandbox stays paused with no VM, and once the image is
/// intact again the same sandbox comes back.
#[tokio::test]
async fn a_corrupt_image_is_refused_and_the_sandbox_stays_paused() {
    let server = TestServer::start(&[]);
    let api = server.new_org(None);
    let (id, pid) = busy_sandbox(&api).await;
    let r = api.post(&format!("/v1/sandbox/{id}/pause"), json!({})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let images = stored_images(&server.data_dir);
    assert_eq!(images.len(), 1, "{images:?}");
    // The runner kept the paused sandbox's files warm; without them (another runner, or a
    // restart after the image moved) a resume reads the image from the store.
    let warm = server.data_dir.join("warm").join(&id);
    common::eventually("the pause kept its RAM warm", || warm.join("memory").exists()).await;
    std::fs::remove_dir_all(&warm).unwrap();
    let blob = server.data_dir.join("blobs/images").join(&images[0]).join("memory");
    let original = std::fs::read(&blob).unwrap();
    let mut damaged = original.clone();
    let at = damaged.len() / 2;
    damaged[at] ^= 0x5a;
    std::fs::write(&blob, &damaged).unwrap();

    let r = api.post(&format!("/v1/sandbox/{id}/process/execute"), json!({"command": "true"})).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("stays paused") && message.contains("chunk"), "{message}");
    assert_eq!(api.get(&format!("/v1/sandbox/{id}")).await.json()["state"], "paused");
    assert!(qemu_pids(&id).is_empty(), "a refused resume left a VM");

    // Every chunk damaged: the guest runs while the RAM is checked, and touches damaged chunks
    // (their reads fail, and so does its QEMU). The answer is still the check's.
    let manifest_path = server.data_dir.join("blobs/images").join(&images[0]).join("manifest.json");
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    let table: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let (mut damaged, mut start) = (original.clone(), 0);
    for c in table["memory"]["chunks"].as_array().unwrap() {
        let stored = c["stored_len"].as_u64().unwrap() as usize;
        damaged[start + stored / 2] ^= 0x5a;
        start += stored;
    }
    assert_eq!(start, original.len());
    std::fs::write(&blob, &damaged).unwrap();
    let t = std::time::Instant::now();
    let r = api.post(&format!("/v1/sandbox/{id}/process/execute"), json!({"command": "true"})).await;
    eprintln!("every chunk damaged: answered in {:?}", t.elapsed());
    assert_eq!(r.status, 503, "{}", r.text());
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("stays paused") && message.contains("chunk"), "{message}");
    assert_eq!(api.get(&format!("/v1/sandbox/{id}")).await.json()["state"], "paused");
    assert!(qemu_pids(&id).is_empty(), "a refused resume left a VM");

    std::fs::write(&blob, &original).unwrap();

    // An image saved from a VM with another device set is refused before any VM starts.
    let mut other: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert!(other["machine"].as_str().is_some_and(|m| m.contains("virtio")), "{manifest}");
    other["machine"] = json!("q35 some-other-device");
    std::fs::write(&manifest_path, other.to_string()).unwrap();
    let r = api.post(&format!("/v1/sandbox/{id}/process/execute"), json!({"command": "true"})).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("another device set") && message.contains("stays paused"), "{message}");
    assert!(qemu_pids(&id).is_empty(), "a refused resume left a VM");
    std::fs::write(&manifest_path, &manifest).unwrap();

    let (code, out, _) = api.exec(&id, "pgrep -f 'while true' | head -1").await;
    assert_eq!((code, out), (0, pid));
    assert_eq!(api.delete(&format!("/v1/sandbox/{id}")).await.status, 204);
    server.kill(libc::SIGTERM);
}

/// A booted guest's first agent session that breaks (`COVE_FAULT` has the host take it as broken)
/// is replaced by a new one, and the boot goes on: once with the old session still open, the
/// new one was never accepted (QEMU serves one connection at a time) and the boot failed after
/// minutes. A stopped sandbox's start is a fresh boot.
#[tokio::test]
async fn a_broken_first_session_with_a_booted_guest_is_replaced() {
    let dir = fresh_dir();
    let server = TestServer::start_with(dir.clone(), &[], &[("COVE_FAULT", "agent.first-session")]);
    let api = server.new_org(None);
    let id = api.create(json!({})).await;
    api.sh_ok(&id, "echo kept > /home/user/kept").await;
    assert_eq!(api.action(&id, "stop").await.status, 200);
    let r = api.action(&id, "start").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(api.sh_ok(&id, "cat /home/user/kept").await, "kept\n");
    let replaced = common::server_log_lines(&dir)
        .iter()
        .filter(|l| l.contains("the first session with a booted guest's agent broke"))
        .count();
    assert!(replaced >= 1, "the fault never made a first session break");
    assert_eq!(api.delete(&format!("/v1/sandbox/{id}")).await.status, 204);
    server.kill(libc::SIGTERM);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server stopped (SIGTERM) while it builds its system templates in the background leaves no
/// build VM, network or file behind: the next start cannot take a build over, it builds again.
#[tokio::test]
async fn a_stopped_server_leaves_no_template_build_behind() {
    // Stopped as a build's VM starts, and once it boots.
    for after in [Duration::ZERO, Duration::from_millis(1500)] {
        stop_during_a_build(after).await;
    }
}

/// Starts a server that builds its templates, stops it `after` a build's VM has appeared, and
/// checks that nothing of the build is left.
async fn stop_during_a_build(after: Duration) {
    use std::os::unix::fs::PermissionsExt;
    // A cache of its own, with the shared one's guest images but no templates: the server
    // builds them as it starts. QEMU (another user) must reach the images through it.
    let shared = common::cache_dir();
    // Short: QEMU's sockets go below it (a socket path has at most 107 bytes).
    let cache = std::env::temp_dir().join(format!("cove-test-c{}", &rand_hex()[..8]));
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(&shared).unwrap() {
        let name = entry.unwrap().file_name();
        if name != "templates" {
            std::os::unix::fs::symlink(shared.join(&name), cache.join(&name)).unwrap();
        }
    }
    let data_dir = std::env::temp_dir().join(format!("cove-test-{}", rand_hex()));
    let server = TestServer::start_on(cache.clone(), data_dir.clone(), &[], &[]);
    // The build VMs are the QEMUs that name this cache.
    let building = || common::qemu_pids_naming(&cache.display().to_string());
    common::eventually("a template build's VM", || !building().is_empty()).await;
    tokio::time::sleep(after).await;
    let keys: Vec<String> = std::fs::read_dir(cache.join("templates"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    server.kill(libc::SIGTERM);
    // What is left is looked at, then cleared, then judged: a failure leaves nothing either.
    let vms = building();
    let files: Vec<&String> = keys.iter().filter(|k| cache.join("templates").join(k).exists()).collect();
    // Template versions are named for the paths of their images, so these are this cache's.
    let shm = cove_runner::RunnerConfig::new(cache.clone(), data_dir.clone()).template_shm_dir();
    let ram: Vec<PathBuf> =
        keys.iter().map(|k| shm.join(format!("tmpl-{k}.mem"))).filter(|f| f.exists()).collect();
    let networks: Vec<String> = keys
        .iter()
        .map(|k| format!("cove-tmpl-{k}"))
        .filter(|n| PathBuf::from("/run/netns").join(n).exists())
        .collect();
    for pid in &vms {
        // SAFETY: kill(2) with plain integers.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(*pid as i32, libc::SIGKILL);
        }
    }
    for n in &networks {
        let _ = std::process::Command::new("ip").args(["netns", "del", n]).status();
    }
    for f in &ram {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&data_dir);
    assert!(vms.is_empty(), "stopped {after:?} in, the server left template build VMs running: {vms:?}");
    assert!(files.is_empty(), "stopped {after:?} in, template builds left their files: {files:?}");
    assert!(ram.is_empty(), "stopped {after:?} in, template builds left their RAM: {ram:?}");
    assert!(networks.is_empty(), "stopped {after:?} in, template builds left their networks: {networks:?}");
}

fn mount(args: &[&str], target: &std::path::Path) {
    let ok = std::process::Command::new("mount").args(args).arg(target).status().unwrap().success();
    assert!(ok, "mount {args:?} {} (the tests run as root)", target.display());
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().to_path_buf())
        .collect()
}
