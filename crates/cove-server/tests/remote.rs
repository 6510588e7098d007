//! The wire between a control plane and a runner on another machine (`cove_runner::remote`),
//! over loopback with the simulated host behind it: who may talk to a runner, and what crosses
//! besides the control-plane suite (which runs through it with `COVE_TEST_HOST=remote`).

use std::sync::Arc;

use cove_runner::remote::{Identity, RemoteHost};
use cove_runner::{RunnerError, SandboxHost, VmRequest};
use cove_server::sim::SimHost;

/// A runner serving `host` on loopback: its address, fingerprint and token.
async fn runner(host: Arc<SimHost>) -> (String, String, String) {
    let identity = Identity::generate();
    let fingerprint = identity.fingerprint();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let token = "the-runner-token".to_string();
    let served = token.clone();
    tokio::spawn(async move { cove_runner::remote::serve(listener, &identity, host, served).await });
    (addr, fingerprint, token)
}

fn vm(id: &str) -> VmRequest {
    VmRequest {
        id: id.into(),
        template: "system/debian:bookworm".into(),
        vcpus: 1,
        memory_mib: 512,
        disk_mib: 2048,
        env: Default::default(),
        unsealed: Default::default(),
    }
}

#[tokio::test]
async fn only_the_pinned_runner_and_only_with_its_token() {
    let (addr, fingerprint, token) = runner(Arc::new(SimHost::new())).await;
    let err = RemoteHost::connect(&addr, &fingerprint, "another-token").await.err().expect("a wrong token");
    assert!(err.to_string().contains("401"), "{err}");
    let other = Identity::generate().fingerprint();
    let err = RemoteHost::connect(&addr, &other, &token).await.err().expect("another certificate");
    assert!(err.to_string().contains("not the one pinned"), "{err}");
    let remote = RemoteHost::connect(&addr, &fingerprint, &token).await.unwrap();
    assert_eq!(remote.template_disk_mib("system/debian:bookworm"), Some(cove_server::sim::SYSTEM_DISK_MIB));
}

#[tokio::test]
async fn calls_errors_streams_and_loans_cross_the_wire() {
    let host = Arc::new(SimHost::new());
    let (addr, fingerprint, token) = runner(host.clone()).await;
    let remote = RemoteHost::connect(&addr, &fingerprint, &token).await.unwrap();

    // Errors keep their kind: no VM, then a refused port once there is one.
    assert!(matches!(remote.connect_guest("sbx-none", 80).await.err(), Some(RunnerError::NoVm(_))));
    remote.create(&vm("sbx-1")).await.unwrap();
    assert_eq!(remote.sandboxes_on_host().await, ["sbx-1"]);
    match remote.connect_guest("sbx-1", 8000).await.err() {
        Some(RunnerError::Io(_, e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused),
        other => panic!("{:?}", other.map(|e| e.to_string())),
    }

    // The agent: requests go through the runner to the guest and back.
    let agent = remote.agent("sbx-1").await.unwrap();
    let out = agent
        .exec(&serde_json::from_value(serde_json::json!({ "command": "echo hi" })).unwrap())
        .await
        .unwrap();
    assert_eq!(out.stdout, "hi\n");

    // A loan holds while its guard lives.
    let loan = cove_runner::host::Loan {
        host: "git.test".into(),
        port: 443,
        path_prefix: "/org/repo.git/".into(),
        authorization: http::HeaderValue::from_static("Basic c2VjcmV0"),
    };
    let guard = remote.lend_credentials("sbx-1", loan).await.unwrap();
    assert_eq!(host.loans().len(), 1);
    drop(guard);
    for _ in 0..100 {
        if host.loans().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(host.loans().is_empty(), "the loan was not returned");

    remote.destroy("sbx-1").await.unwrap();
    assert!(remote.sandboxes_on_host().await.is_empty());
}
