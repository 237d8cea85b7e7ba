"""Load a page in real headless chromium and report what a reader would see go wrong: images that do not decode and
console errors. Speaks the DevTools protocol over --remote-debugging-pipe (NUL-separated JSON on file descriptors 3
and 4), so it needs nothing beyond the standard library and Debian's chromium."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Every <img> on the page with whether it decoded: naturalWidth is 0 for a broken or undecodable image.
IMAGES_SCRIPT = """
Promise.all([...document.images].map(img => img.decode().then(() => true, () => false)))
  .then(decoded => JSON.stringify([...document.images].map((img, i) =>
    ({alt: img.alt, decoded: decoded[i], naturalWidth: img.naturalWidth}))))
"""


@dataclass
class PageCheck:
    title: str
    images: list[dict]  # alt, decoded, naturalWidth per <img>
    console_errors: list[str]  # console.error calls, uncaught exceptions, browser log errors (failed loads)


def find_chromium() -> str | None:
    return next(filter(None, (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome"))), None)


class _Pipe:
    def __init__(self, browser: str, profile: str):
        to_browser_read, self._write = os.pipe()
        self._read, from_browser_write = os.pipe()
        ends = (to_browser_read, from_browser_write)

        def give_browser_its_fds():  # in the child: the browser reads commands on fd 3 and writes on fd 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in ends]  # out of the way of 3 and 4 first
            for target, fd in zip((3, 4), high):
                os.dup2(fd, target, inheritable=True)

        self.process = subprocess.Popen(
            [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=give_browser_its_fds,
            start_new_session=True,  # its own process group, so close() can stop its helpers too
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._receive(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._read], [], [], remaining)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe (it exited)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        """Stop the browser and every helper process it started: killing the main process alone leaves its renderer
        and utility processes running, still writing into the profile folder."""
        os.close(self._write)
        os.close(self._read)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # start_new_session made it the group's leader
        self.process.wait()


def _remove_profile(profile: str, timeout: float = 10) -> None:
    """The helpers die a moment after SIGKILL and may write a last file meanwhile (`Directory not empty`): retry."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            shutil.rmtree(profile)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def check_page(path: Path, browser: str) -> PageCheck:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        pipe = _Pipe(browser, profile)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
            pipe.wait_for("Page.loadEventFired")
            result = pipe.send("Runtime.evaluate", {"expression": IMAGES_SCRIPT, "awaitPromise": True,
                                                    "returnByValue": True}, session=session)["result"]
            title = pipe.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                              session=session)["result"]["value"]
            return PageCheck(title, json.loads(result["value"]), _errors(pipe.events))
        finally:
            pipe.close()
    finally:
        _remove_profile(profile)


def _errors(events: list[dict]) -> list[str]:
    errors = []
    for event in events:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
            errors.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"]))
        elif event.get("method") == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("text", "uncaught exception"))
        elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"]["text"])
    return errors
