"""The artifact cache: model files by sha256, fetched over HTTP, verified, evicted by LRU.

Layout under ``cache_dir``: ``blobs/{sha256}{.ext}`` (complete, verified) and
``partial/{sha256}.part`` (a download in progress or cut off). A cut download resumes from the
partial's size with a Range request, after re-hashing the bytes already there. A server that
cannot be reached is tried for ``CONNECT_WINDOW_S`` (a controller restarting is back within it);
one that has sent bytes and then went away is waited for, with backoff, until
``RESUME_WINDOW_S`` pass without a byte arriving. "Last use" is
the blob's mtime (touched on every use), so the LRU order survives agent restarts for free.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import aiohttp
import structlog

from llm_ops_helper.proto.messages import ArtifactRef, Event

log = structlog.get_logger("llmops.agent.artifacts")

SHA256 = re.compile(r"[0-9a-f]{64}")
_EXT = re.compile(r"\.[A-Za-z0-9]{1,16}")
CHUNK = 1 << 20
# Bytes gathered before one write (through a worker thread, so the loop never blocks on disk).
WRITE_BATCH = 8 << 20
ATTEMPTS = 3
# Before the first byte, how long a fetch keeps trying (at least ATTEMPTS times): a controller
# restarted by systemd (RestartSec=2) answers again within it; a wrong address fails after it.
CONNECT_WINDOW_S = 20.0
# Once bytes have arrived, how long a fetch keeps retrying without another byte: longer than a
# controller's restart (systemd RestartSec=2 plus its start-up), bounded by download_timeout_s.
RESUME_WINDOW_S = 60.0
BACKOFF_MAX_S = 2.0
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class ArtifactError(Exception):
    """An artifact that cannot be fetched or evicted; the message names it and the cause."""


class _Retryable(Exception):
    pass


def _hash_prefix(path: Path, size: int) -> hashlib._Hash:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        left = size
        while left > 0:
            block = f.read(min(left, 8 << 20))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest


def _partial_size(part: Path, expected: int) -> int:
    """Bytes already downloaded; a partial longer than the artifact is junk and goes."""
    try:
        have = part.stat().st_size
    except FileNotFoundError:
        return 0
    if have > expected:
        _remove(part)
        return 0
    return have


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _write_hashed(f: BinaryIO, chunks: list[bytes], digest: hashlib._Hash) -> None:
    """In a worker thread: write and hash a batch (the loop never touches the bytes again)."""
    for chunk in chunks:
        f.write(chunk)
        digest.update(chunk)


def _publish(part: Path, path: Path) -> None:
    """Make a verified partial the blob, durably: its bytes, then its name."""
    with part.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(part, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _sizes(part: Path, size: int) -> str:
    """The bytes a failed write left in ``part`` and free beside it, for the error."""
    try:
        written = str(part.stat().st_size)
    except OSError:
        written = "?"
    try:
        st = os.statvfs(part.parent)
        free = str(st.f_bavail * st.f_frsize)
    except OSError:
        free = "?"
    return f"{written} of {size} bytes written, {free} bytes free on that file system"


def _complete(path: Path, size: int) -> bool:
    """A blob of the right size is there (a cut copy or a truncated disk is not)."""
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


class ArtifactCache:
    def __init__(self, root: Path, max_bytes: int, *, host: str, timeout_s: float = 3600.0,
                 in_use: Callable[[], Mapping[str, list[str]]] = dict,
                 emit: Callable[[Event], None] = lambda event: None) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.partial = root / "partial"
        self.max_bytes = max_bytes
        self.host = host
        self.timeout_s = timeout_s
        # sha256 -> names of the replicas (not stopped) that use it; never evicted.
        self.in_use = in_use
        self.emit = emit
        self._fetches: dict[str, asyncio.Task[Path]] = {}
        # sha256 -> bytes an in-flight download still has to write: room kept for it.
        self._reserved: dict[str, int] = {}
        self._prefetches: set[asyncio.Task[Path]] = set()
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        for task in [*self._fetches.values(), *self._prefetches]:
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def path_for(self, ref: ArtifactRef) -> Path:
        match = _EXT.fullmatch(Path(ref.filename).suffix)
        return self.blobs / f"{ref.sha256}{match.group(0) if match else ''}"

    def find(self, sha256: str) -> Path | None:
        return next(iter(sorted(self.blobs.glob(f"{sha256}*"))), None)

    def usage_bytes(self) -> int:
        total = 0
        for folder in (self.blobs, self.partial):
            for path in folder.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    total += path.stat().st_size
        return total

    async def fetch(self, ref: ArtifactRef) -> Path:
        """The local path of ``ref``, downloading it first if needed. Concurrent fetches of one
        sha256 share one download; cancelling one waiter does not cancel the download."""
        if not SHA256.fullmatch(ref.sha256):
            raise ArtifactError(f"artifact sha256 {ref.sha256!r} is not 64 lowercase hex digits")
        path = self.path_for(ref)
        if ref.sha256 not in self._fetches and self._cached(ref):
            return path
        task = self._fetches.get(ref.sha256)
        if task is None:
            task = asyncio.create_task(self._download(ref, path))
            self._fetches[ref.sha256] = task
            task.add_done_callback(lambda _: self._fetches.pop(ref.sha256, None))
        return await asyncio.shield(task)

    def prefetch(self, ref: ArtifactRef) -> str:
        """Start fetching ``ref`` in the background: "cached" or "fetching". Failures are
        reported by the fetch itself (log and ``artifact_failed`` event)."""
        if not SHA256.fullmatch(ref.sha256):
            raise ArtifactError(f"artifact sha256 {ref.sha256!r} is not 64 lowercase hex digits")
        if ref.sha256 not in self._fetches and self._cached(ref):
            return "cached"
        task = asyncio.create_task(self.fetch(ref))
        self._prefetches.add(task)
        task.add_done_callback(self._prefetch_done)
        return "fetching"

    def _cached(self, ref: ArtifactRef) -> bool:
        """Whether the blob is there and whole (touched: the LRU order); a wrong-sized one
        goes, to be fetched again."""
        path = self.path_for(ref)
        if _complete(path, ref.size_bytes):
            os.utime(path)
            return True
        if path.exists():
            log.warning("artifact_blob_wrong_size", sha256=ref.sha256, path=str(path),
                        expected=ref.size_bytes, action="fetching it again")
            _remove(path)
        return False

    def _prefetch_done(self, task: asyncio.Task[Path]) -> None:
        self._prefetches.discard(task)
        if not task.cancelled():
            task.exception()  # reported already; read so asyncio does not log it again

    def evict(self, sha256: str) -> bool:
        """Remove a cached artifact; False when it was not cached. Refused while in use."""
        if not SHA256.fullmatch(sha256):
            raise ArtifactError(f"artifact sha256 {sha256!r} is not 64 lowercase hex digits")
        users = self.in_use().get(sha256)
        if users:
            raise ArtifactError(f"artifact {sha256} is in use by replica(s) "
                                f"{', '.join(sorted(users))}; stop them first")
        if sha256 in self._fetches:
            raise ArtifactError(f"artifact {sha256} is being fetched; evict it once the "
                                "fetch has ended")
        removed = False
        for path in [*self.blobs.glob(f"{sha256}*"), self.partial / f"{sha256}.part"]:
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                path.unlink()
                removed = True
                log.info("artifact_evicted", sha256=sha256, size_bytes=size, reason="command")
        return removed

    def _make_room(self, ref: ArtifactRef, have: int) -> None:
        """Evict least recently used artifacts no replica uses until ``ref`` fits."""
        if ref.size_bytes > self.max_bytes:
            raise ArtifactError(f"artifact {ref.sha256} is {ref.size_bytes} bytes, more than the "
                                f"whole cache (supervisor.cache_max_bytes = {self.max_bytes})")
        need = ref.size_bytes - have
        self._reserved.pop(ref.sha256, None)
        # Room promised to other downloads in flight counts as used: they write it later.
        used = self.usage_bytes() + sum(self._reserved.values())
        if used + need > self.max_bytes:
            used = self._evict_for(ref, used, need)
        self._reserved[ref.sha256] = need

    def _evict_for(self, ref: ArtifactRef, used: int, need: int) -> int:
        busy = self.in_use()
        fetching = set(self._fetches) | {ref.sha256}
        candidates: list[tuple[float, Path, int]] = []
        # Blobs no replica uses, and partials no download is writing (cut off, abandoned).
        for folder, skip in ((self.blobs, busy.keys() | fetching), (self.partial, fetching)):
            for path in folder.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    if path.name[:64] not in skip:
                        candidates.append((st.st_mtime, path, st.st_size))
        for _, path, size in sorted(candidates):
            if used + need <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                used -= size
                log.info("artifact_evicted", sha256=path.name[:64], size_bytes=size, reason="lru",
                         for_sha256=ref.sha256)
        if used + need > self.max_bytes:
            raise ArtifactError(
                f"cache full: artifact {ref.sha256} needs {need} bytes but only "
                f"{max(0, self.max_bytes - used)} of supervisor.cache_max_bytes = "
                f"{self.max_bytes} can be freed; the rest is used by running replicas "
                "and downloads in progress")
        return used

    async def _download(self, ref: ArtifactRef, path: Path) -> Path:
        started = time.monotonic()
        part = self.partial / f"{ref.sha256}.part"
        try:
            async with asyncio.timeout(self.timeout_s):
                resumed_from = await self._download_verified(ref, part)
            await asyncio.to_thread(_publish, part, path)
        except TimeoutError:
            error = (f"download of artifact {ref.sha256} from {ref.url} timed out after "
                     f"{self.timeout_s:g} s (supervisor.download_timeout_s)")
            raise self._failed(ref, error) from None
        except ArtifactError as exc:
            raise self._failed(ref, str(exc)) from None
        except OSError as exc:
            # Measured before the partial goes: what fit, and what was left when it failed.
            sizes = _sizes(part, ref.size_bytes)
            with contextlib.suppress(OSError):
                part.unlink()
            cause = f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, 'errno ?')})"
            if exc.errno in _DISK_FULL:
                raise self._failed(ref, f"disk full: cannot write artifact {ref.sha256} under "
                                        f"{self.root}: {cause} writing {part}: {sizes}; the "
                                        "partial file was removed: free space there, or "
                                        "lower supervisor.cache_max_bytes") from None
            raise self._failed(ref, f"cannot write artifact {ref.sha256} under {self.root}: "
                                    f"{cause} writing {part}: {sizes}") from None
        finally:
            self._reserved.pop(ref.sha256, None)
        seconds = round(time.monotonic() - started, 3)
        log.info("artifact_fetched", sha256=ref.sha256, size_bytes=ref.size_bytes,
                 seconds=seconds, resumed_from=resumed_from, url=ref.url)
        self.emit(Event(host=self.host, ts=time.time(), kind="artifact_fetched",
                        message=f"artifact {ref.filename} fetched",
                        data={"sha256": ref.sha256, "size_bytes": ref.size_bytes,
                              "seconds": seconds, "resumed_from": resumed_from}))
        return path

    def _failed(self, ref: ArtifactRef, error: str) -> ArtifactError:
        log.warning("artifact_failed", sha256=ref.sha256, url=ref.url, error=error)
        self.emit(Event(host=self.host, ts=time.time(), kind="artifact_failed",
                        severity="warning", message=error,
                        data={"sha256": ref.sha256, "error": error}))
        return ArtifactError(error)

    async def _download_verified(self, ref: ArtifactRef, part: Path) -> int:
        """Download into ``part`` (resuming), check size and sha256; the bytes resumed from."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120))
        loop = asyncio.get_running_loop()
        fresh_retry = True
        started = loop.time()
        misses = 0  # failed attempts since the last byte arrived
        progressed_at: float | None = None  # when a byte last arrived in this fetch
        while True:
            have = _partial_size(part, ref.size_bytes)
            self._make_room(ref, have)
            try:
                resumed_from, digest, got = await self._get(ref, part, have)
            except _Retryable as exc:
                if _partial_size(part, ref.size_bytes) > have:
                    progressed_at, misses = loop.time(), 0
                misses += 1
                log.info("artifact_download_interrupted", sha256=ref.sha256, attempt=misses,
                         error=str(exc))
                if progressed_at is None and misses >= ATTEMPTS \
                        and loop.time() - started >= CONNECT_WINDOW_S:
                    raise ArtifactError(f"download of artifact {ref.sha256} from {ref.url} "
                                        f"failed {misses} times in {loop.time() - started:.1f} s; "
                                        f"last: {exc}") from None
                if progressed_at is not None \
                        and loop.time() - progressed_at > RESUME_WINDOW_S:
                    raise ArtifactError(
                        f"download of artifact {ref.sha256} from {ref.url} broke off and no "
                        f"byte arrived for {RESUME_WINDOW_S:g} s ({misses} attempts); last: "
                        f"{exc}") from None
                await asyncio.sleep(min(0.2 * 2 ** (misses - 1), BACKOFF_MAX_S))
                continue
            if got == ref.size_bytes and digest == ref.sha256:
                return resumed_from
            _remove(part)
            if resumed_from and fresh_retry:
                # The bytes kept from before may be what is wrong: once more, from byte 0.
                fresh_retry = False
                log.warning("artifact_resume_mismatch", sha256=ref.sha256,
                            resumed_from=resumed_from, action="downloading from the start")
                continue
            if got != ref.size_bytes:
                raise ArtifactError(f"size mismatch for artifact {ref.sha256}: expected "
                                    f"{ref.size_bytes} bytes, got {got}")
            raise ArtifactError(f"checksum mismatch for artifact {ref.sha256}: expected "
                                f"{ref.sha256}, got {digest}")

    async def _get(self, ref: ArtifactRef, part: Path, have: int) -> tuple[int, str, int]:
        assert self._session is not None
        digest = await asyncio.to_thread(_hash_prefix, part, have) if have else hashlib.sha256()
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            async with self._session.get(ref.url, headers=headers) as resp:
                if resp.status == 416 and have == ref.size_bytes:
                    return have, digest.hexdigest(), have
                if resp.status == 200:
                    have, digest = 0, hashlib.sha256()
                elif not (resp.status == 206 and have):
                    text = (await resp.text(errors="replace"))[:200]
                    raise ArtifactError(f"download of artifact {ref.sha256} from {ref.url}: "
                                        f"HTTP {resp.status}: {text}")
                elif not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                    # Not the bytes asked for: appending them would corrupt the partial.
                    _remove(part)
                    raise _Retryable(f"HTTP 206 with Content-Range "
                                     f"{resp.headers.get('Content-Range')!r} for bytes={have}-")
                resumed_from = have
                have = await self._receive(resp, part, have, digest, ref.size_bytes)
        except aiohttp.InvalidURL as exc:
            raise ArtifactError(f"artifact {ref.sha256}: invalid URL {ref.url!r}: {exc}") \
                from None
        except aiohttp.ClientResponseError as exc:
            raise ArtifactError(f"download of artifact {ref.sha256} from {ref.url}: {exc}") \
                from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        return resumed_from, digest.hexdigest(), have

    async def _receive(self, resp: aiohttp.ClientResponse, part: Path, have: int,
                       digest: hashlib._Hash, size: int) -> int:
        """Append the body to ``part``, hashing it, in batches written by a worker thread; the
        bytes in the partial afterwards (a cut connection keeps what arrived)."""
        f: BinaryIO
        with part.open("ab" if have else "wb") as f:
            batch: list[bytes] = []
            batched = 0

            async def write() -> None:
                nonlocal batch, batched
                # Handed over before the await: a cancellation during the write cannot make
                # the clean-up below write the same bytes twice.
                chunks, batch, batched = batch, [], 0
                writing = asyncio.ensure_future(
                    asyncio.to_thread(_write_hashed, f, chunks, digest))
                try:
                    await asyncio.shield(writing)
                except asyncio.CancelledError:
                    await asyncio.wait({writing})  # the thread finishes before the file closes
                    raise

            try:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    batch.append(chunk)
                    batched += len(chunk)
                    have += len(chunk)
                    if have > size:
                        break
                    if batched >= WRITE_BATCH:
                        await write()
            finally:
                if batch:
                    await write()
                await asyncio.to_thread(f.flush)
        return have
