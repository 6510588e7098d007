//! Real-VM tests of pause/resume and stop/start: a paused sandbox has no QEMU and holds no
//! memory on the host (its runner keeps its RAM file on disk, a warm copy of its image), yet
//! resumes (transparently, on its next guest request) with its processes, their memory and its
//! files exactly as they were; a stopped one keeps only its disk.

mod common;

use std::collections::BTreeSet;

use common::{
    assert_counts_on, assert_guest_clock, counter_beyond, counter_lines, guest_ram_files, qemu_pids,
    server_log_lines, start_counter, stored_images, Api, Leftovers, TestServer,
};
use serde_json::{json, Value};

/// The VM tests of this file take turns: the host has few cores and QEMU runs under TCG, and
/// some checks compare the image directories before and after an action.
static VM_TURN: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// A hash of every file under the home directory but the growing counter file.
const HOME_HASH: &str =
    "cd /home/user && find . -type f ! -name counter.log -print0 | sort -z | xargs -0 sha256sum | sha256sum";

fn images(server: &TestServer) -> BTreeSet<String> {
    stored_images(&server.data_dir).into_iter().collect()
}

/// Pauses `id` and checks that its VM is gone from the host; returns the pause image's name.
async fn pause(server: &TestServer, api: &Api, id: &str) -> String {
    let before = images(server);
    let r = api.action(id, "pause").await;
    assert_eq!(r.status, 201, "pause {id}: {}", r.text());
    assert_eq!(r.json()["id"], id);
    assert_eq!(r.json()["state"], "paused");
    assert_eq!(api.state_of(id).await, "paused");
    assert_eq!(qemu_pids(id), Vec::<u32>::new(), "QEMU of paused {id} still runs");
    assert_eq!(guest_ram_files(id), Vec::<std::path::PathBuf>::new(), "RAM file of paused {id} left");
    let new: Vec<String> = images(server).difference(&before).cloned().collect();
    assert_eq!(new.len(), 1, "one new image expected: {new:?}");
    assert!(new[0].starts_with("pause-"), "{new:?}");
    new[0].clone()
}

/// The `message` of an error answer with status `status`.
fn message(r: &common::Resp, status: u16) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    r.json()["message"].as_str().unwrap_or_else(|| panic!("no message: {}", r.text())).to_string()
}

/// "resumed" lines the server logged for `id`.
fn resumes_logged(server: &TestServer, id: &str) -> usize {
    let needle = format!("sandbox_id={id}");
    server_log_lines(&server.data_dir)
        .iter()
        .filter(|l| l.contains(" resumed ") && l.contains(&needle))
        .count()
}

