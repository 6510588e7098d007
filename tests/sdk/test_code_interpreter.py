"""The code interpreter through the official Leap0 Python SDK, as a user reaches it.

The SDK calls the interpreter at `https://<sandbox id>.<sandbox domain>` with no port: the
module's server is `services.tls_server`, a `--tls-self-signed` server on port 443.

Sandboxes are real VMs of `system/code-interpreter:v0.1.0`; what a call returns is checked
against what ran in the guest.
"""

from __future__ import annotations

import pytest

from leap0 import DEFAULT_CODE_INTERPRETER_TEMPLATE_NAME, Leap0NotFoundError
from services import png_summary, tls_client, tls_server  # noqa: F401 (fixtures)
from test_leap0_sdk import SANDBOX_DOMAIN, sh


@pytest.fixture(scope="module")
def interpreter(tls_client):
    sb = tls_client.sandboxes.create(template_name=DEFAULT_CODE_INTERPRETER_TEMPLATE_NAME, timeout=1800)
    yield sb
    try:
        sb.delete()
    except Leap0NotFoundError:
        pass


def test_health_and_template(interpreter):
    assert interpreter.template_id == DEFAULT_CODE_INTERPRETER_TEMPLATE_NAME
    assert interpreter.code_interpreter.health() is True
    # The metadata service, asked from a cell, names the interpreter as the template's command.
    r = interpreter.code_interpreter.execute(
        code="import json, urllib.request as u\n"
        "imds = 'http://169.254.169.254/latest'\n"
        "token = u.urlopen(u.Request(imds + '/api/token', method='PUT',\n"
        "    headers={'X-metadata-token-ttl-seconds': '60'})).read().decode()\n"
        "doc = json.loads(u.urlopen(u.Request(imds + '/meta-data/leap0',\n"
        "    headers={'X-metadata-token': token, 'Accept': 'application/json'})).read())\n"
        "[doc['sandbox']['id'], doc['exec']['command'], doc['exec']['user']]",
    )
    assert r.error is None, r.error
    assert r.main_text == repr([interpreter.id, "/usr/bin/python3 /opt/cove/code-interpreter/server.py", "user"])


def test_contexts_keep_state_and_cwd(interpreter):
    ci = interpreter.code_interpreter
    ctx = ci.create_context(language="python", cwd="/tmp")
    assert ctx.id and ctx.language == "python" and ctx.cwd == "/tmp"
    assert ctx.id in [c.id for c in ci.list_contexts()]
    got = ci.get_context(ctx.id)
    assert (got.id, got.cwd) == (ctx.id, "/tmp")

    first = ci.execute(code="import os\nsecret = 6 * 7\nprint('cwd', os.getcwd())", context_id=ctx.id)
    assert first.error is None, first.error
    assert first.logs.stdout == ["cwd /tmp\n"]
    assert first.context_id == ctx.id
    second = ci.execute(code="secret + 1", context_id=ctx.id)
    assert second.main_text == "43"
    assert second.execution_count == 2
    # The guest's own view: the code ran as the sandbox user.
    assert ci.execute(code="import getpass; getpass.getuser()", context_id=ctx.id).main_text == "'user'"

    # Another context has its own globals.
    other = ci.execute(code="'secret' in globals()")
    assert other.main_text == "False"
    assert other.context_id and other.context_id != ctx.id

    ci.delete_context(ctx.id)
    with pytest.raises(Leap0NotFoundError):
        ci.get_context(ctx.id)
    assert ctx.id not in [c.id for c in ci.list_contexts()]


def test_execute_outputs_errors_env_and_files(interpreter):
    ci = interpreter.code_interpreter
    r = ci.execute(
        code="import os, sys\nprint('out'); print('err', file=sys.stderr)\n"
        "open('/tmp/ci-written.txt', 'w').write(os.environ['CI_VAR'])\n{'k': [1, 2]}",
        env_vars={"CI_VAR": "from env_vars"},
    )
    assert r.error is None, r.error
    assert (r.logs.stdout, r.logs.stderr) == (["out\n"], ["err\n"])
    assert r.main_text == "{'k': [1, 2]}"
    # What the cell wrote is in the guest's filesystem.
    assert sh(interpreter, "cat /tmp/ci-written.txt") == "from env_vars"

    bad = ci.execute(code="def f():\n    return undefined_name\nf()")
    assert bad.error is not None
    assert (bad.error.name, bad.error.value) == ("NameError", "name 'undefined_name' is not defined")
    assert "line 2, in f" in bad.error.traceback and "<cell>" in bad.error.traceback

    slow = ci.execute(code="import time\nwhile True: time.sleep(0.05)", timeout_ms=1500)
    assert slow.error is not None and slow.error.name == "TimeoutError"
    # The context survives its interrupted cell.
    assert ci.execute(code="1 + 1", context_id=slow.context_id).main_text == "2"


