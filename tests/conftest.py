"""Shared fixtures: a private Mosquitto per test, agent processes, MQTT recorders."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llm_ops_helper.broker import BrokerUnavailable, LocalMosquitto

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[LocalMosquitto]:
    try:
        broker = LocalMosquitto(tmp_path / "mosquitto")
        await broker.start()
    except BrokerUnavailable as exc:
        pytest.fail(f"these tests need a real Mosquitto: {exc}")
    try:
        yield broker
    finally:
        await broker.stop()


def shared_data(*parts: str) -> Path:
    """A file of the project's evaluation data (../shared/data); fails loudly when absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} is missing: the shared/ folder must sit beside the repository")
    return path
