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

    // A crash: no graceful shutdown at all.
    first.kill(libc::SIGKILL);
    let second = TestServer::start_in(first.data_dir.clone(), &[]);
    let api2 = common::Api { url: second.url.clone(), ..api.clone() };
    let r = api2.get(&format!("/v1/sandbox/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running");
    let (code, out, _) = api2.exec(&id, "echo $KEPT; pgrep -f 'while true' | head -1").await;
    assert_eq!(code, 0);
    assert_eq!(out, format!("yes\n{before}"), "the guest's processes are the same ones");

    // A graceful stop leaves the VM running too.
    second.kill(libc::SIGTERM);
    let third = TestServer::start_in(first.data_dir.clone(), &[]);
    let api3 = common::Api { url: third.url.clone(), ..api };
    let (code, out, _) = api3.exec(&id, "hostname").await;
    assert_eq!((code, out), (0, format!("{id}\n")));
    assert_eq!(api3.delete(&format!("/v1/sandbox/{id}")).await.status, 204);
    third.kill(libc::SIGTERM);
}
