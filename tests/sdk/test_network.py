"""Network policies, the invoke route and presigned URLs through the official Leap0 Python SDK.

The server runs with `--sandbox-domain` set to the SDK's sandbox domain, so the URLs the SDK
builds (`invoke_url`) and the ones the server hands out (presigned) name this server. The
client connects to the server's address and sends those names as Host, as DNS would route them.
Offline: the egress checks here are the ones that need no outside server (deny-all, the host
and metadata refused under allow-all); tests/network.rs covers the rest against a test internet.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import pytest

import leap0
from leap0 import Leap0Error
from test_leap0_sdk import SANDBOX_DOMAIN, TEMPLATE, CoveServer, delete_leftovers, make_client, sh

SERVER_PY = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello %s auth=%s" % (self.path, self.headers.get("Authorization"))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture(scope="module")
def server():
    srv = CoveServer(["--sandbox-domain", SANDBOX_DOMAIN, "--public-scheme", "https"])
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with make_client(server) as c:
        yield c
        delete_leftovers(c)


def fetch(server: CoveServer, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """GETs `url` from the server itself, with the URL's host as Host (what DNS would do)."""
    u = urlsplit(url)
    path = u.path + ("?" + u.query if u.query else "")
    return httpx.get(f"{server.base_url}{path}", headers={"Host": u.netloc, **(headers or {})}, timeout=60)


def test_policies_are_kept_and_enforced(client, server):
    policy = {
        "mode": "custom",
        "allow_domains": ["api.example.com"],
        "transforms": [{"domain": "api.example.com", "inject_headers": {"Authorization": "Bearer sk-sdk-secret"}}],
    }
    sb = client.sandboxes.create(template_name=TEMPLATE, network_policy=policy)
    try:
        # The SDK's sandbox model has no network_policy; the raw answer does, values redacted.
        raw = httpx.get(
            f"{server.base_url}/v1/sandbox/{sb.id}", headers={"Authorization": f"Bearer {server.api_key}"}
        ).json()["network_policy"]
        assert raw["mode"] == "custom" and raw["allow_domains"] == ["api.example.com"]
        assert "sk-sdk-secret" not in repr(raw)
        # Not allowed: refused at once (curl exit 7 or 35/56, never the 28 of a timeout).
        r = sb.process.execute(command="curl -fsS --max-time 20 http://203.0.113.10/ ; echo exit=$?")
        assert "exit=0" not in r.stdout and "exit=28" not in r.stdout, r.stdout + r.stderr
        r = sb.process.execute(command="getent hosts unlisted.example.org")
        assert r.exit_code != 0
    finally:
        sb.delete()

    sb = client.sandboxes.create(template_name=TEMPLATE, network_policy={"mode": "deny-all"})
    try:
        # Link-local addresses stay out of reach; 169.254.169.254:80 is Cove's own metadata
        # service, answered on the host (it wants a session token).
        r = sb.process.execute(command="curl -sS --max-time 20 http://169.254.169.253/ ; echo exit=$?")
        assert "exit=7" in r.stdout, r.stdout + r.stderr
        r = sb.process.execute(command="curl -sS --max-time 20 http://169.254.169.254/latest/meta-data/leap0")
        assert r.exit_code == 0 and "X-metadata-token is required" in r.stdout, r.stdout + r.stderr
    finally:
        sb.delete()

    with pytest.raises(Leap0Error) as err:
        client.sandboxes.create(
            template_name=TEMPLATE, network_policy={"mode": "custom", "allow_cidrs": ["169.254.0.0/16"]}
        )
    assert err.value.status_code == 400
    assert "network_policy.allow_cidrs[0]" in (err.value.body or ""), err.value.body


def test_invoke_url_and_presigned_url(client, server):
    sb = client.sandboxes.create(template_name=TEMPLATE)
    try:
        sb.filesystem.write_file(path="/tmp/srv.py", content=SERVER_PY)
        sh(
            sb,
            "setsid nohup python3 /tmp/srv.py 8000 >/dev/null 2>&1 </dev/null & "
            "for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:8000/ && exit 0; sleep 0.1; done; exit 1",
        )
        # The SDK's invoke URL, with the API key: the key itself never reaches the sandbox.
        url = sb.invoke_url("/hello", port=8000)
        assert urlsplit(url).netloc == f"{sb.id}-8000.{SANDBOX_DOMAIN}"
        r = fetch(server, url, {"Authorization": f"Bearer {server.api_key}"})
        assert r.status_code == 200, r.text
        assert r.text == "hello /hello auth=None"
        assert fetch(server, url).status_code == 401

        # A presigned URL: no key, the app's own Authorization passes, revocable.
        p = sb.create_presigned_url(port=8000, expires_in=600)
        assert p.sandbox_id == sb.id and p.port == 8000
        assert p.url == f"https://{p.token}.{SANDBOX_DOMAIN}"
        r = fetch(server, p.url + "/shared", {"Authorization": "Bearer app-token"})
        assert (r.status_code, r.text) == (200, "hello /shared auth=Bearer app-token")

        # A paused sandbox resumes on the request.
        sb.pause()
        r = fetch(server, p.url + "/again")
        assert (r.status_code, r.text) == (200, "hello /again auth=None")
        assert sb.refresh().state == leap0.SandboxState.RUNNING

        sb.delete_presigned_url(p.id)
        assert fetch(server, p.url + "/gone").status_code == 404
    finally:
        sb.delete()