def test_rich_outputs_plot_png_and_dataframe_html(interpreter):
    ci = interpreter.code_interpreter
    r = ci.execute(
        code="import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\nax.plot([0, 1, 2, 3], [3, 1, 4, 1], color='tab:red')\nax.set_title('cove')\n"
        "plt.show()\n"
        "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})",
        timeout_ms=120_000,
    )
    assert r.error is None, r.error
    pngs = [item for item in r.items if item.png]
    assert len(pngs) == 1, r.items
    width, height, distinct = png_summary(pngs[0].png_bytes())
    assert width > 200 and height > 150, (width, height)
    assert distinct > 20, "the plot is blank"
    table = [item for item in r.items if item.is_primary]
    assert len(table) == 1 and table[0].html and "<table" in table[0].html, r.items
    assert "a  b" in table[0].text


def test_execute_stream(interpreter):
    events = list(
        interpreter.code_interpreter.execute_stream(
            code="import sys, time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.1)\n"
            "print('oops', file=sys.stderr)\nsys.exit(3)",
        )
    )
    kinds = [(e.type.value if hasattr(e.type, "value") else e.type) for e in events]
    assert [e.data for e, k in zip(events, kinds) if k == "stdout"] == ["line 0", "line 1", "line 2"]
    assert [e.data for e, k in zip(events, kinds) if k == "stderr"] == ["oops"]
    assert kinds[-1] == "exit" and events[-1].code == 3


def test_typescript_context(interpreter):
    ci = interpreter.code_interpreter
    ctx = ci.create_context(language="typescript")
    assert ctx.language == "typescript"
    r = ci.execute(code="const base: number = 40;\nconsole.log('ts', base);\nbase + 2", language="typescript",
                   context_id=ctx.id)
    assert r.error is None, r.error
    assert (r.main_text, r.logs.stdout) == ("42", ["ts 40\n"])
    again = ci.execute(code="interface P { n: number }\nconst p: P = { n: base };\np.n * 2", language="typescript",
                       context_id=ctx.id)
    assert again.main_text == "80", again
    ci.delete_context(ctx.id)


def test_context_survives_pause_and_resume(tls_client, interpreter):
    ci = interpreter.code_interpreter
    ctx = ci.create_context()
    ci.execute(code="import secrets\nkept = secrets.token_hex(8)", context_id=ctx.id)
    before = ci.execute(code="kept", context_id=ctx.id).main_text
    interpreter.pause()
    assert tls_client.sandboxes.get(interpreter.id).state.value == "paused"
    # The request resumes the sandbox; the interpreter's memory came back with it.
    assert ci.execute(code="kept", context_id=ctx.id).main_text == before
    assert tls_client.sandboxes.get(interpreter.id).state.value == "running"


def test_api_key_is_required_and_never_reaches_the_service(tls_server, interpreter):
    import httpx

    url = f"https://{interpreter.id}.{SANDBOX_DOMAIN}/healthz"
    with httpx.Client(timeout=60) as plain:
        assert plain.get(url).status_code == 401
        assert plain.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    # The service's own view of a request: no Authorization header arrives.
    probe = interpreter.code_interpreter.execute(
        code="import subprocess, sys\n"
        "srv = subprocess.Popen([sys.executable, '-c', '''\n"
        "import http.server, json\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = json.dumps(dict(self.headers)).encode()\n"
        "        self.send_response(200); self.send_header('content-length', str(len(body))); self.end_headers()\n"
        "        self.wfile.write(body)\n"
        "http.server.HTTPServer(('0.0.0.0', 18080), H).serve_forever()\n"
        "'''])\n"
        # Until it listens: a busy TCG guest can take seconds to start Python.
        "import socket, time\n"
        "for _ in range(300):\n"
        "    try:\n"
        "        socket.create_connection(('127.0.0.1', 18080), 1).close(); break\n"
        "    except OSError:\n"
        "        time.sleep(0.1)",
    )
    assert probe.error is None, probe.error
    with httpx.Client(timeout=60) as c:
        r = c.get(f"https://{interpreter.id}-18080.{SANDBOX_DOMAIN}/",
                  headers={"authorization": f"Bearer {tls_server.api_key}"})
    assert r.status_code == 200, r.text
    seen = {k.lower(): v for k, v in r.json().items()}
    assert "authorization" not in seen and tls_server.api_key not in r.text
