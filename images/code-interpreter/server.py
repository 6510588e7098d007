#!/usr/bin/python3
"""Cove's code interpreter: the service of the `system/code-interpreter` template.

It runs in the guest as the sandbox user, started by the agent as the template's service
before the template snapshot is saved, and listens on COVE_CODE_INTERPRETER_PORT (default
49999). Cove's invoke route sends `https://<id>.<domain>/...` here, after checking the caller's
API key and removing it, so no credential reaches this process.

Routes (Leap0's code interpreter contract):
  GET  /healthz               {"status": "ok"}
  POST /execute               run code in a context (a new one when none is named), wait
  POST /execute/async         run code in a fresh process, stream its output lines (SSE)
  GET  /contexts              list contexts
  POST /contexts              create a context
  GET  /contexts/<id>         one context
  DELETE /contexts/<id>       delete it and end its process

A context is a long-lived worker process (this file run with `--worker`) holding the
session's globals. Python runs in the worker itself; TypeScript and JavaScript run in a Node
worker (`node_worker.js`, beside this file) that keeps one `vm` context. The server speaks
to a worker over its stdin and stdout, one JSON object a line. A worker's own stdout and
stderr writes (print, os.system) are captured per execution.

Rich results follow the IPython display protocol: the value of a cell's last expression is
the primary result (`text` from repr, plus `html`, `png`, ... from `_repr_*_` methods);
`display(obj)` adds results; matplotlib figures (the `module://cove_inline` backend,
cove_inline.py) become PNG results when the cell ends or calls `plt.show()`.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("COVE_CODE_INTERPRETER_PORT", "49999"))
HERE = os.path.dirname(os.path.abspath(__file__))
LANGUAGES = {
    "python": 1, "py": 1, "python3": 1,
    "typescript": 2, "ts": 2, "javascript": 2, "js": 2, "bun": 2, "node": 2,
}
LANGUAGE_NAMES = {1: "python", 2: "typescript"}
DEFAULT_CWD = os.path.expanduser("~") if os.path.isdir(os.path.expanduser("~")) else "/"
DEFAULT_TIMEOUT_MS = 30_000
MAX_TIMEOUT_MS = 3_600_000
# Contexts a sandbox may hold; past it, the least recently used context that /execute made
# on its own is ended to make room.
MAX_CONTEXTS = 16
MAX_BODY = 16 << 20
# How long an interrupted execution may take to unwind before its worker is killed.
INTERRUPT_GRACE = 3.0


def log(msg: str) -> None:
    print(f"code-interpreter: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The worker: one per context, running the user's Python code.
# ---------------------------------------------------------------------------------------------

RICH_METHODS = [
    ("html", "_repr_html_"), ("markdown", "_repr_markdown_"), ("svg", "_repr_svg_"),
    ("png", "_repr_png_"), ("jpeg", "_repr_jpeg_"), ("pdf", "_repr_pdf_"),
    ("latex", "_repr_latex_"), ("json", "_repr_json_"), ("javascript", "_repr_javascript_"),
]
BINARY_KINDS = {"png", "jpeg", "pdf"}


class Capture:
    """A text stream that keeps what is written, for one execution."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.encoding = "utf-8"

    def write(self, s: str) -> int:
        self.parts.append(s)
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def lines(self) -> list[str]:
        text = "".join(self.parts)
        return text.splitlines(keepends=True) if text else []


def bundle(value: object, primary: bool) -> dict:
    """A display bundle for `value`: its repr as text, plus whatever `_repr_*_` it offers."""
    item: dict = {"is_primary": primary}
    if is_figure(value):
        item["text"] = repr(value)
        item["png"] = figure_png(value)
        return item
    for kind, method in RICH_METHODS:
        fn = getattr(value, method, None)
        if not callable(fn):
            continue
        try:
            data = fn()
        except Exception:  # a broken _repr_ must not fail the cell
            continue
        if isinstance(data, tuple):  # (data, metadata)
            data = data[0]
        if data is None:
            continue
        if kind in BINARY_KINDS and isinstance(data, (bytes, bytearray)):
            data = base64.b64encode(data).decode()
        if kind == "json" and not isinstance(data, dict):
            data = {"value": data}
        item[kind] = data
    try:
        item["text"] = repr(value)
    except Exception as e:
        item["text"] = f"<unrepresentable {type(value).__name__}: {e}>"
    return item