#[tokio::test]
async fn memory_and_files_survive_five_pause_resume_cycles() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({ "timeout": 1800 })).await;
    left.sandbox(&id);

    let resumes = r#"cove_sandbox_operation_seconds_count{operation="resume",outcome="ok"}"#;
    let paused_bytes = r#"cove_image_bytes_total{kind="pause_stored"}"#;
    let read_bytes = r#"cove_image_bytes_total{kind="resume_read"}"#;
    let pause_calls = r#"cove_http_request_duration_seconds_count{method="POST",route="/v1/sandbox/{sandboxID}/pause",status="201"}"#;
    let metrics_before =
        [server.metric(resumes).await, server.metric(paused_bytes).await, server.metric(pause_calls).await];

    let pid = start_counter(&api, &id).await;
    for cycle in 1..=5 {
        // New files, through the filesystem API and from a command, random content included.
        let dir = format!("/home/user/cycle-{cycle}");
        api.put_file(
            &id,
            &format!("{dir}/api.txt"),
            format!("written by the API in cycle {cycle}\n").as_bytes(),
        )
        .await;
        api.sh_ok(
            &id,
            &format!("echo cycle {cycle} > {dir}/exec.txt && head -c 65536 /dev/urandom > {dir}/random.bin"),
        )
        .await;
        let hash = api.sh_ok(&id, HOME_HASH).await;
        let before = counter_lines(&api, &id).await;
        let last_before = assert_counts_on(&before, pid);

        let image = pause(server, &api, &id).await;

        // Resumed by the next guest request, not by the resume endpoint.
        let (code, out, err) = api.exec(&id, &format!("kill -0 {pid} && echo alive")).await;
        assert_eq!((code, out.as_str()), (0, "alive\n"), "cycle {cycle}: counter process gone: {err}");
        assert_eq!(api.state_of(&id).await, "running");
        assert_eq!(qemu_pids(&id).len(), 1, "one QEMU for the resumed {id}");
        // The spent image is deleted right after the answer.
        common::eventually(&format!("cycle {cycle}: spent pause image {image} deleted"), || {
            !images(server).contains(&image)
        })
        .await;
        assert_guest_clock(&api, &id).await;
        assert_eq!(api.sh_ok(&id, HOME_HASH).await, hash, "cycle {cycle}: home directory changed");
        let after = counter_beyond(&api, &id, last_before).await;
        assert_eq!(&after[..before.len()], &before[..], "cycle {cycle}: counter lines rewritten");
        assert_counts_on(&after, pid);
    }
    assert_eq!(resumes_logged(server, &id), 5);
    // The metrics endpoint saw them: five resumes on guest requests (no API call names them),
    // five pause calls, the bytes they stored; and the images they read.
    assert!(server.metric(resumes).await >= metrics_before[0] + 5.0);
    assert!(server.metric(paused_bytes).await > metrics_before[1]);
    assert!(server.metric(pause_calls).await >= metrics_before[2] + 5.0);
    assert!(server.metric(read_bytes).await > 0.0);
    assert!(server.metric(r#"cove_sandboxes{state="running"}"#).await >= 1.0);
    assert_eq!(api.sh_ok(&id, "hostname").await, format!("{id}\n"));
    left.delete_sandbox(&id).await;
}

/// Resident bytes of QEMU's mapping of the sandbox's RAM file `<data>/sandboxes/<id>/memory`
/// (a warm resume maps it copy-on-write), from `/proc/<pid>/smaps`.
fn ram_mapping_rss(id: &str) -> u64 {
    let tail = format!("/sandboxes/{id}/memory");
    mapping_rss(id, "the RAM file from the warm image", |l| l.ends_with(&tail))
}

/// Resident bytes of the mapping of QEMU of `id` whose `/proc/<pid>/smaps` header line is
/// `header` (which names it in a failure).
fn mapping_rss(id: &str, what: &str, header: impl Fn(&str) -> bool) -> u64 {
    let pids = qemu_pids(id);
    assert_eq!(pids.len(), 1, "one QEMU for {id}");
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", pids[0])).unwrap();
    let mut lines = smaps.lines().skip_while(|l| !header(l));
    assert!(lines.next().is_some(), "QEMU of {id} does not map {what}");
    let rss = lines.find_map(|l| l.strip_prefix("Rss:")).expect("an Rss line");
    rss.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap() << 10
}

/// Resident bytes of QEMU's mapping of the RAM file a cold resume serves from the image.
fn lazy_mapping_rss(id: &str) -> u64 {
    let inode = cove_runner::lazymem::INODE.to_string();
    mapping_rss(id, "the RAM file served from the image", |l| l.split_whitespace().nth(4) == Some(&inode))
}

/// The lazy memory servers of sandbox `id` (`cove lazy-memory <its dir>`).
fn lazy_servers(id: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| {
            let c = String::from_utf8_lossy(c);
            c.contains("lazy-memory") && c.contains(&format!("/sandboxes/{id}"))
        })
        .count()
}

