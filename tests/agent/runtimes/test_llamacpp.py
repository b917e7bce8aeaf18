"""llama.cpp's real server on the tiny model, launched from the llamacpp runtime's own plan."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from llm_ops_helper.agent.collectors.runtime import parse_metrics
from llm_ops_helper.agent.runtimes.llamacpp import LlamaCppRuntime
from llm_ops_helper.proto.messages import ReplicaSpec
from llm_ops_helper.tinymodel import N_VOCAB, write_broken_gguf, write_tiny_llama

from .servers import child, free_port


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny.gguf")


def replica(served_model_name: str = "") -> ReplicaSpec:
    return ReplicaSpec(name="tiny-r1-abc123", deployment="tiny", version="tiny@1",
                       runtime="llamacpp", served_model_name=served_model_name)


# --- the tiny model ------------------------------------------------------------------------


def test_tiny_model_is_a_small_llama_with_a_byte_fallback_vocab(tiny: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(tiny)
    fields = {name: reader.fields[name].contents() for name in (
        "general.architecture", "llama.context_length", "llama.embedding_length",
        "llama.block_count", "llama.attention.head_count", "llama.attention.head_count_kv",
        "llama.vocab_size", "general.file_type", "tokenizer.ggml.model",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")}
    assert fields == {
        "general.architecture": "llama", "llama.context_length": 256,
        "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 4,
        "llama.vocab_size": N_VOCAB, "general.file_type": 0, "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(types) == N_VOCAB and types.count(int(gguf.TokenType.BYTE)) == 256
    assert len(reader.tensors) == 3 + 2 * 9
    assert 400_000 < tiny.stat().st_size < 700_000


def test_variants_differ_and_the_same_arguments_give_the_same_bytes(tmp_path: Path,
                                                                    tiny: Path) -> None:
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    again = write_tiny_llama(tmp_path / "again.gguf")
    v2 = write_tiny_llama(tmp_path / "v2.gguf", variant="v2")
    seeded = write_tiny_llama(tmp_path / "s1.gguf", seed=1)
    assert digest(again) == digest(tiny)
    assert len({digest(tiny), digest(v2), digest(seeded)}) == 3


def test_tinymodel_command_line_writes_the_file(tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    done = subprocess.run([sys.executable, "-m", "llm_ops_helper.tinymodel", str(out),
                           "--variant", "v3"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith(str(out)) and out.read_bytes()[:4] == b"GGUF"


# --- the real server -----------------------------------------------------------------------


async def test_llama_cpp_serves_chat_and_metrics_under_the_alias(tiny: Path,
                                                                 tmp_path: Path) -> None:
    plan = LlamaCppRuntime(server_binary=None).plan(
        replica(served_model_name="tiny-chat"), model_path=tiny, host="127.0.0.1",
        port=free_port())
    async with child(plan, tmp_path / "llama.log") as server, aiohttp.ClientSession() as http:
        await server.wait_healthy(http)
        async with http.get(f"{plan.base_url}/v1/models") as resp:
            models = await resp.json()
        assert [m["id"] for m in models["data"]] == ["tiny-chat"]
        body = {"model": "tiny-chat", "max_tokens": 6, "ignore_eos": True,
                "messages": [{"role": "user", "content": "hello world"}]}
        async with http.post(f"{plan.base_url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["model"] == "tiny-chat"
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] == 6
        assert plan.metrics_url is not None and plan.metrics_format == "llamacpp"
        async with http.get(plan.metrics_url) as resp:
            text = await resp.text()
        metrics, histograms = parse_metrics(text, plan.metrics_format)
        assert metrics["generation_tokens_total"] == 6
        assert metrics["prompt_tokens_total"] == answer["usage"]["prompt_tokens"]
        assert metrics["requests_running"] == 0 and metrics["requests_waiting"] == 0
        assert histograms == {}
        assert await server.stop() == 0
        assert "llamacpp_server: SIGTERM, stopping" in server.log_text()


async def test_a_model_llama_cpp_cannot_load_ends_the_launcher_with_the_file_named(
        tmp_path: Path) -> None:
    broken = write_broken_gguf(tmp_path / "broken.gguf")
    plan = LlamaCppRuntime(server_binary=None).plan(replica(), model_path=broken,
                                                    host="127.0.0.1", port=free_port())
    async with child(plan, tmp_path / "llama.log") as server:
        assert await server.wait_exit() == 1
        lines = server.log_text().strip().splitlines()
    # llama.cpp logs from a thread of its own: its last lines may land after ours.
    assert f"llamacpp_server: cannot load model {broken} (llama.cpp's log above says why)" in lines


def test_a_file_that_is_not_gguf_is_refused_before_llama_cpp_starts(tmp_path: Path) -> None:
    card = tmp_path / "card.toml"
    card.write_text("[sim]\n")
    done = subprocess.run([sys.executable, "-m", "llm_ops_helper.agent.runtimes.llamacpp_server",
                           "--model", str(card), "--port", str(free_port())],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == (f"llamacpp_server: cannot load model {card}: not a GGUF file "
                           f"(starts with b'[sim')\n")
