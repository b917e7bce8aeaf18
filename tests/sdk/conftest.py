"""Fixtures: the controller's test double on a free port, and a client pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llm_ops_helper.client import LLMOpsHelper
from tests.sdk.fake_controller import FakeController, serving

CLIENT_ENV = ("LLMOPS_URL", "LLMOPS_TOKEN", "LLMOPS_TOKEN_FILE", "LLMOPS_USER",
              "LLMOPS_POLL_INTERVAL")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own LLMOPS_* settings must not leak into the tests."""
    for name in CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLMOPS_POLL_INTERVAL", "0.01")


@pytest.fixture
async def fake() -> AsyncIterator[FakeController]:
    async with serving(FakeController()) as controller:
        yield controller


@pytest.fixture
def helper(fake: FakeController) -> LLMOpsHelper:
    return LLMOpsHelper(fake.url, user="tester")


def model_file(path: Path, size: int = 4096, seed: int = 0) -> Path:
    """A file that starts with the GGUF magic, so the format is inferred as gguf."""
    body = bytes((seed + n * 7) % 251 for n in range(min(size, 1 << 16)))
    path.write_bytes(b"GGUF" + (body * (size // len(body) + 1))[:size - 4])
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
