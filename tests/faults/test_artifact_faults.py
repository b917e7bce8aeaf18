"""Artifacts under faults: an upload killed half-way, a download cut off, a disk that fills up.

Real parts throughout: Mosquitto, the controller and an agent as processes (:class:`LocalFleet`),
the ``llmops`` CLI as a process, a TCP proxy run by the test between a client and the controller
(it throttles uploads so that a kill lands mid-stream, and cuts a download after N bytes), and a
real tmpfs mounted for the agent's artifact cache so that the kernel itself answers ENOSPC.

What the tests hold the product to (figures printed with ``-s``):

- an upload whose client is SIGKILLed mid-stream, or whose connection closes half-way through
  the body, leaves no version (API and SQLite) and no blob or temp file; a retry then succeeds;
- a download cut off resumes with a Range request from the byte where it stopped, completes
  with the right sha256, and fetches no byte twice: the agent's fetch through a proxy that
  drops the connection, the agent's fetch while the controller is SIGKILLed and restarted
  (systemd's RestartSec later), and ``llmops models pull`` run again after a cut;
- a disk that fills up during a download fails the replica with a reason naming ENOSPC, the
  path and the sizes; the partial file goes; the agent keeps publishing telemetry and serves
  the next deployment once space is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_ops_helper.client import LLMOpsHelper
from llm_ops_helper.localfleet import LocalFleet
from tests.faults.fleetwatch import log_events, until

INTERVAL_S = 0.5
# systemd/llmops-controller.service: Restart=on-failure, RestartSec=2.
RESTART_SEC = 2.0
MiB = 1 << 20


# -- a proxy between a client and the controller ---------------------------------------------

@dataclass
class Conn:
    """One proxied connection: the request head as sent, the bytes each way."""

    request: bytes = b""
    up_bytes: int = 0
    down_bytes: int = 0
    down_head: int = 0  # length of the response head (status line and headers)
    status_line: str = ""
    cut: bool = False

    @property
    def request_line(self) -> str:
        return self.request.split(b"\r\n", 1)[0].decode(errors="replace")

    def header(self, name: str) -> str | None:
        for line in self.request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
            key, _, value = line.decode(errors="replace").partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    @property
    def body_down(self) -> int:
        return self.down_bytes - self.down_head


@dataclass
class Proxy:
    """A TCP proxy to ``127.0.0.1:target_port()``. ``upload_bytes_per_s`` and
    ``download_bytes_per_s`` throttle each way; ``cut_after`` closes the first connection whose request line contains
    ``cut_match`` once that many response bytes went through (a graceful close: every byte
    forwarded reaches the client)."""

    target_port: Callable[[], int]
    upload_bytes_per_s: float | None = None
    download_bytes_per_s: float | None = None
    cut_after: int | None = None
    cut_match: bytes = b"/api/v1/artifacts/"
    port: int = 0
    conns: list[Conn] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Conn()
        self.conns.append(conn)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port())
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        pumps = [asyncio.ensure_future(self._up(conn, reader, up_writer)),
                 asyncio.ensure_future(self._down(conn, up_reader, writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
            self._tasks.discard(task)

    async def _up(self, conn: Conn, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(64 * 1024):
            if len(conn.request) < 16 * 1024:
                conn.request += data[:16 * 1024]
            conn.up_bytes += len(data)
            writer.write(data)
            await writer.drain()
            if self.upload_bytes_per_s:
                await asyncio.sleep(len(data) / self.upload_bytes_per_s)

    async def _down(self, conn: Conn, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        cutting = False
        head = b""
        while data := await reader.read(64 * 1024):
            if not conn.down_head:
                head += data
                if (end := head.find(b"\r\n\r\n")) >= 0:
                    conn.down_head = end + 4
                    conn.status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
            limit = self.cut_after
            if limit is not None and not cutting and self.cut_match in conn.request \
                    and not any(c.cut for c in self.conns):
                cutting = conn.cut = True
            if cutting and limit is not None:
                data = data[:max(0, limit - conn.down_bytes)]
            conn.down_bytes += len(data)
            writer.write(data)
            await writer.drain()
            if cutting and limit is not None and conn.down_bytes >= limit:
                return
            if self.download_bytes_per_s:
                await asyncio.sleep(len(data) / self.download_bytes_per_s)


# -- helpers ---------------------------------------------------------------------------------

def big_card(path: Path, size: int, startup_s: float = 0.2) -> tuple[Path, str]:
    """A simulator model card padded to ``size`` bytes with random comment lines (random, so
    that a wrong byte anywhere changes the sha256); the file and its sha256."""
    head = f"[sim]\nstartup_s = {startup_s}\n".encode()
    lines = [b"# " + os.urandom(31).hex().encode() + b"\n"
             for _ in range((size - len(head)) // 65)]
    body = head + b"".join(lines)
    body += b"#" * (size - len(body) - 1) + b"\n"
    assert len(body) == size
    path.write_bytes(body)
    return path, hashlib.sha256(body).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def registry_rows(fleet: LocalFleet, model: str) -> int:
    """Versions of ``model`` in the controller's SQLite file, read directly (read-only)."""
    db = fleet.workdir / "controller-state" / "controller.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM registry_versions WHERE model = ?",
                                (model,)).fetchone()
    return int(count)


