"""The artifact cache against a real aiohttp server with Range support."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from llm_ops_helper.agent.replicas import artifacts
from llm_ops_helper.agent.replicas.artifacts import ArtifactCache, ArtifactError
from llm_ops_helper.broker import free_port
from llm_ops_helper.proto.messages import ArtifactRef, Event

SIZE = 3 << 20


class BlobServer:
    """Serves blobs by sha256 like the controller's /api/v1/artifacts/{sha256}."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.cut_next = False  # send half of the next response, then drop the connection
        self.url = ""

    def add(self, data: bytes, filename: str = "model.gguf") -> ArtifactRef:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return ArtifactRef(sha256=sha, size_bytes=len(data), url=f"{self.url}/{sha}",
                           filename=filename)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        data = self.blobs[request.match_info["sha"]]
        header = request.headers.get("Range")
        self.ranges.append(header)
        start = int(header.removeprefix("bytes=").split("-")[0]) if header else 0
        body = data[start:]
        headers = {"Content-Length": str(len(body))}
        if header:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        response = web.StreamResponse(status=206 if header else 200, headers=headers)
        await response.prepare(request)
        if self.cut_next:
            self.cut_next = False
            await response.write(body[: len(body) // 2])
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(body)
        await response.write_eof()
        return response


@pytest.fixture
async def blob_server() -> AsyncIterator[BlobServer]:
    server = BlobServer()
    app = web.Application()
    app.router.add_get("/{sha}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


def make_cache(root: Path, max_bytes: int = 100 << 20,
               in_use: dict[str, list[str]] | None = None,
               events: list[Event] | None = None) -> ArtifactCache:
    sink = events if events is not None else []
    cache = ArtifactCache(root, max_bytes, host="gpu-test", in_use=lambda: in_use or {},
                          emit=sink.append)
    cache.open()
    return cache


async def test_fetch_verifies_and_stores_under_sha_with_the_extension(
        blob_server: BlobServer, tmp_path: Path) -> None:
    events: list[Event] = []
    cache = make_cache(tmp_path, events=events)
    data = os.urandom(SIZE)
    ref = blob_server.add(data)
    path = await cache.fetch(ref)
    assert path == tmp_path / "blobs" / f"{ref.sha256}.gguf"
    assert path.read_bytes() == data
    assert list((tmp_path / "partial").iterdir()) == []
    assert [e.kind for e in events] == ["artifact_fetched"]
    assert events[0].data["resumed_from"] == 0 and events[0].data["size_bytes"] == SIZE
    assert await cache.fetch(ref) == path and len(blob_server.ranges) == 1, "cached: no GET"
    await cache.close()


async def test_a_cut_download_resumes_with_a_range_request(
        blob_server: BlobServer, tmp_path: Path) -> None:
    events: list[Event] = []
    cache = make_cache(tmp_path, events=events)
    data = os.urandom(SIZE)
    ref = blob_server.add(data)
    blob_server.cut_next = True
    path = await cache.fetch(ref)
    assert path.read_bytes() == data
    first, second = blob_server.ranges
    assert first is None and second is not None
    resumed = int(second.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed < SIZE
    assert events[-1].kind == "artifact_fetched" and events[-1].data["resumed_from"] == resumed
    await cache.close()


async def test_checksum_mismatch_deletes_the_partial_and_says_both_hashes(
        blob_server: BlobServer, tmp_path: Path) -> None:
    events: list[Event] = []
    cache = make_cache(tmp_path, events=events)
    real = blob_server.add(b"x" * 1000)
    wrong = "f" * 64
    blob_server.blobs[wrong] = blob_server.blobs[real.sha256]
    ref = ArtifactRef(sha256=wrong, size_bytes=1000, url=f"{blob_server.url}/{wrong}")
    with pytest.raises(ArtifactError) as info:
        await cache.fetch(ref)
    assert str(info.value) == (f"checksum mismatch for artifact {wrong}: expected {wrong}, "
                               f"got {real.sha256}")
    assert list((tmp_path / "partial").iterdir()) == [] and list((tmp_path / "blobs").iterdir()) == []
    assert events[-1].kind == "artifact_failed" and events[-1].data["sha256"] == wrong
    await cache.close()


async def test_concurrent_fetches_of_one_artifact_share_one_download(
        blob_server: BlobServer, tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    ref = blob_server.add(os.urandom(SIZE))
    paths = await asyncio.gather(*(cache.fetch(ref) for _ in range(4)))
    assert len(set(paths)) == 1 and blob_server.ranges == [None]
    await cache.close()


async def test_lru_eviction_keeps_recently_used_and_in_use_artifacts(
        blob_server: BlobServer, tmp_path: Path) -> None:
    in_use: dict[str, list[str]] = {}
    cache = make_cache(tmp_path, max_bytes=2 * 1000 + 500, in_use=in_use)
    a, b, c, d = (blob_server.add(bytes([i]) * 1000, filename="m.bin") for i in range(4))
    path_a, path_b = await cache.fetch(a), await cache.fetch(b)
    os.utime(path_a, (1, 1))
    os.utime(path_b, (2, 2))
    await cache.fetch(a)  # a used again: now b is the least recently used
    path_c = await cache.fetch(c)
    assert path_a.exists() and not path_b.exists() and path_c.exists()
    # a is the oldest now, but a running replica uses it: c goes instead.
    os.utime(path_a, (1, 1))
    in_use[a.sha256] = ["tiny-r1-aaaaaa"]
    await cache.fetch(d)
    assert path_a.exists() and not path_c.exists()
    with pytest.raises(ArtifactError, match="is in use by replica"):
        cache.evict(a.sha256)
    assert cache.evict(d.sha256) is True and cache.evict(d.sha256) is False
    await cache.close()


async def test_an_artifact_bigger_than_the_cache_or_than_what_can_be_freed_is_refused(
        blob_server: BlobServer, tmp_path: Path) -> None:
    in_use: dict[str, list[str]] = {}
    cache = make_cache(tmp_path, max_bytes=1500, in_use=in_use)
    big = blob_server.add(b"b" * 2000)
    with pytest.raises(ArtifactError, match="more than the whole cache"):
        await cache.fetch(big)
    a = blob_server.add(b"a" * 1000)
    await cache.fetch(a)
    in_use[a.sha256] = ["tiny-r1-aaaaaa"]
    with pytest.raises(ArtifactError, match="cache full"):
        await cache.fetch(blob_server.add(b"c" * 1000))
    await cache.close()


async def test_disk_full_is_a_clear_error_and_the_partial_goes(
        blob_server: BlobServer, tmp_path: Path) -> None:
    """A real ENOSPC from the kernel: the partial file is a symlink to /dev/full."""
    events: list[Event] = []
    cache = make_cache(tmp_path, events=events)
    ref = blob_server.add(os.urandom(4096))
    part = tmp_path / "partial" / f"{ref.sha256}.part"
    part.symlink_to("/dev/full")
    with pytest.raises(ArtifactError, match=r"^disk full: cannot write artifact .*No space left"):
        await cache.fetch(ref)
    assert not part.exists() and not part.is_symlink()
    assert events[-1].kind == "artifact_failed"
    # The cache still works afterwards.
    assert (await cache.fetch(ref)).read_bytes() == blob_server.blobs[ref.sha256]
    await cache.close()


async def test_a_download_cancelled_during_a_write_leaves_a_prefix_of_the_artifact(
        tmp_path: Path, blob_server: BlobServer, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(SIZE)
    ref = blob_server.add(data)
    cache = make_cache(tmp_path)
    started, release = threading.Event(), threading.Event()
    real_write = artifacts._write_hashed

    def slow_write(f: Any, chunks: list[bytes], digest: Any) -> None:
        started.set()
        release.wait(30)
        real_write(f, chunks, digest)

    monkeypatch.setattr(artifacts, "WRITE_BATCH", 1 << 20)
    monkeypatch.setattr(artifacts, "_write_hashed", slow_write)
    fetch = asyncio.create_task(cache.fetch(ref))
    while not started.is_set():
        await asyncio.sleep(0.01)
    cache._fetches[ref.sha256].cancel()  # the agent shutting down, mid-write
    await asyncio.sleep(0.05)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    partial = (cache.partial / f"{ref.sha256}.part").read_bytes()
    assert 0 < len(partial) < SIZE
    assert partial == data[:len(partial)], "the partial must be a prefix to be resumed"
    monkeypatch.setattr(artifacts, "_write_hashed", real_write)
    path = await cache.fetch(ref)
    assert path.read_bytes() == data
    await cache.close()


async def test_a_resumed_download_that_mismatches_is_fetched_once_more_from_the_start(
        tmp_path: Path, blob_server: BlobServer) -> None:
    data = os.urandom(SIZE)
    ref = blob_server.add(data)
    cache = make_cache(tmp_path)
    (cache.partial / f"{ref.sha256}.part").write_bytes(b"x" * (1 << 20))  # not its bytes
    path = await cache.fetch(ref)
    assert path.read_bytes() == data
    assert blob_server.ranges == [f"bytes={1 << 20}-", None]
    await cache.close()


async def test_a_cached_blob_of_the_wrong_size_is_fetched_again(
        tmp_path: Path, blob_server: BlobServer) -> None:
    data = os.urandom(SIZE)
    ref = blob_server.add(data)
    cache = make_cache(tmp_path)
    cache.path_for(ref).write_bytes(data[:100])  # cut short (a full disk, a crash)
    assert cache.prefetch(ref) == "fetching"
    path = await cache.fetch(ref)
    assert path.read_bytes() == data
    assert blob_server.ranges, "downloaded again"
    await cache.close()


async def test_concurrent_downloads_reserve_their_room(
        tmp_path: Path, blob_server: BlobServer) -> None:
    refs = [blob_server.add(os.urandom(SIZE)) for _ in range(2)]
    cache = make_cache(tmp_path, max_bytes=SIZE + SIZE // 2)
    results = await asyncio.gather(*(cache.fetch(r) for r in refs), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and "cache full" in str(errors[0]), results
    assert cache.usage_bytes() <= cache.max_bytes
    await cache.close()


async def test_an_abandoned_partial_is_evicted_for_room_but_not_one_being_fetched(
        tmp_path: Path, blob_server: BlobServer) -> None:
    ref = blob_server.add(os.urandom(SIZE))
    cache = make_cache(tmp_path, max_bytes=SIZE + SIZE // 2)
    stale = cache.partial / f"{'e' * 64}.part"
    stale.write_bytes(b"x" * SIZE)
    fetch = asyncio.create_task(cache.fetch(ref))
    await asyncio.sleep(0)
    with pytest.raises(ArtifactError, match="being fetched"):
        cache.evict(ref.sha256)
    await fetch
    assert not stale.exists()
    assert cache.usage_bytes() <= cache.max_bytes
    await cache.close()


async def test_an_invalid_url_is_an_artifact_error(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    ref = ArtifactRef(sha256="1" * 64, size_bytes=10, url="not a url")
    with pytest.raises(ArtifactError, match=r"invalid URL"):
        await cache.fetch(ref)
    await cache.close()


async def test_a_controller_that_comes_back_after_the_quick_tries_is_waited_for(
        tmp_path: Path) -> None:
    """A controller restarting (connection refused) when a fetch starts: the fetch keeps trying
    past its first quick tries, inside CONNECT_WINDOW_S, and completes once it answers."""
    server = BlobServer()
    app = web.Application()
    app.router.add_get("/{sha}", server.handle)
    port = free_port()  # nothing listens there until the "controller" is back
    server.url = f"http://127.0.0.1:{port}"
    data = os.urandom(SIZE)
    ref = server.add(data)
    cache = make_cache(tmp_path)
    runner = web.AppRunner(app)
    with capture_logs() as logs:
        fetch = asyncio.create_task(cache.fetch(ref))
        for _ in range(400):  # bounded: until the fetch has failed its quick tries
            tries = sum(e["event"] == "artifact_download_interrupted" for e in logs)
            if tries > artifacts.ATTEMPTS:
                break
            await asyncio.sleep(0.05)
        assert not fetch.done(), "gave up after the quick tries"
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        path = await asyncio.wait_for(fetch, artifacts.CONNECT_WINDOW_S + 30)
    assert path.read_bytes() == data
    await cache.close()
    await runner.cleanup()

