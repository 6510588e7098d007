//! Real-VM tests of the sandbox lifecycle through the HTTP API.

mod common;

use common::TestServer;
use serde_json::json;

#[tokio::test]
async fn create_exec_delete_leaves_nothing_behind() {
    let server = TestServer::shared();
    let api = server.new_org(None);
    let id = api.create(json!({ "env_vars": { "FROM_CREATE": "one" } })).await;

    let (code, out, _) = api.exec(&id, "cat /etc/os-release").await;
    assert_eq!(code, 0);
    assert!(out.contains("Debian GNU/Linux 12 (bookworm)"), "{out}");

    let r = api
        .post(
            &format!("/v1/sandbox/{id}/process/execute"),
            json!({ "command": "echo $FROM_CREATE $FROM_REQUEST; id -un; hostname", "envs": { "FROM_REQUEST": "two" } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["stdout"], format!("one two\nuser\n{id}\n"));

    let pid_file = server.data_dir.join("sandboxes").join(&id).join("run/qemu.pid");
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_string();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

    assert_eq!(common::guest_ram_files(&id).len(), 1, "the sandbox's RAM file is on /dev/shm/cove");

    let r = api.delete(&format!("/v1/sandbox/{id}")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "QEMU {pid} still running");
    assert!(!server.data_dir.join("sandboxes").join(&id).exists(), "sandbox dir left behind");
    assert!(
        common::guest_ram_files(&id).is_empty(),
        "memory file left behind: {:?}",
        common::guest_ram_files(&id)
    );
    let cgroups = ["/sys/fs/cgroup/cove", "/sys/fs/cgroup/memory/cove", "/sys/fs/cgroup/pids/cove"];
    for cg in cgroups {
        assert!(!std::path::Path::new(cg).join(&id).exists(), "cgroup left in {cg}");
    }
    assert_eq!(api.get(&format!("/v1/sandbox/{id}")).await.status, 404);
}
