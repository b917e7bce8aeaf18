"""``llmops top``: the controller's overview as a live full-screen terminal view.

A poller thread fetches ``GET /api/v1/overview`` every ``--interval`` and wakes the main
thread through a pipe; the main thread only waits (``select``) on that pipe and the keyboard,
and redraws. So a slow or dead controller never freezes the screen: it shows up in the status
line while the poller keeps trying. ``q`` or Ctrl-C quits; the terminal (alternate screen,
cursor, line discipline) is given back however the loop ends. ``--once`` prints one frame.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import select
import shutil
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

from llm_ops_helper.client import ApiError, ControllerUnreachable, LLMOpsError, LLMOpsHelper
from llm_ops_helper.topview import Status, render

OVERVIEW_PATH = "/api/v1/overview"
EXIT_ERROR = 1
# Enter: alternate screen, hide the cursor, clear. Leave: show the cursor, main screen back.
ENTER_SCREEN = "\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J"
LEAVE_SCREEN = "\x1b[?25h\x1b[?1049l"
QUIT_KEYS = (b"q", b"Q", b"\x03")


def token_source(token_arg: str | None) -> str | None:
    """Where LLMOpsHelper took its token from, as the user would name it; None: nowhere."""
    if token_arg is not None:
        return "--token"
    if os.environ.get("LLMOPS_TOKEN"):
        return "$LLMOPS_TOKEN"
    if os.environ.get("LLMOPS_TOKEN_FILE"):
        return f"$LLMOPS_TOKEN_FILE ({os.environ['LLMOPS_TOKEN_FILE']})"
    return None


def describe_error(exc: LLMOpsError, source: str | None) -> str:
    """One line for the status bar (or stderr under --once)."""
    if isinstance(exc, ControllerUnreachable):
        return f"controller unreachable at {exc.url}: {exc.reason}"
    if isinstance(exc, ApiError) and exc.status == 401:
        if source is None:
            return ("HTTP 401: no API token given (use --token, $LLMOPS_TOKEN or "
                    "$LLMOPS_TOKEN_FILE)")
        return f"HTTP 401: the controller rejected the token from {source}: {exc.message}"
    if isinstance(exc, ApiError) and exc.status == 403:
        return (f"HTTP 403: the token from {source or 'nowhere'} may not read the overview "
                f"(it needs the viewer role): {exc.message}")
    if isinstance(exc, ApiError) and exc.status == 404:
        return f"HTTP 404: this controller has no {OVERVIEW_PATH} (an older version?)"
    return str(exc)


@dataclass
class Snapshot:
    """What the poller knows: the last overview, when it came (monotonic s), and the error of
    the last fetch with how many failed in a row."""

    overview: dict[str, Any] | None = None
    fetched_at: float | None = None
    error: str | None = None
    failures: int = 0


def status_of(snap: Snapshot, now: float, interval: float) -> Status:
    """The status line: the error if the last fetch failed, else how fresh the data are."""
    every = f"every {interval:g} s"
    if snap.error is not None:
        stale = ("" if snap.fetched_at is None
                 else f"; data {now - snap.fetched_at:.0f} s old")
        tries = "1 failed try" if snap.failures == 1 else f"{snap.failures} failed tries"
        return Status(f"{snap.error} -- {tries}, retrying {every}{stale}   (q quits)", "crit")
    if snap.fetched_at is None:
        return Status("connecting...   (q quits)", "warn")
    return Status(f"updated {max(0.0, now - snap.fetched_at):.1f} s ago, refreshing {every}"
                  "   (q quits)", "dim")


class Poller(threading.Thread):
    """Fetches the overview every ``interval`` (from one start to the next) and pokes
    ``wake_fd`` after each attempt. A daemon thread: a fetch hung on a dead controller does
    not hold up the exit (its own timeout ends it anyway)."""

    def __init__(self, client: LLMOpsHelper, interval: float, wake_fd: int,
                 source: str | None) -> None:
        super().__init__(name="llmops-top-poller", daemon=True)
        self.client, self.interval, self.wake_fd, self.source = client, interval, wake_fd, source
        self._lock = threading.Lock()
        self._snapshot = Snapshot()
        self._halt = threading.Event()

    def snapshot(self) -> Snapshot:
        with self._lock:
            return dataclasses.replace(self._snapshot)

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                overview = self.client.overview()
            except LLMOpsError as exc:
                with self._lock:
                    self._snapshot.error = describe_error(exc, self.source)
                    self._snapshot.failures += 1
            else:
                with self._lock:
                    self._snapshot = Snapshot(overview, time.monotonic())
            _poke(self.wake_fd)
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - started)))


def _poke(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):  # full (a wake is pending) or closed
        os.write(fd, b".")


def _use_color(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


def run_top(args: argparse.Namespace) -> int:
    interval = float(args.interval)
    if not interval > 0:
        print("llmops: error: --interval must be more than 0 s", file=sys.stderr)
        return EXIT_ERROR
    source = token_source(args.token)
    try:
        client = LLMOpsHelper(args.url, args.token, timeout=max(2.0, min(10.0, 3 * interval)))
    except LLMOpsError as exc:
        print(f"llmops: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.once:
        return _once(client, source)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("llmops: error: top needs a terminal on stdin and stdout; "
              "`llmops top --once` prints one frame", file=sys.stderr)
        return EXIT_ERROR
    return _live(client, interval, source)


def _once(client: LLMOpsHelper, source: str | None) -> int:
    try:
        overview = client.overview()
    except LLMOpsError as exc:
        print(f"llmops: error: {describe_error(exc, source)}", file=sys.stderr)
        return EXIT_ERROR
    width = shutil.get_terminal_size((120, 40)).columns
    for line in render(overview, width, None, url=client.url, color=_use_color(sys.stdout)):
        print(line)
    return 0


def _live(client: LLMOpsHelper, interval: float, source: str | None) -> int:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    poller = Poller(client, interval, wake_w, source)
    screen = Screen()
    try:
        with _terminal(sys.stdin.fileno(), sys.stdout, wake_w, screen):
            poller.start()
            return _loop(poller, client.url, interval, sys.stdin.fileno(), wake_r, screen)
    except KeyboardInterrupt:
        return 0
    finally:
        poller.stop()
        os.close(wake_r)  # a late poke then fails on the write end, which is still ours
        if poller.ident is not None:
            poller.join(timeout=0.5)
        if not poller.is_alive():  # else a fetch still hangs: the exit closes it
            os.close(wake_w)


@dataclass
class Screen:
    """Set when what is on the terminal is no longer the last frame (back from Ctrl-Z)."""

    dirty: bool = False


def _loop(poller: Poller, url: str, interval: float, in_fd: int, wake_r: int,
          screen: Screen) -> int:
    color = _use_color(sys.stdout)
    last = ""
    while True:
        snap = poller.snapshot()
        size = os.get_terminal_size(sys.stdout.fileno())
        # A terminal that never had its size set reports 0 x 0.
        lines = render(snap.overview, size.columns or 80, size.lines or 24, url=url,
                       status=status_of(snap, time.monotonic(), interval), color=color)
        # Home, each line then clear its rest, clear below: no flicker, no scrolling.
        frame = "\x1b[H" + "\x1b[K\r\n".join(lines) + "\x1b[K\x1b[J"
        if frame != last or screen.dirty:
            screen.dirty = False
            sys.stdout.write(frame)
            sys.stdout.flush()
            last = frame
        # Wake on a key, a new snapshot or a resize; else each second for the status's age.
        ready, _, _ = select.select([in_fd, wake_r], [], [], 1.0)
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        if in_fd in ready:
            keys = os.read(in_fd, 64)
            if not keys or any(k in keys for k in QUIT_KEYS):  # EOF: the terminal went away
                return 0


@contextlib.contextmanager
def _terminal(in_fd: int, out: TextIO, wake_fd: int, screen: Screen) -> Iterator[None]:
    """cbreak input, alternate screen, hidden cursor; a resize pokes ``wake_fd``; SIGTERM and
    SIGHUP end the loop like an error would, so everything is restored on the way out. Ctrl-Z
    gives the terminal back before stopping, and ``fg`` takes it again and redraws."""
    saved = termios.tcgetattr(in_fd)

    def enter() -> None:
        tty.setcbreak(in_fd, termios.TCSANOW)
        out.write(ENTER_SCREEN)
        out.flush()

    def leave() -> None:
        # The modes first: once the main screen shows, the shell's line editing is back too
        # (cbreak changed input modes only, so what is still being written is unaffected).
        with contextlib.suppress(termios.error):
            termios.tcsetattr(in_fd, termios.TCSANOW, saved)
        with contextlib.suppress(OSError):
            out.write(LEAVE_SCREEN)
            out.flush()

    def on_resize(signum: int, frame: FrameType | None) -> None:
        _poke(wake_fd)

    def on_stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def on_suspend(signum: int, frame: FrameType | None) -> None:
        leave()
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here until SIGCONT

    def on_continue(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTSTP, on_suspend)
        with contextlib.suppress(OSError, termios.error):
            enter()
        screen.dirty = True
        _poke(wake_fd)

    handlers = {signal.SIGWINCH: on_resize, signal.SIGTERM: on_stop, signal.SIGHUP: on_stop,
                signal.SIGTSTP: on_suspend, signal.SIGCONT: on_continue}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        enter()
        yield
    finally:
        leave()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
