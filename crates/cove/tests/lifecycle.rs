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

    // Its RAM is its template's, mapped copy-on-write: no RAM file of its own.
    assert!(common::guest_ram_files(&id).is_empty(), "a new sandbox has a RAM file of its own");
    let pid: u32 = pid.parse().unwrap();
    common::cloned_ram_mapping(pid);

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

/// Sandboxes made from one template map its RAM copy-on-write from one sealed memfd: the pages
/// they have not written are the same host pages, and no QEMU can write that memfd (it is
/// sealed: a write through QEMU's own open file is refused). What each guest writes stays its
/// own.
#[tokio::test]
async fn sandboxes_of_a_template_share_its_pages_and_cannot_change_them() {
    let server = TestServer::shared();
    let api = server.new_org(None);
    let a = api.create(json!({})).await;
    let b = api.create(json!({})).await;
    api.sh_ok(&a, "echo from-a > /dev/shm/mine").await;
    let pids: Vec<u32> = [&a, &b].iter().map(|id| common::qemu_pids(id)[0]).collect();
    for &pid in &pids {
        let (range, shared_kb) = common::cloned_ram_mapping(pid);
        assert!(shared_kb >= 8 << 10, "QEMU {pid} shares only {shared_kb} kB of the template's pages");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/map_files/{range}"))
            .expect("the mapped memfd opens for writing");
        use std::os::unix::fs::FileExt;
        let err = file.write_all_at(b"x", 0).expect_err("a sealed template memfd took a write");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    }
    assert_eq!(api.sh_ok(&a, "cat /dev/shm/mine").await, "from-a\n");
    assert_eq!(api.exec(&b, "cat /dev/shm/mine").await.0, 1, "b sees nothing a wrote");
    for id in [&a, &b] {
        assert_eq!(api.delete(&format!("/v1/sandbox/{id}")).await.status, 204);
    }
}
