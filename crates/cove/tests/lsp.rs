//! Language servers in a real VM: pyright for Python and typescript-language-server for
//! TypeScript, as the system template carries them, driven through the API: start, open a
//! document, completions, document symbols, close, stop; a server outlives a pause; bad input
//! and servers never started get their errors.

mod common;

use common::{Api, Leftovers, TestServer};
use serde_json::{json, Value};

const PY: &str = "import os\n\nclass Greeter:\n    def hello(self, name: str) -> str:\n        return 'hi ' + name\n\n\ndef main():\n    os.pa\n";
const TS: &str =
    "const greeting: string = 'x';\nfunction shout(s: string): string {\n  return s;\n}\ngreeting.toUp\n";

async fn lsp(api: &Api, id: &str, op: &str, body: Value) -> (u16, Value) {
    let r = api.post(&format!("/v1/sandbox/{id}/lsp/{op}"), body).await;
    let v = if r.text().is_empty() { Value::Null } else { r.json() };
    (r.status, v)
}

/// Labels of a completion answer (a list, or a list with `items`).
fn labels(answer: &Value) -> Vec<String> {
    let items =
        answer["result"]["items"].as_array().or(answer["result"].as_array()).cloned().unwrap_or_default();
    items.iter().filter_map(|i| i["label"].as_str()).map(str::to_string).collect()
}

/// Names of a documentSymbol answer, children included.
fn names(symbols: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for s in symbols.as_array().into_iter().flatten() {
        out.extend(s["name"].as_str().map(str::to_string));
        out.extend(names(&s["children"]));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyright_and_typescript_complete_and_list_symbols() {
    let srv = TestServer::shared();
    let api = srv.new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({})).await;
    left.sandbox(&id);
    api.sh_ok(&id, "mkdir -p proj web").await;
    api.put_file(&id, "/home/user/proj/main.py", PY.as_bytes()).await;
    let (py, proj) = ("python", "/home/user/proj");
    let main_py = "file:///home/user/proj/main.py";
    let server = json!({"language_id": py, "path_to_project": proj});

    // Nothing runs yet: 404 naming what to do.
    let doc = json!({"language_id": py, "path_to_project": proj, "uri": main_py});
    let (status, v) = lsp(&api, &id, "document-symbols", doc.clone()).await;
    assert_eq!(status, 404, "{v}");
    assert!(v["message"].as_str().unwrap().contains("lsp/start"), "{v}");

    let (status, v) = lsp(&api, &id, "start", server.clone()).await;
    assert_eq!((status, &v), (200, &json!({"success": true})));
    assert_eq!(lsp(&api, &id, "start", server.clone()).await.0, 200, "a second start is a no-op");
    // Opened from the file (no text given).
    assert_eq!(lsp(&api, &id, "did-open", doc.clone()).await.0, 204);
    let at = json!({"language_id": py, "path_to_project": proj, "uri": main_py,
        "position": {"line": 8, "character": 9}, "context": {"trigger_kind": 1}});
    let (status, answer) = lsp(&api, &id, "completions", at.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["jsonrpc"], "2.0");
    assert!(labels(&answer).contains(&"path".to_string()), "{answer}");
    let (status, symbols) = lsp(&api, &id, "document-symbols", doc.clone()).await;
    assert_eq!(status, 200, "{symbols}");
    let found = names(&symbols["result"]);
    for name in ["Greeter", "hello", "main"] {
        assert!(found.contains(&name.to_string()), "{name} not in {found:?}");
    }

    // The server lives in the guest's memory: a pause does not end it.
    assert_eq!(api.action(&id, "pause").await.status, 201);
    let (status, answer) = lsp(&api, &id, "completions", at).await;
    assert_eq!(status, 200, "{answer}");
    assert!(labels(&answer).contains(&"path".to_string()), "{answer}");
    assert_eq!(lsp(&api, &id, "did-close", doc.clone()).await.0, 204);

    // TypeScript, with the text given.
    let ts_doc = json!({"language_id": "typescript", "path_to_project": "/home/user/web",
        "uri": "file:///home/user/web/index.ts"});
    let ts_server = json!({"language_id": "typescript", "path_to_project": "/home/user/web"});
    assert_eq!(lsp(&api, &id, "start", ts_server.clone()).await.0, 200);
    let mut open = ts_doc.clone();
    open["text"] = TS.into();
    open["version"] = 1.into();
    assert_eq!(lsp(&api, &id, "did-open", open).await.0, 204);
    let mut at = ts_doc.clone();
    at["position"] = json!({"line": 4, "character": 13});
    let (status, answer) = lsp(&api, &id, "completions", at).await;
    assert_eq!(status, 200, "{answer}");
    assert!(labels(&answer).contains(&"toUpperCase".to_string()), "{answer}");
    let (_, symbols) = lsp(&api, &id, "document-symbols", ts_doc.clone()).await;
    let found = names(&symbols["result"]);
    assert!(found.contains(&"greeting".to_string()) && found.contains(&"shout".to_string()), "{found:?}");

    // Bad input names its field.
    let nowhere = json!({"language_id": py, "path_to_project": "/nonexistent"});
    common::assert_field(&api.post(&format!("/v1/sandbox/{id}/lsp/start"), nowhere).await, "path_to_project");
    let missing =
        json!({"language_id": py, "path_to_project": proj, "uri": "file:///home/user/proj/nope.py"});
    common::assert_field(&api.post(&format!("/v1/sandbox/{id}/lsp/did-open"), missing).await, "uri");

    // Stopped: its processes are gone, and it answers no more.
    for s in [server, ts_server] {
        assert_eq!(lsp(&api, &id, "stop", s).await, (200, json!({"success": true})));
    }
    assert_eq!(lsp(&api, &id, "document-symbols", doc).await.0, 404);
    assert_eq!(
        api.exec(&id, "pgrep -f 'pyrigh[t]|typescript-language-serve[r]'").await.0,
        1,
        "a server outlived stop"
    );

    left.delete_sandbox(&id).await;
}
