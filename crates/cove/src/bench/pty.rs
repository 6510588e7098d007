//! `cove bench pty`: keystroke echo through a terminal session's WebSocket (a key sent, its
//! echo by the guest's line editor received), and the first streamed byte of a background
//! process (started, followed, its first line received), beside the agent round trip
//! (`user-home-dir`) and the exec round trip in the same run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::{write_json, Bench, Stats};

#[derive(Args, Debug)]
pub struct PtyArgs {
    /// Keystrokes (and agent and exec round trips) to time.
    #[arg(long, default_value_t = 300)]
    keys: usize,
    /// Background processes whose first streamed line to time.
    #[arg(long, default_value_t = 30)]
    streams: usize,
    #[arg(long, default_value = "bench-results/pty.json")]
    out: PathBuf,
}

pub async fn pty(b: &Bench, args: &PtyArgs) -> Result<()> {
    let post = reqwest::Method::POST;
    let id = b.create_default().await?;
    let session = b
        .call(post.clone(), &format!("/v1/sandbox/{id}/pty"), Some(json!({"cols": 200, "rows": 50})))
        .await?;
    let sid = session["id"].as_str().context("no session id")?.to_string();
    let url = format!("{}/v1/sandbox/{id}/pty/{sid}/connect", b.base.replacen("http", "ws", 1));
    let mut req = url.into_client_request()?;
    req.headers_mut().insert("authorization", format!("Bearer {}", b.key).parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await.context("connecting to the terminal")?;
    let mut term = Term { ws, pending: Vec::new() };

    // Wait for the prompt after a command: from then on the line editor echoes each key alone.
    term.ws.send(Message::binary(b"echo ready-$((1+1))\r".to_vec())).await?;
    term.read_until(b"ready-2").await?;
    term.read_until(b"$ ").await?;
    println!("timing {} keystrokes, agent and exec round trips ...", args.keys);
    let (mut echo, mut agent, mut exec) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.keys {
        // `#` (a comment: the prompt has none), at most 100 to a line so that it never wraps,
        // then Return, which runs nothing and prompts again.
        if i % 100 == 99 {
            term.ws.send(Message::binary(b"\r".to_vec())).await?;
            term.read_until(b"$ ").await?;
        }
        let t = Instant::now();
        term.ws.send(Message::binary(b"#".to_vec())).await?;
        term.read_until(b"#").await?;
        echo.push(t.elapsed());
        let t = Instant::now();
        b.call(reqwest::Method::GET, &format!("/v1/sandbox/{id}/system/user-home-dir"), None).await?;
        agent.push(t.elapsed());
        let t = Instant::now();
        b.exec(&id, "true").await?;
        exec.push(t.elapsed());
    }
    let _ = term.ws.close(None).await;

    println!("timing the first streamed line of {} background processes ...", args.streams);
    let mut first = Vec::new();
    for _ in 0..args.streams {
        let t = Instant::now();
        let start = Some(json!({"command": "echo first; sleep 30"}));
        let started = b.call(post.clone(), &format!("/v1/sandbox/{id}/process/start"), start).await?;
        let pid = started["pid"].as_u64().context("no pid")?;
        let process = format!("{}/v1/sandbox/{id}/process/{pid}", b.base);
        let resp =
            b.http.get(format!("{process}/output")).bearer_auth(&b.key).send().await?.error_for_status()?;
        let mut body = resp.bytes_stream();
        let mut seen = Vec::new();
        while !seen.windows(5).any(|w| w == b"first") {
            match tokio::time::timeout(Duration::from_secs(30), body.next()).await {
                Ok(Some(chunk)) => seen.extend_from_slice(&chunk?),
                _ => bail!("no first line from process {pid}"),
            }
        }
        first.push(t.elapsed());
        b.http.delete(&process).bearer_auth(&b.key).send().await?.error_for_status()?;
    }
    b.call(reqwest::Method::DELETE, &format!("/v1/sandbox/{id}"), None).await.ok();

    let (echo, agent, exec, first) =
        (Stats::new(echo), Stats::new(agent), Stats::new(exec), Stats::new(first));
    println!();
    println!("{:<44} {:>9} {:>9} {:>9}", "", "p50 ms", "p95 ms", "p99 ms");
    for (name, s) in [
        ("PTY keystroke echo (WebSocket)", &echo),
        ("agent round trip (user-home-dir)", &agent),
        ("exec round trip (`true`)", &exec),
        ("process start -> first streamed line", &first),
    ] {
        println!("{name:<44} {:>9.2} {:>9.2} {:>9.2}", s.pct(50.0), s.pct(95.0), s.pct(99.0));
    }
    let over_agent = echo.pct(50.0) / agent.pct(50.0);
    println!();
    println!(
        "echo p50 / agent round trip p50 = {over_agent:.2}x; echo p50 / exec p50 = {:.2}x",
        echo.pct(50.0) / exec.pct(50.0)
    );
    println!("first streamed line p50 / exec p50 = {:.2}x", first.pct(50.0) / exec.pct(50.0));
    let result = json!({
        "benchmark": "pty",
        "accel": b.accel,
        "keystroke_echo": echo.json(),
        "agent_round_trip": agent.json(),
        "exec_round_trip": exec.json(),
        "process_start_to_first_line": first.json(),
        "ratios": {
            "first_line_p50_over_exec_p50": first.pct(50.0) / exec.pct(50.0),
            "echo_p50_over_agent_p50": over_agent,
            "echo_p50_over_exec_p50": echo.pct(50.0) / exec.pct(50.0),
        },
        "at": chrono::Utc::now().to_rfc3339(),
    });
    write_json(&args.out, &result)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A terminal connection and what it printed that was not read yet.
struct Term {
    ws: Ws,
    pending: Vec<u8>,
}

impl Term {
    /// Reads the terminal up to and including the first `want`; what follows stays pending.
    async fn read_until(&mut self, want: &[u8]) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = self.pending.windows(want.len()).position(|w| w == want) {
                self.pending.drain(..i + want.len());
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => self.pending.extend_from_slice(&b),
                Ok(Some(Ok(_))) => {}
                Ok(other) => bail!("the terminal closed: {other:?}"),
                Err(_) => bail!("no {:?} from the terminal within 30 s", String::from_utf8_lossy(want)),
            }
        }
    }
}
