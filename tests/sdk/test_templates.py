"""Templates from container images through the official Leap0 Python SDK.

A module fixture starts a real registry (Debian's docker-registry, behind htpasswd basic auth)
on loopback, and pushes to it an image built here: a layer with the static busybox of Debian's
busybox-static, an image config with an environment, a working directory and a user. The
server pulls from it over plain HTTP (`--insecure-registry`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import secrets
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from leap0 import Leap0Error
from test_leap0_sdk import CoveServer, delete_leftovers, make_client, sh, stored_metadata

USER = "sdk-puller"
PASSWORD = "sdk-registry-" + secrets.token_hex(8)


class Registry:
    """docker-registry on a free loopback port, requiring USER/PASSWORD."""

    def __init__(self) -> None:
        binary = Path("/usr/bin/docker-registry")
        if not binary.is_file():
            raise RuntimeError("docker-registry not installed (scripts/test installs it)")
        self.root = Path(tempfile.mkdtemp(prefix="cove-test-sdk-registry-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.addr = f"127.0.0.1:{s.getsockname()[1]}"
        htpasswd = subprocess.run(["htpasswd", "-nbB", USER, PASSWORD], check=True, capture_output=True).stdout
        (self.root / "htpasswd").write_bytes(htpasswd)
        (self.root / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'data'}\n"
            f"http:\n  addr: {self.addr}\n"
            f"auth:\n  htpasswd:\n    realm: cove-sdk\n    path: {self.root / 'htpasswd'}\n"
        )
        self.proc = subprocess.Popen(
            [str(binary), "serve", str(self.root / "config.yml")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.http = httpx.Client(base_url=f"http://{self.addr}", auth=(USER, PASSWORD), timeout=30)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.http.get("/v2/").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("docker-registry did not start")
            time.sleep(0.1)

    def blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        r = self.http.post(f"/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, r.text
        location = r.headers["location"]
        sep = "&" if "?" in location else "?"
        r = self.http.put(f"{location}{sep}digest={digest}", content=data,
                          headers={"content-type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        return digest

    def push(self, repo: str, tag: str, layer_tar: bytes, config: dict) -> None:
        layer = gzip.compress(layer_tar)
        config = dict(config, rootfs={"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]})
        config_bytes = json.dumps(config).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.blob(repo, config_bytes), "size": len(config_bytes)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": self.blob(repo, layer), "size": len(layer)}],
        }
        r = self.http.put(f"/v2/{repo}/manifests/{tag}", content=json.dumps(manifest).encode(),
                          headers={"content-type": manifest["mediaType"]})
        assert r.status_code == 201, r.text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def busybox_layer() -> bytes:
    """A layer with /bin/busybox and a few applets, and /srv/app owned by uid 1001."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, kind: bytes, data: bytes = b"", mode: int = 0o755, uid: int = 0, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.linkname = kind, mode, uid, uid, link
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("bin", tarfile.DIRTYPE)
        add("bin/busybox", tarfile.REGTYPE, Path("/bin/busybox").read_bytes())
        for applet in ("sh", "id", "pwd", "cat", "echo"):
            add(f"bin/{applet}", tarfile.SYMTYPE, link="busybox")
        add("srv", tarfile.DIRTYPE)
        add("srv/app", tarfile.DIRTYPE, uid=1001)
        add("srv/app/hello.txt", tarfile.REGTYPE, b"hello from the image\n", mode=0o644, uid=1001)
    return buf.getvalue()


@pytest.fixture(scope="module")
def registry():
    reg = Registry()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def server(registry):
    srv = CoveServer(["--insecure-registry", registry.addr])
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with make_client(server) as c:
        yield c
        delete_leftovers(c)
        for t in c._transport.request_json("GET", "/v1/templates", expected_status=200)["items"]:
            if not t["is_system"]:
                try:
                    c.templates.delete(t["id"])
                except Leap0Error:
                    pass


def test_template_from_a_private_image_runs_sandboxes(client, registry, server):
    registry.push("sdk/app", "v1", busybox_layer(), {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "GREETING=hi"], "WorkingDir": "/srv/app", "User": "1001"},
    })
    uri = f"{registry.addr}/sdk/app:v1"
    name = f"sdk-app-{secrets.token_hex(3)}"

    # Without the registry's credentials, and with wrong ones: a 400 naming them.
    for creds in (None, {"type": "basic", "username": USER, "password": "not-it"}):
        with pytest.raises(Leap0Error) as e:
            client.templates.create(name=name, uri=uri, credentials=creds)
        assert fields(e.value) == ["credentials"], e.value.body
        assert "not-it" not in e.value.body

    t = client.templates.create(name=name, uri=uri, credentials={"type": "basic", "username": USER, "password": PASSWORD})
    assert t.id.startswith("tpl-") and t.name == name and t.digest.startswith("sha256:") and not t.is_system
    assert t.image_config is not None and t.image_config.working_dir == "/srv/app"
    with pytest.raises(Leap0Error) as e:
        client.templates.create(name=name, uri=uri, credentials={"type": "basic", "username": USER, "password": PASSWORD})
    assert e.value.status_code == 409

    sb = client.sandboxes.create(template_name=name, env_vars={"EXTRA": "x"})
    assert sh(sb, "id -u; pwd; echo $GREETING $EXTRA; cat hello.txt") == "1001\n/srv/app\nhi x\nhello from the image\n"

    client.templates.rename(t.id, name=name + "-renamed")
    with pytest.raises(Leap0Error) as e:
        client.templates.delete(t.id)
    assert e.value.status_code == 409 and sb.id in str(e.value), str(e.value)
    # A sandbox made by the new name runs too.
    sb2 = client.sandboxes.create(template_name=name + "-renamed")
    assert sh(sb2, "cat /srv/app/hello.txt") == "hello from the image\n"
    client.sandboxes.delete(sb.id)
    client.sandboxes.delete(sb2.id)
    client.templates.delete(t.id)
    with pytest.raises(Leap0Error) as e:
        client.templates.delete(t.id)
    assert e.value.status_code == 404

    # The password is in neither the server's log nor its database.
    assert PASSWORD.encode() not in (server.data_dir / "server.log").read_bytes()
    stored = stored_metadata(server)
    assert stored and PASSWORD.encode() not in stored


def test_unknown_images_are_a_field_error(client, registry):
    with pytest.raises(Leap0Error) as e:
        client.templates.create(name=f"missing-{secrets.token_hex(3)}", uri=f"{registry.addr}/sdk/none:1",
                                credentials={"type": "basic", "username": USER, "password": PASSWORD})
    assert fields(e.value) == ["uri"], e.value.body
    assert "not found" in e.value.body


def fields(e: Leap0Error) -> list[str]:
    """The fields a 400 answer names."""
    assert e.status_code == 400, repr(e)
    return [x["field"] for x in json.loads(e.body)["errors"]]