/// A resume on the runner that paused the sandbox maps the RAM file it kept instead of
/// unpacking the image: the guest runs before its memory is read, and pages come in as it
/// touches them. 64 MiB of random bytes in the guest's tmpfs are not resident after the resume
/// and are after the guest reads them, with the same hash.
#[tokio::test]
async fn a_warm_resume_reads_guest_memory_on_first_touch() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({ "timeout": 1800 })).await;
    left.sandbox(&id);
    let hash = api.sh_ok(&id, "head -c 64M /dev/urandom > /dev/shm/big && sha256sum < /dev/shm/big").await;
    pause(server, &api, &id).await;
    // The RAM of a sandbox made from a template is on tmpfs: it reaches the disk after the
    // pause has answered.
    let warm = server.data_dir.join("warm").join(&id);
    common::eventually("the pause kept the RAM file warm", || warm.join("memory").exists()).await;

    assert_eq!(api.sh_ok(&id, "true").await, "");
    assert!(!warm.exists(), "the resume took the warm files");
    let before = ram_mapping_rss(&id);
    assert!(before < 48 << 20, "{} MiB of guest RAM resident right after the resume", before >> 20);
    assert_eq!(api.sh_ok(&id, "sha256sum < /dev/shm/big").await, hash, "guest memory changed");
    let after = ram_mapping_rss(&id);
    assert!(
        after >= before + (48 << 20),
        "reading 64 MiB brought {} MiB in (from {} MiB)",
        (after - before) >> 20,
        before >> 20
    );

    // Paused again (the pages it wrote since are written back), resumed warm again, after
    // longer than the clock check's slack: the greeting brought the guest the time.
    api.sh_ok(&id, "echo more >> /dev/shm/big").await;
    let hash = api.sh_ok(&id, "sha256sum < /dev/shm/big").await;
    pause(server, &api, &id).await;
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    assert_eq!(api.sh_ok(&id, "sha256sum < /dev/shm/big").await, hash);
    assert_guest_clock(&api, &id).await;
    let needle = format!("sandbox_id={id}");
    let clock_greetings = server_log_lines(&server.data_dir)
        .iter()
        .filter(|l| l.contains("sandbox VM restored") && l.contains(&needle))
        .filter(|l| l.contains("told_in_greeting=true"))
        .count();
    assert_eq!(
        clock_greetings, 3,
        "the clone got its identity, both warm resumes the clock in their greeting"
    );

    // A sandbox deleted while paused leaves no warm files (its RAM file was on disk: it moved
    // into the entry before the pause answered).
    // Its network namespace is kept with the entry (the warm resumes above took it as it was)
    // and goes with it.
    pause(server, &api, &id).await;
    assert!(warm.join("memory").exists());
    let netns = format!("cove-{id}");
    assert!(cove_net::netns::exists(&netns), "the paused sandbox's namespace was not kept");
    let kept = server_log_lines(&server.data_dir)
        .iter()
        .filter(|l| l.contains("sandbox network kept from its pause") && l.contains(&needle))
        .count();
    assert_eq!(kept, 2, "both warm resumes took the network kept from the pause");
    left.delete_sandbox(&id).await;
    assert!(!warm.exists(), "the deleted sandbox's warm files are gone");
    assert!(!cove_net::netns::exists(&netns), "the deleted sandbox's namespace is gone");
}

