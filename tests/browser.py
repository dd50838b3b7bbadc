"""A real headless Chromium for the tests, driven over the DevTools protocol on loopback.

``find_chromium()`` looks for ``$SSAM_CHROMIUM``, then Debian's ``chromium`` /
``chromium-headless-shell``, then Playwright's download (``~/.cache/ms-playwright``). Install one
with ``tests/install_browser.sh`` (what CI runs). ``Chromium`` starts it on 127.0.0.1 with a
private profile, ``load(url)`` returns the page's console errors and its images, and leaving the
``with`` block stops the browser by its pid. The WebSocket client is a minimal stdlib one (text
frames, client masking), so the tests need no browser-driver package.

    python tests/browser.py screenshot URL OUT.png [WIDTH HEIGHT]   # e.g. the README picture
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome", "headless_shell")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars", "--mute-audio")


def find_chromium() -> str | None:
    """Path of a usable Chromium binary, or None."""
    env = os.environ.get("SSAM_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path and "snap" not in os.path.realpath(path):  # Ubuntu's snap shim does not run in containers
            return path
    pattern = os.path.expanduser(
        "~/.cache/ms-playwright/chromium*/*/*"
    )  # playwright install chromium[-headless-shell]
    names = ("chrome", "headless_shell", "chrome-headless-shell")
    found = [p for p in sorted(glob.glob(pattern)) if Path(p).name in names and os.access(p, os.X_OK)]
    return found[-1] if found else None


class WebSocket:
    """Just enough RFC 6455 for the DevTools protocol: text messages in and out."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        host_port, _, path = url.removeprefix("ws://").partition("/")
        host, _, port = host_port.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")
        self.buffer = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        size = (
            bytes([0x80 | n])
            if n < 126
            else (bytes([0xFE]) + struct.pack(">H", n) if n < 65536 else bytes([0xFF]) + struct.pack(">Q", n))
        )
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(bytes([0x81]) + size + mask + masked)

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if b0 & 0x80:
                    return message.decode()

    def close(self) -> None:
        self.sock.close()


class Chromium:
    """``with Chromium() as browser: errors, images = browser.load(url)``; headless, on 127.0.0.1."""

    def __init__(self, binary: str | None = None, window: tuple[int, int] = (1200, 1600)):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise FileNotFoundError("no Chromium found: run tests/install_browser.sh or set SSAM_CHROMIUM")
        self.window = window
        self.next_id = 0
        self.events: list[dict] = []

    def __enter__(self) -> Chromium:
        self.profile = tempfile.mkdtemp(prefix="ssam-chromium-")
        self.proc = subprocess.Popen(
            [self.binary, *FLAGS, f"--window-size={self.window[0]},{self.window[1]}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            self.ws = WebSocket(self._devtools_url())
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.call(f"{domain}.enable", session=True)
            self.call("Network.setCacheDisabled", session=True, cacheDisabled=True)  # each load refetches
        except BaseException:
            self.__exit__()
            raise
        return self

    def _devtools_url(self, timeout_s: float = 30.0) -> str:
        marker = Path(self.profile) / "DevToolsActivePort"  # Chromium writes "PORT\n/devtools/browser/ID"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with status {self.proc.returncode} at start")
            lines = marker.read_text().split("\n") if marker.exists() else []
            if len(lines) >= 2 and lines[1]:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.1)
        raise TimeoutError(f"{self.binary} did not open its DevTools port in {timeout_s}s")

    def __exit__(self, *exc) -> None:
        if getattr(self, "ws", None):
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # helpers left in its own group (start_new_session)
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method: str, session: bool = False, **params) -> dict:
        """Send one command and return its result; events that arrive meanwhile go to ``self.events``."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def load(self, url: str, timeout_s: float = 30.0) -> tuple[list[str], list[dict]]:
        """Open ``url``; return (console errors and uncaught exceptions, ``[{src, ok, width}]`` per <img>)."""
        self.events = []
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading in {timeout_s}s")
            self.events.append(json.loads(self.ws.recv()))
        images = self.evaluate(
            "[...document.images].map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0,"
            " width: i.naturalWidth}))"
        )
        return _errors(self.events), images

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif e.get("method") == "Runtime.exceptionThrown":
            out.append("exception: " + p["exceptionDetails"].get("text", ""))
        elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
    return out


def screenshot(url: str, out_png: str, width: int = 1200, height: int = 1600) -> None:
    """Write a PNG of ``url`` as headless Chromium renders it at ``width`` x ``height``."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium found: run tests/install_browser.sh or set SSAM_CHROMIUM")
    with tempfile.TemporaryDirectory(prefix="ssam-chromium-") as profile:
        subprocess.run(
            [binary, *FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}",
             f"--screenshot={os.path.abspath(out_png)}", url],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) not in (4, 6) or sys.argv[1] != "screenshot":
        sys.exit(__doc__)
    screenshot(sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:6]))
