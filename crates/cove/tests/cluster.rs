//! Two runners in network namespaces of their own (their own addresses, 192.88.99.0/24) behind
//! a control plane that runs no VM, on an S3 image store (s3s-fs) and, under scripts/test,
//! Postgres over TLS (Debian's `postgresql`, see scripts/postgres): the runners register over
//! the network, a create lands on the runner with more free memory, a sandbox paused on runner
//! A resumes on runner B once A is killed (its memory-held process and files intact) while A's
//! running sandbox is reported lost and made nowhere else, A comes back and runs it on, a
//! runner cut off from the network is lost and then found again without a second VM of its
//! sandbox anywhere, and a control plane killed and started again finds it all.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{qemu_pids, start_runner, RunnerProcess, TestServer};
use cove_blob::testing::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use serde_json::json;

/// Namespaces `<name>a` and `<name>b`, each linked to this one by a veth pair: this side is
/// 192.88.99.1 (to a) and .5 (to b), the runners are .2 and .6.
struct Net {
    name: String,
}

const HERE_A: &str = "192.88.99.1";
const HERE_B: &str = "192.88.99.5";
const RUNNER_A: &str = "192.88.99.2";
const RUNNER_B: &str = "192.88.99.6";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Net {
    fn new() -> Net {
        // Not `cv*`: the host firewall cove sets up treats those as sandbox links.
        let name = format!("rt{}", &common::rand_hex()[..6]);
        for (side, here, there) in [("a", HERE_A, RUNNER_A), ("b", HERE_B, RUNNER_B)] {
            let (ns, outer, inner) =
                (format!("{name}{side}"), format!("{name}{side}0"), format!("{name}{side}1"));
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["addr", "add", &format!("{here}/30"), "dev", &outer]);
            ip(&["link", "set", &outer, "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{there}/30"), "dev", &inner]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            // The control plane and the S3 server are this namespace's addresses: both runners
            // reach either through their link.
            ip(&["-n", &ns, "route", "add", "default", "via", here]);
        }
        Net { name }
    }

    fn ns(&self, side: &str) -> String {
        format!("{}{side}", self.name)
    }

    /// Cuts (or restores) the link to a runner's namespace, as a partition would.
    fn link(&self, side: &str, up: bool) {
        ip(&["link", "set", &format!("{}{side}0", self.name), if up { "up" } else { "down" }]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for side in ["a", "b"] {
            let _ = Command::new("ip").args(["link", "del", &format!("{}{side}0", self.name)]).output();
            let _ = Command::new("ip").args(["netns", "del", &format!("{}{side}", self.name)]).output();
        }
    }
}

struct Cluster {
    net: Net,
    s3: S3Server,
    server: TestServer,
    token_file: String,
    dir: std::path::PathBuf,
}

/// A failed run leaves VMs on runners it killed: they go, with their network namespaces.
impl Drop for Cluster {
    fn drop(&mut self) {
        let dir = self.dir.display().to_string();
        for pid in std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if !cmdline.starts_with("qemu-system") || !cmdline.contains(&dir) {
                continue;
            }
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            let name = cmdline.split(" -name cove-").nth(1).and_then(|r| r.split(',').next());
            if let Some(id) = name {
                let _ = Command::new("ip").args(["netns", "del", &format!("cove-{id}")]).status();
            }
        }
    }
}

impl Cluster {
    /// Runner `side` (a or b) on a fixed port in its namespace, offering `memory_mib`.
    fn runner(&self, side: &str, memory_mib: u64) -> RunnerProcess {
        let (here, there) = if side == "a" { (HERE_A, RUNNER_A) } else { (HERE_B, RUNNER_B) };
        let port = self.server.url.rsplit(':').next().unwrap();
        let control_plane = format!("http://{here}:{port}");
        let memory = memory_mib.to_string();
        let blob_url = format!("s3://{BUCKET}/cove");
        let args = [
            "--control-plane",
            &control_plane,
            "--token-file",
            &self.token_file,
            "--capacity-memory-mib",
            &memory,
            "--blob-url",
            &blob_url,
        ];
        let s3 = self.s3.endpoint.clone();
        let envs = [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_ENDPOINT_URL", &s3),
        ];
        let ns = self.net.ns(side);
        start_runner(&self.dir.join(side), &format!("{there}:8081"), &args, &envs, Some(&ns))
    }
}