/// A resume without the warm files (as on another runner) serves the guest's RAM from the image
/// as the guest touches it: 64 MiB of random bytes in the guest's tmpfs are not resident after
/// the resume and are after the guest reads them, with the same hash. The next pause stores
/// what the guest wrote over the image's RAM, which a second such resume finds whole. The
/// server of the RAM runs only as long as the VM, and nothing stays mounted. A guest whose
/// identity has not changed since its pause is told only the clock; one whose identity has (here
/// its egress CA, as on a runner that holds another) is told the new one.
#[tokio::test]
async fn a_cold_resume_serves_guest_memory_from_the_image() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({ "timeout": 1800 })).await;
    left.sandbox(&id);
    let mut hash =
        api.sh_ok(&id, "head -c 64M /dev/urandom > /dev/shm/big && sha256sum < /dev/shm/big").await;
    let warm = server.data_dir.join("warm").join(&id);
    let mounts =
        || std::fs::read_to_string("/proc/mounts").unwrap().matches(&format!("/sandboxes/{id}/")).count();
    // The same machine resumes: its identity stays (hostname, the egress CA in the trust store),
    // and so do the guest's own edits of the files the identity first wrote.
    api.sh_ok(&id, "echo '192.88.99.7 mine' | sudo tee -a /etc/hosts >/dev/null").await;
    let identity = "hostname; grep -c mine /etc/hosts; ca=/usr/local/share/ca-certificates/cove-egress.crt; \
                    tail -c $(wc -c < $ca) /etc/ssl/certs/ca-certificates.crt | cmp - $ca && echo trusted";
    assert_eq!(api.sh_ok(&id, identity).await, format!("{id}\n1\ntrusted\n"));
    // Round 2 resumes the image that round 1's lazily resumed VM was paused into.
    let ca_file = server.data_dir.join("net").join(format!("{id}.pem"));
    let first_ca = cove_net::ca::SandboxCa::from_pem(&std::fs::read_to_string(&ca_file).unwrap()).unwrap();
    let new_ca = cove_net::ca::SandboxCa::generate(&id);
    for round in 1..=2 {
        pause(server, &api, &id).await;
        common::eventually("the RAM server ends with its VM", || lazy_servers(&id) == 0).await;
        common::eventually("the pause kept the RAM file warm", || warm.join("memory").exists()).await;
        std::fs::remove_dir_all(&warm).unwrap();
        if round == 2 {
            std::fs::write(&ca_file, new_ca.to_pem()).unwrap();
        }

        assert_eq!(api.sh_ok(&id, "true").await, "");
        let before = lazy_mapping_rss(&id);
        assert_eq!(api.sh_ok(&id, identity).await, format!("{id}\n1\ntrusted\n"), "round {round}");
        let trusted = api.sh_ok(&id, "cat /usr/local/share/ca-certificates/cove-egress.crt").await;
        let want = if round == 2 { &new_ca } else { &first_ca };
        assert_eq!(trusted, want.cert_pem(), "round {round}: the guest trusts its sandbox's CA of now");
        assert_guest_clock(&api, &id).await;
        assert!(before < 48 << 20, "round {round}: {} MiB resident right after the resume", before >> 20);
        assert_eq!(
            api.sh_ok(&id, "sha256sum < /dev/shm/big").await,
            hash,
            "round {round}: guest memory changed"
        );
        let after = lazy_mapping_rss(&id);
        assert!(
            after >= before + (48 << 20),
            "round {round}: reading 64 MiB brought {} MiB in (from {} MiB)",
            (after - before) >> 20,
            before >> 20
        );
        assert_eq!(lazy_servers(&id), 1, "round {round}: one server of the RAM");
        assert_eq!(mounts(), 0, "round {round}: the RAM file's mount is detached once QEMU has it");
        hash =
            api.sh_ok(&id, &format!("echo round {round} >> /dev/shm/big && sha256sum < /dev/shm/big")).await;
    }
    // Paused once more and resumed warm: what the guest wrote after the cold resume is kept.
    pause(server, &api, &id).await;
    assert_eq!(api.sh_ok(&id, "sha256sum < /dev/shm/big").await, hash);
    assert_eq!(lazy_servers(&id), 0, "a warm resume needs no server");
    // Every greeting brought the guest what it needed: the identity (the clone from the
    // template, the cold resume after the CA changed), else the clock alone (the cold resume
    // of the same guest, the warm resume).
    let needle = format!("sandbox_id={id}");
    let restored: Vec<_> = server_log_lines(&server.data_dir)
        .into_iter()
        .filter(|l| l.contains("sandbox VM restored") && l.contains(&needle))
        .collect();
    assert!(restored.iter().all(|l| l.contains("told_in_greeting=true")), "{restored:#?}");
    let clock_only: Vec<bool> = restored.iter().map(|l| l.contains("clock_only=true")).collect();
    assert_eq!(clock_only, [false, true, false, true], "{restored:#?}");
    left.delete_sandbox(&id).await;
    assert!(!server.data_dir.join("sandboxes").join(&id).exists());
}

