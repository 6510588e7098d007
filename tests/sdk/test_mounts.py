"""Object-storage mounts through the official Leap0 Python SDK.

A module fixture starts a real S3 server (s3s-fs, as crates/cove-blob/src/testing.rs does:
COVE_S3S_FS, else COVE_CACHE_DIR/tools/bin/s3s-fs, installed by `scripts/s3-server install`)
that requires signed requests, with objects written straight into its directory. One sandbox,
created with a mount, serves every test: what the SDK's calls return is checked against what the
guest sees with `process.execute`, and the server's raw answers against leaking credentials.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from leap0 import AsyncLeap0Client, Leap0Error, Leap0NotFoundError, ObjectStorageMount
from test_leap0_sdk import COVE_CACHE_DIR, SANDBOX_DOMAIN, TEMPLATE, CoveServer, delete_leftovers, make_client, sh

BUCKET = "cove-sdk"
ACCESS_KEY = "cove-sdk-access"
SECRET_KEY = "cove-sdk-secret-0123456789"
WRONG_SECRET = "cove-sdk-not-the-secret-42"
OBJECTS = {
    "top.txt": "top level\n",
    "docs/readme.md": "# readme\n",
    "docs/deep/note.txt": "deep note\n",
}
HIDDEN_FIELDS = ("access_key_id", "secret_access_key", "endpoint")


class S3Server:
    """A running s3s-fs on a free loopback port, requiring ACCESS_KEY/SECRET_KEY."""

    def __init__(self) -> None:
        binary = Path(os.environ.get("COVE_S3S_FS") or COVE_CACHE_DIR / "tools" / "bin" / "s3s-fs")
        if not binary.is_file():
            raise RuntimeError(f"{binary} not found: run `scripts/s3-server install` (or set COVE_S3S_FS)")
        self.root = Path(tempfile.mkdtemp(prefix="cove-test-sdk-s3-"))
        # s3s-fs keeps each bucket as a directory under its root, each object as a file.
        for key, data in OBJECTS.items():
            path = self.root / BUCKET / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(data)
        self.proc = subprocess.Popen(
            [str(binary), "--host", "127.0.0.1", "--port", "0",
             "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY, str(self.root)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, RUST_LOG="s3s_fs=info"),
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            # Keeps draining stdout after the address is known, so s3s-fs never blocks on it.
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                lines.put(raw.decode(errors="replace"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.endpoint = ""
        marker = "server is running at "
        while not self.endpoint:
            try:
                line = lines.get(timeout=20)
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError(f"{binary} did not report its address")
            if marker + "http://" in line:
                self.endpoint = line[line.index(marker) + len(marker) :].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def mount(s3: S3Server, mount_path: str, **extra: str) -> dict:
    return {
        "type": "object-storage",
        "bucket": BUCKET,
        "mount_path": mount_path,
        "endpoint": s3.endpoint,
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        **extra,
    }


@pytest.fixture(scope="module")
def s3():
    srv = S3Server()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server():
    srv = CoveServer()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with make_client(server) as c:
        yield c
        delete_leftovers(c)


@pytest.fixture(scope="module")
def sandbox(client, s3):
    """The module's one sandbox, created with the bucket mounted at /data/bucket."""
    sb = client.sandboxes.create(template_name=TEMPLATE, timeout=1800, mounts=[mount(s3, "/data/bucket")])
    yield sb
    try:
        sb.delete()
    except Leap0NotFoundError:
        pass


