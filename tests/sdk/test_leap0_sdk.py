"""Wire-compatibility tests: the official Leap0 Python SDK, unmodified, against `cove server`.

A session fixture starts its own `cove server` (binary from COVE_BIN, guest images from
COVE_CACHE_DIR) on a free loopback port with a fresh data dir and a random bootstrap key, and
every test talks to it only through the SDK's public API. Results are checked from inside the
guest with `process.execute` wherever that is meaningful, so a call that answers "ok" without
doing anything fails.

Sandboxes are real QEMU VMs on a 2-core machine: the module uses one shared sandbox for the
process and filesystem tests, and creates at most one more at a time for lifecycle tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

# The SDK must never try to export telemetry from these tests.
os.environ["LEAP0_SDK_OTEL_ENABLED"] = "false"
os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)

import pytest  # noqa: E402

import leap0  # noqa: E402
from leap0 import (  # noqa: E402
    AsyncLeap0Client,
    FileEdit,
    Leap0Client,
    Leap0ConflictError,
    Leap0Error,
    Leap0NotFoundError,
    SandboxState,
)

REPO = Path(__file__).resolve().parents[2]
COVE_BIN = Path(os.environ.get("COVE_BIN", REPO / "target" / "debug" / "cove"))
COVE_CACHE_DIR = Path(os.environ.get("COVE_CACHE_DIR", "/var/cache/cove"))
TEMPLATE = "system/debian:bookworm"
STARTUP_TIMEOUT = 120.0
ENV_NAME = "COVE_SDK_TEST_VAR"
ENV_VALUE = "hello from env_vars: spaces, 'quotes' & $dollars"
SANDBOX_DOMAIN = "sandbox.cove.invalid"
SANDBOX_LIMIT = 3  # `cove server`'s default per-organization limit, as Leap0's


# ---------------------------------------------------------------------------------------------
# Server and client fixtures
# ---------------------------------------------------------------------------------------------


def database_args() -> list[str]:
    """`--database-url` of a new database when the tests run on Postgres (COVE_TEST_POSTGRES,
    the server `scripts/postgres start` printed); none on SQLite."""
    server = os.environ.get("COVE_TEST_POSTGRES")
    if not server:
        return []
    server = server.rstrip("/")
    name = "cove_test_sdk_" + secrets.token_hex(6)
    subprocess.run(["psql", "-q", f"{server}/postgres", "-c", f"CREATE DATABASE {name}"], check=True)
    return ["--database-url", f"{server}/{name}"]


def stored_metadata(server: "CoveServer") -> bytes:
    """What the server's metadata store holds, to search for secrets: its SQLite files, or a
    dump of its Postgres database."""
    if server.database_url:
        return subprocess.run(["pg_dump", "--data-only", server.database_url], check=True,
                              capture_output=True).stdout
    return b"".join((server.data_dir / f).read_bytes() for f in ("cove.db", "cove.db-wal")
                    if (server.data_dir / f).exists())


class CoveServer:
    # The servers running now: a failed test's report ends with their logs (conftest.py).
    running: set["CoveServer"] = set()

    def __init__(self, extra_args: list[str] | None = None, listen: str = "127.0.0.1:0") -> None:
        if not COVE_BIN.is_file():
            raise RuntimeError(f"{COVE_BIN} not found: build it with `cargo build -p cove`")
        if not (COVE_CACHE_DIR / "initramfs").exists():
            raise RuntimeError(f"{COVE_CACHE_DIR} has no guest images: run `cove setup` first")
        # 0700, as mkdtemp makes it: the server must make its own directories usable by QEMU.
        # The cove-test- prefix lets scripts/test find VMs a crashed run left behind.
        self.data_dir = Path(tempfile.mkdtemp(prefix="cove-test-sdk-"))
        self.api_key = "cove_sdk_" + secrets.token_hex(16)
        self.log_path = self.data_dir / "server.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, COVE_BOOTSTRAP_API_KEY=self.api_key)
        database = database_args()
        self.database_url = database[1] if database else None
        self.proc = subprocess.Popen(
            [
                str(COVE_BIN),
                "server",
                "--listen",
                listen,
                "--ssh-listen",
                "127.0.0.1:0",
                "--data-dir",
                str(self.data_dir),
                "--cache-dir",
                str(COVE_CACHE_DIR),
                *database,
                *(extra_args or []),
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                lines.put(raw.decode(errors="replace"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        CoveServer.running.add(self)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        self.base_url = ""
        while not self.base_url:
            remaining = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                line = None
            if line is None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"cove server did not start:\n{tail}")
            prefix = "cove listening on "
            if line.startswith(prefix):
                self.base_url = line[len(prefix) :].strip()

    def log_tail(self, n: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        # Without the colours the server gives its log.
        return "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()[-n:])

    def _leftover_qemu_pids(self) -> list[int]:
        """QEMU processes whose command line names this server's data dir."""
        pids = []
        needle = str(self.data_dir).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline and b"qemu" in cmdline.split(b"\0", 1)[0]:
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        CoveServer.running.discard(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # `cove server` leaves sandbox VMs running on SIGTERM (to adopt them at the next start);
        # any still there now belong to this test run only.
        for pid in self._leftover_qemu_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def make_client(server: CoveServer, api_key: str | None = None) -> Leap0Client:
    return Leap0Client(
        api_key=api_key or server.api_key,
        base_url=server.base_url,
        sandbox_domain=SANDBOX_DOMAIN,
        timeout=120.0,
        sdk_otel_enabled=False,
    )


def delete_leftovers(c: Leap0Client) -> None:
    """Deletes, through the API, whatever sandboxes and snapshots failed tests left behind."""
    for item in c.sandboxes.list(page_size=100).items:
        try:
            c.sandboxes.delete(item.id)
        except Leap0Error:
            pass
    for snap in c.snapshots.list(page_size=100).items:
        try:
            c.snapshots.delete(snap)
        except Leap0Error:
            pass


@pytest.fixture(scope="session")
def server():
    srv = CoveServer()
    try:
        yield srv
    finally:
        # Delete every sandbox still there through the API, then stop the server.
        try:
            with make_client(srv) as c:
                for item in c.sandboxes.list(page_size=100).items:
                    try:
                        c.sandboxes.delete(item.id)
                    except Leap0Error:
                        pass
        except Exception as exc:  # pragma: no cover - cleanup must not hide test results
            print(f"cleanup: could not delete leftover sandboxes: {exc}")
        srv.stop()


@pytest.fixture(scope="session")
def client(server):
    c = make_client(server)
    yield c
    c.close()


@pytest.fixture(scope="module")
def sandbox(client):
    sb = client.sandboxes.create(template_name=TEMPLATE, timeout=1800, env_vars={ENV_NAME: ENV_VALUE})
    yield sb
    try:
        sb.delete()
    except Leap0NotFoundError:
        pass


def sh(sb, command: str, **kwargs) -> str:
    """Runs a command in the guest; fails the test unless it exits 0. Returns stdout."""
    r = sb.process.execute(command=command, **kwargs)
    assert r.exit_code == 0, f"{command!r} exited {r.exit_code}: stdout={r.stdout!r} stderr={r.stderr!r}"
    return r.stdout


@pytest.fixture
def workdir(sandbox):
    """A fresh, empty directory in the guest for one test."""
    path = f"/tmp/sdk-{secrets.token_hex(4)}"
    sh(sandbox, f"mkdir -p {path}")
    yield path
    sandbox.process.execute(command=f"rm -rf {path}")


# ---------------------------------------------------------------------------------------------
# Sandbox lifecycle
# ---------------------------------------------------------------------------------------------


def test_sdk_installs_no_telemetry_exporter(client):
    # With OpenTelemetry enabled the SDK would install the OTel SDK's own providers, which
    # export over OTLP; disabled, the global providers stay the API's no-op ones.
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    client.sandboxes.list()
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert not isinstance(metrics.get_meter_provider(), MeterProvider)


def test_create_returns_running_sandbox(sandbox):
    assert isinstance(sandbox, leap0.Sandbox)
    assert isinstance(sandbox.id, str) and sandbox.id.strip()
    assert sandbox.state == SandboxState.RUNNING
    assert sandbox.template_id
    assert sandbox.vcpu == 1
    assert sandbox.memory == 1024
    assert sandbox.timeout == 1800
    assert sandbox.disk > 0
    assert sandbox.auto_pause is False
    created = datetime.fromisoformat(sandbox.created_at.replace("Z", "+00:00"))
    assert created.tzinfo is not None
    assert abs(time.time() - created.timestamp()) < 600


def test_create_env_vars_are_visible_in_the_guest(sandbox):
    out = sh(sandbox, f'printf %s "${ENV_NAME}"')
    assert out == ENV_VALUE


def test_get_and_refresh(client, sandbox):
    got = client.sandboxes.get(sandbox.id)
    assert got.id == sandbox.id
    assert got.state == SandboxState.RUNNING
    assert got.template_id == sandbox.template_id
    assert (got.vcpu, got.memory, got.disk, got.timeout) == (
        sandbox.vcpu,
        sandbox.memory,
        sandbox.disk,
        sandbox.timeout,
    )
    assert got.created_at == sandbox.created_at
    # The top-level helper and the handle's refresh go through the same endpoint.
    assert client.get_sandbox(sandbox.id).id == sandbox.id
    assert sandbox.refresh() is sandbox
    assert sandbox.state == SandboxState.RUNNING


def test_list_includes_the_sandbox(client, sandbox):
    listing = client.sandboxes.list()
    ids = [item.id for item in listing.items]
    assert sandbox.id in ids
    assert listing.total_items >= 1
    item = next(i for i in listing.items if i.id == sandbox.id)
    assert item.state == SandboxState.RUNNING
    assert item.template_id == sandbox.template_id
    assert item.created_at
    assert item.timeout_at is not None and item.timeout_at > time.time()

    running = client.sandboxes.list(state="running", sort="state", order_by="asc")
    assert sandbox.id in [i.id for i in running.items]
    assert all(i.state == SandboxState.RUNNING for i in running.items)
    paused = client.sandboxes.list(state="paused")
    assert sandbox.id not in [i.id for i in paused.items]

    page = client.sandboxes.list(page_size=1)
    assert len(page.items) == 1
    assert page.total_items == listing.total_items


def test_user_home_dir_and_workdir(sandbox):
    home = sandbox.get_user_home_dir()
    assert home.startswith("/")
    assert sh(sandbox, 'printf %s "$HOME"') == home
    sh(sandbox, f"test -d {shlex.quote(home)}")

    wd = sandbox.get_workdir()
    assert wd.startswith("/")
    sh(sandbox, f"test -d {shlex.quote(wd)}")


def test_create_use_and_delete_a_second_sandbox(client):
    # The top-level helper forwards to sandboxes.create with the SDK's defaults.
    sb = client.create_sandbox(env_vars={"ONLY_HERE": "2"})
    try:
        assert sb.state == SandboxState.RUNNING
        assert sh(sb, "printf %s \"$ONLY_HERE\"") == "2"
        sb.filesystem.write_file(path="/tmp/marker", content="second")
        assert sb.filesystem.read_file(path="/tmp/marker") == "second"
    finally:
        sb.delete()
    with pytest.raises(Leap0NotFoundError) as err:
        client.sandboxes.get(sb.id)
    assert err.value.status_code == 404
    assert sb.id not in [i.id for i in client.sandboxes.list(page_size=100).items]
    # The handle outlives the sandbox: its bound services now get 404s.
    with pytest.raises(Leap0NotFoundError):
        sb.process.execute(command="true")
    with pytest.raises(Leap0NotFoundError):
        sb.filesystem.read_file(path="/tmp/marker")
    with pytest.raises(Leap0NotFoundError):
        client.sandboxes.delete(sb.id)


def test_sandbox_limit_is_a_conflict(client, sandbox):
    held = client.sandboxes.list(state="running", page_size=100).total_items
    assert 1 <= held < SANDBOX_LIMIT
    extra = []
    try:
        for _ in range(SANDBOX_LIMIT - held):
            extra.append(client.sandboxes.create(timeout=120))
        with pytest.raises(Leap0ConflictError) as err:
            client.sandboxes.create(timeout=120)
        assert err.value.status_code == 409
        assert err.value.error_message
    finally:
        for sb in extra:
            sb.delete()
    # Deleting frees the slots again.
    assert client.sandboxes.list(state="running", page_size=100).total_items == held


def test_timeout_deletes_the_sandbox(client):
    sb = client.sandboxes.create(timeout=2)
    assert sb.timeout == 2
    deadline = time.monotonic() + 30
    while True:
        try:
            client.sandboxes.get(sb.id)
        except Leap0NotFoundError:
            break
        assert time.monotonic() < deadline, "sandbox outlived its timeout"
        time.sleep(0.5)
    assert sb.id not in [i.id for i in client.sandboxes.list(page_size=100).items]


def test_async_client(server, sandbox):
    async def run() -> None:
        async with AsyncLeap0Client(
            api_key=server.api_key,
            base_url=server.base_url,
            sandbox_domain=SANDBOX_DOMAIN,
            sdk_otel_enabled=False,
        ) as ac:
            sb = await ac.sandboxes.get(sandbox.id)
            assert sb.id == sandbox.id
            assert sb.state == SandboxState.RUNNING
            r = await sb.process.execute(command=f'printf %s "${ENV_NAME}"')
            assert (r.exit_code, r.stdout) == (0, ENV_VALUE)
            path = f"/tmp/async-{secrets.token_hex(4)}.txt"
            await sb.filesystem.write_file(path=path, content="from async")
            assert await sb.filesystem.read_file(path=path) == "from async"
            assert await sb.filesystem.exists(path=path) is True
            await sb.filesystem.delete(path=path)
            assert await sb.filesystem.exists(path=path) is False
            with pytest.raises(Leap0NotFoundError):
                await ac.sandboxes.get("sbx-" + "0" * 20)

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# PTY
# ---------------------------------------------------------------------------------------------


def _read_until(conn, want: bytes, limit: float = 60) -> bytes:
    """Terminal output until it contains `want`."""
    seen = b""
    deadline = time.monotonic() + limit
    while want not in seen:
        assert time.monotonic() < deadline, f"no {want!r} in {seen!r}"
        seen += conn.recv()
    return seen


def test_pty_sessions(sandbox):
    session = sandbox.pty.create(session_id="sdk-term", cols=100, rows=30, envs={"WHO": "sdk"})
    try:
        assert (session.id, session.cols, session.rows, session.active) == ("sdk-term", 100, 30, True)
        assert session.envs == {"WHO": "sdk"} and session.created_at
        assert "sdk-term" in [s.id for s in sandbox.pty.list()]
        assert sandbox.pty.get("sdk-term").cwd == "/home/user"
        with pytest.raises(Leap0ConflictError):
            sandbox.pty.create(session_id="sdk-term")

        conn = sandbox.pty.connect("sdk-term")
        try:
            conn.send("echo hello-$WHO\r")
            _read_until(conn, b"hello-sdk")
            resized = sandbox.pty.resize("sdk-term", cols=120, rows=40)
            assert (resized.cols, resized.rows) == (120, 40)
            conn.send(b"stty size\r")
            _read_until(conn, b"40 120")
        finally:
            conn.close()
    finally:
        sandbox.pty.delete("sdk-term")
    assert "sdk-term" not in [s.id for s in sandbox.pty.list()]
    with pytest.raises(Leap0NotFoundError):
        sandbox.pty.get("sdk-term")


def test_git_every_operation(sandbox, workdir):
    """All 16 git methods against a bare repository inside the sandbox (the credential path, which
    needs a git server on the network, is the Rust test `crates/cove/tests/git.rs`)."""
    origin, repo = f"{workdir}/origin.git", f"{workdir}/work"
    seed = (
        f"git init -q --bare -b main {origin} && git init -q -b main {workdir}/seed && cd {workdir}/seed && "
        "echo one > a.txt && git add a.txt && git -c user.name=s -c user.email=s@x commit -qm first && "
        f"git push -q {origin} main"
    )
    assert sandbox.process.execute(command=seed).exit_code == 0

    def ok(result):
        assert result.exit_code == 0, result.output
        return result.output

    ok(sandbox.git.clone(url=origin, path=repo, branch="main", depth=1))
    assert "On branch main" in ok(sandbox.git.status(path=repo))
    assert "main" in ok(sandbox.git.branches(path=repo, branch_type="all"))
    ok(sandbox.git.create_branch(path=repo, name="feature", checkout=True))
    sandbox.filesystem.write_file(path=f"{repo}/a.txt", content="one\ntwo\n")
    assert "+two" in ok(sandbox.git.diff_unstaged(path=repo))
    ok(sandbox.git.add(path=repo, files=["a.txt"]))
    assert "+two" in ok(sandbox.git.diff_staged(path=repo, context_lines=0))
    ok(sandbox.git.reset(path=repo))
    assert ok(sandbox.git.diff_staged(path=repo)) == ""
    ok(sandbox.git.add(path=repo, files=["a.txt"]))
    commit = sandbox.git.commit(path=repo, message="second", author="SDK", email="sdk@example.com")
    assert commit.result.exit_code == 0, commit.result.output
    head = sandbox.process.execute(command=f"git -C {repo} rev-parse HEAD").stdout.strip()
    assert commit.sha == head and len(head) == 40
    assert "second" in ok(sandbox.git.log(path=repo, max_count=1))
    assert "+two" in ok(sandbox.git.show(path=repo, revision=head))
    assert "+two" in ok(sandbox.git.diff(path=repo, target="main"))
    ok(sandbox.git.push(path=repo, remote="origin", branch="feature", set_upstream=True))
    pushed = sandbox.process.execute(command=f"git --git-dir={origin} rev-parse feature").stdout.strip()
    assert pushed == head
    ok(sandbox.git.checkout_branch(path=repo, branch="main"))
    ok(sandbox.git.pull(path=repo, remote="origin", branch="feature"))
    assert sandbox.filesystem.read_file(path=f"{repo}/a.txt") == "one\ntwo\n"
    ok(sandbox.git.delete_branch(path=repo, name="feature", force=True))
    assert "feature" not in ok(sandbox.git.branches(path=repo))
    # git's refusals are results with an exit code; bad input is a validation error.
    assert sandbox.git.checkout_branch(path=repo, branch="no-such-branch").exit_code != 0
    with pytest.raises(Leap0Error):
        sandbox.git.show(path=repo, revision="--output=/tmp/x")


def _ssh(access, password: str, command: str) -> subprocess.CompletedProcess:
    """The system's OpenSSH client with `access.ssh_command`, the password given by SSH_ASKPASS."""
    words = access.ssh_command.split()
    port, dest = words[words.index("-p") + 1], words[-1]
    with tempfile.TemporaryDirectory() as tmp:
        askpass = Path(tmp) / "askpass"
        askpass.write_text(f"#!/bin/sh\necho '{password}'\n")
        askpass.chmod(0o700)
        env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force")
        env.pop("DISPLAY", None)
        opts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no"]
        return subprocess.run(["ssh", "-p", port, *opts, dest, command], env=env, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_ssh_access(sandbox):
    access = sandbox.ssh.create_access()
    assert access.id and access.password and access.sandbox_id == sandbox.id
    assert access.ssh_command.endswith(f"{access.id}@localhost") and access.expires_at
    assert sandbox.ssh.validate_access(id=access.id, password=access.password).valid
    assert not sandbox.ssh.validate_access(id=access.id, password="wrong").valid
    ran = _ssh(access, access.password, "whoami; exit 5")
    assert (ran.returncode, ran.stdout) == (5, "user\n"), ran.stderr
    renewed = sandbox.ssh.regenerate_access(id=access.id)
    assert renewed.id == access.id and renewed.password != access.password
    assert not sandbox.ssh.validate_access(id=access.id, password=access.password).valid
    assert _ssh(access, access.password, "true").returncode == 255
    assert _ssh(renewed, renewed.password, "true").returncode == 0
    sandbox.ssh.delete_access(id=access.id)
    with pytest.raises(Leap0NotFoundError):
        sandbox.ssh.validate_access(id=access.id, password=renewed.password)


def test_lsp_python(sandbox, workdir):
    """Every LSP method against pyright, which the system template carries."""
    project, main = workdir, f"{workdir}/main.py"
    sandbox.filesystem.write_file(path=main, content="import os\n\ndef greet():\n    return os.pa\n")
    # (A cold pyright under emulation answers its first request in tens of seconds, inside the
    # SDK's default 300 s.)
    lsp = dict(language_id="python", path_to_project=project)
    assert sandbox.lsp.start(**lsp).success
    try:
        sandbox.lsp.did_open_path(**lsp, path=main)
        answer = sandbox.lsp.completions_path(**lsp, path=main, line=3, character=16)
        items = answer.result["items"] if isinstance(answer.result, dict) else answer.result
        assert answer.error is None and "path" in [i["label"] for i in items]
        symbols = sandbox.lsp.document_symbols_path(**lsp, path=main)
        assert "greet" in [s["name"] for s in symbols.result]
        symbols = sandbox.lsp.document_symbols(**lsp, uri=f"file://{main}")
        assert "greet" in [s["name"] for s in symbols.result]
        sandbox.lsp.did_close_path(**lsp, path=main)
        # The URI forms too, with the text given.
        sandbox.lsp.did_open(**lsp, uri=f"file://{main}", text="x = 1\nx.bit_l\n", version=2)
        answer = sandbox.lsp.completions(**lsp, uri=f"file://{main}", line=1, character=7)
        assert "bit_length" in [i["label"] for i in (answer.result.get("items") or [])]
        sandbox.lsp.did_close(**lsp, uri=f"file://{main}")
    finally:
        assert sandbox.lsp.stop(**lsp).success
    with pytest.raises(Leap0NotFoundError):
        sandbox.lsp.document_symbols(**lsp, uri=f"file://{main}")


# ---------------------------------------------------------------------------------------------
# Process
# ---------------------------------------------------------------------------------------------


def test_execute_stdout_stderr_exit_code(sandbox):
    r = sandbox.process.execute(command="echo out; echo err >&2; exit 7")
    assert r.exit_code == 7
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"

    r = sandbox.process.execute(command="uname -s")
    assert r.exit_code == 0
    assert r.stdout.strip() == "Linux"


def test_execute_env_and_cwd(sandbox, workdir):
    r = sandbox.process.execute(
        command='printf "%s|%s|%s" "$A" "$B" "$(pwd)"',
        env={"A": "one", "B": "two words"},
        cwd=workdir,
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout == f"one|two words|{workdir}"
    # Per-process env wins over the sandbox's env_vars, and does not stick.
    r = sandbox.process.execute(command=f'printf %s "${ENV_NAME}"', env={ENV_NAME: "override"})
    assert r.stdout == "override"
    assert sh(sandbox, f'printf %s "${ENV_NAME}"') == ENV_VALUE


def test_execute_default_cwd_is_workdir(sandbox):
    assert sh(sandbox, "pwd").strip() == sandbox.get_workdir()


def test_execute_timeout_kills_the_command(sandbox):
    start = time.monotonic()
    r = sandbox.process.execute(command="sleep 30; echo done", timeout=1)
    assert time.monotonic() - start < 20
    assert r.exit_code != 0
    assert "done" not in r.stdout


# ---------------------------------------------------------------------------------------------
# Filesystem
# ---------------------------------------------------------------------------------------------


def test_write_and_read_text_file(sandbox, workdir):
    path = f"{workdir}/hello.txt"
    text = "héllo wörld ✓\nsecond line\n"
    sandbox.filesystem.write_file(path=path, content=text)
    assert sandbox.filesystem.read_file(path=path) == text
    assert sh(sandbox, f"cat {path}") == text
    assert sh(sandbox, f"stat -c %s {path}").strip() == str(len(text.encode()))


def test_read_file_ranges(sandbox, workdir):
    path = f"{workdir}/lines.txt"
    sh(sandbox, f"printf 'l1\\nl2\\nl3\\nl4\\n' > {path}")
    assert sandbox.filesystem.read_file(path=path, head=2) == "l1\nl2\n"
    assert sandbox.filesystem.read_file(path=path, tail=1) == "l4\n"
    assert sandbox.filesystem.read_file(path=path, offset=3, limit=5) == "l2\nl3"


def test_write_and_read_binary_file(sandbox, workdir):
    path = f"{workdir}/data.bin"
    data = bytes(range(256)) * 64 + b"\x00\xff\r\n"
    sandbox.filesystem.write_bytes(path=path, content=data)
    assert sandbox.filesystem.read_bytes(path=path) == data
    digest = sh(sandbox, f"sha256sum {path}").split()[0]
    assert digest == hashlib.sha256(data).hexdigest()


def test_write_file_with_permissions(sandbox, workdir):
    path = f"{workdir}/script.sh"
    sandbox.filesystem.write_file(path=path, content="#!/bin/sh\necho ran\n", permissions="750")
    assert sh(sandbox, f"stat -c %a {path}").strip() == "750"
    assert sh(sandbox, path) == "ran\n"


def test_write_files_and_read_files(sandbox, workdir):
    files = {
        f"{workdir}/multi/a.txt": "alpha\n",
        f"{workdir}/multi/b.txt": "beta\n",
    }
    sandbox.filesystem.write_files(files=files)
    for path, content in files.items():
        assert sh(sandbox, f"cat {path}") == content
    blobs = {f"{workdir}/multi/c.bin": b"\x00\x01\x02\xfe"}
    sandbox.filesystem.write_files_bytes(files=blobs)
    assert sh(sandbox, f"od -An -tx1 {workdir}/multi/c.bin").split() == ["00", "01", "02", "fe"]

    got = sandbox.filesystem.read_files(paths=list(files))
    assert got == files
    got_bytes = sandbox.filesystem.read_files_bytes(paths=list(blobs))
    assert got_bytes == blobs


def test_mkdir_exists_and_stat(sandbox, workdir):
    deep = f"{workdir}/a/b/c"
    assert sandbox.filesystem.exists(path=deep) is False
    sandbox.filesystem.mkdir(path=deep, recursive=True)
    sh(sandbox, f"test -d {deep}")
    assert sandbox.filesystem.exists(path=deep) is True

    flat = f"{workdir}/flat"
    sandbox.filesystem.mkdir(path=flat, permissions="700")
    assert sh(sandbox, f"stat -c %a {flat}").strip() == "700"
    with pytest.raises(Leap0ConflictError) as err:
        sandbox.filesystem.mkdir(path=flat)
    assert err.value.status_code == 409
    sandbox.filesystem.mkdir(path=deep, recursive=True)  # like mkdir -p: existing is fine

    info = sandbox.filesystem.stat(path=deep)
    assert info.is_dir is True
    assert info.name == "c"
    assert info.path == deep
    assert info.mtime > 0

    sandbox.filesystem.write_file(path=f"{deep}/f.txt", content="12345")
    info = sandbox.filesystem.stat(path=f"{deep}/f.txt")
    assert info.is_dir is False
    assert info.size == 5
    assert info.name == "f.txt"
    assert info.mode.lstrip("0") == sh(sandbox, f"stat -c %a {deep}/f.txt").strip()
    assert info.owner == sh(sandbox, f"stat -c %U {deep}/f.txt").strip()
    assert info.group == sh(sandbox, f"stat -c %G {deep}/f.txt").strip()
    assert info.mtime == int(sh(sandbox, f"stat -c %Y {deep}/f.txt"))
    assert info.is_symlink is False

    sh(sandbox, f"ln -s f.txt {deep}/link")
    link = sandbox.filesystem.stat(path=f"{deep}/link")
    assert link.is_symlink is True
    assert link.link_target == "f.txt"


def test_ls(sandbox, workdir):
    sh(sandbox, f"mkdir -p {workdir}/d/sub && printf abc > {workdir}/d/one && printf x > {workdir}/d/sub/two")
    items = sandbox.filesystem.ls(path=f"{workdir}/d").items
    by_name = {i.name: i for i in items}
    assert set(by_name) == {"one", "sub"}
    assert by_name["one"].is_dir is False and by_name["one"].size == 3
    assert by_name["one"].path == f"{workdir}/d/one"
    assert by_name["sub"].is_dir is True

    rec = sandbox.filesystem.ls(path=f"{workdir}/d", recursive=True).items
    assert f"{workdir}/d/sub/two" in {i.path for i in rec}

    excl = sandbox.filesystem.ls(path=f"{workdir}/d", exclude=["sub"]).items
    assert {i.name for i in excl} == {"one"}


def test_glob(sandbox, workdir):
    sh(sandbox, f"mkdir -p {workdir}/g/x && touch {workdir}/g/a.py {workdir}/g/b.txt {workdir}/g/x/c.py")
    top = sandbox.filesystem.glob(path=f"{workdir}/g", pattern="*.py")
    assert any(p.endswith("a.py") for p in top)
    assert not any(p.endswith("b.txt") for p in top)
    deep = sandbox.filesystem.glob(path=f"{workdir}/g", pattern="**/*.py")
    assert any(p.endswith("x/c.py") for p in deep)
    assert not any(p.endswith(".txt") for p in deep)


def test_grep(sandbox, workdir):
    sandbox.filesystem.write_files(
        files={
            f"{workdir}/s/one.py": "import os\nNEEDLE = 1\n",
            f"{workdir}/s/two.txt": "nothing\nhere NEEDLE\n",
            f"{workdir}/s/three.py": "no match\n",
        }
    )
    matches = sandbox.filesystem.grep(path=f"{workdir}/s", pattern="NEEDLE")
    found = {(m.path.rsplit("/", 1)[-1], m.line, m.content.strip()) for m in matches}
    assert found == {("one.py", 2, "NEEDLE = 1"), ("two.txt", 2, "here NEEDLE")}

    only_py = sandbox.filesystem.grep(path=f"{workdir}/s", pattern="NEEDLE", include="*.py")
    assert [m.path.rsplit("/", 1)[-1] for m in only_py] == ["one.py"]


def test_edit_file_and_edit_files(sandbox, workdir):
    path = f"{workdir}/e.txt"
    sandbox.filesystem.write_file(path=path, content="foo bar\nfoo baz\nqux\n")
    res = sandbox.filesystem.edit_file(
        path=path, edits=[FileEdit(find="foo", replace="FOO"), FileEdit(find="qux", replace="QUX")]
    )
    assert res.replacements == 3
    assert "-qux" in res.diff and "+QUX" in res.diff
    assert sh(sandbox, f"cat {path}") == "FOO bar\nFOO baz\nQUX\n"

    a, b = f"{workdir}/m1.txt", f"{workdir}/m2.txt"
    sandbox.filesystem.write_files(files={a: "old one\n", b: "nothing\n"})
    results = {r.file: r for r in sandbox.filesystem.edit_files(paths=[a, b], find="old", replace="new")}
    assert results[a].success is True
    assert sh(sandbox, f"cat {a}") == "new one\n"
    assert sh(sandbox, f"cat {b}") == "nothing\n"


def test_move_copy_delete(sandbox, workdir):
    src = f"{workdir}/src.txt"
    sandbox.filesystem.write_file(path=src, content="payload")

    sandbox.filesystem.copy(src_path=src, dst_path=f"{workdir}/copy.txt")
    assert sh(sandbox, f"cat {workdir}/copy.txt") == "payload"
    sh(sandbox, f"test -f {src}")

    sandbox.filesystem.move(src_path=src, dst_path=f"{workdir}/moved.txt")
    assert sh(sandbox, f"cat {workdir}/moved.txt") == "payload"
    assert sandbox.process.execute(command=f"test -e {src}").exit_code == 1

    with pytest.raises(Leap0ConflictError):
        sandbox.filesystem.move(src_path=f"{workdir}/copy.txt", dst_path=f"{workdir}/moved.txt")
    sandbox.filesystem.move(src_path=f"{workdir}/copy.txt", dst_path=f"{workdir}/moved.txt", overwrite=True)
    assert sandbox.filesystem.exists(path=f"{workdir}/copy.txt") is False

    sh(sandbox, f"mkdir -p {workdir}/tree/in && printf z > {workdir}/tree/in/f")
    sandbox.filesystem.copy(src_path=f"{workdir}/tree", dst_path=f"{workdir}/tree2", recursive=True)
    assert sh(sandbox, f"cat {workdir}/tree2/in/f") == "z"

    sandbox.filesystem.delete(path=f"{workdir}/moved.txt")
    assert sandbox.process.execute(command=f"test -e {workdir}/moved.txt").exit_code == 1
    sandbox.filesystem.delete(path=f"{workdir}/tree2", recursive=True)
    assert sandbox.process.execute(command=f"test -e {workdir}/tree2").exit_code == 1


def test_set_permissions(sandbox, workdir):
    path = f"{workdir}/p.txt"
    sandbox.filesystem.write_file(path=path, content="x")
    sandbox.filesystem.set_permissions(path=path, mode="640")
    assert sh(sandbox, f"stat -c %a {path}").strip() == "640"


def test_tree(sandbox, workdir):
    sh(sandbox, f"mkdir -p {workdir}/t/d1/d2 && touch {workdir}/t/f0 {workdir}/t/d1/f1 {workdir}/t/d1/d2/f2")

    def find(entries, name):
        return next(e for e in entries if e.name == name)

    items = sandbox.filesystem.tree(path=f"{workdir}/t").items
    assert {e.name for e in items} == {"f0", "d1"}
    d1 = find(items, "d1")
    assert d1.type == "directory"
    assert find(items, "f0").type == "file"
    assert {e.name for e in d1.children} == {"f1", "d2"}
    assert [e.name for e in find(d1.children, "d2").children] == ["f2"]

    shallow = sandbox.filesystem.tree(path=f"{workdir}/t", max_depth=1).items
    assert {e.name for e in shallow} == {"f0", "d1"}
    assert find(shallow, "d1").children == []


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _exact_base_error(exc: BaseException) -> bool:
    # The SDK has no dedicated validation error: a 400 is a plain Leap0Error carrying the status.
    return type(exc) is Leap0Error


def test_unknown_sandbox_raises_not_found(client):
    missing = "sbx-" + "0" * 20
    with pytest.raises(Leap0NotFoundError) as err:
        client.sandboxes.get(missing)
    assert err.value.status_code == 404
    assert err.value.error_message
    with pytest.raises(Leap0NotFoundError):
        client.sandboxes.delete(missing)
    with pytest.raises(Leap0NotFoundError):
        client.sandboxes.get_user_home_dir(missing)
    with pytest.raises(Leap0NotFoundError):
        client.sandboxes.get_workdir(missing)


def test_invalid_requests_raise_validation_errors(client, sandbox):
    # Empty command: the SDK sends it, the server rejects it.
    with pytest.raises(Leap0Error) as err:
        sandbox.process.execute(command="")
    assert _exact_base_error(err.value), type(err.value)
    assert err.value.status_code == 400
    assert err.value.error_message

    # Unknown template.
    with pytest.raises(Leap0Error) as err:
        client.sandboxes.create(template_name="no-such/template:v0")
    assert _exact_base_error(err.value), type(err.value)
    assert err.value.status_code == 400

    # Invalid per-process environment variable name.
    with pytest.raises(Leap0Error) as err:
        sandbox.process.execute(command="true", env={"A=B": "x"})
    assert err.value.status_code == 400

    # A working directory that does not exist.
    with pytest.raises(Leap0Error) as err:
        sandbox.process.execute(command="true", cwd="/no/such/dir")
    assert err.value.status_code == 400

    # Invalid octal mode.
    with pytest.raises(Leap0Error) as err:
        sandbox.filesystem.mkdir(path="/tmp/bad-mode", permissions="999")
    assert err.value.status_code == 400
    assert sandbox.filesystem.exists(path="/tmp/bad-mode") is False


def test_missing_paths_raise_not_found(sandbox, workdir):
    with pytest.raises(Leap0NotFoundError) as err:
        sandbox.filesystem.read_file(path=f"{workdir}/nope.txt")
    assert err.value.status_code == 404
    with pytest.raises(Leap0NotFoundError):
        sandbox.filesystem.stat(path=f"{workdir}/nope.txt")
    with pytest.raises(Leap0NotFoundError):
        sandbox.filesystem.ls(path=f"{workdir}/nope")
    with pytest.raises(Leap0NotFoundError):
        sandbox.filesystem.delete(path=f"{workdir}/nope.txt")


def test_bad_api_key_is_rejected(server):
    with make_client(server, api_key="not-a-real-key") as bad:
        with pytest.raises(Leap0Error) as err:
            bad.sandboxes.list()
    assert err.value.status_code == 401
