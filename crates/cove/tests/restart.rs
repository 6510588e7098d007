//! A restarted server finds its sandboxes again, including after being killed with SIGKILL.

mod common;

use common::TestServer;
use serde_json::json;

#[tokio::test]
async fn sandboxes_survive_server_restarts() {
    let first = TestServer::start(&[]);
    let api = first.new_org(None);
    let id = api.create(json!({ "env_vars": { "KEPT": "yes" } })).await;
    let (code, _, _) =
        api.exec(&id, "nohup sh -c 'while true; do sleep 1; done' >/dev/null 2>&1 & echo started").await;
    assert_eq!(code, 0);
    let (_, before, _) = api.exec(&id, "pgrep -f 'while true' | head -1").await;
    let hash = api.sh_ok(&id, "head -c 16M /dev/urandom > /dev/shm/kept && sha256sum < /dev/shm/kept").await;
    // Resumed cold (its warm files dropped, as on another runner): a helper process serves its
    // RAM, and must outlive the server as QEMU does.
    let pause = format!("/v1/sandbox/{id}/pause");
    assert_eq!(api.post(&pause, json!({})).await.status, 201);
    let warm = first.data_dir.join("warm").join(&id);
    common::eventually("the pause kept the RAM file warm", || warm.join("memory").exists()).await;
    std::fs::remove_dir_all(&warm).unwrap();
    assert_eq!(api.sh_ok(&id, "sha256sum < /dev/shm/kept").await, hash);

    // A crash: no graceful shutdown at all.
    first.kill(libc::SIGKILL);
    let second = TestServer::start_in(first.data_dir.clone(), &[]);
    let api2 = api.on(&second);
    let r = api2.get(&format!("/v1/sandbox/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running");
    let (code, out, _) = api2.exec(&id, "echo $KEPT; pgrep -f 'while true' | head -1").await;
    assert_eq!(code, 0);
    assert_eq!(out, format!("yes\n{before}"), "the guest's processes are the same ones");
    // The new server pauses it as a VM whose RAM is served from its image: what the guest wrote
    // since goes over the image's RAM.
    let hash = api2.sh_ok(&id, "echo more >> /dev/shm/kept && sha256sum < /dev/shm/kept").await;
    assert_eq!(api2.post(&pause, json!({})).await.status, 201);
    assert_eq!(api2.sh_ok(&id, "sha256sum < /dev/shm/kept").await, hash);
    let (_, now, _) = api2.exec(&id, "pgrep -f 'while true' | head -1").await;
    assert_eq!(now, before, "the guest's processes are the same ones after the pause");

    // A graceful stop leaves the VM running too.
    second.kill(libc::SIGTERM);
    let third = TestServer::start_in(first.data_dir.clone(), &[]);
    let api3 = api.on(&third);
    let (code, out, _) = api3.exec(&id, "hostname").await;
    assert_eq!((code, out), (0, format!("{id}\n")));
    assert_eq!(api3.delete(&format!("/v1/sandbox/{id}")).await.status, 204);
    third.kill(libc::SIGTERM);
}
