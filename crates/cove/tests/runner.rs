//! Real VMs on a runner in a process of its own (`cove runner`), driven by a control plane that
//! runs none (`cove server --runner`): the sandbox lives in the runner's data directory, and
//! exec, files, the metadata service, pause and resume with the guest's memory intact, and the
//! invoke route (a stream to a guest port) all go through the wire.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{start_runner, TestServer};
use serde_json::json;

#[tokio::test]
async fn a_sandbox_on_a_remote_runner_lives_its_life_through_the_wire() {
    // A fixed address, for the runner started again below.
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let runner_dir = std::env::temp_dir().join(format!("cove-test-runner-{}", common::rand_hex()));
    let mut runner = start_runner(&runner_dir, &listen, &[], &[], None);
    let token_file = runner.data_dir.join("runner-token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(token.trim().len(), 64);
    let args = [
        "--runner",
        &runner.addr,
        "--runner-fingerprint",
        &runner.fingerprint,
        "--runner-token-file",
        token_file.to_str().unwrap(),
    ];
    let server = TestServer::start(&args);
    let api = server.new_org(None);
    let id = api.create(json!({ "env_vars": { "FROM_CREATE": "remote" } })).await;

    // The VM is the runner's: its files are in the runner's data directory, none in the
    // control plane's.
    let pid_file = runner.data_dir.join("sandboxes").join(&id).join("run/qemu.pid");
    let pid = std::fs::read_to_string(&pid_file).unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()));
    assert!(Path::new(&format!("/proc/{}", pid.trim())).exists());
    assert!(!server.data_dir.join("sandboxes").join(&id).exists());

    assert_eq!(api.sh_ok(&id, "echo $FROM_CREATE; id -un").await, "remote\nuser\n");

    // The metadata service answers on the runner, from the control plane's records.
    let imds = "http://169.254.169.254";
    let doc = api
        .sh_ok(
            &id,
            &format!(
                "t=$(curl -sSf -X PUT -H 'X-metadata-token-ttl-seconds: 60' {imds}/latest/api/token) && \
                 curl -sSf -H \"X-metadata-token: $t\" -H 'Accept: application/json' {imds}/latest/meta-data/leap0"
            ),
        )
        .await;
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap_or_else(|e| panic!("{e}: {doc}"));
    assert!(doc.to_string().contains(&id), "{doc}");
    assert!(doc.to_string().contains("\"FROM_CREATE\":\"remote\""), "{doc}");
    api.put_file(&id, "/home/user/note.txt", b"kept on the disk").await;
    let counter = common::start_counter(&api, &id).await;

    let r = api.action(&id, "pause").await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(api.state_of(&id).await, "paused");
    assert!(!Path::new(&format!("/proc/{}", pid.trim())).exists(), "the paused VM still runs");
    // The next request resumes it; the counter process carried on from its memory.
    assert_eq!(api.sh_ok(&id, "cat /home/user/note.txt").await, "kept on the disk");
    let lines = common::counter_beyond(&api, &id, 0).await;
    common::assert_counts_on(&lines, counter);

    // A control plane killed and started again finds the sandbox running on the runner, the
    // same VM, its process still counting.
    let vm_pid = || std::fs::read_to_string(&pid_file).unwrap_or_default().trim().to_string();
    let before = vm_pid();
    server.kill(libc::SIGKILL);
    let server = TestServer::start_in(server.data_dir.clone(), &args);
    let api = api.on(&server);
    assert_eq!(api.state_of(&id).await, "running");
    assert_eq!(vm_pid(), before, "not the same VM");
    assert!(Path::new(&format!("/proc/{before}")).exists());
    let lines = common::counter_beyond(&api, &id, lines.len() as u64).await;
    common::assert_counts_on(&lines, counter);

    // The runner killed and started again (same address, certificate and token): the control
    // plane finds another run of it and adopts the sandbox there again; the same VM counts on.
    let _ = runner.child.kill();
    let _ = runner.child.wait();
    runner = start_runner(&runner_dir, &listen, &[], &[], None);
    let mut answered = false;
    for _ in 0..60 {
        let r =
            api.post(&format!("/v1/sandbox/{id}/process/execute"), json!({ "command": "echo back" })).await;
        if r.status == 200 && r.json()["stdout"] == "back\n" {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(answered, "the sandbox did not answer after the runner restarted");
    assert_eq!(api.state_of(&id).await, "running");
    assert_eq!(vm_pid(), before, "not the same VM");
    let lines = common::counter_beyond(&api, &id, lines.len() as u64).await;
    common::assert_counts_on(&lines, counter);

    // The invoke route: a stream to a guest port, through the runner.
    api.sh_ok(
        &id,
        "cd /tmp && echo served-remotely > hello.txt && (setsid python3 -m http.server 8000 >/dev/null 2>&1 &)",
    )
    .await;
    let body = common::invoke_until(&api, &server.url, &id, 8000, "/hello.txt", "served-remotely\n").await;
    assert_eq!(body, "served-remotely\n");

    let r = api.delete(&format!("/v1/sandbox/{id}")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(!runner.data_dir.join("sandboxes").join(&id).exists(), "the runner kept the sandbox's files");
    assert!(common::qemu_pids(&id).is_empty());
}