def is_figure(value: object) -> bool:
    mpl_figure = sys.modules.get("matplotlib.figure")
    return mpl_figure is not None and isinstance(value, mpl_figure.Figure)


def figure_png(fig) -> str:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


class Worker:
    def __init__(self) -> None:
        self.globals: dict = {"__name__": "__main__", "__builtins__": __builtins__}
        self.globals["display"] = self.display
        self.items: list[dict] = []
        self.count = 0
        # cove_inline.py, beside this file, is the backend; its show() calls flush_figures.
        os.environ["MPLBACKEND"] = "module://cove_inline"

    def display(self, *objs: object) -> None:
        for obj in objs:
            self.items.append(bundle(obj, primary=False))

    def flush_figures(self) -> None:
        """Every open matplotlib figure becomes a PNG result, then is closed."""
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        for num in pyplot.get_fignums():
            fig = pyplot.figure(num)
            try:
                self.items.append({"is_primary": False, "text": repr(fig), "png": figure_png(fig)})
            finally:
                pyplot.close(fig)

    def run(self, req: dict) -> dict:
        self.count += 1
        self.items = []
        out, err = Capture(), Capture()
        error = None
        env = {str(k): str(v) for k, v in (req.get("env_vars") or {}).items()}
        saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        saved_streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            tree = ast.parse(req["code"], "<cell>", "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, "<cell>", "exec"), self.globals)
            if last is not None:
                value = eval(compile(last, "<cell>", "eval"), self.globals)
                if value is not None:
                    self.globals["_"] = value
                    if not is_figure(value):
                        self.items.append(bundle(value, primary=True))
        except KeyboardInterrupt:
            error = {"name": "TimeoutError", "value": "execution timed out", "traceback": ""}
        except BaseException as e:  # the user's exception, SystemExit included
            tb = e.__traceback__
            # Drop this file's frames: the traceback starts in the user's cell.
            while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
                tb = tb.tb_next
            error = {
                "name": type(e).__name__,
                "value": str(e),
                "traceback": "".join(traceback.format_exception(type(e), e, tb)),
            }
        finally:
            sys.stdout, sys.stderr = saved_streams
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        try:
            self.flush_figures()
        except Exception as e:
            err.write(f"could not render a figure: {e}\n")
        result = {
            "items": self.items,
            "logs": {"stdout": out.lines(), "stderr": err.lines()},
            "execution_count": self.count,
        }
        if error is not None:
            result["error"] = error
        return result


WORKER: Worker | None = None


def flush_figures() -> None:
    """Called by `cove_inline.show()`."""
    if WORKER is not None:
        WORKER.flush_figures()


def worker_main() -> None:
    global WORKER
    # Answers go to the original stdout; the user's writes to fd 1 go to stderr (the service
    # log) so that they can never corrupt the protocol.
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
    # A timeout interrupts the cell (KeyboardInterrupt); between cells SIGINT is ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = WORKER = Worker()
    if os.environ.get("COVE_WARM_IMPORTS"):
        # A spare worker imports the heavy modules before any context takes it.
        for name in ("numpy", "pandas", "matplotlib.pyplot"):
            try:
                __import__(name)
            except Exception:
                pass
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if "cwd" in req and "code" not in req:
            os.chdir(req["cwd"])
            answers.write(json.dumps({"ok": True}) + "\n")
            answers.flush()
            continue
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            result = worker.run(req)
        except KeyboardInterrupt:
            result = {"items": [], "logs": {"stdout": [], "stderr": []},
                      "error": {"name": "TimeoutError", "value": "execution timed out", "traceback": ""}}
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        answers.write(json.dumps(result, default=str) + "\n")
        answers.flush()


# ---------------------------------------------------------------------------------------------
# The server: contexts and HTTP.
# ---------------------------------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, field: str, error: str) -> None:
        super().__init__(f"{field}: {error}")
        self.field, self.error = field, error


class NotFound(Exception):
    pass


def worker_argv(language: int) -> list[str]:
    if language == 1:
        return [sys.executable, "-u", os.path.abspath(__file__), "--worker"]
    return ["node", os.path.join(HERE, "node_worker.js")]


class Context:
    def __init__(self, language: int, cwd: str, auto: bool, proc: subprocess.Popen | None = None) -> None:
        self.id = secrets.token_urlsafe(15)
        self.language = language
        self.cwd = cwd
        self.auto = auto
        self.used = time.monotonic()
        self.lock = threading.Lock()
        self.proc = proc
        self.start()

    def start(self) -> None:
        if self.proc is None:
            self.proc = spawn(self.language)
            wait_ready(self.proc)
        self.call({"cwd": self.cwd}, None)

    def view(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def call(self, req: dict, timeout: float | None) -> dict:
        """Sends one request and waits for its answer; on timeout interrupts the worker, and
        kills it (restarting the context empty) if it does not answer after that."""
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(req) + "\n")
        proc.stdin.flush()
        answer: list[str] = []
        reader = threading.Thread(target=lambda: answer.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        timed_out = reader.is_alive()
        if timed_out:
            proc.send_signal(signal.SIGINT)
            reader.join(INTERRUPT_GRACE)
        if reader.is_alive() or not answer or not answer[0]:
            self.kill()
            self.proc = None
            self.start()
            why = "timed out and did not stop when interrupted" if timed_out else "ended"
            raise RuntimeError(f"the context's process {why}; it was restarted and its state is lost")
        result = json.loads(answer[0])
        if timed_out and isinstance(result, dict):
            result["error"] = {
                "name": "TimeoutError",
                "value": f"execution timed out after {timeout:.3g} s",
                "traceback": "",
            }
        return result

    def execute(self, req: dict, timeout: float) -> dict:
        with self.lock:
            self.used = time.monotonic()
            return self.call(req, timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def spawn(language: int, warm: bool = False) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("COVE_CODE_INTERPRETER_PORT", None)
    if warm:
        env["COVE_WARM_IMPORTS"] = "1"
    return subprocess.Popen(
        worker_argv(language), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        cwd=DEFAULT_CWD, start_new_session=True,
    )


def wait_ready(proc: subprocess.Popen) -> None:
    """Reads the line a worker writes once it has started (and a spare has loaded its
    modules)."""
    assert proc.stdout is not None
    if not proc.stdout.readline():
        raise RuntimeError("the context's process did not start")


class Spare:
    """A Python worker started ahead, so that a new context does not wait for Python and
    numpy, pandas and matplotlib to load."""

    def __init__(self) -> None:
        self.proc = spawn(1, warm=True)
        self.ready = threading.Event()
        threading.Thread(target=self.wait, daemon=True).start()

    def wait(self) -> None:
        try:
            wait_ready(self.proc)
        except RuntimeError:
            self.proc.kill()
        self.ready.set()


class Contexts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_id: dict[str, Context] = {}
        self.spare: Spare | None = Spare()

    def warm(self, timeout: float) -> bool:
        """Waits until the spare worker has loaded its modules (the template is snapshotted
        after that, so every sandbox starts with a warm spare)."""
        spare = self.spare
        return spare is not None and spare.ready.wait(timeout)

    def take_spare(self) -> subprocess.Popen | None:
        spare, self.spare = self.spare, None
        threading.Thread(target=self.refill, daemon=True).start()
        if spare is None or not spare.ready.wait(120) or spare.proc.poll() is not None:
            return None
        return spare.proc

    def refill(self) -> None:
        spare = Spare()
        with self.lock:
            if self.spare is None:
                self.spare = spare
                return
        spare.proc.kill()

    def create(self, language: int, cwd: str, auto: bool) -> Context:
        if not os.path.isdir(cwd):
            raise BadRequest("cwd", f"{cwd} is not a directory")
        with self.lock:
            if len(self.by_id) >= MAX_CONTEXTS:
                idle = [c for c in self.by_id.values() if c.auto and not c.lock.locked()]
                if not idle:
                    raise BadRequest("context_id", f"at most {MAX_CONTEXTS} contexts; delete one first")
                oldest = min(idle, key=lambda c: c.used)
                del self.by_id[oldest.id]
                oldest.kill()
            proc = self.take_spare() if language == 1 else None
        ctx = Context(language, cwd, auto, proc)
        with self.lock:
            self.by_id[ctx.id] = ctx
        return ctx

    def get(self, cid: str) -> Context:
        with self.lock:
            ctx = self.by_id.get(cid)
        if ctx is None:
            raise NotFound(f"context {cid} not found")
        return ctx

    def delete(self, cid: str) -> None:
        with self.lock:
            ctx = self.by_id.pop(cid, None)
        if ctx is not None:
            ctx.kill()

    def list(self) -> list[dict]:
        with self.lock:
            return [c.view() for c in self.by_id.values()]


CONTEXTS: Contexts | None = None


def language_of(body: dict, default: str | None = "python") -> int:
    raw = body.get("language", default)
    if raw is None:
        raw = "python"
    if not isinstance(raw, str) or raw.lower() not in LANGUAGES:
        raise BadRequest("language", f"{raw!r} is not one of {', '.join(LANGUAGES)}")
    return LANGUAGES[raw.lower()]


def timeout_of(body: dict) -> float:
    raw = body.get("timeout_ms", DEFAULT_TIMEOUT_MS)
    if raw is None:
        raw = DEFAULT_TIMEOUT_MS
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 < raw <= MAX_TIMEOUT_MS:
        raise BadRequest("timeout_ms", f"must be an integer from 1 to {MAX_TIMEOUT_MS}")
    return raw / 1000


def code_of(body: dict) -> str:
    code = body.get("code")
    if not isinstance(code, str):
        raise BadRequest("code", "is required and must be a string")
    return code


def env_of(body: dict) -> dict:
    env = body.get("env_vars") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise BadRequest("env_vars", "must map names to string values")
    return env


def context_for(body: dict, language: int) -> Context:
    assert CONTEXTS is not None
    cid = body.get("context_id")
    if cid is None:
        return CONTEXTS.create(language, DEFAULT_CWD, auto=True)
    if not isinstance(cid, str):
        raise BadRequest("context_id", "must be a string")
    try:
        ctx = CONTEXTS.get(cid)
    except NotFound:
        raise BadRequest("context_id", f"context {cid} not found") from None
    if "language" in body and language != ctx.language:
        raise BadRequest("language", f"context {cid} runs {LANGUAGE_NAMES[ctx.language]}")
    return ctx


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "cove-code-interpreter"

    def log_message(self, fmt: str, *args) -> None:
        log(f"{self.command} {self.path} " + (fmt % args))

    def send_json(self, status: int, body: object | None) -> None:
        data = b"" if body is None else json.dumps(body, default=str).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("body", "bad Content-Length") from None
        if length > MAX_BODY:
            raise BadRequest("body", f"larger than {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise BadRequest("body", f"not JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("body", "must be a JSON object")
        return body

    def dispatch(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        path = path.rstrip("/") or "/"
        try:
            self.route(method, path, query)
        except BadRequest as e:
            self.send_json(400, {"message": "Invalid request", "errors": [{"field": e.field, "error": e.error}]})
        except NotFound as e:
            self.send_json(404, {"message": str(e)})
        except BrokenPipeError:
            pass
        except Exception as e:
            log(f"{method} {path} failed: {traceback.format_exc()}")
            self.send_json(500, {"message": str(e)})

    def route(self, method: str, path: str, query: str) -> None:
        assert CONTEXTS is not None
        if (method, path) == ("GET", "/healthz"):
            # `?warm` (Cove's template build, before the snapshot): also wait for the spare.
            if "warm" in query.split("&") and not CONTEXTS.warm(300):
                return self.send_json(503, {"message": "the spare worker did not start"})
            return self.send_json(200, {"status": "ok"})
        if (method, path) == ("POST", "/execute"):
            return self.execute(self.body())
        if (method, path) == ("POST", "/execute/async"):
            return self.execute_stream(self.body())
        if path == "/contexts":
            if method == "GET":
                return self.send_json(200, {"items": CONTEXTS.list()})
            if method == "POST":
                body = self.body()
                cwd = body.get("cwd") or DEFAULT_CWD
                if not isinstance(cwd, str) or not cwd.startswith("/"):
                    raise BadRequest("cwd", "must be an absolute path")
                ctx = CONTEXTS.create(language_of(body), cwd, auto=False)
                return self.send_json(201, ctx.view())
        if path.startswith("/contexts/") and path.count("/") == 2:
            cid = path.split("/")[2]
            if method == "GET":
                return self.send_json(200, CONTEXTS.get(cid).view())
            if method == "DELETE":
                CONTEXTS.delete(cid)
                return self.send_json(204, None)
        raise NotFound(f"no route {method} {path}")

    def execute(self, body: dict) -> None:
        code, language, timeout, env = code_of(body), language_of(body), timeout_of(body), env_of(body)
        ctx = context_for(body, language)
        try:
            # A Node worker enforces the limit itself (vm's timeout); the server's is the backstop.
            grace = 1.0 if ctx.language == 2 else 0.0
            result = ctx.execute({"code": code, "env_vars": env, "timeout_ms": int(timeout * 1000)}, timeout + grace)
        except RuntimeError as e:
            return self.send_json(500, {"context_id": ctx.id, "items": [], "logs": {"stdout": [], "stderr": []},
                                        "error": {"name": "ContextLost", "value": str(e), "traceback": ""}})
        result["context_id"] = ctx.id
        self.send_json(200, result)

    def execute_stream(self, body: dict) -> None:
        """A fresh process per request; each output line is an event as it comes, then the exit
        status (type 2) or an error (type 3)."""
        code, language, timeout = code_of(body), language_of(body), timeout_of(body)
        cwd = DEFAULT_CWD
        if body.get("context_id") is not None:
            cwd = context_for(body, language).cwd
        if language == 1:
            argv = [sys.executable, "-u", "-c", code]
        else:
            argv = ["node", os.path.join(HERE, "node_worker.js"), "--run", code]
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        lock = threading.Lock()

        def emit(event: dict) -> None:
            with lock:
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()

        def pump(stream, kind: int) -> None:
            for raw in iter(stream.readline, b""):
                emit({"type": kind, "data": raw.decode(errors="replace").rstrip("\n")})

        pumps = [threading.Thread(target=pump, args=(proc.stdout, 0), daemon=True),
                 threading.Thread(target=pump, args=(proc.stderr, 1), daemon=True)]
        for p in pumps:
            p.start()
        try:
            code_ = proc.wait(timeout)
            for p in pumps:
                p.join()
            emit({"type": 2, "code": code_})
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            emit({"type": 3, "data": f"execution timed out after {timeout:.3g} s"})
        except BrokenPipeError:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")


def main() -> None:
    global CONTEXTS
    if sys.argv[1:2] == ["--worker"]:
        return worker_main()
    CONTEXTS = Contexts()
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    log(f"listening on port {PORT}")
    # No timeout: it only lets `shutdown()` be noticed, which nothing calls, and its default
    # (0.5 s) woke the idle guest twice a second, ~0.4% of a host core under TCG.
    server.serve_forever(poll_interval=None)


if __name__ == "__main__":
    main()
