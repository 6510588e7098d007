//! Router tests: the HTTP layer called in-process over a simulated host. Every request here is
//! answered before a sandbox would be needed (auth, validation, lookups).

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::App;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

async fn app() -> App {
    App::new().await
}

async fn call(
    app: &App,
    method: &str,
    path: &str,
    auth: Option<(&str, String)>,
    body: &str,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some((h, v)) = auth {
        req = req.header(h, v);
    }
    let resp = app.router.clone().oneshot(req.body(Body::from(body.to_string())).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, v)
}

fn bearer(app: &App) -> Option<(&'static str, String)> {
    Some(("authorization", format!("Bearer {}", app.key)))
}

#[tokio::test]
async fn auth_headers() {
    let app = app().await;
    let (s, v) = call(&app, "GET", "/v1/sandboxes", None, "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["message"].is_string());
    let (s, _) = call(&app, "GET", "/v1/sandboxes", Some(("authorization", "Bearer nope".into())), "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    for auth in [
        ("authorization", format!("Bearer {}", app.key)),
        ("authorization", app.key.clone()),
        ("leap0-authorization", format!("Bearer {}", app.key)),
        ("leap0-authorization", app.key.clone()),
    ] {
        let (s, v) = call(&app, "GET", "/v1/sandboxes", Some(auth), "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["total_items"], 0);
    }
}

#[tokio::test]
async fn create_validation_names_fields() {
    let app = app().await;
    let cases: &[(Value, &str)] = &[
        (json!({}), "template_name"),
        (json!({"template_name": "system/debian:bookworm", "vcpu": 9}), "vcpu"),
        (json!({"template_name": "system/debian:bookworm", "vcpu": "two"}), "vcpu"),
        (json!({"template_name": "system/debian:bookworm", "memory": 511}), "memory"),
        (json!({"template_name": "system/debian:bookworm", "memory": 1025}), "memory"),
        (json!({"template_name": "system/debian:bookworm", "timeout": 28801}), "timeout"),
        (json!({"template_name": "nope/unknown:1"}), "template_name"),
        (
            json!({"template_name": "system/debian:bookworm", "network_policy": {"mode": "sometimes"}}),
            "network_policy.mode",
        ),
    ];
    for (body, field) in cases {
        let (s, v) = call(&app, "POST", "/v1/sandbox", bearer(&app), &body.to_string()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        let fields: Vec<&str> =
            v["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
        assert!(fields.contains(field), "{body}: expected {field} in {fields:?}");
    }
    let (s, v) = call(&app, "POST", "/v1/sandbox/", bearer(&app), "{not json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["errors"][0]["field"], "body");
}

#[tokio::test]
async fn unknown_things_are_404_and_bad_input_400() {
    let app = app().await;
    for path in ["/v1/sandbox/sbx-nope", "/v1/sandbox/sbx-nope/"] {
        let (s, v) = call(&app, "GET", path, bearer(&app), "").await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
        assert!(v["message"].as_str().unwrap().contains("sbx-nope"));
    }
    let (s, _) =
        call(&app, "POST", "/v1/sandbox/sbx-nope/process/execute", bearer(&app), r#"{"command":"true"}"#)
            .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) =
        call(&app, "POST", "/v1/sandbox/sbx-nope/process/execute", bearer(&app), r#"{"command":""}"#).await;
    assert_eq!((s, v["errors"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("command")));
    let (s, _) = call(&app, "GET", "/v2/whatever", bearer(&app), "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let lsp = r#"{"language_id":"cobol","path_to_project":"/p"}"#;
    let (s, v) = call(&app, "POST", "/v1/sandbox/sbx-x/lsp/start", bearer(&app), lsp).await;
    assert_eq!((s, v["errors"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("language_id")));
    let (s, _) = call(&app, "POST", "/v1/sandbox/sbx-x/lsp/start", None, lsp).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // git: an option never passes for a revision, and credentials go only to https.
    let show = r#"{"path":"r","revision":"--output=/etc/passwd"}"#;
    let (s, v) = call(&app, "POST", "/v1/sandbox/sbx-x/git/show", bearer(&app), show).await;
    assert_eq!((s, v["errors"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("revision")));
    let clone = r#"{"url":"http://git.test/r.git","path":"r","username":"u","password":"p"}"#;
    let (s, v) = call(&app, "POST", "/v1/sandbox/sbx-x/git/clone", bearer(&app), clone).await;
    assert_eq!((s, v["errors"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("url")));
    assert!(!v.to_string().contains("\"p\""), "{v}");
    // Mounts: the body's fields are checked before the sandbox is looked up.
    let bad = r#"{"type":"nfs","bucket":"b","mount_path":"rel","endpoint":"s3"}"#;
    let (s, v) = call(&app, "POST", "/v1/sandbox/sbx-x/mounts", bearer(&app), bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let fields: Vec<&str> =
        v["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    for f in ["type", "bucket", "mount_path", "endpoint"] {
        assert!(fields.contains(&f), "{f} in {fields:?}");
    }
    let ok = r#"{"type":"object-storage","bucket":"bkt","mount_path":"/data","endpoint":"http://s3"}"#;
    let (s, _) = call(&app, "POST", "/v1/sandbox/sbx-x/mounts", bearer(&app), ok).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&app, "PATCH", "/v1/sandbox/sbx-x/mounts/mnt-1", bearer(&app), r#"{"id":"x"}"#).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(&app, "DELETE", "/v1/sandbox/sbx-x/mounts/mnt-1", bearer(&app), "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&app, "POST", "/v1/sandbox/sbx-x/mounts", None, ok).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Lifecycle actions on an unknown sandbox or snapshot: 404 naming it.
    for path in [
        "/v1/sandbox/sbx-x/pause",
        "/v1/sandbox/sbx-x/resume",
        "/v1/sandbox/sbx-x/stop",
        "/v1/sandbox/sbx-x/start",
        "/v1/sandbox/sbx-x/snapshot/create",
    ] {
        let (s, v) = call(&app, "POST", path, bearer(&app), "").await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
        assert!(v["message"].as_str().unwrap().contains("sbx-x"), "{path}");
    }
    let (s, _) = call(&app, "DELETE", "/v1/snapshot/snap-x", bearer(&app), "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) =
        call(&app, "POST", "/v1/snapshot/restore", bearer(&app), r#"{"snapshot_name":"nope"}"#).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(v["message"].as_str().unwrap().contains("nope"));
    let (s, v) = call(&app, "POST", "/v1/snapshot/restore", bearer(&app), r#"{"timeout":5}"#).await;
    assert_eq!((s, v["errors"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("snapshot_name")));
    let (s, v) = call(&app, "GET", "/v1/snapshots?sort=name", bearer(&app), "").await;
    assert_eq!((s, v["errors"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("sort")));
    let (s, v) = call(&app, "GET", "/v1/snapshots", bearer(&app), "").await;
    assert_eq!((s, v["total_items"].as_u64()), (StatusCode::OK, Some(0)));
    let (s, _) = call(&app, "GET", "/v1/sandboxes?page-size=101", bearer(&app), "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

/// The committed OpenAPI document is the one the code generates.
#[tokio::test]
async fn template_requests_are_checked_before_any_pull() {
    let app = app().await;
    for (body, field) in [
        (r#"{"name": "system/x", "uri": "alpine"}"#, "name"),
        (r#"{"name": "a b", "uri": "alpine"}"#, "name"),
        (r#"{"name": "a", "uri": ""}"#, "uri"),
        (r#"{"uri": "alpine"}"#, "name"),
        (
            r#"{"name": "a", "uri": "alpine", "credentials": {"type": "basic", "username": "u"}}"#,
            "credentials.password",
        ),
        (
            r#"{"name": "a", "uri": "alpine", "credentials": {"type": "gcp", "gcp_service_account_json": "{}"}}"#,
            "credentials.type",
        ),
    ] {
        let (s, v) = call(&app, "POST", "/v1/template", bearer(&app), body).await;
        assert_eq!(
            (s, v["errors"][0]["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some(field)),
            "{body}: {v}"
        );
    }
    let (s, _) = call(&app, "POST", "/v1/template", None, r#"{"name": "a", "uri": "alpine"}"#).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    for (method, body) in [("PATCH", r#"{"name": "n"}"#), ("DELETE", ""), ("GET", "")] {
        let (s, _) = call(&app, method, "/v1/template/tpl-0123", bearer(&app), body).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method}");
    }
    let (s, v) = call(&app, "PATCH", "/v1/template/tpl-0123", bearer(&app), r#"{"name": "system/n"}"#).await;
    assert_eq!((s, v["errors"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("name")));
    // The system template is listed; an unknown template name is a field error on create.
    let (s, v) = call(&app, "GET", "/v1/templates", bearer(&app), "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"][0]["name"], "system/debian:bookworm", "{v}");
    assert_eq!(v["items"][0]["is_system"], true);
    let (s, v) = call(&app, "POST", "/v1/sandbox", bearer(&app), r#"{"template_name": "mine"}"#).await;
    assert_eq!(
        (s, v["errors"][0]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("template_name")),
        "{v}"
    );
}

#[test]
fn openapi_document_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    let generated = cove_server::openapi_json();
    if std::env::var_os("COVE_UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is out of date: run `COVE_UPDATE_OPENAPI=1 cargo test -p cove-server --test router openapi`"
    );
}

/// Every operation documents the answers any of them can give before its handler runs: 401 for
/// a missing key, and 400 for a missing or malformed body where it takes one. (Schemathesis
/// found these missing from 20 operations.)
#[test]
fn openapi_operations_document_auth_and_body_refusals() {
    let doc: serde_json::Value = serde_json::from_str(&cove_server::openapi_json()).unwrap();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = &op["responses"];
            assert!(responses.get("401").is_some(), "{method} {path} does not document 401");
            if op.get("requestBody").is_some() {
                assert!(responses.get("400").is_some(), "{method} {path} does not document 400");
            }
            checked += 1;
        }
    }
    assert!(checked > 80, "{checked} operations");
}