fn runner_id(r: &RunnerProcess) -> String {
    format!("runner-{}", &r.fingerprint[..16])
}

async fn placed_on(api: &common::Api, id: &str) -> String {
    let r = api.get("/v1/sandboxes").await;
    let items = r.json()["items"].as_array().cloned().unwrap_or_default();
    let item =
        items.iter().find(|i| i["id"] == id).unwrap_or_else(|| panic!("{id} not listed: {}", r.text()));
    item["pod_id"].as_str().unwrap_or_default().to_string()
}

/// Waits until the control plane's log tells of `n` runners joining, in all.
async fn joined(server: &TestServer, n: usize) {
    for _ in 0..60 {
        let log = std::fs::read_to_string(server.data_dir.join("server.log")).unwrap_or_default();
        if log.matches("runner joined").count() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("fewer than {n} runners joined: see {}", server.data_dir.join("server.log").display());
}

async fn wait_state(api: &common::Api, id: &str, state: &str) {
    for _ in 0..120 {
        if api.state_of(id).await == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{id} did not become {state}: it is {}", api.state_of(id).await);
}

#[tokio::test]
async fn two_runners_place_move_lose_and_find_sandboxes() {
    let net = Net::new();
    let s3 = S3Server::start_on(&format!("{HERE_A}:0"));
    let dir = std::env::temp_dir().join(format!("cove-test-cluster-{}", common::rand_hex()));
    // The records on Postgres over TLS, as a deployment's are, when the suite has a server
    // (scripts/test names it); the harness takes the URL from the data dir.
    if let (Ok(server), Err(_)) =
        (std::env::var("COVE_TEST_POSTGRES_SERVER"), std::env::var(cove_store::testing::POSTGRES_ENV))
    {
        let mut url = cove_store::testing::fresh_database_on(&server).unwrap();
        if let Ok(ca) = std::env::var("COVE_TEST_POSTGRES_CA") {
            url = format!("{url}?sslmode=require&sslrootcert={ca}");
        }
        std::fs::create_dir_all(dir.join("control")).unwrap();
        std::fs::write(dir.join("control/test-database-url"), url).unwrap();
    }
    // The control plane listens where both namespaces reach it (and only for this test), on a
    // port below the ephemeral range: it starts again on the same port later, which an
    // outgoing connection of this host could otherwise have taken meanwhile.
    let listen = format!("0.0.0.0:{}", free_port_below_ephemeral());
    let server = TestServer::start_in(dir.join("control"), &["--no-local-runner", "--listen", &listen]);
    let token_file = server.data_dir.join("cluster-token").display().to_string();
    let c = Cluster { net, s3, server, token_file, dir };
    let api = c.server.new_org(Some(10));

    // A offers more memory than B: the first sandboxes land on A.
    let mut a = c.runner("a", 6144);
    let b = c.runner("b", 3072);
    let (id_a, id_b) = (runner_id(&a), runner_id(&b));
    joined(&c.server, 2).await;
    let moving = api.create(json!({})).await;
    let staying = api.create(json!({})).await;
    assert_eq!(placed_on(&api, &moving).await, id_a);
    assert_eq!(placed_on(&api, &staying).await, id_a);
    assert!(a.data_dir.join("sandboxes").join(&moving).exists());

    api.put_file(&moving, "/home/user/note.txt", b"moved with its sandbox").await;
    let counter = common::start_counter(&api, &moving).await;
    let staying_counter = common::start_counter(&api, &staying).await;
    let r = api.action(&moving, "pause").await;
    assert_eq!(r.status, 201, "{}", r.text());

    // A is killed: its lease lapses, its running sandbox is lost (its VM lives on, unseen) and
    // is made nowhere else; the paused one resumes on B from S3, process and files intact.
    let _ = a.child.kill();
    let _ = a.child.wait();
    wait_state(&api, &staying, "lost").await;
    let r = api.post(&format!("/v1/sandbox/{staying}/process/execute"), json!({"command": "true"})).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("lost"), "{}", r.text());
    assert_eq!(api.state_of(&moving).await, "paused");
    assert_eq!(api.sh_ok(&moving, "cat /home/user/note.txt").await, "moved with its sandbox");
    assert_eq!(placed_on(&api, &moving).await, id_b);
    assert!(b.data_dir.join("sandboxes").join(&moving).exists());
    let lines = common::counter_beyond(&api, &moving, 0).await;
    let moved_count = common::assert_counts_on(&lines, counter);
    assert_eq!(qemu_pids(&staying).len(), 1, "the lost sandbox's VM must be the one on A, alone");
    assert!(!b.data_dir.join("sandboxes").join(&staying).exists());

    // The invoke route follows it: a guest port, reached through the control plane on B.
    api.sh_ok(
        &moving,
        "cd /tmp && echo on-b > where.txt && (setsid python3 -m http.server 8000 >/dev/null 2>&1 &)",
    )
    .await;
    let body = common::invoke_until(&api, &c.server.url, &moving, 8000, "/where.txt", "on-b\n").await;
    assert_eq!(body, "on-b\n");

    // A comes back: its sandbox runs on (the same VM, its counter going on). What A kept of
    // the sandbox that moved goes, but not its namespace: B's VM runs in it (namespaces are
    // named by sandbox on the whole host).
    a = c.runner("a", 6144);
    assert!(cove_net::netns::exists(&format!("cove-{moving}")), "A took B's namespace of {moving}");
    wait_state(&api, &staying, "running").await;
    let lines = common::counter_beyond(&api, &staying, 0).await;
    common::assert_counts_on(&lines, staying_counter);
    assert_eq!(qemu_pids(&moving).len(), 1);
    assert_eq!(qemu_pids(&staying).len(), 1);

    // B is cut off: lost with its sandbox, whose VM runs on there; the link back, B renews,
    // and the sandbox runs again, one VM of it in all.
    c.net.link("b", false);
    wait_state(&api, &moving, "lost").await;
    assert_eq!(qemu_pids(&moving).len(), 1);
    c.net.link("b", true);
    wait_state(&api, &moving, "running").await;
    assert_eq!(qemu_pids(&moving).len(), 1);
    let lines = common::counter_beyond(&api, &moving, moved_count).await;
    common::assert_counts_on(&lines, counter);

    // The control plane killed and started again: the runners register with it again and it
    // finds both sandboxes running where they were.
    c.server.kill(libc::SIGKILL);
    let listen = c.server.url.trim_start_matches("http://").to_string();
    let server = TestServer::start_in(c.server.data_dir.clone(), &["--no-local-runner", "--listen", &listen]);
    let api = api.on(&server);
    joined(&server, 6).await;
    for (id, on) in [(&moving, &id_b), (&staying, &id_a)] {
        assert_eq!(api.sh_ok(id, "echo here").await, "here\n");
        assert_eq!(placed_on(&api, id).await, *on);
    }
    let body = common::invoke_until(&api, &server.url, &moving, 8000, "/where.txt", "on-b\n").await;
    assert_eq!(body, "on-b\n");
    for id in [&moving, &staying] {
        let r = api.delete(&format!("/v1/sandbox/{id}")).await;
        assert_eq!(r.status, 204, "{}", r.text());
        assert!(qemu_pids(id).is_empty());
    }
    drop((a, b));

    // The cluster token signs leases and never travels or lands in a log.
    let token = std::fs::read_to_string(&c.token_file).unwrap();
    let token = token.trim();
    for log in [c.dir.join("a/runner.log"), c.dir.join("b/runner.log"), server.data_dir.join("server.log")] {
        assert!(!common::file_contains(&log, token.as_bytes()), "{} holds the cluster token", log.display());
        assert!(!common::file_contains(&log, SECRET_KEY.as_bytes()), "{} holds the S3 secret", log.display());
    }
}

/// A TCP port free now, in 20000..32000 (below Linux's default ephemeral range, 32768 up).
fn free_port_below_ephemeral() -> u16 {
    (0..200)
        .map(|_| 20000 + rand::random::<u16>() % 12000)
        .find(|p| std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok())
        .expect("a free port below 32000")
}