#[tokio::test]
async fn concurrent_requests_share_one_resume() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({})).await;
    left.sandbox(&id);
    api.sh_ok(&id, "echo kept > /home/user/kept.txt").await;

    // Resume of a running sandbox returns it as it is.
    let r = api.action(&id, "resume").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((r.json()["id"].clone(), r.json()["state"].clone()), (json!(id), json!("running")));

    pause(server, &api, &id).await;
    let m = message(&api.action(&id, "pause").await, 409);
    assert!(m.contains("paused"), "{m}");

    assert_eq!(resumes_logged(server, &id), 0);
    let execs = (0..4).map(|i| {
        let api = api.clone();
        let id = id.clone();
        tokio::spawn(async move { api.exec(&id, &format!("echo {i} $(cat /home/user/kept.txt)")).await })
    });
    for (i, outcome) in futures::future::join_all(execs).await.into_iter().enumerate() {
        let (code, out, err) = outcome.expect("exec task");
        assert_eq!((code, out), (0, format!("{i} kept\n")), "{err}");
    }
    assert_eq!(resumes_logged(server, &id), 1, "one resume for four concurrent requests");
    assert_eq!(api.state_of(&id).await, "running");

    // The explicit endpoint resumes a paused sandbox too.
    pause(server, &api, &id).await;
    let r = api.action(&id, "resume").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running");
    assert_eq!(qemu_pids(&id).len(), 1);
    assert_eq!(resumes_logged(server, &id), 2);
    assert_eq!(api.sh_ok(&id, "cat /home/user/kept.txt").await, "kept\n");
    left.delete_sandbox(&id).await;
}

#[tokio::test]
async fn invalid_transitions_are_conflicts() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({})).await;
    left.sandbox(&id);

    let m = message(&api.action(&id, "start").await, 409);
    assert!(m.contains("running"), "{m}");

    let image = pause(server, &api, &id).await;
    let m = message(&api.action(&id, "stop").await, 409);
    assert!(m.contains("paused"), "{m}");
    let m = message(&api.action(&id, "start").await, 409);
    assert!(m.contains("paused"), "{m}");
    assert_eq!(api.state_of(&id).await, "paused", "a refused action changed nothing");

    left.delete_sandbox(&id).await;
    assert_eq!(api.get(&format!("/v1/sandbox/{id}")).await.status, 404);
    assert!(!images(server).contains(&image), "image {image} of the deleted paused sandbox left");
    assert!(!server.data_dir.join("sandboxes").join(&id).exists(), "sandbox dir left behind");
    for action in ["pause", "resume", "stop", "start"] {
        assert_eq!(api.action(&id, action).await.status, 404, "{action} of a deleted sandbox");
    }
}

