"""``llmops demo`` as a user runs it: a real subprocess, watched through the URL and token it
prints. Unattended for 60 s it serves the dashboard, gets every replica ready, raises the
injected fault as an alert, scales up and back down, exits 0 and leaves no process behind; two
Ctrl-Cs kill everything at once (exit 130), also when the default ports are taken."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from llm_ops_helper.demo import DASHBOARD_PORT, DEPLOYMENT, GATEWAY_PORT

pytestmark = pytest.mark.slow

DASHBOARD = re.compile(r"dashboard\s+(http://127\.0\.0\.1:(\d+))/#token=(\S+)")
GATEWAY = re.compile(r"gateway\s+http://127\.0\.0\.1:(\d+)/v1")


@dataclass
class Run:
    """The demo process, its output as it arrives, and every process seen under it."""

    process: subprocess.Popen[str]
    workdir: Path
    lines: list[str] = field(default_factory=list)
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    cmdlines: dict[int, str] = field(default_factory=dict)

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float = 120.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.remember()
            found = pattern.search(self.output())
            if found:
                return found
            assert self.process.poll() is None, f"the demo exited early:\n{self.output()}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern.pattern!r} within {timeout_s} s:\n{self.output()}")

    def remember(self) -> None:
        found = in_workdir(self.workdir)  # replicas whose agent is already gone, too
        with contextlib.suppress(psutil.Error):
            found += psutil.Process(self.process.pid).children(recursive=True)
        for p in found:
            if p.pid not in self.seen:
                with contextlib.suppress(psutil.Error):
                    self.cmdlines[p.pid] = " ".join(p.cmdline())
                    self.seen[p.pid] = p

    def replicas(self) -> list[psutil.Process]:
        return [self.seen[pid] for pid, cmd in self.cmdlines.items()
                if "llamacpp_server" in cmd or "runtimes.simserver" in cmd]

    def survivors(self) -> list[str]:
        """What still runs, given 30 s to be reaped (killed is not yet gone)."""
        alive = [p for p in [*self.seen.values(), *in_workdir(self.workdir)] if _alive(p)]
        _, alive = psutil.wait_procs(alive, timeout=30)
        out = []
        for p in alive:
            with contextlib.suppress(psutil.Error):
                if _alive(p):
                    out.append(f"{p.pid} {' '.join(p.cmdline())}")
        return out


def _alive(p: psutil.Process) -> bool:
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def in_workdir(workdir: Path) -> list[psutil.Process]:
    """Processes whose command line points into the demo's fleet directory (agents, the
    controller, the gateway, Mosquitto and the replicas, whose model files live there)."""
    mark = str(workdir / "fleet") + "/"
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(mark in a for a in p.info["cmdline"] or ()):
            found.append(p)
    return found


@contextlib.contextmanager
def demo(workdir: Path, *args: str) -> Iterator[Run]:
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_ops_helper.cli", "demo", "--workdir", str(workdir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    run = Run(process, workdir)
    reader = threading.Thread(target=run.read, daemon=True)
    reader.start()
    try:
        yield run
    finally:
        # Whatever happened (a failed assert, a demo that left processes): leave nothing behind.
        if process.poll() is None:
            process.kill()
            process.wait()
        for p in [*run.seen.values(), *in_workdir(workdir)]:
            if _alive(p):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        reader.join(timeout=10)


def get(url: str, token: str) -> tuple[int, str, Any]:
    """Status, content type and body (JSON decoded where it is JSON) of a GET."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            kind = response.headers.get("Content-Type", "")
            body = response.read()
            return response.status, kind, json.loads(body) if "json" in kind else body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), None


def test_demo_runs_unattended_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # Any free ports: a demo someone runs meanwhile keeps its own.
    with demo(tmp_path / "demo", "--duration", "60", "--port", "0",
              "--gateway-port", "0") as run:
        url, _, token = run.wait_for(DASHBOARD).groups()
        pages: list[tuple[int, str]] = []
        all_ready: list[int] = []
        alerts: list[dict[str, Any]] = []
        decisions: list[dict[str, Any]] = []
        while run.process.poll() is None:
            run.remember()
            # The controller busy or stopping under the poll: ask again.
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                status, kind, _ = get(url + "/", token)
                pages.append((status, kind))
                status, _, body = get(f"{url}/api/v1/deployments/{DEPLOYMENT}", token)
                if status == 200:
                    replicas = body["replicas"]
                    if replicas and all(r["state"] == "ready" for r in replicas) \
                            and body["ready"] == body["desired"]:
                        all_ready.append(body["ready"])
                status, _, body = get(url + "/api/v1/alerts", token)
                if status == 200:
                    alerts += body["alerts"]
                status, _, body = get(
                    f"{url}/api/v1/deployments/{DEPLOYMENT}/decisions?limit=10000", token)
                if status == 200:
                    decisions = body["decisions"]
            time.sleep(0.5)
        code = run.process.wait()
        output = run.output()
    assert code == 0, output
    assert any(s == 200 and kind.startswith("text/html") for s, kind in pages), \
        (pages[-3:], output)
    assert all_ready and max(all_ready) >= 2, (all_ready, output)
    fault = [a for a in alerts if a["rule"] == "gpu_xid" and a["host"] == "demo-gpu-03"]
    assert fault and fault[0]["state"] == "firing" and fault[0]["severity"] == "critical"
    applied = [d for d in decisions if d["applied"]]
    assert any(d["desired"] > d["current"] for d in applied), (decisions[:5], output)
    assert any(d["desired"] < d["current"] for d in applied), (decisions[:5], output)
    assert "scaled up" in output and "scaled down" in output and "fault injected" in output
    assert "outlived the stop" not in output, output  # the orderly stop stopped everything
    assert len(run.replicas()) >= 2, run.cmdlines  # replicas were among what was watched
    assert run.survivors() == [], output


def _occupy(port: int) -> socket.socket | None:
    """A listening socket on ``port``; None if something else holds it already."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


def test_second_ctrl_c_kills_everything_at_once_and_taken_ports_are_avoided(
        tmp_path: Path) -> None:
    held = [s for s in (_occupy(DASHBOARD_PORT), _occupy(GATEWAY_PORT)) if s is not None]
    try:
        with demo(tmp_path / "demo") as run:
            dashboard = run.wait_for(DASHBOARD)
            gateway = run.wait_for(GATEWAY)
            assert int(dashboard.group(2)) != DASHBOARD_PORT
            assert int(gateway.group(1)) != GATEWAY_PORT
            run.wait_for(re.compile(r"replicas\s+1/1 ready"))
            run.remember()
            replicas = run.replicas()
            assert replicas, run.cmdlines
            # A shutdown that hangs (the gateway does not answer SIGTERM while stopped) is what
            # the second Ctrl-C is for.
            (stuck,) = [run.seen[pid] for pid, cmd in run.cmdlines.items()
                        if "llm_ops_helper.controller.gateway" in cmd]
            stuck.suspend()
            run.process.send_signal(signal.SIGINT)
            run.wait_for(re.compile(r"Ctrl-C again"))
            run.process.send_signal(signal.SIGINT)
            code = run.process.wait(timeout=60)
            assert code == 130, run.output()
            assert "killed" in run.output()
            assert run.survivors() == [], run.output()
    finally:
        for sock in held:
            sock.close()
    assert not [p for p in replicas if _alive(p)]
