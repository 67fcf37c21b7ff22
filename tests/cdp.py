"""A headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages ended by a NUL byte on file descriptors 3 and 4), so a test can run a page's
own scripts in real time and read what they did, with no driver package."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from typing import Any

MOVE_AND_EXEC = (
    "import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4);"
    " os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])"
)


def _above_four(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 5)
    os.close(fd)
    return moved


class Chromium:
    """One headless browser; ``evaluate(url, expression)`` loads ``url`` in a new tab and
    returns the value of ``expression`` (awaited when it is a promise)."""

    def __init__(self, binary: str, profile: str) -> None:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # the browser's ends above 4, so that moving them onto 3 and 4 cannot close them
        to_browser, from_browser = (_above_four(fd) for fd in (to_browser, from_browser))
        # the browser reads commands on fd 3 and writes replies on fd 4: a Python process
        # moves the pipe's ends there, then becomes the browser
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MOVE_AND_EXEC, str(to_browser), str(from_browser), binary,
             "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(to_browser, from_browser),
        )  # fmt: skip
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next = 0
        self._events: list[dict] = []

    def _send(self, method: str, params: dict, session: str | None = None) -> int:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        return self._next

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no message from chromium in time")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed its pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict, session: str | None = None, timeout=60) -> dict:
        """Send one command and return its result; a protocol error raises RuntimeError."""
        wanted = self._send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == wanted:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self._events.append(reply)

    def wait_for(self, event: str, session: str, timeout: float = 60) -> dict:
        """The next ``event`` of ``session`` (already received, or the next to come)."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self._events:
                if message.get("method") == event and message.get("sessionId") == session:
                    self._events.remove(message)
                    return message
            self._events.append(self._receive(deadline))

    def evaluate(self, url: str, expression: str, timeout: float = 60) -> Any:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        session_id = session["sessionId"]
        self.call("Page.enable", {}, session_id)
        self.call("Page.navigate", {"url": url}, session_id)
        self.wait_for("Page.loadEventFired", session_id, timeout)
        params = {"expression": expression, "awaitPromise": True, "returnByValue": True}
        result = self.call("Runtime.evaluate", params, session_id, timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"].get("text", "exception"))
        return result["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send("Browser.close", {})
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._write)
        os.close(self._read)