def raw_sandbox(server: CoveServer, sandbox_id: str) -> httpx.Response:
    r = httpx.get(
        f"{server.base_url}/v1/sandbox/{sandbox_id}",
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r


def assert_no_secrets(text: str) -> None:
    for secret in (SECRET_KEY, WRONG_SECRET):
        assert secret not in text, f"{secret!r} in {text}"


def assert_no_credentials(text: str) -> None:
    assert_no_secrets(text)
    assert ACCESS_KEY not in text, text


def test_mounts_on_create(client, server, s3, sandbox):
    # What the SDK made of the create answer.
    assert sandbox.mounts is not None and len(sandbox.mounts) == 1, sandbox.mounts
    m = sandbox.mounts[0]
    assert isinstance(m, ObjectStorageMount)
    assert m.id.startswith("mnt-"), m
    assert (m.type, m.bucket, m.mount_path, m.prefix, m.read_only) == (
        "object-storage",
        BUCKET,
        "/data/bucket",
        None,
        True,
    )
    # The same through get() (SandboxStatus) and refresh().
    assert client.sandboxes.get(sandbox.id).mounts == [m]
    assert sandbox.refresh().mounts == [m]

    # On the wire: no endpoint, no keys.
    r = raw_sandbox(server, sandbox.id)
    raw = r.json()["mounts"]
    assert [x["id"] for x in raw] == [m.id]
    for field in HIDDEN_FIELDS:
        assert field not in raw[0], f"{field} returned: {raw}"
    assert_no_credentials(r.text)
    assert s3.endpoint not in r.text

    # Mounted before the sandbox was handed back: files, nested prefixes, read-only.
    out = sh(sandbox, "cat /data/bucket/top.txt /data/bucket/docs/readme.md /data/bucket/docs/deep/note.txt")
    assert out == "top level\n# readme\ndeep note\n"
    assert sh(sandbox, "ls /data/bucket; ls /data/bucket/docs") == "docs\ntop.txt\ndeep\nreadme.md\n"
    r = sandbox.process.execute(command="sudo -n sh -c 'echo x > /data/bucket/new.txt'")
    assert r.exit_code != 0 and "Read-only file system" in r.stdout + r.stderr, r
    assert not (s3.root / BUCKET / "new.txt").exists()


def test_add_update_delete_mount(client, s3, sandbox):
    created = sandbox.mounts[0]

    # Add, with a prefix: only what is under it, at the mount path.
    added = sandbox.add_mount(mount(s3, "/mnt/docs", prefix="docs/"))
    assert isinstance(added, ObjectStorageMount)
    assert added.id.startswith("mnt-") and added.id != created.id, added
    assert (added.type, added.bucket, added.mount_path, added.prefix, added.read_only) == (
        "object-storage",
        BUCKET,
        "/mnt/docs",
        "docs/",
        True,
    )
    assert client.sandboxes.get(sandbox.id).mounts == [created, added]
    assert sh(sandbox, "ls /mnt/docs; cat /mnt/docs/readme.md /mnt/docs/deep/note.txt") == (
        "deep\nreadme.md\n# readme\ndeep note\n"
    )
    assert sandbox.process.execute(command="test -e /mnt/docs/top.txt").exit_code != 0

    # Update the mount path: the old path goes, the new one shows the same prefix.
    updated = sandbox.update_mount(added.id, {"mount_path": "/mnt/docs2"})
    assert (updated.id, updated.mount_path, updated.prefix, updated.read_only) == (
        added.id,
        "/mnt/docs2",
        "docs/",
        True,
    )
    assert sh(sandbox, "test ! -e /mnt/docs && ls /mnt/docs2 && cat /mnt/docs2/readme.md") == (
        "deep\nreadme.md\n# readme\n"
    )
    assert client.sandboxes.get(sandbox.id).mounts == [created, updated]

    # Delete: unmounted, the path gone, the other mount untouched.
    assert sandbox.delete_mount(added.id) is None
    assert sh(sandbox, "test ! -e /mnt/docs2 && cat /data/bucket/top.txt") == "top level\n"
    assert client.sandboxes.get(sandbox.id).mounts == [created]

    # A mount that is not there (any more).
    with pytest.raises(Leap0NotFoundError):
        sandbox.delete_mount(added.id)
    with pytest.raises(Leap0NotFoundError):
        sandbox.update_mount(added.id, {"mount_path": "/mnt/docs3"})


def test_add_mount_with_wrong_secret(client, server, s3, sandbox):
    before = client.sandboxes.get(sandbox.id).mounts
    with pytest.raises(Leap0Error) as err:
        sandbox.add_mount(mount(s3, "/mnt/bad", secret_access_key=WRONG_SECRET))
    e = err.value
    # 400 maps to no subclass in the SDK: a plain Leap0Error carrying the answer.
    assert type(e) is Leap0Error, repr(e)
    assert e.status_code == 400, repr(e)
    assert e.message.startswith("Failed to add sandbox mount: "), e.message
    assert e.error_message, e.body
    errors = json.loads(e.body)["errors"]
    assert "access_key_id" in [x["field"] for x in errors], e.body
    # The key id may be named (it is not a secret, and says which key was refused); no secret is.
    for text in (str(e), e.message, e.body, repr(e)):
        assert_no_secrets(text)

    # Nothing was mounted or recorded.
    assert sh(sandbox, "test ! -e /mnt/bad && grep -c ' /mnt/bad ' /proc/mounts || true") == "0\n"
    assert client.sandboxes.get(sandbox.id).mounts == before
    assert_no_credentials(raw_sandbox(server, sandbox.id).text)


def test_async_client_mount_calls(server, s3, sandbox):
    async def run() -> tuple[str, str]:
        async with AsyncLeap0Client(
            api_key=server.api_key,
            base_url=server.base_url,
            sandbox_domain=SANDBOX_DOMAIN,
            sdk_otel_enabled=False,
        ) as ac:
            sb = await ac.sandboxes.get(sandbox.id)
            added = await sb.add_mount(mount(s3, "/mnt/async", prefix="docs/deep/"))
            assert (added.mount_path, added.prefix, added.read_only) == ("/mnt/async", "docs/deep/", True)
            r = await sb.process.execute(command="cat /mnt/async/note.txt")
            first = r.stdout
            updated = await sb.update_mount(added.id, {"prefix": "docs/"})
            assert (updated.id, updated.mount_path, updated.prefix) == (added.id, "/mnt/async", "docs/")
            r = await sb.process.execute(command="ls /mnt/async")
            second = r.stdout
            await sb.delete_mount(added.id)
            assert [m.id for m in (await ac.sandboxes.get(sandbox.id)).mounts] == [sandbox.mounts[0].id]
            with pytest.raises(Leap0NotFoundError):
                await sb.delete_mount(added.id)
            return first, second

    first, second = asyncio.run(run())
    assert first == "deep note\n"
    assert second == "deep\nreadme.md\n"
    assert sh(sandbox, "test ! -e /mnt/async && echo gone") == "gone\n"
