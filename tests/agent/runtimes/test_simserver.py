"""The simulator as a real child process, launched from the sim runtime's own plan."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llm_ops_helper.agent.collectors.runtime import parse_metrics
from llm_ops_helper.agent.runtimes.base import LaunchPlan
from llm_ops_helper.agent.runtimes.sim import SimRuntime
from llm_ops_helper.agent.runtimes.simserver import load_card, write_model_card
from llm_ops_helper.proto.messages import Histogram, ReplicaSpec

from .servers import Child, child, free_port

FAST = {"ttft_base_ms": 5.0, "ttft_per_prompt_token_ms": 0.0, "itl_ms": 2.0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 4}


def sim_plan(card: Path, *args: str) -> LaunchPlan:
    spec = ReplicaSpec(name="tiny-r1-abc123", deployment="tiny", version="tiny@1",
                       runtime="sim", args=list(args))
    return SimRuntime().plan(spec, model_path=card, host="127.0.0.1", port=free_port())


@asynccontextmanager
async def sim(tmp_path: Path, *args: str, **card: Any) -> AsyncIterator[
        tuple[Child, aiohttp.ClientSession]]:
    """A healthy simulator on a card with ``card``'s keys, and a client session."""
    plan = sim_plan(write_model_card(tmp_path / "card.toml", **card), *args)
    async with child(plan, tmp_path / "sim.log") as server, aiohttp.ClientSession() as http:
        await server.wait_healthy(http)
        yield server, http


async def scrape(server: Child, http: aiohttp.ClientSession) -> tuple[
        dict[str, float], dict[str, Histogram]]:
    assert server.plan.metrics_url is not None and server.plan.metrics_format is not None
    async with http.get(server.plan.metrics_url) as resp:
        assert resp.status == 200
        return parse_metrics(await resp.text(), server.plan.metrics_format)


