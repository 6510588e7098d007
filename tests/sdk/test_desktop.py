"""The desktop through the official Leap0 Python SDK, as a user reaches it.

The SDK calls the desktop at `https://<sandbox id>.<sandbox domain>` with no port: the module's
server is `services.tls_server`, a `--tls-self-signed` server on port 443.

Sandboxes are real VMs of `system/desktop:v0.1.0`. What a call does is checked where it lands:
screenshots are decoded pixel by pixel, typed keys must reach a shell in a terminal window and
make it write a file, a drag must move that window, a recording must be an MP4 of H.264 the
size the guest holds, a restarted process must have a new PID in the guest.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
import time
import zlib

import pytest

from leap0 import DEFAULT_DESKTOP_TEMPLATE_NAME, Leap0ConflictError, Leap0Error, Leap0NotFoundError
from services import tls_client, tls_server  # noqa: F401 (fixtures)
from test_leap0_sdk import SANDBOX_DOMAIN, sh

PROCESSES = {"xvfb": "Xvfb", "xfce4": "xfce4-session", "x11vnc": "x11vnc", "novnc": "python3"}
TERMINAL = "cove-term"


@pytest.fixture(scope="module")
def desktop(tls_client):
    sb = tls_client.sandboxes.create(template_name=DEFAULT_DESKTOP_TEMPLATE_NAME, timeout=1800)
    yield sb
    try:
        sb.delete()
    except Leap0NotFoundError:
        pass


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the RGB rows of an 8-bit RGB PNG (the filters undone)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 2), "not 8-bit RGB"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * 3, [], bytes(width * 3)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - 3] if i >= 3 else 0
            b = prev[i]
            c = prev[i - 3] if i >= 3 else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from a JPEG's frame header."""
    assert data[:2] == b"\xff\xd8", data[:2]
    pos = 2
    while pos < len(data):
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if 0xC0 <= marker <= 0xC3:
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    raise AssertionError("no JPEG frame header")


