//! SSH into a sandbox with the system's OpenSSH client: accesses made, checked, regenerated and
//! revoked through the API; commands with and without a terminal; exit statuses, standard input
//! and error apart; a login resumes a paused sandbox; a client that goes takes its command with
//! it; and nothing of SSH (server, keys, passwords) is inside the guest.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Api, Leftovers, TestServer};
use serde_json::{json, Value};

/// Runs `ssh` against the endpoint of `access` (the API's answer) with `args` after the
/// destination, `input` on its standard input: (exit code, stdout, stderr).
fn ssh(access: &Value, password: &str, args: &[&str], input: &str) -> (i32, String, String) {
    let command = access["ssh_command"].as_str().unwrap();
    let port = command.split_whitespace().skip_while(|w| *w != "-p").nth(1).unwrap();
    let dest = command.split_whitespace().last().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let askpass = dir.path().join("askpass");
    std::fs::write(&askpass, format!("#!/bin/sh\necho '{password}'\n")).unwrap();
    std::fs::set_permissions(&askpass, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut child = Command::new("ssh")
        .args(["-p", port, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args([
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "LogLevel=ERROR",
        ])
        .args(["-o", "NumberOfPasswordPrompts=1", "-o", "ConnectTimeout=30", dest])
        .args(args)
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env_remove("DISPLAY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the ssh client (openssh-client)");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

async fn access(api: &Api, id: &str) -> (Value, String) {
    let r = api.post(&format!("/v1/sandbox/{id}/ssh/access"), json!({})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let password = v["password"].as_str().unwrap().to_string();
    (v, password)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_logs_in_with_an_access_and_runs_in_the_guest() {
    let srv = TestServer::shared();
    let api = srv.new_org(None);
    let left = Leftovers::new(&api);
    let id = api.create(json!({})).await;
    left.sandbox(&id);

    let (a, password) = access(&api, &id).await;
    let ssh_id = a["id"].as_str().unwrap().to_string();
    assert_eq!(a["sandbox_id"], id.as_str());
    assert!(a["ssh_command"].as_str().unwrap().ends_with(&format!("{ssh_id}@localhost")), "{a}");
    for field in ["expires_at", "created_at", "updated_at"] {
        assert!(a[field].is_string(), "{field}: {a}");
    }
    let validate = |pw: &str| json!({ "password": pw });
    let r = api.post(&format!("/v1/sandbox/{id}/ssh/{ssh_id}/validate"), validate(&password)).await;
    assert_eq!(r.json(), json!({"valid": true, "sandbox_id": id}));
    let r = api.post(&format!("/v1/sandbox/{id}/ssh/{ssh_id}/validate"), validate("wrong")).await;
    assert_eq!(r.json()["valid"], false);
    let r = api.post(&format!("/v1/sandbox/{id}/ssh/sshnope/validate"), validate("x")).await;
    assert_eq!(r.status, 404, "{}", r.text());

    // A command without a terminal: stdout and stderr apart, its exit status, its input.
    let (code, out, err) = ssh(&a, &password, &["echo out; echo err >&2; whoami; exit 3"], "");
    assert_eq!((code, out.as_str()), (3, "out\nuser\n"), "stderr: {err}");
    assert!(err.contains("err"), "{err}");
    let (code, out, err) = ssh(&a, &password, &["cat; python3 -c 'print(1+1)'"], "hello\n");
    assert_eq!((code, out.as_str()), (0, "hello\n2\n"), "{err}");

    // With a terminal: a shell that reads what is typed, and its exit status.
    let (code, out, err) = ssh(&a, &password, &["-tt"], "echo hi-$((40+2)); tty\nexit 7\n");
    assert_eq!(code, 7, "{out}{err}");
    assert!(out.contains("hi-42") && out.contains("/dev/pts/"), "{out}");
    let (code, out, _) = ssh(&a, &password, &["-tt", "stty size"], "");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("24 80"), "{out}");

    // A client that goes takes its command with it.
    let sleeper = std::thread::spawn({
        let a = a.clone();
        let password = password.clone();
        move || ssh(&a, &password, &["-o", "ServerAliveInterval=1", "sleep 313"], "")
    });
    let mut seen = false;
    for _ in 0..60 {
        if api.exec(&id, "pgrep -f '^sleep 313'").await.0 == 0 {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(seen, "the command never started");
    Command::new("pkill").args(["-f", "^ssh -p .* sleep 313"]).status().unwrap();
    let _ = sleeper.join();
    let mut gone = false;
    for _ in 0..40 {
        if api.exec(&id, "pgrep -f '^sleep 313'").await.0 != 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(gone, "the command outlived its client");

    // A login resumes a paused sandbox.
    assert_eq!(api.action(&id, "pause").await.status, 201);
    let (code, out, err) = ssh(&a, &password, &["echo resumed"], "");
    assert_eq!((code, out.as_str()), (0, "resumed\n"), "{err}");
    assert_eq!(api.state_of(&id).await, "running");

    // Regenerated: the old password fails, the new one works; deleted: nothing works.
    let r = api.post(&format!("/v1/sandbox/{id}/ssh/{ssh_id}/regen"), json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let renewed = r.json();
    let new_password = renewed["password"].as_str().unwrap().to_string();
    assert_eq!(renewed["id"], ssh_id.as_str());
    assert_ne!(new_password, password);
    assert_eq!(ssh(&a, &password, &["true"], "").0, 255, "the old password still works");
    assert_eq!(ssh(&renewed, &new_password, &["true"], "").0, 0);
    let r = api.delete(&format!("/v1/sandbox/{id}/ssh/{ssh_id}")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(ssh(&renewed, &new_password, &["true"], "").0, 255, "a deleted access still works");
    assert_eq!(api.delete(&format!("/v1/sandbox/{id}/ssh/{ssh_id}")).await.status, 404);

    // Nothing of SSH is in the guest: no server, no keys, no password.
    let pw =
        format!("{}[{}]", &new_password[..new_password.len() - 1], &new_password[new_password.len() - 1..]);
    let scan = format!(
        "pgrep -l sshd; ls /home/user/.ssh /etc/ssh/ssh_host_* 2>/dev/null; \
         grep -rl -e '{pw}' /home /root /tmp /etc 2>/dev/null; echo end"
    );
    assert_eq!(api.sh_ok(&id, &scan).await, "end\n");
    // The server's log names accesses, never passwords.
    let log = common::server_log_lines(&srv.data_dir).join("\n");
    assert!(log.contains("SSH login") && !log.contains(&password) && !log.contains(&new_password));

    left.delete_sandbox(&id).await;
}
