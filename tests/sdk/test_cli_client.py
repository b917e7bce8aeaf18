"""The ``llmops`` client commands end to end through `main`, against the controller's test double.

`main` runs in a worker thread (`asyncio.to_thread`) while the aiohttp server serves on the
test's loop; capsys captures what it prints.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from llm_ops_helper.cli import main
from llm_ops_helper.progress import TransferBars
from tests.sdk.conftest import free_port, model_file
from tests.sdk.fake_controller import FakeController


async def llmops(fake: FakeController, *argv: str) -> int:
    return await asyncio.to_thread(main, ["--url", fake.url, *argv])


async def test_push_list_and_show_print_tables(fake: FakeController, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = model_file(tmp_path / "tiny.gguf", size=2048)
    assert await llmops(fake, "models", "push", str(path), "--tag", "team=sre",
                        "--description", "first") == 0
    out = capsys.readouterr().out
    assert out.startswith("pushed tiny@1: registered, gguf for llamacpp, 2.0 KiB, sha256 ")
    assert fake.uploads[0].query["tag"] == ["team=sre"]

    assert await llmops(fake, "models", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "LATEST", "VERSIONS", "ALIASES", "UPDATED"]
    assert lines[1].split()[:4] == ["tiny", "1", "1", "-"]

    assert await llmops(fake, "models", "show", "tiny") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "model tiny; aliases: none"
    assert lines[1].split()[:4] == ["VERSION", "STAGE", "ALIASES", "RUNTIME"]
    assert lines[2].split()[:7] == ["1", "registered", "-", "llamacpp", "gguf", "2.0", "KiB"]
    assert lines[2].endswith("tester first") or lines[2].split()[-1] == "first"

    assert await llmops(fake, "models", "show", "tiny", "1") == 0
    details = capsys.readouterr().out
    assert "ref:           tiny@1" in details and "tags:          team=sre" in details


async def test_json_output_before_or_after_the_command(
        fake: FakeController, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await llmops(fake, "models", "push", str(model_file(tmp_path / "tiny.gguf")), "--json")
    pushed = json.loads(capsys.readouterr().out)
    assert pushed["ref"] == "tiny@1" and pushed["artifact"]["size_bytes"] == 4096
    assert await llmops(fake, "--json", "models", "list") == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["tiny"]
    assert await llmops(fake, "models", "diff", "tiny", "1", "1", "--json") == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["from"]["ref"] == "tiny@1" and diff["artifact"]["same"] is True


async def test_deploy_a_file_waits_and_prints_the_endpoints(
        fake: FakeController, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = model_file(tmp_path / "tiny.gguf")
    assert await llmops(fake, "deploy", str(path), "--replicas", "2", "--gpus", "2",
                        "--gpu-memory", "40GiB", "--arg=--ctx-size=64", "--env",
                        "LLAMA_LOG=1") == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "deployment tiny: available, 2/2 ready on tiny@1",
        "  tiny-r1-000000: http://gpu-1:9000/v1",
        "  tiny-r1-000001: http://gpu-1:9001/v1"]
    assert captured.err.splitlines() == [
        "deployment tiny: progressing, 0/2 ready on tiny@1 (tiny-r1-000000 pending, "
        "tiny-r1-000001 pending)",
        "deployment tiny: progressing, 0/2 ready on tiny@1 (tiny-r1-000000 starting, "
        "tiny-r1-000001 starting)",
        "deployment tiny: available, 2/2 ready on tiny@1"]
    put = next(r for r in fake.requests if r.method == "PUT")
    assert put.body == {"model": "tiny@1", "runtime": None, "replicas": 2,
                        "gpus_per_replica": 2, "gpu_memory_bytes": 40 * 2**30,
                        "args": ["--ctx-size=64"], "env": {"LLAMA_LOG": "1"}}


async def test_status_scale_rollback_and_delete(
        fake: FakeController, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await llmops(fake, "deploy", str(model_file(tmp_path / "tiny.gguf")), "--name", "chat")
    await llmops(fake, "deploy", str(model_file(tmp_path / "tiny.gguf", seed=1)), "--name",
                 "chat")
    capsys.readouterr()
    assert await llmops(fake, "status") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "PHASE", "READY", "REVISION", "UPDATED",
                                "MESSAGE"]
    assert lines[1].split()[:5] == ["chat", "chat@2", "available", "1/1", "2"]

    assert await llmops(fake, "status", "chat") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "deployment chat: available, 1/1 ready on chat@2"
    assert lines[1].startswith("revision 2; previous version chat@1; updated ")
    assert lines[2].split() == ["REPLICA", "HOST", "GPUS", "VERSION", "STATE", "RESTARTS", "URL",
                                "REASON"]
    assert lines[3].split() == ["chat-r2-000000", "gpu-1", "0", "chat@2", "ready", "0",
                                "http://gpu-1:9000/v1", "-"]

    assert await llmops(fake, "scale", "chat", "3", "--wait") == 0
    assert capsys.readouterr().out == "deployment chat: available, 3/3 ready on chat@2\n"
    assert await llmops(fake, "rollback", "chat", "--to", "1") == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "deployment chat: available, 3/3 ready on chat@1")
    assert await llmops(fake, "delete", "chat") == 0
    assert "deleting" in capsys.readouterr().out
    assert await llmops(fake, "status") == 0
    assert capsys.readouterr().out == "no deployments\n"


async def test_registry_commands(fake: FakeController, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    await llmops(fake, "models", "push", str(model_file(tmp_path / "a.gguf")), "--name", "tiny")
    await llmops(fake, "models", "push", str(model_file(tmp_path / "b.gguf", size=5000)),
                 "--name", "tiny", "--description", "bigger")
    capsys.readouterr()
    assert await llmops(fake, "models", "promote", "tiny", "2", "--stage", "staging") == 0
    assert await llmops(fake, "models", "promote", "tiny", "2") == 0
    assert await llmops(fake, "models", "alias", "tiny", "canary", "1") == 0
    assert await llmops(fake, "models", "alias", "tiny", "canary", "--delete") == 0
    assert await llmops(fake, "models", "diff", "tiny", "1", "production") == 0
    assert await llmops(fake, "models", "retire", "tiny", "1") == 0
    assert capsys.readouterr().out.splitlines() == [
        "tiny@2 is now staging",
        "tiny@2 is now production",
        "tiny: alias canary -> 1",
        "tiny: alias canary removed (was 1)",
        "FIELD        tiny@1      tiny@2",
        "description  -           bigger",
        "stage        registered  production",
        "artifact: differs, size +904 bytes",
        "tiny@1 is now retired"]


async def test_errors_are_one_line_and_exit_1(
        fake: FakeController, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(
        main, ["status", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "llmops: error: cannot reach the controller at http://127.0.0.1:")

    missing = tmp_path / "nope.gguf"
    assert await llmops(fake, "deploy", str(missing)) == 1
    assert capsys.readouterr().err == f"llmops: error: {missing}: no such file\n"
    assert fake.requests == []

    fake.rollout = [{"phase": "failed", "message": "no host has 2 free GPUs with 40 GiB",
                     "replica_state": "pending"}]
    assert await llmops(fake, "deploy", str(model_file(tmp_path / "t.gguf"))) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "llmops: error: deployment t failed: no host has 2 free GPUs with 40 GiB")

    assert await llmops(fake, "models", "promote", "t", "1") == 1
    assert capsys.readouterr().err == (
        "llmops: error: t@1: cannot move from 'registered' to 'production': from 'registered' "
        "a version can move to: staging, archived, retired (HTTP 409)\n")
    assert await llmops(fake, "status", "nope") == 1
    assert capsys.readouterr().err == (
        "llmops: error: no deployment named 'nope' (GET /api/v1/deployments lists them) "
        "(HTTP 404)\n")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["models", "promote", "tiny", "two"], ["deploy", "x", "--gpu-memory", "lots"],
                 ["models", "alias", "tiny", "canary"], ["models", "push", "x", "--tag", "k"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
        assert "llmops" in capsys.readouterr().err


def test_progress_bars_draw_on_stderr_only_when_enabled(
        capsys: pytest.CaptureFixture[str]) -> None:
    with TransferBars() as quiet:  # capsys's stderr is no terminal
        quiet("upload", 10, 100)
    assert capsys.readouterr().err == ""
    with TransferBars(enabled=True) as bars:
        bars("hash", 50, 100)
        bars("hash", 100, 100)
        bars("upload", 100, 100)
    err = capsys.readouterr().err
    assert "\rsha256:" in err and "\rupload:" in err and "B/s" in err
