"""``llmops top``: the renderer on a fixed overview, then the real command on a pseudo-terminal
against a real fleet (Mosquitto, the controller, two agents with simulated GPUs and a ``sim``
deployment), with ``--once``, a rejected token and an unreachable controller."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.broker import BrokerUnavailable, free_port
from llm_ops_helper.cli import main
from llm_ops_helper.client import ApiError, ControllerUnreachable, LLMOpsHelper
from llm_ops_helper.localfleet import LocalFleet
from llm_ops_helper.top import LEAVE_SCREEN, Snapshot, describe_error, status_of, token_source
from llm_ops_helper.topview import Status, render

TS = 1_700_000_000.0
OVERVIEW: dict[str, Any] = {
    "ts": TS,
    "hosts": [
        {"host": "gpu-01", "online": True, "offline_reason": None, "last_ts": TS - 0.4,
         "agent_version": "0.1.0", "cpu_pct": 12.5, "memory_used_pct": 41.0, "alerts": 2,
         "gpus": [
             {"index": 0, "name": "NVIDIA A10G", "uuid": "GPU-a", "healthy": True,
              "util_pct": 53.0, "memory_used_bytes": 10 << 30, "memory_total_bytes": 24 << 30,
              "temperature_c": 61.0, "power_w": 150.2, "health": "ok"},
             {"index": 1, "name": "NVIDIA A10G", "uuid": "GPU-b", "healthy": False,
              "util_pct": 97.0, "memory_used_bytes": 23 << 30, "memory_total_bytes": 24 << 30,
              "temperature_c": 91.0, "power_w": 299.0, "health": "critical"}]},
        {"host": "gpu-02", "online": False, "offline_reason": "lwt", "last_ts": TS - 125,
         "agent_version": None, "cpu_pct": None, "memory_used_pct": None, "alerts": 0,
         "gpus": [{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-c",
                   "healthy": True, "util_pct": None, "memory_used_bytes": None,
                   "memory_total_bytes": None, "temperature_c": None, "power_w": None,
                   "health": "warning"}]},
    ],
    "deployments": [
        {"name": "chat", "model": "chat", "version": 2, "runtime": "sim",
         "replicas_desired": 2, "replicas_ready": 1, "phase": "progressing",
         "autoscale_mode": "off",
         "replicas": [
             {"name": "chat-r1", "host": "gpu-01", "state": "ready", "reason": None,
              "version": 2, "gpus": [0], "url": "http://127.0.0.1:5000"},
             {"name": "chat-r2", "host": None, "state": "pending", "reason": "no GPU fits",
              "version": 2, "gpus": [], "url": None}]}],
    "alerts": [
        {"id": "a1", "rule": "gpu_temperature_high", "severity": "warning", "host": "gpu-01",
         "gpu": 1, "replica": None, "summary": "GPU 1 at 91 C for 60 s", "started_at": TS - 75},
        {"id": "a2", "rule": "gpu_unhealthy", "severity": "critical", "host": "gpu-01", "gpu": 1,
         "replica": None, "summary": "XID 79\x1b[2J fell off the bus", "started_at": TS - 5},
    ],
}
SGR = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def line_with(lines: list[str], text: str) -> str:
    found = [line for line in lines if text in line]
    assert found, f"no line with {text!r} in:\n" + "\n".join(lines)
    return found[0]


# -- the renderer ----------------------------------------------------------------------------

def test_render_shows_totals_hosts_gpus_replicas_and_alerts() -> None:
    lines = render(OVERVIEW, 140, None, url="http://ctl:8470", status=Status("updated 0.2 s ago"))
    assert lines[0].startswith("llmops top  http://ctl:8470")
    assert lines[0].endswith(time.strftime("%H:%M:%S", time.localtime(TS)))
    assert len(lines[0]) == 140  # the clock sits at the right edge
    assert "hosts 1/2 online" in lines[1] and "GPUs 3 (1 warning, 1 critical)" in lines[1]
    assert "replicas 1/2 ready in 1 deployment" in lines[1] and "alerts 2 firing" in lines[1]
    assert lines[2] == "updated 0.2 s ago"
    assert line_with(lines, "gpu-01  online").split()[2:6] == ["12%", "41%", "2", "2"]
    assert "offline (lwt)" in line_with(lines, "gpu-02  ")
    assert "2m05s" in line_with(lines, "gpu-02  ")
    busy = line_with(lines, "gpu-01:1")
    assert "A10G" in busy and "97%" in busy and "23.0/24.0G" in busy
    assert "91C" in busy and "299W" in busy and busy.endswith("critical")
    assert busy.count("|") > line_with(lines, "gpu-01:0").count("|")  # fuller bars
    assert line_with(lines, "gpu-02:0").endswith("warning")
    deployment = line_with(lines, "chat ")
    assert "progressing" in deployment and "v2" in deployment and "1/2 ready" in deployment
    assert line_with(lines, "chat-r1").split()[:5] == ["chat-r1", "gpu-01", "0", "ready", "v2"]
    assert "no GPU fits" in line_with(lines, "chat-r2")
    # Critical alerts first; the controller's text cannot smuggle escapes onto the screen.
    alerts = [line for line in lines if "gpu_" in line and "gpu-01:1" in line]
    assert [a.split()[:3] for a in alerts] == [["gpu_unhealthy", "critical", "gpu-01:1"],
                                               ["gpu_temperature_high", "warning", "gpu-01:1"]]
    assert "XID 79?[2J fell off the bus" in alerts[0]
    assert not any("\x1b" in line for line in lines)


def test_render_replaces_c1_controls_too() -> None:
    # U+009B is a one-character CSI on terminals that take C1 controls.
    alert = {**OVERVIEW["alerts"][0], "summary": "XID 79\u009b2J\u0085 gone\u00a0ok"}
    lines = render({**OVERVIEW, "alerts": [alert]}, 160, 40)
    assert "XID 79?2J? gone\u00a0ok" in line_with(lines, "gpu_temperature_high")


def test_render_fits_the_terminal() -> None:
    for width, height in ((80, 24), (60, 12), (200, 9), (30, 5)):
        lines = render(OVERVIEW, width, height, status=Status("x" * 300))
        assert len(lines) <= height
        assert all(len(line) <= width for line in lines), (width, lines)
    lines = render(OVERVIEW, 100, 14)
    # Too short for every row: each table keeps at least one and says what it hides.
    assert len(lines) == 14 and any("more (enlarge the terminal)" in line for line in lines)
    for header in ("HOST ", "GPU ", "DEPLOYMENT ", "ALERT "):
        line_with(lines, header)


def test_render_colours_only_when_asked() -> None:
    plain = render(OVERVIEW, 120, 40)
    painted = render(OVERVIEW, 120, 40, color=True)
    assert [SGR.sub("", line).rstrip() for line in painted] == plain
    critical = line_with(painted, "gpu-01:1")
    assert "\x1b[1;31mcritical\x1b[0m" in critical and "\x1b[1;31m 91C\x1b[0m" in critical
    assert "\x1b[32mok\x1b[0m" in line_with(painted, "gpu-01:0")
    assert "\x1b[32monline " in line_with(painted, "online ")
    assert "\x1b[1;31moffline (lwt)" in line_with(painted, "offline")


def test_render_before_data_and_for_an_empty_fleet() -> None:
    assert render(None, 80, 24, url="http://x", status=Status("connecting...")) == [
        "llmops top  http://x", "connecting..."]
    lines = render({"ts": TS, "hosts": [], "deployments": [], "alerts": []}, 80, 24)
    assert "hosts 0/0 online" in lines[1]
    line_with(lines, "no hosts have reported yet")
    line_with(lines, "no deployments")
    assert not any(line.startswith("ALERT") for line in lines)


def test_errors_name_the_token_source(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LLMOPS_TOKEN", "LLMOPS_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert token_source(None) is None
    assert "no API token given" in describe_error(ApiError(401, "missing token"), None)
    monkeypatch.setenv("LLMOPS_TOKEN_FILE", "/etc/llmops/token")
    assert token_source(None) == "$LLMOPS_TOKEN_FILE (/etc/llmops/token)"
    monkeypatch.setenv("LLMOPS_TOKEN", "llmops_x")
    assert token_source(None) == "$LLMOPS_TOKEN"
    assert token_source("llmops_y") == "--token"
    assert describe_error(ApiError(401, "unknown token"), "--token") == (
        "HTTP 401: the controller rejected the token from --token: unknown token")
    assert "viewer role" in describe_error(ApiError(403, "forbidden"), "$LLMOPS_TOKEN")
    assert describe_error(ControllerUnreachable("http://h:1", "Connection refused"), None) == (
        "controller unreachable at http://h:1: Connection refused")


def test_status_line() -> None:
    assert status_of(Snapshot(), 10.0, 1.0).level == "warn"
    fresh = status_of(Snapshot({"hosts": []}, 9.5, None, 0), 10.0, 1.0)
    assert fresh.text.startswith("updated 0.5 s ago, refreshing every 1 s")
    failing = status_of(Snapshot({"hosts": []}, 4.0, "controller unreachable", 7), 10.0, 2.0)
    assert failing.level == "crit"
    assert failing.text.startswith(
        "controller unreachable -- 7 failed tries, retrying every 2 s; data 6 s old")


# -- the command on a pseudo-terminal --------------------------------------------------------

# The child makes the pty its controlling terminal (as a login shell would), so that a window
# size change reaches it as SIGWINCH and Ctrl-C as SIGINT, then becomes `llmops`.
_AS_TERMINAL_SESSION = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                        "os.execv(sys.executable, [sys.executable, '-m', 'llm_ops_helper.cli', "
                        "*sys.argv[1:]])")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LLMOPS_") and k not in ("NO_COLOR", "COLUMNS", "LINES")}
    return {**env, "TERM": "xterm-256color", **extra}


class Terminal:
    """``llmops ARGS`` on a pseudo-terminal of ``rows`` x ``cols``, its screen output kept."""

    def __init__(self, args: list[str], rows: int, cols: int, **env: str) -> None:
        self.master, self.slave = os.openpty()
        self.resize(rows, cols)
        self.before = termios.tcgetattr(self.slave)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _AS_TERMINAL_SESSION, *args], stdin=self.slave,
            stdout=self.slave, stderr=self.slave, start_new_session=True, env=_env(**env))
        self.raw = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace")

    def frames(self) -> list[list[str]]:
        """Every complete frame drawn so far, as plain lines (home ... clear-to-end)."""
        out = []
        for chunk in self.text.split("\x1b[H")[1:]:
            if chunk.endswith("\x1b[K\x1b[J") or "\x1b[K\x1b[J\x1b[" in chunk:
                body = chunk[:chunk.index("\x1b[K\x1b[J")]
                out.append([SGR.sub("", line).rstrip("\r") for line in body.split("\n")])
        return out

    def wait_for(self, what: str, found: Callable[[Terminal], bool],
                 timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not found(self):
            if time.monotonic() > deadline or self.process.poll() is not None:
                last = self.frames()[-1:] or [[self.text[-2000:]]]
                raise AssertionError(f"never saw {what} (exit {self.process.poll()}); "
                                     "last frame:\n" + "\n".join(last[0]))
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                self.raw += os.read(self.master, 1 << 16)

    def finish(self, timeout_s: float = 10.0) -> int:
        code = self.process.wait(timeout_s)
        while select.select([self.master], [], [], 0)[0]:  # what it wrote before exiting
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:
                break
            if not data:
                break
            self.raw += data
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminals() -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def start(args: list[str], rows: int = 40, cols: int = 120, **env: str) -> Terminal:
        opened.append(Terminal(args, rows, cols, **env))
        return opened[-1]

    yield start
    for terminal in opened:
        terminal.close()


def assert_restored(terminal: Terminal) -> None:
    assert terminal.text.rstrip().endswith(LEAVE_SCREEN), repr(terminal.text[-200:])
    lflag = termios.tcgetattr(terminal.slave)[3]
    assert lflag & (termios.ECHO | termios.ICANON) == termios.ECHO | termios.ICANON
    assert lflag == terminal.before[3]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    workdir = tmp_path_factory.mktemp("top")
    local = LocalFleet(workdir / "fleet", agents_count=2, gpus_per_agent=2, interval_s=0.5)
    try:
        asyncio.run(local.start())
    except BrokerUnavailable as exc:
        asyncio.run(local.stop())
        pytest.fail(f"this test needs a real Mosquitto (apt-get install -y mosquitto): {exc}")
    except BaseException:
        asyncio.run(local.stop())
        raise
    try:
        helper = LLMOpsHelper(local.url, token=local.token, poll_interval=0.2)
        card = write_model_card(workdir / "top-sim.toml", startup_s=0.2)
        helper.deploy_model(str(card), name="top-sim", replicas=2, gpu_memory_bytes=2 << 30,
                            timeout=120)
        yield local
    finally:
        asyncio.run(local.stop())


def replica_names(fleet: LocalFleet) -> list[str]:
    deployment = LLMOpsHelper(fleet.url, token=fleet.token).status("top-sim")
    return sorted(r.name for r in deployment.replicas)


def test_top_live_on_a_pty(fleet: LocalFleet, terminals: Callable[..., Terminal]) -> None:
    names = replica_names(fleet)
    top = terminals(["top", "--url", fleet.url, "--token", fleet.token, "--interval", "0.5"],
                     rows=40, cols=120)

    wanted = ("gpu-01  online", "gpu-02  online", "gpu-01:0", "gpu-01:1", "gpu-02:1", "top-sim",
              *names)

    def shows_fleet(frame: list[str]) -> bool:
        return all(any(w in line for line in frame) for w in wanted)

    top.wait_for("hosts, GPUs and replicas", lambda t: any(map(shows_fleet, t.frames())))
    first = next(f for f in top.frames() if shows_fleet(f))
    assert "\x1b[?1049h" in top.text and "\x1b[?25l" in top.text  # alternate screen, no cursor
    assert "\x1b[32m" in top.text  # colours on a terminal
    top.wait_for("a later frame with another clock", lambda t: any(
        f[0] != first[0] and shows_fleet(f) for f in t.frames()))
    for frame in top.frames():
        assert len(frame) <= 40 and all(len(line) <= 120 for line in frame)

    top.resize(16, 70)
    top.wait_for("a frame redrawn for 70 x 16",
                 lambda t: len(t.frames()[-1][0]) == 70)
    newest = top.frames()[-1]
    assert len(newest) <= 16 and all(len(line) <= 70 for line in newest)

    top.send(b"q")
    assert top.finish() == 0
    assert_restored(top)


def test_ctrl_z_gives_the_terminal_back_and_fg_redraws(
        fleet: LocalFleet, terminals: Callable[..., Terminal]) -> None:
    top = terminals(["top", "--url", fleet.url, "--token", fleet.token, "--interval", "0.5"])
    top.wait_for("a first frame", lambda t: any("top-sim" in " ".join(f) for f in t.frames()))
    top.send(b"\x1a")  # Ctrl-Z: SIGTSTP from the terminal
    top.wait_for("the main screen back", lambda t: t.text.rstrip().endswith(LEAVE_SCREEN))
    cooked = termios.ECHO | termios.ICANON
    assert termios.tcgetattr(top.slave)[3] & cooked == cooked  # restored before the screen
    # Its process group has no parent in the session (orphaned), so the kernel does not stop
    # it; SIGCONT is what `fg` sends.
    mark = len(top.raw)
    top.process.send_signal(signal.SIGCONT)
    top.wait_for("the screen taken again and redrawn",
                 lambda t: b"\x1b[?1049h" in t.raw[mark:] and b"\x1b[K\x1b[J" in t.raw[mark:])
    assert not termios.tcgetattr(top.slave)[3] & termios.ICANON  # cbreak again
    top.send(b"q")
    assert top.finish() == 0
    assert_restored(top)


def test_top_once(fleet: LocalFleet) -> None:
    done = subprocess.run([sys.executable, "-m", "llm_ops_helper.cli", "top", "--once",
                           "--url", fleet.url, "--token", fleet.token],
                          capture_output=True, text=True, timeout=60, env=_env(COLUMNS="150"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"llmops top  {fleet.url}") and len(lines[0]) == 150
    assert "hosts 2/2 online" in lines[1] and "GPUs 4" in lines[1]
    for text in ("gpu-01:0", "gpu-01:1", "gpu-02:0", "gpu-02:1", "top-sim", *replica_names(fleet)):
        line_with(lines, text)
    assert "\x1b" not in done.stdout  # no colours into a pipe


def test_top_says_which_token_was_rejected(fleet: LocalFleet,
                                           terminals: Callable[..., Terminal]) -> None:
    done = subprocess.run([sys.executable, "-m", "llm_ops_helper.cli", "top", "--once",
                           "--url", fleet.url, "--token", "llmops_wrong"],
                          capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 1
    assert "HTTP 401: the controller rejected the token from --token" in done.stderr

    top = terminals(["top", "--url", fleet.url], LLMOPS_TOKEN="llmops_wrong")
    top.wait_for("the 401 in the status line", lambda t: any(
        any("HTTP 401" in line and "$LLMOPS_TOKEN" in line and "retrying" in line for line in f)
        for f in t.frames()))
    top.send(b"q")
    assert top.finish() == 0
    assert_restored(top)


def test_top_with_no_controller(tmp_path: Path, terminals: Callable[..., Terminal]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "llm_ops_helper.cli", "top", "--once",
                           "--url", url, "--token", "llmops_x"],
                          capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 1 and done.stdout == ""
    assert f"llmops: error: controller unreachable at {url}" in done.stderr

    top = terminals(["top", "--url", url, "--token", "llmops_x", "--interval", "0.2"])
    top.wait_for("the outage in the status line, and retries", lambda t: any(
        f"controller unreachable at {url}" in line and "3 failed tries" in line
        for f in t.frames() for line in f))
    top.send(b"\x03")  # Ctrl-C quits as q does
    assert top.finish() == 0
    assert_restored(top)


def test_top_refuses_a_bad_interval(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--interval", "0", "--url", "http://127.0.0.1:9"]) == 1
    assert "--interval must be more than 0 s" in capsys.readouterr().err


def test_top_needs_a_terminal_without_once() -> None:
    done = subprocess.run([sys.executable, "-m", "llm_ops_helper.cli", "top", "--url",
                           "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=_env())
    assert done.returncode == 1 and "--once" in done.stderr
