"""A content-addressed blob directory: ``{root}/{sha[:2]}/{sha}``, written by streaming.

An upload streams into ``{root}/tmp/`` (same file system, so the final ``os.replace`` is
atomic), hashed as it is written and never held whole in memory; it is fsync'd before it
gets its name. Any failure or cancellation (a client gone mid-upload) deletes the temp file,
and start-up deletes temp files a crash left behind, so a blob is either whole or absent.
File I/O runs in worker threads (``asyncio.to_thread``) in batches of a few MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import structlog

from llm_ops_helper.controller.registry.errors import (
    ChecksumMismatch,
    DiskFull,
    StorageError,
    TooLarge,
)
from llm_ops_helper.controller.registry.records import SHA256

log = structlog.get_logger("llmops.controller.registry")

BATCH_BYTES = 4 << 20
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Staged:
    """An upload on disk, hashed and fsync'd, not yet under its name."""

    sha256: str
    size: int
    head: bytes
    temp: Path


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            stale = list(self.tmp.iterdir())
            for path in stale:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"{root}: cannot prepare the blob directory: {exc}") from None
        if stale:
            log.info("blob_temp_files_removed", root=str(root), count=len(stale))

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return bool(SHA256.fullmatch(sha256)) and self.path(sha256).is_file()

    def delete(self, sha256: str) -> bool:
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot delete blob {sha256}: {exc}") from None
        return True

    def detach(self, sha256: str) -> Path | None:
        """Move a blob out of its name into ``tmp/`` (a rename: quick, and the name is free at
        once for an upload of the same bytes); the file to delete, None if there was none.
        Deleting a file of many GB takes a while: the caller does it off the event loop."""
        trash = self.tmp / f"deleted-{sha256}-{os.urandom(4).hex()}"
        try:
            os.replace(self.path(sha256), trash)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot delete blob {sha256}: {exc}") from None
        return trash

    def blobs(self) -> list[str]:
        return [p.name for d in self.root.iterdir() if d.is_dir() and d != self.tmp
                for p in d.iterdir() if SHA256.fullmatch(p.name)]

    def gc(self, referenced: set[str]) -> list[str]:
        """Delete every blob not in ``referenced``; returns the deleted digests."""
        removed = [sha for sha in self.blobs() if sha not in referenced and self.delete(sha)]
        if removed:
            log.info("blobs_collected", root=str(self.root), count=len(removed))
        return removed

    async def stage(self, chunks: AsyncIterable[bytes], *, expected_sha256: str | None = None,
                    max_bytes: int | None = None, head_bytes: int = 0) -> Staged:
        """Stream ``chunks`` to a temp file; check size and digest; keep the first bytes."""
        try:
            fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-", suffix=".part")
        except OSError as exc:
            raise _storage_error(exc) from None
        temp = Path(name)
        hasher = hashlib.sha256()
        size = 0
        head = bytearray()
        batch: list[bytes] = []
        batched = 0
        out = os.fdopen(fd, "wb")
        try:
            async for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise TooLarge(f"upload larger than the limit of {max_bytes} bytes")
                if len(head) < head_bytes:
                    head += chunk[:head_bytes - len(head)]
                batch.append(chunk)
                batched += len(chunk)
                if batched >= BATCH_BYTES:
                    await _io(_write, out, hasher, batch)
                    batch, batched = [], 0
            await _io(_write, out, hasher, batch, True)
            digest = hasher.hexdigest()
            if expected_sha256 is not None and digest != expected_sha256:
                raise ChecksumMismatch(f"checksum mismatch: expected {expected_sha256}, "
                                       f"got {digest}")
        except BaseException:
            _abandon(out, temp)
            raise
        return Staged(digest, size, bytes(head), temp)

    async def commit(self, staged: Staged) -> Path:
        """Give a staged upload its name (atomic; an identical blob already there is fine)."""
        final = self.path(staged.sha256)
        try:
            await _io(_publish, staged.temp, final)
        except BaseException:
            self.discard(staged)
            raise
        return final

    def discard(self, staged: Staged) -> None:
        staged.temp.unlink(missing_ok=True)


def _write(out: BinaryIO, hasher: hashlib._Hash, chunks: list[bytes],
           last: bool = False) -> None:
    for chunk in chunks:
        hasher.update(chunk)
        out.write(chunk)
    if last:
        out.flush()
        os.fsync(out.fileno())
        out.close()


def _abandon(out: BinaryIO, temp: Path) -> None:
    with contextlib.suppress(OSError):
        out.close()
    temp.unlink(missing_ok=True)


def _publish(temp: Path, final: Path) -> None:
    final.parent.mkdir(exist_ok=True)
    os.replace(temp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def _io(fn: Callable[..., _T], *args: object) -> _T:
    """Run blocking file I/O in a thread; OSError becomes DiskFull or StorageError.

    A cancelled caller still waits for the thread, so the file is not closed or unlinked
    under a write in progress.
    """
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])
        raise
    except OSError as exc:
        raise _storage_error(exc) from None


def _storage_error(exc: OSError) -> StorageError | DiskFull:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full while storing upload: {exc}")
    return StorageError(f"cannot store upload: {exc}")
