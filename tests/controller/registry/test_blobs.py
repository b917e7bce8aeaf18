"""The blob directory: streamed, hashed, fsync'd writes that leave a whole blob or nothing."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llm_ops_helper.controller.registry.blobs import BATCH_BYTES, BlobStore
from llm_ops_helper.controller.registry.errors import ChecksumMismatch, DiskFull, TooLarge


async def pieces(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def leftovers(store: BlobStore) -> list[Path]:
    return list(store.tmp.iterdir())


async def test_stream_hash_commit_and_layout(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = os.urandom(9 << 20 | 123)  # over two write batches, not a multiple of a chunk
    sha = hashlib.sha256(data).hexdigest()
    staged = await store.stage(pieces(data), expected_sha256=sha, head_bytes=10)
    assert (staged.sha256, staged.size, staged.head) == (sha, len(data), data[:10])
    assert not store.exists(sha)
    path = await store.commit(staged)
    assert path == tmp_path / "blobs" / sha[:2] / sha and path.read_bytes() == data
    assert store.exists(sha) and store.blobs() == [sha] and leftovers(store) == []
    # the same content again replaces the file with itself
    await store.commit(await store.stage(pieces(data)))
    assert store.blobs() == [sha] and leftovers(store) == []


async def test_checksum_mismatch_and_size_limit_leave_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = b"x" * 300_000
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatch) as err:
        await store.stage(pieces(data), expected_sha256=wrong)
    assert err.value.message == (f"checksum mismatch: expected {wrong}, "
                                 f"got {hashlib.sha256(data).hexdigest()}")
    with pytest.raises(TooLarge, match="larger than the limit of 100000 bytes"):
        await store.stage(pieces(data), max_bytes=100_000)
    assert leftovers(store) == [] and store.blobs() == []


async def test_a_failing_or_cancelled_source_leaves_no_temp_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    started = asyncio.Event()

    async def broken() -> AsyncIterator[bytes]:
        yield b"a" * (5 << 20)
        raise ConnectionResetError("peer went away")

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"b" * 65536
            started.set()
            await asyncio.sleep(0)

    with pytest.raises(ConnectionResetError):  # a reader's error is not a storage error
        await store.stage(broken())
    assert leftovers(store) == []
    task = asyncio.create_task(store.stage(endless()))
    await started.wait()
    assert len(leftovers(store)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(store) == [] and store.blobs() == []


async def test_disk_full_is_named_and_cleaned_up(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path / "blobs")
    real_mkstemp = tempfile.mkstemp

    def on_a_full_disk(dir: Path, prefix: str, suffix: str) -> tuple[int, str]:
        # A real temp file name, but the writes go to /dev/full: the kernel's ENOSPC.
        fd, name = real_mkstemp(dir=dir, prefix=prefix, suffix=suffix)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", on_a_full_disk)
    with pytest.raises(DiskFull, match=r"^disk full while storing upload: .*No space left"):
        await store.stage(pieces(b"z" * 1_000_000))
    assert leftovers(store) == []


def test_start_up_removes_stale_temp_files_and_gc_keeps_referenced(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    (root / "tmp").mkdir(parents=True)
    (root / "tmp" / "upload-crashed.part").write_bytes(b"half")
    keep, drop = "a" * 64, "b" * 64
    for sha in (keep, drop):
        (root / sha[:2]).mkdir()
        (root / sha[:2] / sha).write_bytes(b"blob")
    store = BlobStore(root)
    assert leftovers(store) == []
    assert sorted(store.blobs()) == [keep, drop]
    assert store.gc({keep}) == [drop]
    assert store.blobs() == [keep] and not store.exists(drop)
    assert store.delete(keep) and not store.delete(keep)
    assert not store.exists("../../etc/passwd")


async def test_memory_stays_bounded_whatever_the_size(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    chunk = os.urandom(1 << 20)
    count = 96  # 96 MiB through a store that holds at most a batch at a time

    async def big() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk  # the same object: the source itself allocates nothing

    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(chunk)
    tracemalloc.start()
    try:
        staged = await store.stage(big(), head_bytes=256 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert staged.size == count << 20 and staged.sha256 == expected.hexdigest()
    assert peak < BATCH_BYTES, f"peak {peak} bytes for a {staged.size}-byte upload"
    store.discard(staged)
