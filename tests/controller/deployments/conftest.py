"""The engine's test world, as every test here starts it: the registry holding tiny@1..3 (with
the deployments' versions kept from retirement, as the controller wires it) and two hosts."""

from __future__ import annotations

from pathlib import Path

import pytest

from .world import World, register


@pytest.fixture
async def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    for label in ("one", "two", "three"):
        await register(w.registry, "tiny", label)
    w.host("host-a")
    w.host("host-b")
    w.registry.in_use = w.engine.refs_in_use
    return w
