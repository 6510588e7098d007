#!/usr/bin/python3
"""Cove's desktop: the service of the `system/desktop` template.

It runs in the guest as the sandbox user, started by the agent as the template's service
before the template snapshot is saved, and listens on COVE_DESKTOP_PORT (default 6080). Cove's
invoke route sends `https://<id>.<domain>/...` here, after checking the caller's API key and
removing it, so no credential reaches this process.

It supervises four processes, restarting any that ends:
  xvfb     the X server (display :0, a virtual framebuffer)
  xfce4    the XFCE session (window manager, panel, desktop), under its own D-Bus session
  x11vnc   a VNC server for display :0, on 127.0.0.1:5900 only
  novnc    websockify serving noVNC's page and bridging its WebSocket to x11vnc, on
           127.0.0.1:6081; every path outside /api/ is passed through to it, so
           `https://<id>.<domain>/` opens the desktop in a browser
and answers Leap0's desktop contract under /api/: display and windows (wmctrl), screenshots
(Pillow's X11 grab), pointer and keyboard (xdotool), screen recordings (ffmpeg x11grab, H.264
in MP4, kept in RECORDINGS), and the processes' status, SSE status stream, restart and logs.

x11vnc and websockify are stopped (SIGSTOP) while no client of noVNC is connected: with no
client both still wake several times a second, which was most of what an idle desktop cost.

A resize restarts the X server at the new size, and with it the session and the VNC server:
Xvfb cannot grow its framebuffer in place.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# Loaded before the template snapshot is saved, so no sandbox pays for it on its first screenshot.
from PIL import ImageGrab

PORT = int(os.environ.get("COVE_DESKTOP_PORT", "6080"))
DISPLAY = ":0"
X_SOCKET = "/tmp/.X11-unix/X0"
VNC_PORT = 5900
NOVNC_PORT = 6081
# The processes between a noVNC client and the screen, and the port each listens on.
VIEWER_PATH = {"x11vnc": VNC_PORT, "novnc": NOVNC_PORT}
DEFAULT_SIZE = (1280, 800)
STATE = os.environ.get("COVE_DESKTOP_STATE", "/tmp/cove-desktop")
LOGS = os.path.join(STATE, "logs")
RECORDINGS = os.path.join(os.path.expanduser("~"), "Videos", "recordings")
MAX_BODY = 1 << 20
MAX_LOG_BYTES = 64 << 10
RECORDING_FPS = 10
RECORDING_START_TIMEOUT = 30.0
# How long a process must have been up before it counts as started, and how long the
# supervisor waits before starting one that ended again.
RESTART_DELAY = 1.0
SUPERVISE_CHECK = 60.0
PANEL_ROWS = 24  # the top rows of the screen where XFCE's panel sits
HEARTBEAT = 2.0
DRAG_STEPS = 10
SCROLL_BUTTONS = {"up": 4, "down": 5, "left": 6, "right": 7}
# Key names agents use that are not X11 keysyms, and the keysyms xdotool knows them by.
KEY_ALIASES = {
    "enter": "Return", "return": "Return", "esc": "Escape", "escape": "Escape", "tab": "Tab",
    "space": "space", "backspace": "BackSpace", "delete": "Delete", "del": "Delete",
    "insert": "Insert", "home": "Home", "end": "End", "pageup": "Page_Up",
    "pagedown": "Page_Down", "up": "Up", "down": "Down", "left": "Left", "right": "Right",
    "control": "ctrl", "ctl": "ctrl", "option": "alt", "cmd": "super", "command": "super",
    "win": "super", "windows": "super", "meta": "super", "capslock": "Caps_Lock",
}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def x_env() -> dict:
    env = dict(os.environ)
    env["DISPLAY"] = DISPLAY
    env.setdefault("HOME", os.path.expanduser("~"))
    runtime = os.path.join(STATE, "xdg-runtime")
    os.makedirs(runtime, mode=0o700, exist_ok=True)
    env["XDG_RUNTIME_DIR"] = runtime
    return env


class BadRequest(Exception):
    """A request that fails validation: answered 400 with the field and what is wrong."""

    def __init__(self, field: str, error: str):
        super().__init__(f"{field}: {error}")
        self.field = field
        self.error = error


class Conflict(Exception):
    pass


class NotFound(Exception):
    pass


# ── processes ──


class Proc:
    def __init__(self, name: str):
        self.name = name
        self.popen: subprocess.Popen | None = None
        self.stdout_log = os.path.join(LOGS, f"{name}.out.log")
        self.stderr_log = os.path.join(LOGS, f"{name}.err.log")
        self.started = 0.0

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def info(self) -> dict:
        out = {"name": self.name, "running": self.running(),
               "stdout_log": self.stdout_log, "stderr_log": self.stderr_log}
        if out["running"]:
            out["pid"] = self.popen.pid
        return out


class Desktop:
    """The four processes, started in order and kept running."""

    NAMES = ("xvfb", "xfce4", "x11vnc", "novnc")

    def __init__(self):
        os.makedirs(LOGS, exist_ok=True)
        self.size = DEFAULT_SIZE
        self.procs = {n: Proc(n) for n in self.NAMES}
        self.lock = threading.RLock()
        # Bumped on every status change; the SSE streams wait on it.
        self.changed = threading.Condition()
        self.version = 0
        self.paused = False  # the supervisor leaves processes alone during a resize
        # Set when a process ends (a thread waits on each): the supervisor sleeps until then,
        # so an idle desktop has nothing waking up to poll.
        self.exited = threading.Event()
        self.last_strip = b""  # the panel strip `drawn` saw last
        # Connections passed to noVNC now: x11vnc and websockify run only while there is one
        # (see `client_joined`).
        self.clients = 0
        self.clients_lock = threading.Lock()

    def command(self, name: str) -> list[str]:
        w, h = self.size
        if name == "xvfb":
            return ["Xvfb", DISPLAY, "-screen", "0", f"{w}x{h}x24", "-nolisten", "tcp", "-ac",
                    "-s", "0", "-dpms", "+extension", "RANDR"]
        if name == "xfce4":
            return ["dbus-launch", "--exit-with-session", "xfce4-session"]
        if name == "x11vnc":
            return ["x11vnc", "-display", DISPLAY, "-rfbport", str(VNC_PORT), "-localhost",
                    "-forever", "-shared", "-nopw", "-noxdamage", "-quiet"]
        return ["python3", "-m", "websockify", "--web", "/usr/share/novnc",
                f"127.0.0.1:{NOVNC_PORT}", f"127.0.0.1:{VNC_PORT}"]

    def notify(self):
        with self.changed:
            self.version += 1
            self.changed.notify_all()

    def start(self, name: str):
        p = self.procs[name]
        if name == "xvfb":
            # Only root may create these; X and ICE want them shared and sticky, as root would.
            for d in ("/tmp/.X11-unix", "/tmp/.ICE-unix"):
                os.makedirs(d, exist_ok=True)
                if os.stat(d).st_uid == os.getuid():
                    os.chmod(d, 0o1777)
        if name != "xvfb" and not self.wait_x(10):
            return
        if name == "xfce4":
            prepare_session()
        with open(p.stdout_log, "ab") as out, open(p.stderr_log, "ab") as err:
            stamp = f"--- {now_iso()} starting {' '.join(self.command(name))}\n".encode()
            out.write(stamp)
            err.write(stamp)
            out.flush()
            err.flush()
            p.popen = subprocess.Popen(self.command(name), stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=err, env=x_env(), cwd=os.path.expanduser("~"),
                                       start_new_session=True)
        threading.Thread(target=self.watch, args=(p.popen,), daemon=True).start()
        if name in VIEWER_PATH:
            threading.Thread(target=self.stop_when_listening, args=(name, p.popen), daemon=True).start()
        p.started = time.monotonic()
        if name == "xvfb":
            self.wait_x(10)
            # No screen saver: a blank screen is not what an agent wants to look at.
            run(["xset", "s", "off", "s", "noblank"], check=False)
        self.notify()

    def stop(self, name: str):
        p = self.procs[name]
        if p.popen is None:
            return
        if p.popen.poll() is None:
            try:
                os.killpg(p.popen.pid, signal.SIGTERM)
                os.killpg(p.popen.pid, signal.SIGCONT)  # a stopped one (see client_left) must see it
            except ProcessLookupError:
                pass
            try:
                p.popen.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
        p.popen = None
        self.notify()

    def restart(self, name: str):
        with self.lock:
            if name == "xvfb":
                # Everything else is a client of the X server and goes down with it.
                self.restart_all()
                return
            self.stop(name)
            self.start(name)

    def restart_all(self):
        with self.lock:
            self.paused = True
            try:
                for name in reversed(self.NAMES):
                    self.stop(name)
                for name in self.NAMES:
                    self.start(name)
            finally:
                self.paused = False

    def wait_x(self, seconds: float) -> bool:
        """Whether the X server accepts connections, waiting up to `seconds` for it."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.procs["xvfb"].running():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(X_SOCKET)
                        return True
                    except OSError:
                        pass
            time.sleep(0.05)
        return False

    # With no client, x11vnc still runs its loop five times a second (no flag changes that),
    # and websockify wakes every second to poll; under TCG that was ~1.4% of a host core, more
    # than all the rest of an idle desktop. So both are stopped while no client of noVNC is
    # connected, and continued before a connection is passed to websockify (which connects to
    # x11vnc only then). Their status still says running, with their PIDs.

    def client_joined(self):
        with self.clients_lock:
            self.clients += 1
            if self.clients == 1:
                for name in VIEWER_PATH:
                    self.signal(name, signal.SIGCONT)

    def client_left(self):
        with self.clients_lock:
            self.clients -= 1
            if self.clients == 0:
                for name in VIEWER_PATH:
                    self.signal(name, signal.SIGSTOP)

    def signal(self, name: str, sig: int, popen: subprocess.Popen | None = None):
        """Send `sig` to process `name` (if `popen` is given, only if it is still that one)."""
        current = self.procs[name].popen
        if current is None or (popen is not None and current is not popen) or current.poll() is not None:
            return
        try:
            os.killpg(current.pid, sig)
        except ProcessLookupError:
            pass

    def stop_when_listening(self, name: str, popen: subprocess.Popen):
        """Stop a new x11vnc or websockify once it listens (stopped earlier, it would never
        listen), unless a client came meanwhile."""
        deadline = time.monotonic() + 30
        while not listening(VIEWER_PATH[name]) and popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with self.clients_lock:
            if self.clients == 0:
                self.signal(name, signal.SIGSTOP, popen)

    def watch(self, popen: subprocess.Popen):
        popen.wait()
        self.exited.set()

    def supervise(self):
        """Start every process that is not running: at first, then RESTART_DELAY seconds after
        any of them ended (and every SUPERVISE_CHECK seconds in any case)."""
        while True:
            # Cleared before the check: an exit during or after it wakes the next round.
            self.exited.clear()
            with self.lock:
                if not self.paused:
                    for name in self.NAMES:
                        p = self.procs[name]
                        if not p.running():
                            if p.popen is not None:
                                p.popen = None
                                self.notify()
                            self.start(name)
            self.exited.wait(SUPERVISE_CHECK)
            time.sleep(RESTART_DELAY)

    def status(self) -> dict:
        items = [self.procs[n].info() for n in self.NAMES]
        running = sum(1 for i in items if i["running"])
        overall = "running" if running == len(items) else "stopped" if running == 0 else "degraded"
        return {"status": overall, "items": items, "running": running, "total": len(items)}

    def drawn(self) -> bool:
        """Whether the session is up and painted: every process running, XFCE's desktop and
        panel windows mapped, and the panel strip at the top of the screen drawn (not the
        background's colour, several colours, unchanged since the previous call). Called in a
        loop by the readiness probe, which comes before the template's snapshot."""
        if self.status()["status"] != "running":
            return False
        classes = {w["class"].split(".")[0] for w in list_windows()}
        if not {"xfdesktop", "xfce4-panel"} <= classes:
            return False
        w, h = self.size
        screen = ImageGrab.grab(bbox=(0, 0, w, h), xdisplay=DISPLAY).convert("RGB")
        background = screen.getpixel((w // 2, h // 2))
        strip = screen.crop((0, 0, w, PANEL_ROWS))
        colours = strip.getcolors(maxcolors=w * PANEL_ROWS) or []
        painted = len(colours) >= 8 and all(
            strip.getpixel((x, 5)) != background for x in (w // 8, w // 4))
        previous, self.last_strip = self.last_strip, strip.tobytes()
        return painted and previous == self.last_strip


def listening(port: int) -> bool:
    """Whether a TCP socket listens on `port` (read from the kernel's tables: connecting to
    x11vnc to find out would make it start a session)."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(suffix) and fields[3] == "0A":
                        return True
        except OSError:
            pass
    return False


# What the desktop's processes run as (the programs XFCE's session starts among them).
OWN_PROGRAMS = {"Xvfb", "xfce4-session", "dbus-launch", "dbus-daemon", "xfwm4", "xfce4-panel",
                "xfdesktop", "xfsettingsd", "xfconfd", "x11vnc", "ffmpeg"}


def end_leftovers():
    """End the desktop processes a previous run of this service left: if the service itself
    ended, the agent starts it again, and an X server still holding the display would keep
    the new one from starting."""
    me, uid = os.getpid(), os.getuid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv and (os.path.basename(argv[0]) in OWN_PROGRAMS or argv[1:3] == ["-m", "websockify"]):
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def prepare_session():
    """XFCE's first start asks how to set up the panel; answer it beforehand (the default)."""
    home = os.path.expanduser("~")
    conf = os.path.join(home, ".config/xfce4/xfconf/xfce-perchannel-xml")
    panel = os.path.join(conf, "xfce4-panel.xml")
    if not os.path.exists(panel) and os.path.exists("/etc/xdg/xfce4/panel/default.xml"):
        os.makedirs(conf, exist_ok=True)
        shutil.copyfile("/etc/xdg/xfce4/panel/default.xml", panel)


def run(cmd: list[str], check: bool = True, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, input=stdin, capture_output=True, env=x_env(), timeout=60)
    if check and out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {out.returncode}: {out.stderr.decode(errors='replace').strip()}")
    return out


def xdotool(*args: str) -> str:
    out = run(["xdotool", *args])
    err = out.stderr.decode(errors="replace")
    if "No such key name" in err or "Invalid key sequence" in err:
        raise BadRequest("key", err.strip().splitlines()[0])
    return out.stdout.decode(errors="replace")


def pointer() -> dict:
    values = dict(line.split("=", 1) for line in xdotool("getmouselocation", "--shell").split() if "=" in line)
    return {"x": int(values["X"]), "y": int(values["Y"])}


def list_windows() -> list[dict]:
    out = run(["wmctrl", "-lpGx"], check=False)
    if out.returncode != 0:
        return []
    active = run(["xdotool", "getactivewindow"], check=False).stdout.decode().strip()
    active_id = int(active) if active.isdigit() else -1
    windows = []
    for line in out.stdout.decode(errors="replace").splitlines():
        parts = line.split(None, 9)
        if len(parts) < 9:
            continue
        wid, desktop, pid, x, y, w, h, wclass, host = parts[:9]
        windows.append({
            "id": wid, "desktop": int(desktop), "pid": int(pid), "x": int(x), "y": int(y),
            "width": int(w), "height": int(h), "class": wclass, "host": host,
            "title": parts[9] if len(parts) > 9 else "", "focused": int(wid, 16) == active_id,
        })
    return windows


# ── screenshots ──


def screenshot(desktop: Desktop, fmt: str, quality: int | None, x: int, y: int, w: int, h: int) -> tuple[bytes, str]:
    sw, sh = desktop.size
    if w == 0 and h == 0:
        if x or y:
            raise BadRequest("width", "set width and height to capture a region from x, y")
        box = (0, 0, sw, sh)
    else:
        if x + w > sw:
            raise BadRequest("width", f"the region ends at x={x + w}, beyond the screen's width {sw}")
        if y + h > sh:
            raise BadRequest("height", f"the region ends at y={y + h}, beyond the screen's height {sh}")
        box = (x, y, x + w, y + h)
    image = ImageGrab.grab(bbox=box, xdisplay=DISPLAY)
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, "PNG")
        return buf.getvalue(), "image/png"
    image.convert("RGB").save(buf, "JPEG", quality=quality or 75)
    return buf.getvalue(), "image/jpeg"


# ── recordings ──


def first_frame(progress: str) -> bool:
    """Has the ffmpeg writing `progress` (its -progress file) encoded a frame yet?"""
    try:
        with open(progress) as f:
            return any(line.startswith("frame=") and line.strip() != "frame=0" for line in f)
    except FileNotFoundError:
        return False


class Recorder:
    def __init__(self, desktop: Desktop):
        self.desktop = desktop
        self.lock = threading.Lock()
        self.active: dict | None = None
        self.popen: subprocess.Popen | None = None
        self.last: dict | None = None
        os.makedirs(RECORDINGS, exist_ok=True)

    def status(self) -> dict:
        with self.lock:
            if self.active is not None:
                return dict(self.active)
            return dict(self.last) if self.last else {"active": False}

    def start(self) -> dict:
        with self.lock:
            if self.active is not None:
                raise Conflict(f"recording {self.active['id']} is already active")
            rid = f"rec_{time.time_ns() // 1_000_000}"
            w, h = self.desktop.size
            path = os.path.join(RECORDINGS, f"{rid}.mp4")
            progress = os.path.join(LOGS, "ffmpeg.progress")
            cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "x11grab",
                   "-framerate", str(RECORDING_FPS), "-video_size", f"{w}x{h}", "-i", DISPLAY,
                   # H.264 in 4:2:0 needs even sides.
                   "-vf", "crop=trunc(iw/2)*2:trunc(ih/2)*2", "-c:v", "libx264",
                   "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-movflags", "+faststart",
                   "-progress", progress, "-stats_period", "0.2", path]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(progress)
            log = open(os.path.join(LOGS, "ffmpeg.err.log"), "ab")
            self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=log, env=x_env(), start_new_session=True)
            log.close()
            # A recording is active once ffmpeg has encoded a frame: on a loaded host its start
            # takes seconds, and one stopped before then would hold no picture.
            deadline = time.monotonic() + RECORDING_START_TIMEOUT
            while not first_frame(progress) and self.popen.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            self.active = {
                "id": rid, "active": True, "started_at": now_iso(),
                "download": f"/api/recordings/{rid}/download", "mime_type": "video/mp4",
                "file_name": f"{rid}.mp4", "display": DISPLAY, "resolution": f"{w}x{h}",
            }
            self.save(self.active)
            return dict(self.active)

    def stop(self) -> dict:
        with self.lock:
            if self.active is None:
                raise Conflict("no recording is active")
            popen, self.popen = self.popen, None
            if popen.poll() is None:
                # SIGINT makes ffmpeg finish the file (moov atom) before it exits.
                popen.send_signal(signal.SIGINT)
                try:
                    popen.wait(60)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()
            done = dict(self.active, active=False, stopped_at=now_iso())
            self.active = None
            self.last = done
            self.save(done)
            return dict(done)

    def save(self, meta: dict):
        tmp = os.path.join(RECORDINGS, f".{meta['id']}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, os.path.join(RECORDINGS, f"{meta['id']}.json"))

    def summary(self, meta: dict) -> dict:
        path = os.path.join(RECORDINGS, meta["file_name"])
        size = os.path.getsize(path) if os.path.exists(path) else 0
        return {"id": meta["id"], "file_name": meta["file_name"], "download": meta["download"],
                "mime_type": meta["mime_type"], "size_bytes": size,
                "created_at": meta["started_at"], "active": meta["active"]}

    def all(self) -> list[dict]:
        out = []
        for name in sorted(os.listdir(RECORDINGS)):
            if name.startswith("rec_") and name.endswith(".json"):
                meta = self.meta(name[:-5])
                if meta:
                    out.append(self.summary(meta))
        return out

    def meta(self, rid: str) -> dict | None:
        if not re.fullmatch(r"rec_[0-9]+", rid):
            return None
        with self.lock:
            if self.active is not None and self.active["id"] == rid:
                return dict(self.active)
        try:
            with open(os.path.join(RECORDINGS, f"{rid}.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        # One that was active when the service last ended was cut off there.
        meta["active"] = False
        return meta

    def get(self, rid: str) -> dict:
        meta = self.meta(rid)
        if meta is None:
            raise NotFound(f"recording {rid} not found")
        return meta

    def delete(self, rid: str):
        meta = self.get(rid)
        if meta["active"]:
            raise Conflict(f"recording {rid} is active; stop it first")
        for name in (meta["file_name"], f"{rid}.json"):
            try:
                os.remove(os.path.join(RECORDINGS, name))
            except FileNotFoundError:
                pass
        with self.lock:
            if self.last and self.last["id"] == rid:
                self.last = None


# ── validation ──


def field_int(body: dict, name: str, *, required: bool = True, default: int | None = None,
              minimum: int | None = None, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(name, "is required")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(name, "must be an integer")
    if minimum is not None and value < minimum:
        raise BadRequest(name, f"must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise BadRequest(name, f"must be at most {maximum}")
    return value


def query_int(query: dict, name: str, *, default: int | None = None, minimum: int | None = None,
              maximum: int | None = None) -> int | None:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(name, "must be an integer") from None
    return field_int({name: value}, name, minimum=minimum, maximum=maximum)


def image_format(value) -> str:
    if value is None:
        return "png"
    if value not in ("png", "jpg", "jpeg"):
        raise BadRequest("format", "must be one of png, jpg, jpeg")
    return "png" if value == "png" else "jpeg"


def key_name(value, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(field, "must be a non-empty key name")
    value = value.strip()
    return KEY_ALIASES.get(value.lower(), value)


def process_name(name: str) -> str:
    if name not in Desktop.NAMES:
        raise BadRequest("processName", f"must be one of {', '.join(Desktop.NAMES)}")
    return name


def tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - MAX_LOG_BYTES))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


# ── HTTP ──


DESKTOP = Desktop()
RECORDER = Recorder(DESKTOP)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cove-desktop"

    def log_message(self, fmt, *args):
        pass

    def send_json(self, status: int, body: dict | None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_bytes(self, data: bytes, content_type: str, filename: str | None = None):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if filename:
            self.send_header("Content-Disposition", f'attachment; filename="{filename}"')
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise BadRequest("body", f"is larger than {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequest("body", "is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("body", "must be a JSON object")
        return body

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def dispatch(self, method: str):
        url = urlsplit(self.path)
        if not url.path.startswith("/api/"):
            if url.path == "/" and method == "GET":
                self.send_response(302)
                self.send_header("Location", "/vnc.html?autoconnect=1&resize=scale&path=websockify")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.pass_to_novnc()
            return
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            route = ROUTES.get((method, url.path))
            if route is not None:
                route(self, query)
                return
            m = re.fullmatch(r"/api/recordings/([^/]+)(/download)?", url.path)
            if m and method in ("GET", "DELETE"):
                rid = m.group(1)
                if m.group(2) and method == "GET":
                    meta = RECORDER.get(rid)
                    if meta["active"]:
                        raise Conflict(f"recording {rid} is active; stop it first")
                    with open(os.path.join(RECORDINGS, meta["file_name"]), "rb") as f:
                        self.send_bytes(f.read(), "video/mp4", meta["file_name"])
                elif not m.group(2) and method == "GET":
                    self.send_json(200, RECORDER.summary(RECORDER.get(rid)))
                elif not m.group(2):
                    RECORDER.delete(rid)
                    self.send_json(204, None)
                else:
                    self.send_json(405, {"message": "method not allowed"})
                return
            m = re.fullmatch(r"/api/process/([^/]+)/(status|restart|logs|errors)", url.path)
            if m and (method, m.group(2)) in (("GET", "status"), ("POST", "restart"), ("GET", "logs"), ("GET", "errors")):
                self.process_route(process_name(m.group(1)), m.group(2))
                return
            self.send_json(404, {"message": f"no route {method} {url.path}"})
        except BadRequest as e:
            self.send_json(400, {"message": "Invalid request", "errors": [{"field": e.field, "error": e.error}]})
        except NotFound as e:
            self.send_json(404, {"message": str(e)})
        except Conflict as e:
            self.send_json(409, {"message": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 - the client gets a message, the log the rest
            self.send_json(500, {"message": f"{type(e).__name__}: {e}"})

    def process_route(self, name: str, action: str):
        p = DESKTOP.procs[name]
        if action == "status":
            self.send_json(200, p.info())
        elif action == "restart":
            DESKTOP.restart(name)
            self.send_json(200, {"message": f"{name} restarted", "status": p.info()})
        elif action == "logs":
            self.send_json(200, {"process": name, "logs": tail(p.stdout_log)})
        else:
            self.send_json(200, {"process": name, "errors": tail(p.stderr_log)})

    # /api routes

    def healthz(self, query):
        # `?ready` (the template's readiness probe) waits until the session is drawn.
        if "ready" in query:
            deadline = time.monotonic() + 300
            while not DESKTOP.drawn():
                if time.monotonic() > deadline:
                    self.send_json(503, {"ok": False})
                    return
                time.sleep(0.5)
            # One screenshot, so the grab and PNG paths are warm in the snapshot too.
            screenshot(DESKTOP, "png", None, 0, 0, 0, 0)
        self.send_json(200, {"ok": True})

    def display(self, query):
        w, h = DESKTOP.size
        self.send_json(200, {"display": DISPLAY, "width": w, "height": h})

    def resize(self, query):
        body = self.body()
        w = field_int(body, "width", minimum=320, maximum=7680)
        h = field_int(body, "height", minimum=320, maximum=4320)
        if RECORDER.status().get("active"):
            raise Conflict("a recording is active; stop it before resizing the screen")
        with DESKTOP.lock:
            if (w, h) != DESKTOP.size:
                DESKTOP.size = (w, h)
                DESKTOP.restart_all()
        self.display(query)

    def windows(self, query):
        self.send_json(200, {"items": list_windows()})

    def screenshot_get(self, query):
        fmt = image_format(query.get("format"))
        quality = query_int(query, "quality", minimum=1, maximum=100)
        x = query_int(query, "x", default=0, minimum=0)
        y = query_int(query, "y", default=0, minimum=0)
        w = query_int(query, "width", minimum=0)
        h = query_int(query, "height", minimum=0)
        if (w is None) != (h is None):
            raise BadRequest("width" if w is None else "height", "set width and height together")
        if (w or 0) == 0 and (h or 0) != 0 or (w or 0) != 0 and (h or 0) == 0:
            raise BadRequest("width" if not w else "height", "must be positive (or both 0 for the full screen)")
        data, ctype = screenshot(DESKTOP, fmt, quality, x, y, w or 0, h or 0)
        self.send_bytes(data, ctype)

    def screenshot_region(self, query):
        body = self.body()
        x = field_int(body, "x", minimum=0)
        y = field_int(body, "y", minimum=0)
        w = field_int(body, "width", minimum=1)
        h = field_int(body, "height", minimum=1)
        fmt = image_format(body.get("format"))
        quality = field_int(body, "quality", required=False, minimum=1, maximum=100)
        data, ctype = screenshot(DESKTOP, fmt, quality, x, y, w, h)
        self.send_bytes(data, ctype)

    def position(self, query):
        self.send_json(200, pointer())

    def move(self, query):
        body = self.body()
        x = field_int(body, "x", minimum=0)
        y = field_int(body, "y", minimum=0)
        xdotool("mousemove", "--sync", str(x), str(y))
        self.send_json(200, pointer())

    def click(self, query):
        body = self.body()
        x = field_int(body, "x", required=False, minimum=0)
        y = field_int(body, "y", required=False, minimum=0)
        if (x is None) != (y is None):
            raise BadRequest("y" if y is None else "x", "set x and y together")
        button = field_int(body, "button", required=False, default=1, minimum=1, maximum=3)
        args = ["mousemove", "--sync", str(x), str(y)] if x is not None else []
        xdotool(*args, "click", str(button))
        self.send_json(200, pointer())

    def drag(self, query):
        body = self.body()
        fx, fy, tx, ty = (field_int(body, n, minimum=0) for n in ("from_x", "from_y", "to_x", "to_y"))
        button = str(field_int(body, "button", required=False, default=1, minimum=1, maximum=3))
        # In steps, as a hand would, with pauses: a window manager grabs the pointer only once
        # it has seen the button go down, and starts a move only once the pointer moves after.
        steps: list[str] = []
        for i in range(1, DRAG_STEPS + 1):
            x = fx + (tx - fx) * i // DRAG_STEPS
            y = fy + (ty - fy) * i // DRAG_STEPS
            steps += ["mousemove", "--sync", str(x), str(y), "sleep", "0.05"]
        xdotool("mousemove", "--sync", str(fx), str(fy), "sleep", "0.1", "mousedown", button,
                "sleep", "0.3", *steps, "sleep", "0.2", "mouseup", button)
        self.send_json(200, pointer())

    def scroll(self, query):
        body = self.body()
        direction = body.get("direction")
        if direction not in SCROLL_BUTTONS:
            raise BadRequest("direction", "must be one of up, down, left, right")
        amount = field_int(body, "amount", required=False, default=1, minimum=1, maximum=100)
        xdotool("click", "--repeat", str(amount), "--delay", "10", str(SCROLL_BUTTONS[direction]))
        self.send_json(200, pointer())

    def type_text(self, query):
        body = self.body()
        text = body.get("text")
        if not isinstance(text, str):
            raise BadRequest("text", "is required (a string)")
        if len(text) > 50_000:
            raise BadRequest("text", "is longer than 50000 characters")
        # Pieces keep each argument well under the kernel's limit on one argument.
        for i in range(0, len(text), 2000):
            xdotool("type", "--delay", "2", "--", text[i:i + 2000])
        self.send_json(200, {"ok": True})

    def press(self, query):
        body = self.body()
        xdotool("key", "--", key_name(body.get("key"), "key"))
        self.send_json(200, {"ok": True})

    def hotkey(self, query):
        body = self.body()
        keys = body.get("keys")
        if not isinstance(keys, list) or not 1 <= len(keys) <= 10:
            raise BadRequest("keys", "must be a list of 1 to 10 key names")
        combo = "+".join(key_name(k, f"keys[{i}]") for i, k in enumerate(keys))
        try:
            xdotool("key", "--", combo)
        except BadRequest as e:
            raise BadRequest("keys", e.error) from None
        self.send_json(200, {"ok": True})

    def recording(self, query):
        self.send_json(200, RECORDER.status())

    def recording_start(self, query):
        self.send_json(201, RECORDER.start())

    def recording_stop(self, query):
        self.send_json(200, RECORDER.stop())

    def recordings(self, query):
        self.send_json(200, {"items": RECORDER.all()})

    def status(self, query):
        self.send_json(200, DESKTOP.status())

    def status_stream(self, query):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        seen = -1
        try:
            while True:
                with DESKTOP.changed:
                    if DESKTOP.version == seen:
                        DESKTOP.changed.wait(HEARTBEAT)
                    seen = DESKTOP.version
                self.wfile.write(f"data: {json.dumps(DESKTOP.status())}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass

    # everything else: noVNC's page and its WebSocket, from websockify

    def pass_to_novnc(self):
        self.close_connection = True
        DESKTOP.client_joined()
        try:
            self.relay_to_novnc()
        finally:
            DESKTOP.client_left()

    def relay_to_novnc(self):
        try:
            upstream = socket.create_connection(("127.0.0.1", NOVNC_PORT), timeout=5)
        except OSError:
            self.send_json(503, {"message": "the noVNC server is not running"})
            return
        with upstream:
            upstream.settimeout(None)
            # One request per connection unless it is an upgrade: the next request on a
            # kept-alive connection could be one for /api/, which must not reach websockify.
            upgrade = "upgrade" in self.headers.get("Connection", "").lower()
            headers = [(k, v) for k, v in self.headers.items() if upgrade or k.lower() != "connection"]
            if not upgrade:
                headers.append(("Connection", "close"))
            head = f"{self.command} {self.path} HTTP/1.1\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
            upstream.sendall(head.encode("latin-1"))
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                upstream.sendall(self.rfile.read(length))
            # Bytes the request parser already buffered (a WebSocket's first frames) go first;
            # peeking without blocking, as the client may wait for the answer before it sends.
            self.connection.setblocking(False)
            try:
                pending = self.rfile.peek()
            finally:
                self.connection.setblocking(True)
            if pending:
                upstream.sendall(self.rfile.read(len(pending)))
            splice(self.connection, upstream)


def splice(a: socket.socket, b: socket.socket):
    """Copy bytes both ways until either side closes."""
    peers = {a: b, b: a}
    while True:
        ready, _, _ = select.select(list(peers), [], [], 300)
        if not ready:
            return
        for s in ready:
            try:
                data = s.recv(65536)
            except OSError:
                return
            if not data:
                return
            peers[s].sendall(data)


ROUTES = {
    ("GET", "/api/healthz"): Handler.healthz,
    ("GET", "/api/display"): Handler.display,
    ("GET", "/api/display/screen"): Handler.display,
    ("POST", "/api/display/screen"): Handler.resize,
    ("GET", "/api/display/windows"): Handler.windows,
    ("GET", "/api/screenshot"): Handler.screenshot_get,
    ("POST", "/api/screenshot/region"): Handler.screenshot_region,
    ("GET", "/api/input/position"): Handler.position,
    ("POST", "/api/input/move"): Handler.move,
    ("POST", "/api/input/click"): Handler.click,
    ("POST", "/api/input/drag"): Handler.drag,
    ("POST", "/api/input/scroll"): Handler.scroll,
    ("POST", "/api/input/type"): Handler.type_text,
    ("POST", "/api/input/press"): Handler.press,
    ("POST", "/api/input/hotkey"): Handler.hotkey,
    ("GET", "/api/recording"): Handler.recording,
    ("POST", "/api/recording/start"): Handler.recording_start,
    ("POST", "/api/recording/stop"): Handler.recording_stop,
    ("GET", "/api/recordings"): Handler.recordings,
    ("GET", "/api/status"): Handler.status,
    ("GET", "/api/status/stream"): Handler.status_stream,
}


def main():
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    server.daemon_threads = True
    end_leftovers()
    threading.Thread(target=DESKTOP.supervise, daemon=True, name="supervisor").start()
    # No timeout: it only lets `shutdown()` be noticed, which nothing calls, and its default
    # (0.5 s) woke the idle guest twice a second, ~0.4% of a host core under TCG.
    server.serve_forever(poll_interval=None)


if __name__ == "__main__":
    main()
