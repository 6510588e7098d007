//! The control plane over a simulated host ([`cove_server::sim::SimHost`]): the router called
//! in-process, no VM, no root. A restart is a new `Core` on the same store and a restarted
//! host, as after `kill -9`.
//!
//! With `COVE_TEST_HOST=remote` the control plane reaches the simulated host as it would a
//! runner on another machine: through `cove_runner::remote` (HTTP/2 on TLS over loopback,
//! the certificate pinned, the token checked), so every test also runs the wire protocol.

#![allow(dead_code)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use cove_server::sim::SimHost;
use cove_server::{router, Core, CoreConfig};
use cove_store::Store;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// What the control plane holds of `host`: the host itself, or (`COVE_TEST_HOST=remote`) a
/// remote runner that serves it.
pub async fn seam(host: Arc<SimHost>) -> Arc<dyn cove_runner::SandboxHost> {
    match std::env::var("COVE_TEST_HOST").as_deref() {
        Ok("remote") => cove_runner::remote::over_loopback(host).await.unwrap(),
        Ok(other) if other != "local" => panic!("COVE_TEST_HOST is local or remote, not {other}"),
        _ => host,
    }
}

#[derive(Clone)]
pub struct App {
    pub router: axum::Router,
    pub core: Arc<Core>,
    pub host: Arc<SimHost>,
    pub store: Arc<Store>,
    pub key: String,
}

pub const SYSTEM: &str = "system/debian:bookworm";

impl App {
    pub async fn new() -> App {
        App::with_host(SimHost::new()).await
    }

    /// An app on `host`, set up before the control plane first sees it (a remote runner tells
    /// what it offers when it connects).
    pub async fn with_host(host: SimHost) -> App {
        let store = cove_store::testing::store();
        let org = store.create_org("test", None).unwrap();
        let key = cove_store::generate_key();
        store.add_key(&org.id, "test", &key).unwrap();
        App::on(Arc::new(store), Arc::new(host), key).await
    }

    async fn on(store: Arc<Store>, host: Arc<SimHost>, key: String) -> App {
        let mut cfg = CoreConfig::local(8);
        cfg.ssh = Some(cove_server::SshEndpoint { host: "ssh.test".into(), port: 2222 });
        let seam = seam(host.clone()).await;
        let core = Arc::new(Core::new(store.clone(), seam, cfg, cove_store::sealed::Sealer::ephemeral()));
        App { router: router(core.clone()), core, host, store, key }
    }

    /// The next server process: same store, same machine, nothing in memory. Not recovered
    /// yet: call `core.recover()`.
    pub async fn restarted(&self) -> App {
        App::on(self.store.clone(), Arc::new(self.host.restarted()), self.key.clone()).await
    }

    pub async fn call(&self, method: &str, path: &str, body: &str) -> (StatusCode, Value) {
        let (s, bytes) = self.call_raw(method, path, "application/json", body.as_bytes().to_vec()).await;
        (s, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    pub async fn call_raw(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Vec<u8>) {
        request(&self.router, &self.key, method, path, content_type, body).await
    }

    /// Creates a sandbox of the system template; its id.
    pub async fn create(&self, extra: Value) -> String {
        let mut body = serde_json::json!({"template_name": SYSTEM});
        body.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
        let (s, v) = self.call("POST", "/v1/sandbox", &body.to_string()).await;
        assert_eq!(s, StatusCode::CREATED, "create: {v}");
        v["id"].as_str().unwrap().to_string()
    }

    pub async fn state(&self, id: &str) -> Option<String> {
        let (s, v) = self.call("GET", &format!("/v1/sandbox/{id}"), "").await;
        (s == StatusCode::OK).then(|| v["state"].as_str().unwrap().to_string())
    }

    /// Runs a command; (exit code, stdout).
    pub async fn exec(&self, id: &str, command: &str) -> (StatusCode, i64, String) {
        let body = serde_json::json!({"command": command}).to_string();
        let (s, v) = self.call("POST", &format!("/v1/sandbox/{id}/process/execute"), &body).await;
        (s, v["exit_code"].as_i64().unwrap_or(-1), v["stdout"].as_str().unwrap_or_default().to_string())
    }

    pub async fn write(&self, id: &str, path: &str, bytes: &[u8]) -> StatusCode {
        let uri = format!("/v1/sandbox/{id}/filesystem/write-file?path={path}");
        self.call_raw("POST", &uri, "application/octet-stream", bytes.to_vec()).await.0
    }

    pub async fn read(&self, id: &str, path: &str) -> (StatusCode, Vec<u8>) {
        let body = serde_json::json!({"path": path}).to_string().into_bytes();
        self.call_raw("POST", &format!("/v1/sandbox/{id}/filesystem/read-file"), "application/json", body)
            .await
    }
}

pub async fn request(
    router: &axum::Router,
    key: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(body))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
}

/// Waits up to 10 s for `f`: background work (a spent image's deletion, a runner joining) takes
/// a round trip more when the host is a remote runner, and a loaded machine stretches it.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("never happened: {what}");
}
