//! `cove sandbox shell`: an interactive terminal in a sandbox. It opens a terminal session of
//! this terminal's size (or joins one), puts this terminal in raw mode, and relays keys and
//! output over the session's WebSocket; a window resize is passed on.

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Api;

/// Runs a shell in sandbox `id` until it exits or the connection closes. `session` joins an
/// existing session; otherwise one is made, and deleted when its shell exits.
pub async fn run(api: &Api, id: &str, session: Option<String>) -> Result<()> {
    let (cols, rows) = term::size().unwrap_or((80, 24));
    let base = format!("/v1/sandbox/{id}/pty");
    let (sid, made) = match session {
        Some(s) => (s, false),
        None => {
            let created =
                api.call(reqwest::Method::POST, &base, Some(json!({"cols": cols, "rows": rows}))).await?;
            let sid =
                created.as_ref().and_then(|v| v["id"].as_str()).context("no session id in the answer")?;
            (sid.to_string(), true)
        }
    };
    let ws_url = match api.url.strip_prefix("http://") {
        Some(rest) => format!("ws://{rest}{base}/{sid}/connect"),
        None => bail!("`cove sandbox shell` speaks plain HTTP only; --url {} is not http://", api.url),
    };
    let mut req = ws_url.into_client_request()?;
    req.headers_mut().insert("authorization", format!("Bearer {}", api.key).parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await.context("connecting to the terminal")?;
    let (mut to_server, mut from_server) = ws.split();

    let raw = term::Raw::enter()?;
    let resize_path = format!("{base}/{sid}/resize");
    let keys = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 4096];
        let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
        loop {
            tokio::select! {
                n = stdin.read(&mut buf) => match n? {
                    0 => return Ok::<_, anyhow::Error>(()),
                    n => to_server.send(Message::binary(buf[..n].to_vec())).await?,
                },
                _ = winch.recv() => {
                    if let Some((cols, rows)) = term::size() {
                        let _ = api.call(reqwest::Method::POST, &resize_path, Some(json!({"cols": cols, "rows": rows}))).await;
                    }
                }
            }
        }
    };
    let screen = async {
        let mut stdout = tokio::io::stdout();
        while let Some(msg) = from_server.next().await {
            match msg? {
                Message::Binary(b) => {
                    stdout.write_all(&b).await?;
                    stdout.flush().await?;
                }
                Message::Text(t) => stdout.write_all(t.as_bytes()).await?,
                Message::Close(frame) => return Ok(frame),
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>(None)
    };
    let closed = tokio::select! {
        r = keys => { r?; None }
        r = screen => r?,
    };
    drop(raw);
    match closed {
        Some(f) if f.code != CloseCode::Normal => eprintln!("\r\n[cove: {}]", f.reason),
        _ if made => {
            let _ = api.call(reqwest::Method::DELETE, &format!("{base}/{sid}"), None).await;
        }
        _ => {}
    }
    Ok(())
}

#[allow(unsafe_code)]
mod term {
    use std::io;

    /// The size of the terminal on stdout, (columns, rows).
    pub fn size() -> Option<(u16, u16)> {
        let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize through the pointer given.
        let r = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) };
        (r == 0 && ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
    }

    /// Stdin in raw mode (keys pass as typed, no local echo) until dropped.
    pub struct Raw(Option<libc::termios>);

    impl Raw {
        pub fn enter() -> io::Result<Raw> {
            // SAFETY: isatty takes a descriptor number.
            if unsafe { libc::isatty(0) } != 1 {
                return Ok(Raw(None));
            }
            // SAFETY: termios is plain data; tcgetattr fills it.
            let mut saved: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: a valid pointer to a termios.
            if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut raw = saved;
            // SAFETY: cfmakeraw edits the struct it is given.
            unsafe { libc::cfmakeraw(&mut raw) };
            // SAFETY: a valid pointer to a termios.
            if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Raw(Some(saved)))
        }
    }

    impl Drop for Raw {
        fn drop(&mut self) {
            if let Some(saved) = &self.0 {
                // SAFETY: a valid pointer to the termios saved at entry.
                unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
            }
        }
    }
}
