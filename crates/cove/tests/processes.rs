//! Real-VM tests of background processes (a Cove addition): output followed while it is
//! written, standard input, signals that reach a whole process tree, a timeout, a pause in the
//! middle of a follow, and what bad input gets.

mod common;

use std::time::Duration;

use common::{Api, Leftovers, TestServer};
use futures::StreamExt;
use serde_json::{json, Value};

/// A follower of a process's output (server-sent events).
struct Follow {
    events: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    pending: Vec<u8>,
}

impl Follow {
    async fn open(api: &Api, id: &str, pid: u64, follow: bool) -> Follow {
        let url = format!("{}/v1/sandbox/{id}/process/{pid}/output?follow={follow}", api.url);
        let resp = api.http.get(url).bearer_auth(&api.key).send().await.expect("output request");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Follow { events: Box::pin(resp.bytes_stream()), pending: Vec::new() }
    }

    /// The next event, as (name, data); `None` when the stream has ended.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.pending.drain(..end + 2).collect();
                let text = String::from_utf8(event).unwrap();
                let name = text.lines().find_map(|l| l.strip_prefix("event: ")).unwrap().to_string();
                let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                return Some((name, serde_json::from_str(data).unwrap()));
            }
            match tokio::time::timeout(Duration::from_secs(60), self.events.next()).await {
                Ok(Some(Ok(b))) => self.pending.extend_from_slice(&b),
                Ok(_) => return None,
                Err(_) => {
                    panic!("no event within 60 s; pending: {:?}", String::from_utf8_lossy(&self.pending))
                }
            }
        }
    }

    /// Every event until the stream ends.
    async fn rest(&mut self) -> Vec<(String, Value)> {
        let mut all = Vec::new();
        while let Some(e) = self.next().await {
            all.push(e);
        }
        all
    }
}

fn text(events: &[(String, Value)], stream: &str) -> String {
    events.iter().filter(|(n, _)| n == stream).map(|(_, d)| d["data"].as_str().unwrap()).collect()
}

async fn start(api: &Api, id: &str, body: Value) -> u64 {
    let r = api.post(&format!("/v1/sandbox/{id}/process/start"), body).await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["pid"].as_u64().unwrap()
}

