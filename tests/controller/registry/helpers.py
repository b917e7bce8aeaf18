"""Shared by the registry tests: a registry on a real SQLite file and upload bodies."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from llm_ops_helper.controller.registry import NewVersion, Registry, Version

CARD = b'[sim]\nttft_base_s = 0.05\nitl_s = 0.01\n'


def gguf(size: int = 4096) -> bytes:
    return b"GGUF" + os.urandom(size - 4)


async def pieces(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def make_registry(tmp_path: Path, in_use: set[str] | None = None) -> Registry:
    refs = in_use if in_use is not None else set()
    return Registry(tmp_path / "controller.db", tmp_path / "blobs", in_use=lambda: set(refs))


async def add(registry: Registry, name: str, data: bytes | None = None, *,
              by: str = "alice", **meta: object) -> Version:
    body = pieces(data) if data is not None else None
    return await registry.register(name, NewVersion(**meta), body, by=by)  # type: ignore[arg-type]
