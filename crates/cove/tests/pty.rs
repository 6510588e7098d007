//! Real-VM tests of terminal sessions: a login shell on a pseudo-terminal in the guest, driven
//! over the WebSocket as the SDK does it: Python's REPL answers, a resize reaches `stty`, the
//! shell outlives a pause (its connection does not), and deleting a session kills what it
//! started.

mod common;

use std::time::Duration;

use common::{Api, Leftovers, TestServer};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(api: &Api, id: &str, session: &str) -> Ws {
    let url = format!("{}/v1/sandbox/{id}/pty/{session}/connect", api.url.replacen("http", "ws", 1));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", api.key).parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Reads one more message of the terminal's output into `seen`, within `deadline`.
async fn read_more(ws: &mut Ws, seen: &mut String, deadline: tokio::time::Instant, want: &str) {
    let msg = tokio::time::timeout_at(deadline, ws.next())
        .await
        .unwrap_or_else(|_| panic!("no {want} within 60 s; the terminal showed: {seen:?}"));
    match msg {
        Some(Ok(Message::Binary(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
        Some(Ok(Message::Close(c))) => panic!("closed ({c:?}) before {want}; it showed: {seen:?}"),
        Some(Ok(_)) => {}
        other => panic!("connection ended ({other:?}) before {want}; it showed: {seen:?}"),
    }
}

/// Reads the terminal until its output (in `seen`) contains `want`.
async fn read_until(ws: &mut Ws, seen: &mut String, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !seen.contains(want) {
        read_more(ws, seen, deadline, &format!("{want:?}")).await;
    }
}

/// Reads on until the server closes the connection (after `what`): its close code.
async fn close_code(ws: &mut Ws, what: &str) -> Option<CloseCode> {
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(c))) => return c.map(|c| c.code),
                Some(Ok(_)) => continue,
                other => panic!("no close frame at {what}: {other:?}"),
            }
        }
    });
    closed.await.unwrap_or_else(|_| panic!("the connection outlived {what}"))
}

async fn type_line(ws: &mut Ws, line: &str) {
    ws.send(Message::binary(format!("{line}\r").into_bytes())).await.unwrap();
}

#[tokio::test]
async fn a_terminal_runs_python_resizes_and_outlives_a_pause() {
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({})).await;
    left.sandbox(&id);
    let base = format!("/v1/sandbox/{id}/pty");

    let r = api.post(&base, json!({"id": "main", "cols": 80, "rows": 24, "envs": {"GREETING": "hi"}})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let info = r.json();
    assert_eq!((info["id"].as_str(), info["active"].as_bool()), (Some("main"), Some(true)), "{info}");
    assert_eq!(info["cwd"], "/home/user");
    assert_eq!(api.post(&base, json!({"id": "main"})).await.status, 409, "a second session named main");

    let mut ws = connect(&api, &id, "main").await;
    let mut seen = String::new();
    type_line(&mut ws, "echo \"$GREETING from $(whoami) on $(tty)\"").await;
    read_until(&mut ws, &mut seen, "hi from user on /dev/pts/").await;
    type_line(&mut ws, "python3 -q").await;
    read_until(&mut ws, &mut seen, ">>> ").await;
    type_line(&mut ws, "1+1").await;
    read_until(&mut ws, &mut seen, "2\r\n>>> ").await;
    type_line(&mut ws, "exit()").await;

    // A resize reaches the terminal.
    let r = api.post(&format!("{base}/main/resize"), json!({"cols": 132, "rows": 43})).await;
    assert_eq!((r.status, r.json()["cols"].as_u64()), (200, Some(132)), "{}", r.text());
    type_line(&mut ws, "stty size").await;
    read_until(&mut ws, &mut seen, "43 132").await;

    // The shell's pid, printed before the pause (the typed line shows `$$`, not digits).
    type_line(&mut ws, "echo pid:$$:end").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let shell = loop {
        let pid = seen
            .split("pid:")
            .skip(1)
            .filter_map(|rest| rest.split_once(":end"))
            .map(|(p, _)| p)
            .find(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if let Some(pid) = pid {
            break pid.to_string();
        }
        read_more(&mut ws, &mut seen, deadline, "the shell's pid").await;
    };

    // A pause closes the connection with 1001; the session and its shell live on.
    let paused = api.action(&id, "pause").await;
    assert_eq!(paused.status, 201, "{}", paused.text());
    let closed = close_code(&mut ws, "the pause").await;
    assert_eq!(closed, Some(CloseCode::Away));

    // Connecting again resumes the sandbox: what the shell printed comes first, same shell.
    let mut ws = connect(&api, &id, "main").await;
    assert_eq!(api.state_of(&id).await, "running");
    let mut again = String::new();
    read_until(&mut ws, &mut again, &format!("pid:{shell}:end")).await;
    type_line(&mut ws, "echo still=$$").await;
    read_until(&mut ws, &mut again, &format!("still={shell}")).await;

    // Listed; a background job of the session dies with it.
    let list = api.get(&base).await.json();
    let ids: Vec<&str> = list["items"].as_array().unwrap().iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids, ["main"], "{list}");
    type_line(&mut ws, "sleep 4242 &").await;
    type_line(&mut ws, "echo started-$((40+2))").await;
    read_until(&mut ws, &mut again, "started-42").await;
    assert_eq!(api.exec(&id, "pgrep -f 'slee[p] 4242' | wc -l").await.1.trim(), "1");
    assert_eq!(api.delete(&format!("{base}/main")).await.status, 204);
    assert_eq!(api.exec(&id, "sleep 0.5; pgrep -f 'slee[p] 4242' | wc -l").await.1.trim(), "0");
    assert_eq!(api.get(&format!("{base}/main")).await.status, 404);
    assert_eq!(api.get(&format!("{base}/no-such")).await.status, 404);
    assert_eq!(api.post(&format!("{base}/main/resize"), json!({"cols": 10, "rows": 10})).await.status, 404);

    // A shell that exits closes its connection with 1000; a lazy session starts on connect.
    let r = api.post(&base, json!({"lazy_start": true, "cwd": "/tmp"})).await;
    assert_eq!((r.status, r.json()["active"].as_bool()), (201, Some(false)), "{}", r.text());
    let lazy = r.json()["id"].as_str().unwrap().to_string();
    let mut ws = connect(&api, &id, &lazy).await;
    let mut out = String::new();
    type_line(&mut ws, "pwd; exit").await;
    read_until(&mut ws, &mut out, "/tmp").await;
    assert_eq!(close_code(&mut ws, "its shell's exit").await, Some(CloseCode::Normal));
    assert_eq!(api.get(&format!("{base}/{lazy}")).await.json()["active"], false);

    // Bad input names its field; an unknown session cannot be connected to.
    let r = api.post(&base, json!({"cols": 0, "id": "bad id"})).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let url = format!("{}/v1/sandbox/{id}/pty/nope/connect", api.url.replacen("http", "ws", 1));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", api.key).parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("connecting to an unknown session: {:?}", other.map(|(_, r)| r.status())),
    }
    left.delete_sandbox(&id).await;
}
