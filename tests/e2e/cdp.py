"""A small Chrome DevTools Protocol client for the browser tests: headless Debian ``chromium``
as a real process, driven over its DevTools websocket (aiohttp's client).

:class:`Browser` starts chromium in its own session (so that its whole process group can be
killed) and reads the DevTools address from the line chromium prints, ``DevTools listening on
ws://...``; :meth:`Browser.new_page` opens a tab and attaches to it (flat sessions: every
message names its session). A :class:`Page` collects what a test must see empty: console
errors, uncaught exceptions and error log entries (failed loads, refused scripts).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

INSTALL = "install it: apt-get install -y chromium"
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class CdpError(Exception):
    """A DevTools command that failed, or a page script that threw."""


def chromium_path() -> str | None:
    return shutil.which("chromium")


class Connection:
    """One DevTools websocket: commands by id, events to the listeners of their session."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: dict[str | None, list[Callable[[str, dict[str, Any]], None]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(CdpError(f"{data['error']}"))
                    else:
                        future.set_result(data.get("result", {}))
                continue
            for listener in self._listeners.get(data.get("sessionId"), []):
                listener(data["method"], data.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CdpError("the DevTools connection closed"))

    def listen(self, session: str | None, listener: Callable[[str, dict[str, Any]], None]) -> None:
        self._listeners.setdefault(session, []).append(listener)

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   session: str | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
        n = next(self._ids)
        message: dict[str, Any] = {"id": n, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[n] = future
        await self.ws.send_str(json.dumps(message))
        return await asyncio.wait_for(future, timeout_s)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class Page:
    """One tab. ``problems`` lists the console errors, exceptions and error log entries."""

    def __init__(self, connection: Connection, session: str) -> None:
        self.connection, self.session = connection, session
        self.problems: list[str] = []
        self.console: list[str] = []
        self._loaded = asyncio.Event()
        connection.listen(session, self._on_event)

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", "")))
                            for a in params.get("args", []))
            self.console.append(f"{params.get('type')}: {text}")
            if params.get("type") in ("error", "assert"):
                self.problems.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text")
            self.problems.append(f"exception: {description}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                self.problems.append(f"log ({entry.get('source')}): {entry.get('text')} "
                                     f"{entry.get('url', '')}".strip())
        elif method == "Page.loadEventFired":
            self._loaded.set()

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.connection.send(method, params, self.session)

    async def enable(self, width: int = 1440, height: int = 1100) -> None:
        for domain in ("Runtime", "Log", "Page"):
            await self.send(f"{domain}.enable")
        await self.send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    async def navigate(self, url: str, wait_load: bool = True) -> None:
        self._loaded.clear()
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigate {url}: {result['errorText']}")
        if wait_load:
            await asyncio.wait_for(self._loaded.wait(), 30)

    async def evaluate(self, expression: str) -> Any:
        """The value of a script (awaited when a promise), by value."""
        result = await self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CdpError(f"{expression!r}: "
                           f"{details.get('exception', {}).get('description') or details}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, what: str, timeout_s: float = 60.0) -> Any:
        """Until the script's value is truthy; its value. The limit only guards a hang."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{what}: still {value!r} after {timeout_s} s "
                           f"(problems: {self.problems})")

    async def click(self, selector: str, expect: str | None = None,
                    timeout_s: float = 30.0) -> None:
        """A real mouse click (pressed, released) at the middle of the element.

        The page redraws while a test runs, so a box read now may be stale by the click: the
        point is taken in the same script that checks that the element is what the browser
        hits there, after scrolling it into view (retried until it is); with ``expect`` (a
        script), the click is tried once more when that does not come true."""
        point = await self.wait_for(
            f"(() => {{ const sel = {json.dumps(selector)};"
            " const el = document.querySelector(sel);"
            " if (!el) return null; el.scrollIntoView({block: 'center'});"
            " const r = el.getBoundingClientRect();"
            " const x = r.left + r.width / 2, y = r.top + r.height / 2;"
            " const hit = document.elementFromPoint(x, y);"
            " return hit && hit.closest(sel) === el ? {x, y} : null; })()",
            f"{selector!r} clickable", timeout_s)
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", {
                "type": kind, "x": point["x"], "y": point["y"], "button": "left",
                "clickCount": 1})
        if expect is None:
            return
        try:
            await self.wait_for(expect, f"after clicking {selector!r}", timeout_s=2.0)
        except TimeoutError:  # missed: the element moved between the check and the click
            await self.click(selector, None, timeout_s)
            await self.wait_for(expect, f"after clicking {selector!r} again", timeout_s)

    async def screenshot(self, path: Path) -> bytes:
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        data = base64.b64decode(result["data"])

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        await asyncio.to_thread(write)
        return data


class Browser:
    """Headless chromium as a process group of its own, and its DevTools connection."""

    def __init__(self, user_data_dir: Path, executable: str = "chromium") -> None:
        self.user_data_dir = user_data_dir
        self.executable = executable
        self.log_path = user_data_dir.parent / f"{user_data_dir.name}-chromium.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.connection: Connection | None = None

    async def start(self, timeout_s: float = 60.0) -> None:
        self.user_data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [self.executable, "--headless", "--no-sandbox", "--disable-gpu",
                 "--remote-debugging-port=0", f"--user-data-dir={self.user_data_dir}",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
                 "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        url = await self._devtools_url(timeout_s)
        self._session = aiohttp.ClientSession()
        ws = await self._session.ws_connect(url, max_msg_size=0)
        self.connection = Connection(ws)

    async def _devtools_url(self, timeout_s: float) -> str:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            found = _LISTENING.search(text)
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise CdpError(f"chromium exited ({self.process.returncode}): {text[-2000:]}")
            await asyncio.sleep(0.05)
        raise CdpError(f"chromium printed no DevTools address in {timeout_s} s: "
                       f"{self.log_path.read_text(errors='replace')[-2000:]}")

    async def new_page(self) -> Page:
        assert self.connection is not None
        target = await self.connection.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.connection.send("Target.attachToTarget", {
            "targetId": target["targetId"], "flatten": True})
        page = Page(self.connection, attached["sessionId"])
        await page.enable()
        return page

    async def stop(self) -> None:
        """Close the connection and kill chromium's whole process group."""
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()
        if self._session is not None:
            await self._session.close()
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await asyncio.to_thread(self.process.wait)