def blob_files(fleet: LocalFleet) -> list[Path]:
    """Every file under the controller's blob directory, temp files included."""
    root = fleet.workdir / "controller-state" / "blobs"
    return sorted(p for p in root.rglob("*") if p.is_file())


def telemetry_seq(fleet: LocalFleet, host: str) -> int:
    return int(fleet.get(f"/api/v1/hosts/{host}")["telemetry"]["seq"])


def cli(fleet: LocalFleet, url: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LLMOPS_URL": url, "LLMOPS_TOKEN": fleet.token}
    return subprocess.Popen([sys.executable, "-m", "llm_ops_helper.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def half_upload(port: int, token: str, model: str, body: bytes) -> None:
    """POST a version announcing len(body) bytes, send half of them, close the socket. No
    sha256 in the query: nothing but the length tells the controller that bytes are missing."""
    head = (f"POST /api/v1/models/{model}/versions?runtime=sim&filename=card.toml HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + body[:len(body) // 2])
        time.sleep(0.5)  # the controller is reading the body when the connection goes


def model_versions(helper: LLMOpsHelper, model: str) -> list[Any]:
    return [m for m in helper.list_models() if m.name == model]


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Any:
    """A real tmpfs of ``size`` at ``path`` (root needed), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mount, umount = shutil.which("mount"), shutil.which("umount")
    assert mount and umount, "mount/umount missing: apt-get install mount"
    done = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, (f"cannot mount a tmpfs at {path} (the disk-full test needs "
                                  f"root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run([umount, str(path)], capture_output=True).returncode != 0:
            subprocess.run([umount, "-l", str(path)], capture_output=True)


# -- the tests -------------------------------------------------------------------------------

async def test_an_upload_killed_half_way_leaves_no_version_and_no_blob_and_a_retry_succeeds(
        tmp_path: Path) -> None:
    """``llmops models push`` of a 16 MiB file, SIGKILLed once about 40 % of the body has gone
    through a throttling proxy, and a raw client that sends half of a body (no sha256 to check
    it against) then closes its socket: each leaves no version (API and SQLite) and no blob or
    temp file in the controller's blob directory; a retry of the push then registers version 1
    with the right sha256 and the blob on disk has exactly those bytes."""
    size = 16 * MiB
    model = "half-upload"
    card, sha = big_card(tmp_path / "card.toml", size)
    fleet = LocalFleet(tmp_path / "fleet", agents_count=0, interval_s=INTERVAL_S)
    proxy = Proxy(lambda: fleet.http_port, upload_bytes_per_s=4 * MiB)
    await proxy.start()
    push: subprocess.Popen[bytes] | None = None
    try:
        async with fleet:
            helper = LLMOpsHelper(fleet.url, token=fleet.token)
            push = cli(fleet, proxy.url, "models", "push", str(card), "--name", model,
                       "--runtime", "sim")
            upload = await until(lambda: next((c for c in proxy.conns if c.up_bytes >= 0.4 * size
                                               and b"POST" in c.request), None),
                                 60, "40 % of the upload through the proxy")
            push.send_signal(signal.SIGKILL)
            push.wait(10)
            sent_at_kill = upload.up_bytes
            assert sent_at_kill < size, "the upload finished before the kill"
            # The controller drops the cut upload: its temp file goes, no row, no blob.
            await until(lambda: not blob_files(fleet), 30, "the upload's temp file removed")
            assert registry_rows(fleet, model) == 0
            assert model_versions(helper, model) == []

            # A client that closes its socket half-way through the body, with no sha256.
            await asyncio.to_thread(half_upload, fleet.http_port, fleet.token, model,
                                    card.read_bytes())
            await until(lambda: not blob_files(fleet), 30, "the half body's temp file removed")
            await asyncio.sleep(1.0)  # a late registration would show up here
            assert registry_rows(fleet, model) == 0, "a truncated body became a version"
            assert model_versions(helper, model) == []
            assert not blob_files(fleet)
            controller_log = fleet.controller.log() if fleet.controller else ""

            retry = await asyncio.to_thread(lambda: cli(
                fleet, fleet.url, "--json", "models", "push", str(card), "--name", model,
                "--runtime", "sim").communicate(timeout=120))
            version = helper.get_version(model, 1)
            assert version.artifact is not None and version.artifact.sha256 == sha, retry
            assert version.artifact.size_bytes == size
            blobs = blob_files(fleet)
            assert [b.name for b in blobs] == [sha]
            assert sha256_file(blobs[0]) == sha
            assert registry_rows(fleet, model) == 1
            failed = log_events(fleet.workdir / "controller.log", "model_upload_failed")
            print(f"\nupload killed at {sent_at_kill} of {size} bytes "
                  f"({100 * sent_at_kill / size:.0f} %); uploads failed on the controller: "
                  f"{len(failed)} ({[f.get('reason') for f in failed]}); "
                  f"versions after the cuts: 0; retry: version 1, sha256 ok")
            assert len(failed) == 2, controller_log[-3000:]
    finally:
        if push is not None and push.poll() is None:
            push.kill()
            push.wait(10)
        await proxy.close()


async def test_a_cut_download_resumes_with_a_range_request_and_fetches_no_byte_twice(
        tmp_path: Path) -> None:
    """An agent fetching a 16 MiB artifact through a proxy that closes the connection after
    6 MiB: the agent asks again with ``Range: bytes=K-`` where K is exactly the body bytes it
    had received, gets the rest, verifies the sha256 and serves the replica; the bytes fetched
    in all equal the artifact's size (nothing fetched twice)."""
    size = 16 * MiB
    card, sha = big_card(tmp_path / "card.toml", size)
    proxy = Proxy(lambda: fleet.http_port, cut_after=6 * MiB)
    await proxy.start()
    fleet = LocalFleet(tmp_path / "fleet", agents_count=1, interval_s=INTERVAL_S,
                       controller_overrides={"http": {"advertise_url": proxy.url}})
    try:
        async with fleet:
            helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
            deployment = await asyncio.to_thread(
                helper.deploy_model, str(card), name="cut-download", runtime="sim",
                replicas=1, gpu_memory_bytes=4 << 30, timeout=120)
            assert deployment.ready == 1
            gets = [c for c in proxy.conns if b"/api/v1/artifacts/" + sha.encode() in c.request]
            assert len(gets) == 2, [c.request_line for c in gets]
            first, second = gets
            assert first.cut and first.header("Range") is None
            received = first.body_down
            assert 0 < received < size
            assert second.header("Range") == f"bytes={received}-"
            assert second.down_bytes > second.down_head
            assert second.status_line.startswith("HTTP/1.1 206"), second.status_line
            fetched = first.body_down + second.body_down
            assert fetched == size, f"{fetched} bytes fetched for a {size}-byte artifact"
            agent = fleet.agents[0]
            blob = agent.state_dir / "artifacts" / "blobs" / f"{sha}.toml"
            assert sha256_file(blob) == sha
            done = log_events(agent.daemon.log_path, "artifact_fetched")
            assert [e["resumed_from"] for e in done] == [received]
            assert not list((agent.state_dir / "artifacts" / "partial").iterdir())
            print(f"\ndownload cut at {received} of {size} bytes; resumed with Range "
                  f"bytes={received}-; fetched {fetched} bytes in all, re-fetched "
                  f"{fetched - size}; sha256 ok")
    finally:
        await proxy.close()


async def test_a_disk_full_during_a_download_fails_the_replica_clearly_and_the_agent_carries_on(
        tmp_path: Path) -> None:
    """The agent's artifact cache on a 12 MiB tmpfs holding an 8 MiB file: fetching a 6 MiB
    artifact hits ENOSPC. The replica fails with a reason naming ENOSPC, the partial's path,
    the artifact's size and the bytes written and free; no partial and no blob stays; the agent
    keeps running and publishing telemetry; once the 8 MiB file is gone the next deployment of
    the same artifact fetches it (right sha256) and becomes ready."""
    size = 6 * MiB
    card, sha = big_card(tmp_path / "card.toml", size)
    cache = tmp_path / "cache"
    with tmpfs(cache, "12m"):
        filler = cache / "filler"
        filler.write_bytes(b"\0" * (8 * MiB))
        fleet = LocalFleet(tmp_path / "fleet", agents_count=1, interval_s=INTERVAL_S,
                           agent_overrides={"supervisor": {"cache_dir": str(cache)}})
        async with fleet:
            agent = fleet.agents[0]
            helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
            pushed = await asyncio.to_thread(helper.push_model, str(card), "full-disk",
                                             runtime="sim")
            await asyncio.to_thread(helper.deploy_model, pushed.ref, name="full-disk",
                                    runtime="sim", replicas=1, gpu_memory_bytes=4 << 30,
                                    wait=False)

            def failed_reason() -> str | None:
                """The failed replica's reason, as the deployment shows it while the replica
                is there, or as its revision keeps it once the controller has acted on it."""
                state = helper.status("full-disk")
                texts = [r.reason for r in state.replicas if r.state == "failed" and r.reason]
                history = fleet.get("/api/v1/deployments/full-disk/history")
                texts += [str(r["failed"]) for r in history.get("revisions", []) if r.get("failed")]
                return next(iter(texts), None)

            reason: str = await until(failed_reason, 90, "the replica failed")
            print(f"\nreplica failed: {reason}")
            part = cache / "partial" / f"{sha}.part"
            assert "ENOSPC" in reason and "No space left on device" in reason, reason
            assert str(part) in reason, reason
            assert f"{size} bytes" in reason and "bytes free" in reason, reason
            assert not part.exists() and not list((cache / "partial").iterdir())
            assert not list((cache / "blobs").iterdir())

            # The agent carries on: alive, still publishing telemetry.
            assert agent.daemon.running
            seq = await asyncio.to_thread(telemetry_seq, fleet, agent.host)
            await until(lambda: telemetry_seq(fleet, agent.host) >= seq + 3, 30,
                        "three more telemetry snapshots")
            assert agent.daemon.running

            # Space freed: the next deployment of the same artifact works.
            await asyncio.to_thread(helper.delete_deployment, "full-disk")
            await until(lambda: not [d for d in helper.status() if d.name == "full-disk"], 60,
                        "the failed deployment gone")
            filler.unlink()
            deployment = await asyncio.to_thread(
                helper.deploy_model, pushed.ref, name="after-full-disk", runtime="sim",
                replicas=1, gpu_memory_bytes=4 << 30, timeout=120)
            assert deployment.ready == 1
            assert sha256_file(cache / "blobs" / f"{sha}.toml") == sha
            assert agent.daemon.running
            print(f"after freeing space: deployed, sha256 ok; telemetry seq {seq} -> "
                  f"{telemetry_seq(fleet, agent.host)}")


async def test_a_download_from_a_controller_sigkilled_and_restarted_resumes_and_completes(
        tmp_path: Path) -> None:
    """An agent fetching a 16 MiB artifact (throttled to 4 MiB/s by a proxy) when the
    controller is SIGKILLed, once 4 MiB have arrived, and restarted 2 s later (the shipped
    unit's RestartSec): the fetch waits for it rather than giving up (no artifact_failed, no
    failed replica), resumes from the bytes it kept with a Range request, completes with the
    right sha256 and the replica becomes ready, re-fetching less than one artifact's size."""
    size = 16 * MiB
    card, sha = big_card(tmp_path / "card.toml", size)
    proxy = Proxy(lambda: fleet.http_port, download_bytes_per_s=4 * MiB)
    await proxy.start()
    fleet = LocalFleet(tmp_path / "fleet", agents_count=1, interval_s=INTERVAL_S,
                       controller_overrides={"http": {"advertise_url": proxy.url}})
    try:
        async with fleet:
            assert fleet.controller is not None
            controller = fleet.controller
            helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
            pushed = await asyncio.to_thread(helper.push_model, str(card), "killed-controller",
                                             runtime="sim")
            await asyncio.to_thread(helper.deploy_model, pushed.ref, name="killed-controller",
                                    runtime="sim", replicas=1, gpu_memory_bytes=4 << 30,
                                    wait=False)
            needle = b"/api/v1/artifacts/" + sha.encode()
            await until(lambda: any(needle in c.request and c.body_down >= 4 * MiB
                                    for c in proxy.conns), 60, "4 MiB of the download")
            controller.signal(signal.SIGKILL)
            await controller.wait(10)
            killed_at = time.monotonic()
            await asyncio.sleep(RESTART_SEC)  # as systemd would restart it
            fleet._start(controller)  # same config, same port, same state directory
            await fleet.wait_ready(60)
            restarted_s = time.monotonic() - killed_at
            deployment = await asyncio.to_thread(helper.wait, "killed-controller",
                                                 pushed.ref, timeout=180)
            ready_s = time.monotonic() - killed_at
            assert deployment.ready == 1
            agent = fleet.agents[0]
            assert sha256_file(agent.state_dir / "artifacts" / "blobs" / f"{sha}.toml") == sha
            gets = [c for c in proxy.conns if needle in c.request]
            fetched = sum(c.body_down for c in gets if c.down_head)
            ranges = [c.header("Range") for c in gets if c.down_head]
            assert any(r and r != "bytes=0-" for r in ranges), ranges
            assert fetched - size < size, f"{fetched} bytes fetched for {size}"
            failed = log_events(agent.daemon.log_path, "artifact_failed")
            done = log_events(agent.daemon.log_path, "artifact_fetched")
            print(f"\ncontroller SIGKILLed mid-download, back in {restarted_s:.1f} s; replica "
                  f"ready {ready_s:.1f} s after the kill; requests {ranges}; fetched {fetched} "
                  f"bytes for {size} (re-fetched {fetched - size}); resumed_from "
                  f"{[e.get('resumed_from') for e in done]}; artifact_failed events: "
                  f"{[e.get('error') for e in failed]}")
            assert not failed, "the fetch gave up while the controller restarted"
    finally:
        await proxy.close()


async def test_a_cut_models_pull_says_so_keeps_the_bytes_and_the_next_pull_resumes(
        tmp_path: Path) -> None:
    """``llmops models pull`` of a 16 MiB version through a proxy that closes the connection
    after 6 MiB: the CLI exits non-zero saying where it broke off and to run it again, keeps
    the bytes in ``FILE.part`` and writes no ``FILE``; run again, it asks for the rest with
    ``Range: bytes=K-`` (K the bytes kept), writes ``FILE`` with the right sha256 and removes
    the ``.part``; nothing is fetched twice."""
    size = 16 * MiB
    card, sha = big_card(tmp_path / "card.toml", size)
    proxy = Proxy(lambda: fleet.http_port, cut_after=6 * MiB)
    await proxy.start()
    fleet = LocalFleet(tmp_path / "fleet", agents_count=0, interval_s=INTERVAL_S)
    try:
        async with fleet:
            helper = LLMOpsHelper(fleet.url, token=fleet.token)
            await asyncio.to_thread(helper.push_model, str(card), "pulled", runtime="sim")
            out = tmp_path / "out" / "pulled.toml"
            out.parent.mkdir()
            part = out.with_name(out.name + ".part")
            first = cli(fleet, proxy.url, "models", "pull", "pulled", "1", "-o", str(out))
            # In a thread: the proxy runs on this event loop.
            text = (await asyncio.to_thread(first.communicate, None, 120))[0].decode(
                errors="replace")
            assert first.returncode != 0, text
            assert "broke off" in text and "run it again to resume" in text, text
            assert not out.exists() and 0 < part.stat().st_size < size
            kept = part.stat().st_size
            second = cli(fleet, proxy.url, "models", "pull", "pulled", "1", "-o", str(out))
            text = (await asyncio.to_thread(second.communicate, None, 120))[0].decode(
                errors="replace")
            assert second.returncode == 0, text
            assert sha256_file(out) == sha and not part.exists()
            gets = [c for c in proxy.conns if b"/api/v1/artifacts/" + sha.encode() in c.request]
            assert [c.header("Range") for c in gets] == ["bytes=0-", f"bytes={kept}-"]
            fetched = sum(c.body_down for c in gets)
            assert fetched == size, f"{fetched} bytes fetched for {size}"
            print(f"\nmodels pull cut at {kept} of {size} bytes; the rerun resumed with Range "
                  f"bytes={kept}-; fetched {fetched} in all (re-fetched {fetched - size}); "
                  "sha256 ok")
    finally:
        await proxy.close()