/// Guest calls race the timeout's auto-pauses: a sandbox with a 1 s timeout is paused again
/// and again while two clients keep running commands and reading files in it. A pause waits
/// for the calls in flight, and calls that arrive during one wait and resume the sandbox:
/// every call succeeds. `COVE_RACE_PAUSES` pauses (default 50).
#[tokio::test]
async fn guest_calls_racing_auto_pauses_all_succeed() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({ "timeout": 1, "auto_pause": true })).await;
    left.sandbox(&id);
    let want: usize = std::env::var("COVE_RACE_PAUSES").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let pauses = || {
        server_log_lines(&server.data_dir)
            .iter()
            .filter(|l| l.contains("timeout reached, pausing") && l.contains(&id))
            .count()
    };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = |n: u32| {
        let (api, id, done) = (api.clone(), id.clone(), done.clone());
        tokio::spawn(async move {
            let mut calls = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                calls += 1;
                let cmd = format!("sleep 0.3; echo {n}-{calls} | tee /home/user/race-{n}.txt");
                let r =
                    api.post(&format!("/v1/sandbox/{id}/process/execute"), json!({ "command": cmd })).await;
                assert_eq!(r.status, 200, "exec {calls} of client {n}: {}", r.text());
                assert_eq!(r.json()["stdout"], format!("{n}-{calls}\n"), "{}", r.text());
                let r = api.fs(&id, "read-file", json!({ "path": format!("/home/user/race-{n}.txt") })).await;
                assert_eq!(r.status, 200, "read {calls} of client {n}: {}", r.text());
                assert_eq!(r.text(), format!("{n}-{calls}\n"));
            }
            calls
        })
    };
    let clients = [client(1), client(2)];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60 * want as u64);
    while pauses() < want && std::time::Instant::now() < deadline && !clients.iter().any(|c| c.is_finished())
    {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut calls = 0;
    for c in clients {
        calls += c.await.expect("a client's call failed");
    }
    assert!(pauses() >= want, "{} auto-pauses in the time allowed (wanted {want})", pauses());
    eprintln!("{calls} commands and reads, all answered, across {} auto-pauses", pauses());
    left.delete_sandbox(&id).await;
}

