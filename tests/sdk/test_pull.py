"""``pull_model`` / ``llmops models pull`` against the controller's real registry routes (a real
aiohttp server over a real SQLite registry and blob directory), not the test double."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from llm_ops_helper import cli
from llm_ops_helper.broker import free_port
from llm_ops_helper.client import LLMOpsError, LLMOpsHelper
from llm_ops_helper.controller.registry import Registry
from llm_ops_helper.controller.registry import api as registry_api
from tests.sdk.conftest import model_file


@pytest.fixture
async def controller_url(tmp_path: Path) -> AsyncIterator[str]:
    registry = Registry(tmp_path / "controller.db", tmp_path / "blobs")
    app = web.Application()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    registry_api.add_routes(app, registry, public_url=lambda: url)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield url
    finally:
        await runner.cleanup()
        registry.close()


async def test_pull_writes_the_artifact_and_resumes_a_partial_download(
        controller_url: str, tmp_path: Path) -> None:
    helper = LLMOpsHelper(controller_url)
    source = model_file(tmp_path / "m.gguf", size=3 << 20)
    version = await asyncio.to_thread(helper.push_model, source, "m")
    data = source.read_bytes()

    whole = await asyncio.to_thread(helper.pull_model, "m", version.version, tmp_path / "a.gguf")
    assert whole.read_bytes() == data

    # An interrupted download left its first megabyte: the rest is fetched, not all of it.
    target = tmp_path / "b.gguf"
    seen: list[tuple[str, int, int]] = []
    (tmp_path / "b.gguf.part").write_bytes(data[: 1 << 20])
    await asyncio.to_thread(helper.pull_model, "m", "1", target,
                            progress=lambda *p: seen.append(p))
    assert target.read_bytes() == data and not (tmp_path / "b.gguf.part").exists()
    assert seen[0][1] > 1 << 20, "progress counts on from the bytes already there"

    # A partial that is not a prefix of the artifact: refused, removed, the next pull works.
    (tmp_path / "c.gguf.part").write_bytes(b"x" * 1000)
    with pytest.raises(LLMOpsError, match="does not match the registry"):
        await asyncio.to_thread(helper.pull_model, "m", 1, tmp_path / "c.gguf")
    assert not (tmp_path / "c.gguf").exists() and not (tmp_path / "c.gguf.part").exists()
    await asyncio.to_thread(helper.pull_model, "m", 1, tmp_path / "c.gguf")
    assert (tmp_path / "c.gguf").read_bytes() == data


async def test_llmops_models_pull(controller_url: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    source = model_file(tmp_path / "m.gguf", size=4096)
    await asyncio.to_thread(LLMOpsHelper(controller_url).push_model, source, "m")
    out = tmp_path / "pulled.gguf"
    code = await asyncio.to_thread(cli.main, ["--url", controller_url, "models", "pull", "m",
                                              "1", "-o", str(out)])
    assert code == 0 and out.read_bytes() == source.read_bytes()
    assert capsys.readouterr().out.strip().endswith(f"wrote {out}")  # after the server log
    code = await asyncio.to_thread(cli.main, ["--url", controller_url, "models", "pull", "m",
                                              "9"])
    assert code == 1 and "no version 9" in capsys.readouterr().err