#[tokio::test]
async fn background_processes_stream_take_input_and_die_with_their_tree() {
    let server = TestServer::shared();
    let api = server.new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({})).await;
    left.sandbox(&id);
    let base = format!("/v1/sandbox/{id}");

    // An idle agent sleeps. A guest restored from a snapshot saw its ports' host go away once;
    // the agent must not be left polling them (CPU time of PID 1, in clock ticks, while a
    // command sleeps 3 s: a busy loop takes all 300).
    let stat = "cut -d' ' -f14,15 /proc/1/stat";
    let out = api.sh_ok(&id, &format!("a=$({stat}); sleep 3; echo $a $({stat})")).await;
    let t: Vec<u64> = out.split_whitespace().map(|n| n.parse().unwrap()).collect();
    let ticks = (t[2] + t[3]) - (t[0] + t[1]);
    assert!(ticks < 60, "the agent used {ticks} ticks of CPU in 3 s with nothing to do");

    // The first line arrives while the process still runs; stderr and the exit code follow.
    let pid = start(
        &api,
        &id,
        json!({"command": "echo first; sleep 2; echo second; echo oops >&2; exit 3", "tag": "lines"}),
    )
    .await;
    let mut follow = Follow::open(&api, &id, pid, true).await;
    let (name, data) = follow.next().await.unwrap();
    assert_eq!((name.as_str(), data["data"].as_str()), ("stdout", Some("first\n")));
    let info = api.get(&format!("{base}/process/{pid}")).await.json();
    assert_eq!((info["running"].as_bool(), info["tag"].as_str()), (Some(true), Some("lines")), "{info}");
    let rest = follow.rest().await;
    assert_eq!(text(&rest, "stdout"), "second\n");
    assert_eq!(text(&rest, "stderr"), "oops\n");
    assert_eq!(rest.last().map(|(n, d)| (n.as_str(), d["exit_code"].as_i64())), Some(("exit", Some(3))));
    let info = api.get(&format!("{base}/process/{pid}")).await.json();
    assert_eq!((info["running"].as_bool(), info["exit_code"].as_i64()), (Some(false), Some(3)));
    // Followed again later: the output kept, then the exit.
    let again = Follow::open(&api, &id, pid, true).await.rest().await;
    assert_eq!(text(&again, "stdout"), "first\nsecond\n");

    // Standard input, closed with eof.
    let cat = start(&api, &id, json!({"command": "tr a-z A-Z"})).await;
    let r = api.post(&format!("{base}/process/{cat}/stdin"), json!({"data": "hello "})).await;
    assert_eq!(r.status, 204, "{}", r.text());
    api.post(&format!("{base}/process/{cat}/stdin"), json!({"data": "world\n", "eof": true})).await;
    let out = Follow::open(&api, &id, cat, true).await.rest().await;
    assert_eq!(text(&out, "stdout"), "HELLO WORLD\n");
    assert_eq!(api.post(&format!("{base}/process/{cat}/stdin"), json!({"data": "x"})).await.status, 409);

    // KILL reaches every process the command started, daemons included.
    let tree = start(&api, &id, json!({"command": "sleep 3131 & setsid sleep 3132 & wait"})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api.exec(&id, "pgrep -f '^sleep 313' | wc -l").await.1.trim(), "2");
    let r = api.post(&format!("{base}/process/{tree}/signal"), json!({"signal": "SIGKILL"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let end = Follow::open(&api, &id, tree, true).await.rest().await;
    assert_eq!(end.last().map(|(n, d)| (n.as_str(), d["exit_code"].as_i64())), Some(("exit", Some(137))));
    assert_eq!(api.exec(&id, "pgrep -f '^sleep 313' | wc -l").await.1.trim(), "0");
    // TERM goes to the group; a timeout kills with 124.
    let term = start(&api, &id, json!({"command": "sleep 600"})).await;
    api.post(&format!("{base}/process/{term}/signal"), json!({"signal": "TERM"})).await;
    let end = Follow::open(&api, &id, term, true).await.rest().await;
    assert_eq!(end.last().map(|(_, d)| d["exit_code"].as_i64()), Some(Some(143)));
    let timed = start(&api, &id, json!({"command": "sleep 600", "timeout": 1})).await;
    let end = Follow::open(&api, &id, timed, true).await.rest().await;
    assert!(text(&end, "stderr").contains("timed out after 1s"), "{end:?}");
    assert_eq!(end.last().map(|(_, d)| d["exit_code"].as_i64()), Some(Some(124)));

    // A pause cuts a follow with `detached`; following again resumes the sandbox, and the
    // process has gone on counting.
    let counter =
        start(&api, &id, json!({"command": "i=0; while true; do echo n=$i; i=$((i+1)); sleep 0.2; done"}))
            .await;
    let mut follow = Follow::open(&api, &id, counter, true).await;
    follow.next().await.unwrap();
    assert_eq!(api.action(&id, "pause").await.status, 201);
    let cut = follow.rest().await;
    assert_eq!(cut.last().map(|(n, _)| n.as_str()), Some("detached"), "{cut:?}");
    let mut follow = Follow::open(&api, &id, counter, true).await;
    assert_eq!(api.state_of(&id).await, "running");
    let mut seen = String::new();
    while !seen.contains("n=30\n") {
        let (name, data) = follow.next().await.expect("the counter's output went on");
        if name == "stdout" {
            seen.push_str(data["data"].as_str().unwrap());
        }
    }
    drop(follow);
    let list = api.get(&format!("{base}/processes")).await.json();
    let pids: Vec<u64> = list["items"].as_array().unwrap().iter().filter_map(|p| p["pid"].as_u64()).collect();
    for p in [pid, cat, tree, term, timed, counter] {
        assert!(pids.contains(&p), "{p} not in {list}");
    }
    assert_eq!(api.delete(&format!("{base}/process/{counter}")).await.status, 204);
    assert_eq!(api.get(&format!("{base}/process/{counter}")).await.status, 404);
    assert_eq!(api.exec(&id, "sleep 0.3; pgrep -f 'n=\\$i' | wc -l").await.1.trim(), "0");

    // Bad input.
    for (body, field) in [
        (json!({"command": ""}), "command"),
        (json!({"command": "true", "timeout": 0}), "timeout"),
        (json!({"command": "true", "cwd": "/no/such/dir"}), "cwd"),
    ] {
        let r = api.post(&format!("{base}/process/start"), body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.text().contains(field), "{body}: {}", r.text());
    }
    let r = api.post(&format!("{base}/process/{pid}/signal"), json!({"signal": "BOGUS"})).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(api.get(&format!("{base}/process/424242")).await.status, 404);
    assert_eq!(api.get(&format!("{base}/process/not-a-pid")).await.status, 404);
    left.delete_sandbox(&id).await;
}