#[tokio::test]
async fn timeout_pauses_with_auto_pause_and_deletes_without() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let pausing = api.create(json!({ "timeout": 3, "auto_pause": true })).await;
    left.sandbox(&pausing);
    let deleted = api.create(json!({ "timeout": 2 })).await;
    left.sandbox(&deleted);
    api.sh_ok(&pausing, "echo before the timeout > /home/user/note.txt").await;

    let (mut paused, mut gone) = (false, false);
    for _ in 0..150 {
        if !paused {
            paused = api.state_of(&pausing).await == "paused";
        }
        if !gone {
            gone = api.get(&format!("/v1/sandbox/{deleted}")).await.status == 404;
        }
        if paused && gone {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(paused, "the auto_pause sandbox was not paused at its timeout: {}", api.state_of(&pausing).await);
    assert!(gone, "the sandbox without auto_pause was not deleted at its timeout");
    left.forget(&format!("/v1/sandbox/{deleted}"));
    assert_eq!(qemu_pids(&pausing), Vec::<u32>::new());
    assert_eq!(qemu_pids(&deleted), Vec::<u32>::new());

    assert_eq!(api.sh_ok(&pausing, "cat /home/user/note.txt").await, "before the timeout\n");
    let state = api.state_of(&pausing).await;
    // A resume gives the sandbox its timeout (3 s) afresh, so it may be paused again already.
    let repaused = server_log_lines(&server.data_dir)
        .iter()
        .filter(|l| l.contains("timeout reached, pausing") && l.contains(&pausing))
        .count();
    assert!(state == "running" || (state == "paused" && repaused >= 2), "state {state} after the resume");
    assert_eq!(resumes_logged(server, &pausing), 1);
    left.delete_sandbox(&pausing).await;
}

/// The guest's root disk and filesystem sizes, MiB.
async fn guest_disk_mib(api: &Api, id: &str) -> (u64, u64) {
    let out = api
        .sh_ok(id, "echo $(( $(cat /sys/class/block/vda/size) / 2048 )) $(df -m --output=size / | tail -1)")
        .await;
    let mut it = out.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

/// Also: a sandbox that asks for more disk than its template's gets it, grown in the guest,
/// and keeps it across the stop.
#[tokio::test]
async fn stop_keeps_files_and_start_boots_afresh() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let templates = api.get("/v1/templates").await.json();
    let base = templates["items"].as_array().unwrap().iter().find(|t| t["name"] == "system/debian:bookworm");
    let base = base.and_then(|t| t["disk"].as_u64()).expect("the system template's disk");
    let r = api
        .post("/v1/sandbox", json!({ "template_name": "system/debian:bookworm", "disk": base + 512, "env_vars": { "KEPT_ENV": "yes" } }))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    left.sandbox(&id);
    assert_eq!(r.json()["disk"], base + 512);
    let (disk, fs) = guest_disk_mib(&api, &id).await;
    assert_eq!(disk, base + 512, "the guest's root disk");
    assert!(fs > base + 400, "the root filesystem was not grown: {fs} MiB on a {disk} MiB disk");
    let pid = start_counter(&api, &id).await;
    api.put_file(&id, "/home/user/data/kept.txt", b"kept across a stop\n").await;
    api.sh_ok(&id, "echo from a command > /home/user/data/exec.txt").await;

    let r = api.action(&id, "stop").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((r.json()["id"].clone(), r.json()["state"].clone()), (json!(id), json!("stopped")));
    assert_eq!(api.state_of(&id).await, "stopped");
    assert_eq!(qemu_pids(&id), Vec::<u32>::new(), "QEMU of stopped {id} still runs");
    assert_eq!(guest_ram_files(&id), Vec::<std::path::PathBuf>::new(), "RAM file of stopped {id} left");
    assert!(server.data_dir.join("sandboxes").join(&id).join("disk.qcow2").exists(), "disk not kept");

    let r = api.post(&format!("/v1/sandbox/{id}/process/execute"), json!({ "command": "true" })).await;
    assert!(message(&r, 409).contains("stopped"), "{}", r.text());
    let r = api.fs(&id, "read-file", json!({ "path": "/home/user/data/kept.txt" })).await;
    assert_eq!(r.status, 409, "{}", r.text());
    for action in ["stop", "pause", "resume"] {
        let m = message(&api.action(&id, action).await, 409);
        assert!(m.contains("stopped"), "{action}: {m}");
    }

    let r = api.action(&id, "start").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running");
    assert_eq!(qemu_pids(&id).len(), 1);
    let out = api
        .sh_ok(&id, "cat /home/user/data/kept.txt /home/user/data/exec.txt; hostname; echo $KEPT_ENV")
        .await;
    assert_eq!(out, format!("kept across a stop\nfrom a command\n{id}\nyes\n"));
    assert_eq!(guest_disk_mib(&api, &id).await, (disk, fs), "the disk's size after the stop");
    // (The pattern does not match this command's own shell.)
    let (code, out, _) = api.exec(&id, "pgrep -af 'counter[.]log'").await;
    assert_eq!((code, out.as_str()), (1, ""), "the counter process ({pid} before the stop) outlived it");
    assert_guest_clock(&api, &id).await;
    left.delete_sandbox(&id).await;
}

/// Start over the org limit: a stopped sandbox does not hold a place, a started one does.
#[tokio::test]
async fn start_respects_the_sandbox_limit() {
    let _turn = VM_TURN.acquire().await.unwrap();
    let server = TestServer::shared();
    let api = server.new_org(Some(1));
    let left = Leftovers::new(&api);
    let first = api.create(json!({})).await;
    left.sandbox(&first);
    let r = api.action(&first, "stop").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let second = api.create(json!({})).await;
    left.sandbox(&second);
    let r = api.action(&first, "start").await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(api.state_of(&first).await, "stopped");
    // Likewise, resuming a paused sandbox needs a place.
    pause(server, &api, &second).await;
    let r = api.action(&first, "start").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r: Value = api.action(&second, "resume").await.json();
    assert!(r["message"].as_str().is_some_and(|m| m.contains("limit")), "{r}");
    let r = api.post(&format!("/v1/sandbox/{second}/process/execute"), json!({ "command": "true" })).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(api.state_of(&second).await, "paused");
    left.delete_sandbox(&first).await;
    left.delete_sandbox(&second).await;
}