async def post(server: Child, http: aiohttp.ClientSession, path: str,
               body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(server.plan.base_url + path, json=body) as resp:
        return resp.status, await resp.json()


async def test_chat_and_completions_answer_like_vllm_and_the_metrics_move(
        tmp_path: Path) -> None:
    async with sim(tmp_path, **FAST) as (server, http):
        async with http.get(server.plan.base_url + "/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["tiny"]
        status, answer = await post(server, http, "/v1/chat/completions", CHAT)
        assert status == 200
        assert answer["object"] == "chat.completion" and answer["model"] == "tiny"
        assert answer["choices"][0]["message"] == {"role": "assistant",
                                                   "content": "the quick brown fox"}
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"] == {"prompt_tokens": 10, "completion_tokens": 4,
                                   "total_tokens": 14}  # 40 characters, ~4 a token
        status, text = await post(server, http, "/v1/completions",
                                  {"prompt": "abcd", "max_tokens": 2})
        assert status == 200 and text["choices"][0]["text"] == "the quick"
        metrics, histograms = await scrape(server, http)
    assert metrics == {"requests_running": 0, "requests_waiting": 0, "kv_cache_usage": 0,
                       "prompt_tokens_total": 11, "generation_tokens_total": 6,
                       "requests_finished_total": 2, "requests_failed_total": 0}
    assert set(histograms) == {"ttft_seconds", "itl_seconds", "e2e_seconds", "queue_seconds"}
    assert histograms["ttft_seconds"].count == 2 and histograms["itl_seconds"].count == 3 + 1
    assert histograms["e2e_seconds"].count == 2 and histograms["queue_seconds"].count == 2


async def test_streaming_sends_a_chunk_per_token_then_usage_then_done(tmp_path: Path) -> None:
    async with sim(tmp_path, **FAST) as (server, http):
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        async with http.post(server.plan.base_url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = (await resp.read()).decode()
        events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
        assert deltas[0] == {"role": "assistant", "content": "the"}
        assert "".join(d.get("content", "") for d in deltas) == "the quick brown fox"
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 4 + ["length"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        metrics, _ = await scrape(server, http)
        assert metrics["generation_tokens_total"] == 4


async def test_a_client_that_leaves_mid_stream_is_counted_as_an_abort(tmp_path: Path) -> None:
    async with sim(tmp_path, itl_ms=50.0) as (server, http):
        body = {**CHAT, "stream": True, "max_tokens": 200}
        async with http.post(server.plan.base_url + "/v1/chat/completions", json=body) as resp:
            await resp.content.readuntil(b"\n\n")
        while (metrics := (await scrape(server, http))[0])["requests_running"]:
            await asyncio.sleep(0.05)
        assert metrics["requests_finished_total"] == 1  # finished_reason="abort"
        assert metrics["kv_cache_usage"] == 0


async def test_requests_beyond_max_concurrency_wait_in_a_queue(tmp_path: Path) -> None:
    card = {"ttft_base_ms": 1.0, "itl_ms": 40.0, "max_concurrency": 2, "kv_cache_tokens": 1000}
    async with sim(tmp_path, **card) as (server, http):
        body = {**CHAT, "max_tokens": 20}  # 10 + 20 tokens each: 3% of the cache
        calls = [asyncio.create_task(post(server, http, "/v1/chat/completions", body))
                 for _ in range(5)]
        seen: list[dict[str, float]] = []
        while not all(c.done() for c in calls):
            seen.append((await scrape(server, http))[0])
            await asyncio.sleep(0.02)
        assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 5
        metrics, histograms = await scrape(server, http)
    assert max(s["requests_running"] for s in seen) == 2
    assert max(s["requests_waiting"] for s in seen) == 3
    assert 0 < max(s["kv_cache_usage"] for s in seen) <= 2 * 30 / 1000
    assert metrics["requests_finished_total"] == 5 and metrics["requests_waiting"] == 0
    queued = histograms["queue_seconds"]
    assert queued.count == 5 and queued.sum > 0


async def test_loading_answers_503_until_start_up_is_over(tmp_path: Path) -> None:
    plan = sim_plan(write_model_card(tmp_path / "card.toml", startup_s=0.5))
    async with child(plan, tmp_path / "sim.log") as server, aiohttp.ClientSession() as http:
        statuses: list[int] = []
        while not statuses or statuses[-1] != 200:
            try:
                async with http.get(plan.health_url) as resp:
                    statuses.append(resp.status)
                    if resp.status == 503:
                        assert (await resp.json())["error"]["message"] == "Loading model"
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.02)
        assert statuses[0] == 503 and set(statuses) == {503, 200}
        assert await server.stop() == 0


async def test_error_rate_one_answers_every_completion_with_an_openai_error(
        tmp_path: Path) -> None:
    async with sim(tmp_path, error_rate=1.0) as (server, http):
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/completions"):
            status, body = await post(server, http, path, {**CHAT, "prompt": "hi"})
            assert status == 500
            assert body["error"]["type"] == "InternalServerError"
            assert body["error"]["code"] == 500
        async with http.get(server.plan.health_url) as resp:
            assert resp.status == 200
        assert server.plan.metrics_url is not None
        async with http.get(server.plan.metrics_url) as resp:
            text = await resp.text()
        metrics, _ = await scrape(server, http)
    # The failures reach the canonical counter through vLLM's own counter and labels.
    assert parse_metrics(text, "sim")[0]["requests_failed_total"] == 3
    assert metrics["requests_failed_total"] == 3
    assert metrics["requests_finished_total"] == 0  # none reached the engine
    failed = [line for line in text.splitlines() if line.startswith("http_requests_total{")]
    assert failed == [
        'http_requests_total{handler="/v1/chat/completions",method="POST",status="5xx"} 1.0',
        'http_requests_total{handler="/v1/completions",method="POST",status="5xx"} 2.0',
    ]  # /health and /metrics are not counted, as in vLLM


async def test_every_answer_is_counted_by_status_class_as_vllm_does(tmp_path: Path) -> None:
    async with sim(tmp_path, **FAST) as (server, http):
        assert (await post(server, http, "/v1/completions", {"prompt": "a", "max_tokens": 1}))[
            0] == 200
        assert (await post(server, http, "/v1/completions", {"prompt": "a", "max_tokens": 0}))[
            0] == 400
        async with http.get(server.plan.base_url + "/v1/models") as resp:
            assert resp.status == 200
        async with http.get(server.plan.base_url + "/v1/completions") as resp:
            assert resp.status == 405
        async with http.get(server.plan.base_url + "/no/such/path") as resp:
            assert resp.status == 404
        assert server.plan.metrics_url is not None
        async with http.get(server.plan.metrics_url) as resp:
            text = await resp.text()
    counted = sorted(line for line in text.splitlines() if line.startswith("http_requests_total{"))
    assert counted == [
        'http_requests_total{handler="/v1/completions",method="GET",status="4xx"} 1.0',
        'http_requests_total{handler="/v1/completions",method="POST",status="2xx"} 1.0',
        'http_requests_total{handler="/v1/completions",method="POST",status="4xx"} 1.0',
        'http_requests_total{handler="/v1/models",method="GET",status="2xx"} 1.0',
        'http_requests_total{handler="none",method="GET",status="4xx"} 1.0',
    ]
    assert parse_metrics(text, "sim")[0]["requests_failed_total"] == 0  # 4xx are the client's


async def test_bad_requests_get_openai_errors(tmp_path: Path) -> None:
    async with sim(tmp_path) as (server, http):
        status, body = await post(server, http, "/v1/chat/completions",
                                  {**CHAT, "model": "other"})
        assert (status, body["error"]["message"]) == (404, "The model `other` does not exist.")
        status, body = await post(server, http, "/v1/chat/completions", {"messages": "hi"})
        assert status == 400 and "messages" in body["error"]["message"]
        status, body = await post(server, http, "/v1/completions", {"prompt": "a",
                                                                    "max_tokens": 0})
        assert status == 400 and "max_tokens" in body["error"]["message"]


async def test_exit_at_start_exits_1_with_a_message(tmp_path: Path) -> None:
    card = write_model_card(tmp_path / "card.toml", exit_at_start=True)
    async with child(sim_plan(card), tmp_path / "sim.log") as server:
        assert await server.wait_exit() == 1
        last = server.log_text().strip().splitlines()[-1]
    assert last == (f"simserver: {card}: failed to load the model "
                    f"(faults.exit_at_start = true)")


async def test_crash_after_s_ends_a_ready_server_with_exit_1(tmp_path: Path) -> None:
    async with sim(tmp_path, crash_after_s=0.2) as (server, _):
        assert await server.wait_exit() == 1
        assert "faults.crash_after_s = 0.2" in server.log_text()


async def test_hang_takes_connections_and_never_answers_not_even_health(tmp_path: Path) -> None:
    plan = sim_plan(write_model_card(tmp_path / "card.toml", hang=True))
    async with child(plan, tmp_path / "sim.log") as server, aiohttp.ClientSession() as http:
        while True:  # wait until it listens: a refused connection is not a hang
            try:
                async with asyncio.timeout(0.5), http.get(plan.health_url):
                    raise AssertionError("a hung server answered")
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
            except TimeoutError:
                break
        assert server.proc.returncode is None
        assert await server.stop() == 0


async def test_hang_after_s_lets_it_become_ready_first(tmp_path: Path) -> None:
    async with sim(tmp_path, hang_after_s=0.3) as (server, http):
        while True:
            try:
                async with asyncio.timeout(0.5), http.get(server.plan.health_url) as resp:
                    assert resp.status == 200
            except TimeoutError:
                break
            await asyncio.sleep(0.05)
        assert server.proc.returncode is None  # hung, not dead; wait_healthy saw it ready


@pytest.mark.parametrize(("card", "message"), [
    ("[sim]\nitl_ms = \"fast\"\n", "key 'sim.itl_ms': expected float, got str"),
    ("[sim]\n[faults]\nexplode = true\n", "key 'faults.explode': unknown key"),
    ("[faults]\nhang = true\n", "key 'sim': required key is missing"),
    ("[sim]\nmax_concurrency = 0\n", "key 'sim.max_concurrency': expected int >= 1"),
    ("[sim\n", "not valid TOML"),
])
def test_a_bad_card_exits_2_naming_the_file_and_the_key(tmp_path: Path, card: str,
                                                        message: str) -> None:
    path = tmp_path / "card.toml"
    path.write_text(card)
    done = subprocess.run([*sim_plan(path).argv], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith(f"simserver: {path}: ")
    assert message in done.stderr and done.stderr.count("\n") == 1


def test_write_model_card_puts_each_key_in_its_table(tmp_path: Path) -> None:
    path = write_model_card(tmp_path / "c.toml", itl_ms=3.0, max_tokens=8, error_rate=0.25)
    card = load_card(path)
    assert (card.sim.itl_ms, card.sim.max_tokens, card.faults.error_rate) == (3.0, 8, 0.25)
    assert card.faults.crash_after_s is None and card.sim.startup_s == 0
    with pytest.raises(ValueError, match="unknown model card key 'itl'"):
        write_model_card(tmp_path / "d.toml", itl=3)


def test_the_simulator_module_runs_with_this_python() -> None:
    done = subprocess.run([sys.executable, "-m", "llm_ops_helper.agent.runtimes.simserver",
                           "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--model-card" in done.stdout


async def test_the_runtime_collector_reports_each_intervals_latency_percentiles(
        tmp_path: Path) -> None:
    # A real server scraped twice by the agent's collector, with requests in between: the
    # second sample carries this interval's TTFT percentiles (the controller keeps only
    # histogram sums and counts, so percentiles are made here).
    from llm_ops_helper.agent.collectors.runtime import RuntimeCollector, ScrapeTarget

    async with sim(tmp_path, ttft_base_ms=200.0, ttft_per_prompt_token_ms=0.0,
                   itl_ms=2.0) as (server, http):
        assert server.plan.metrics_url is not None
        target = ScrapeTarget("tiny-r1-abc123", "sim", server.plan.metrics_url)
        collector = RuntimeCollector(lambda: [target])
        try:
            (first,) = (await collector.collect()).replicas or []
            assert not any(k.startswith("ttft_p") for k in first.metrics)
            for _ in range(3):
                status, _ = await post(server, http, "/v1/chat/completions", CHAT)
                assert status == 200
            (second,) = (await collector.collect()).replicas or []
        finally:
            await collector.close()
    p50, p99 = second.metrics["ttft_p50_seconds"], second.metrics["ttft_p99_seconds"]
    assert 0.1 < p50 <= p99 <= 0.5, second.metrics  # vLLM's bucket around 200 ms: (0.1, 0.25]
    assert "itl_p90_seconds" in second.metrics