def wait_for(what: str, probe, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def guest_file(sb, path: str) -> str:
    r = sb.process.execute(command=f"cat {path} 2>/dev/null")
    return r.stdout if r.exit_code == 0 else ""


def process_state(sb, name: str) -> str:
    """The state letter of desktop process `name` in the guest (`T`: stopped)."""
    stat = guest_file(sb, f"/proc/{sb.desktop.get_process(name).pid}/stat")
    return stat.rsplit(") ", 1)[1][:1] if ") " in stat else "?"


def viewer_path_stopped(sb) -> bool:
    return all(process_state(sb, name) == "T" for name in ("x11vnc", "novnc"))


def terminal(sb):
    """The terminal window the tests type into, opened on first use."""
    found = [w for w in sb.desktop.windows() if w.title == TERMINAL]
    if found:
        return found[0]
    sh(sb, f"DISPLAY=:0 setsid xfce4-terminal --title={TERMINAL} --geometry=80x20+200+150 "
           ">/dev/null 2>&1 </dev/null &")
    return wait_for("the terminal window", lambda: [w for w in sb.desktop.windows() if w.title == TERMINAL])[0]


def test_ready_status_display_and_windows(desktop):
    d = desktop.desktop
    d.wait_until_ready(timeout=120)
    assert d.health().ok is True
    status = d.process_status()
    assert (status.status, status.running, status.total) == ("running", 4, 4)
    assert sorted(i.name for i in status.items) == sorted(PROCESSES)
    for name, comm in PROCESSES.items():
        p = d.get_process(name)
        assert p.running and p.pid > 0, p
        # The PID is the guest's: that process runs the program named.
        assert sh(desktop, f"cat /proc/{p.pid}/comm").strip() == comm
    info = d.display_info()
    assert (info.display, info.width, info.height) == (":0", 1280, 800)
    assert d.screen().width == 1280
    classes = {w.window_class for w in d.windows()}
    assert "xfdesktop.Xfdesktop" in classes and "xfce4-panel.Xfce4-panel" in classes, classes
    assert d.desktop_url() == f"https://{desktop.id}.{SANDBOX_DOMAIN}/"


def test_screenshots_are_the_screen(desktop):
    d = desktop.desktop
    width, height, rows = png_pixels(d.screenshot())
    assert (width, height) == (1280, 800)
    # XFCE drew a desktop: its background fills the middle, the panel is a different colour,
    # and the whole holds many colours (icons, text), not a blank frame.
    middle = rows[400][640 * 3 : 640 * 3 + 3]
    assert rows[5][300 * 3 : 300 * 3 + 3] != middle
    colours = {row[i : i + 3] for row in rows[::4] for i in range(0, len(row), 12)}
    assert len(colours) > 50, f"only {len(colours)} colours: a blank screen"
    # A region is the same pixels as that part of the whole screen (an empty part of the desktop).
    rw, rh, region = png_pixels(d.screenshot(x=600, y=300, width=120, height=80))
    assert (rw, rh) == (120, 80)
    assert region == [row[600 * 3 : 720 * 3] for row in rows[300:380]]
    posted = d.screenshot_region(x=0, y=0, width=300, height=40)
    assert png_pixels(posted)[:2] == (300, 40)
    jpeg = d.screenshot_region(x=10, y=10, width=320, height=240, image_format="jpeg", quality=60)
    assert jpeg_size(jpeg) == (320, 240)
    assert jpeg_size(d.screenshot(image_format="jpg")) == (1280, 800)
    with pytest.raises(Leap0Error) as err:
        d.screenshot_region(x=1200, y=0, width=200, height=10)
    assert err.value.status_code == 400


def test_keyboard_reaches_a_terminal(desktop):
    d = desktop.desktop
    term = terminal(desktop)
    # A click in the window focuses it.
    pos = d.click(x=term.x + 200, y=term.y + 150)
    assert (pos.x, pos.y) == (term.x + 200, term.y + 150)
    wait_for("the terminal to have the focus", lambda: [w for w in d.windows() if w.title == TERMINAL and w.focused])
    # What is typed reaches the shell, which expands it: the file proves the keys arrived.
    assert d.type_text(text="echo typed-$((6*7)) > /tmp/typed.txt") is True
    assert d.press_key(key="Return") is True
    assert wait_for("the typed command", lambda: guest_file(desktop, "/tmp/typed.txt")) == "typed-42\n"
    # ctrl+d as one combination ends `cat`; the command after it runs only if it did.
    d.type_text(text="cat > /tmp/hotkey.txt")
    d.press_key(key="Return")
    d.type_text(text="abc")
    d.press_key(key="Return")
    assert d.hotkey(keys=["ctrl", "d"]) is True
    d.type_text(text="echo after-eof > /tmp/after.txt")
    d.press_key(key="Return")
    assert wait_for("the command after ctrl+d", lambda: guest_file(desktop, "/tmp/after.txt")) == "after-eof\n"
    assert guest_file(desktop, "/tmp/hotkey.txt") == "abc\n"
    with pytest.raises(Leap0Error) as err:
        d.press_key(key="NoSuchKeyName")
    assert err.value.status_code == 400


def test_pointer_moves_scrolls_and_drags_a_window(desktop):
    d = desktop.desktop
    moved = d.move_pointer(x=321, y=123)
    assert (moved.x, moved.y) == (321, 123)
    now = d.pointer_position()
    assert (now.x, now.y) == (321, 123)
    term = terminal(desktop)
    # Over the terminal (on the bare desktop, XFCE's wheel switches workspaces).
    d.move_pointer(x=term.x + 100, y=term.y + 100)
    scrolled = d.scroll(direction="down", amount=3)
    assert (scrolled.x, scrolled.y) == (term.x + 100, term.y + 100)
    # Grab the title bar: above the window's area (where X puts it), half the frame's top
    # extent (from the window manager).
    wid = sh(desktop, f"DISPLAY=:0 xdotool search --name '^{TERMINAL}$' | head -1").strip()
    area = sh(desktop, f"DISPLAY=:0 xwininfo -id {wid}")
    x0 = int(area.split("Absolute upper-left X:")[1].split()[0])
    y0 = int(area.split("Absolute upper-left Y:")[1].split()[0])
    top = int(sh(desktop, f"DISPLAY=:0 xprop -id {wid} _NET_FRAME_EXTENTS").split("=")[1].split(",")[2])
    grab_x, grab_y = x0 + 150, y0 - top // 2
    end = d.drag(from_x=grab_x, from_y=grab_y, to_x=grab_x + 100, to_y=grab_y + 80)
    assert (end.x, end.y) == (grab_x + 100, grab_y + 80)
    after = wait_for("the window to move", lambda: [
        w for w in d.windows() if w.title == TERMINAL and (w.x, w.y) != (term.x, term.y)])[0]
    assert (after.x - term.x, after.y - term.y) == (100, 80)


def test_recording(desktop):
    d = desktop.desktop
    started = d.start_recording()
    assert started.active and started.id and started.mime_type == "video/mp4"
    assert (started.display, started.resolution) == (":0", "1280x800")
    assert d.recording_status().active is True
    with pytest.raises(Leap0ConflictError):
        d.start_recording()
    d.move_pointer(x=100, y=100)
    d.move_pointer(x=700, y=500)
    time.sleep(2)
    stopped = d.stop_recording()
    assert stopped.id == started.id and not stopped.active and stopped.stopped_at
    with pytest.raises(Leap0ConflictError):
        d.stop_recording()
    listed = {r.id: r for r in d.recordings()}
    assert started.id in listed and listed[started.id].size_bytes > 1000
    one = d.get_recording(started.id)
    assert (one.size_bytes, one.file_name) == (listed[started.id].size_bytes, f"{started.id}.mp4")
    video = d.download_recording(started.id)
    assert len(video) == one.size_bytes
    assert video[4:8] == b"ftyp" and b"moov" in video and b"avc1" in video, video[:32]
    # The guest holds the same file.
    held = sh(desktop, f"stat -c %s ~/Videos/recordings/{started.id}.mp4").strip()
    assert int(held) == len(video)
    d.delete_recording(started.id)
    with pytest.raises(Leap0NotFoundError):
        d.get_recording(started.id)
    assert started.id not in {r.id for r in d.recordings()}
    assert sh(desktop, f"ls ~/Videos/recordings/ | grep -c {started.id} || true").strip() == "0"


def test_processes_restart_logs_and_stream(desktop):
    d = desktop.desktop
    before = d.get_process("x11vnc").pid
    restarted = d.restart_process("x11vnc")
    assert restarted.message == "x11vnc restarted"
    assert restarted.status.running and restarted.status.pid != before
    assert sh(desktop, f"cat /proc/{restarted.status.pid}/comm").strip() == "x11vnc"
    assert desktop.process.execute(command=f"test -e /proc/{before}").exit_code != 0
    # A process that dies is started again by the service, which nothing polls for.
    crashed = restarted.status.pid
    sh(desktop, f"kill -9 {crashed}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = d.get_process("x11vnc")
        if now.running and now.pid != crashed:
            break
        time.sleep(0.5)
    assert now.running and now.pid != crashed, "x11vnc was not started again after it died"
    assert "starting Xvfb :0" in d.process_logs("xvfb").logs
    errors = d.process_errors("xfce4")
    assert errors.process == "xfce4" and "starting dbus-launch" in errors.errors
    for status in d.status_stream(deadline=time.monotonic() + 60):
        assert status.total == 4
        if status.status == "running":
            break
    with pytest.raises(Leap0Error) as err:
        d.get_process("nonesuch")
    assert err.value.status_code == 400


def test_novnc_page_and_vnc_stream(tls_server, desktop):
    import httpx
    import websockets

    # With no client of noVNC, x11vnc and websockify are stopped (idle, they would wake the
    # guest several times a second); their status still says running.
    wait_for("x11vnc and websockify to be stopped", lambda: viewer_path_stopped(desktop))
    assert desktop.desktop.process_status().status == "running"
    auth = {"authorization": f"Bearer {tls_server.api_key}"}
    url = desktop.desktop.desktop_url()
    with httpx.Client(timeout=60) as c:
        assert c.get(url).status_code == 401
        page = c.get(url, headers=auth, follow_redirects=True)
    assert page.status_code == 200 and "noVNC" in page.text, page.text[:200]

    async def greeting_and_states() -> tuple[bytes, set[str]]:
        tls = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
        ws_url = f"wss://{desktop.id}.{SANDBOX_DOMAIN}/websockify"
        async with websockets.connect(ws_url, ssl=tls, additional_headers=auth, subprotocols=["binary"]) as ws:
            greeting = await asyncio.wait_for(ws.recv(), 30)
            return greeting, {process_state(desktop, name) for name in ("x11vnc", "novnc")}

    # noVNC's WebSocket reaches the VNC server: it greets with the RFB protocol version.
    greeting, states = asyncio.run(greeting_and_states())
    assert greeting.startswith(b"RFB 003.008")
    assert "T" not in states, f"x11vnc or websockify stopped while a viewer is connected: {states}"
    # The viewer gone, both are stopped again.
    wait_for("x11vnc and websockify to be stopped again", lambda: viewer_path_stopped(desktop))


def test_resize(desktop):
    d = desktop.desktop
    with pytest.raises(Leap0Error):
        d.resize_screen(width=100, height=100)  # the SDK refuses it before sending
    resized = d.resize_screen(width=1024, height=768)
    assert (resized.width, resized.height) == (1024, 768)
    assert (d.screen().width, d.screen().height) == (1024, 768)
    assert png_pixels(d.screenshot())[:2] == (1024, 768)
    d.wait_until_ready(timeout=120)
    assert sh(desktop, "DISPLAY=:0 xdpyinfo | grep dimensions").split()[1] == "1024x768"
    d.resize_screen(width=1280, height=800)
    d.wait_until_ready(timeout=120)


def test_desktop_survives_pause_and_resume(tls_client, desktop):
    d = desktop.desktop
    term = terminal(desktop)
    xvfb = d.get_process("xvfb").pid
    desktop.pause()
    assert tls_client.sandboxes.get(desktop.id).state.value == "paused"
    # The request resumes the sandbox: the same X server, with the same window on it.
    assert term.id in {w.id for w in d.windows()}
    assert d.get_process("xvfb").pid == xvfb
    assert d.process_status().status == "running"
    assert png_pixels(d.screenshot())[:2] == (1280, 800)
    assert tls_client.sandboxes.get(desktop.id).state.value == "running"
