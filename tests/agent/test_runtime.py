"""The runtime collector: canonical names from recorded /metrics pages, and real HTTP scrapes.

The vLLM and SGLang pages in tests/fixtures/metrics are built from the names, types and labels in
shared/data/runtime-metrics.md; llamacpp.txt is recorded from a real llama.cpp server. The expected
numbers below are read straight off those pages.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from llm_ops_helper.agent.collectors import metric_map
from llm_ops_helper.agent.collectors import runtime as runtime_module
from llm_ops_helper.agent.collectors.metric_map import (
    MetricsMappingError,
    mappings,
    parse_mappings,
)
from llm_ops_helper.agent.collectors.runtime import (
    MetricsParseError,
    MetricsParser,
    RuntimeCollector,
    ScrapeTarget,
    parse_metrics,
)
from llm_ops_helper.proto import codec
from llm_ops_helper.proto.messages import Telemetry

FIXTURES = Path(__file__).parents[1] / "fixtures" / "metrics"
PROM_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def page(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text()


def scaled(text: str, factor: float) -> str:
    """The same page with every sample value multiplied: a later scrape of the same server."""
    def scale(match: re.Match[str]) -> str:
        return f"{match[1]} {float(match[2]) * factor!r}"
    return re.sub(r"^([^#].*) (\S+)$", scale, text, flags=re.MULTILINE)


# --- canonical values per fixture ---------------------------------------------------------


def test_vllm_two_engines_sum_counters_and_queues_and_take_the_busiest_kv_cache() -> None:
    metrics, histograms = parse_metrics(page("vllm"), "vllm")
    assert metrics == {
        "requests_running": 12 + 9,
        "requests_waiting": 3 + 0,
        "kv_cache_usage": 0.6875,  # max(0.6875, 0.53125)
        "prompt_tokens_total": 1.555398e6 + 1.500353e6,
        "generation_tokens_total": 354010 + 332756,
        "requests_finished_total": 75 + 1350 + 75 + 74 + 1332 + 74,  # every finished_reason
        "preemptions_total": 4 + 1,
        "prefix_cache_queries_total": 1.555398e6 + 1.500353e6,
        "prefix_cache_hits_total": 518466 + 500117,
        "prompt_tokens_cached_total": 81920 + 65536,
        "requests_failed_total": 0,  # http_requests_total is there, with no 5xx series yet
    }
    assert set(histograms) == {"ttft_seconds", "itl_seconds", "e2e_seconds", "queue_seconds"}
    ttft = histograms["ttft_seconds"]
    assert ttft.count == 1500 + 1480
    assert ttft.sum == pytest.approx(198.56392174157511 + 198.87943033823257)
    bounds = [le for le, _ in ttft.buckets]
    assert bounds == [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                      2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
    assert dict(ttft.buckets)[0.25] == 1312 + 1308
    counts = [n for _, n in ttft.buckets]
    assert counts == sorted(counts)
    assert counts[-1] <= ttft.count  # +Inf is not sent: it always equals count
    itl = histograms["itl_seconds"]
    assert itl.count == 29993 + 29592
    assert itl.sum == pytest.approx(859.1067148768719 + 846.5176543407401)
    assert histograms["e2e_seconds"].count == 2980
    assert histograms["e2e_seconds"].sum == pytest.approx(10187.551006914533 + 9703.150125542335)
    assert histograms["queue_seconds"].sum == pytest.approx(85.7009912632107 + 76.67856733382916)


def test_vllm_before_0_9_2_maps_the_old_names_to_the_same_canonical_ones() -> None:
    metrics, histograms = parse_metrics(page("vllm-old"), "vllm")
    assert metrics["kv_cache_usage"] == 0.4375  # vllm:gpu_cache_usage_perc
    assert metrics["prefix_cache_queries_total"] == 612894  # vllm:gpu_prefix_cache_queries_total
    assert metrics["prefix_cache_hits_total"] == 204298
    assert metrics["requests_finished_total"] == 32 + 576 + 32
    assert histograms["itl_seconds"].count == 12800  # vllm:time_per_output_token_seconds
    assert histograms["itl_seconds"].sum == pytest.approx(366.11574171855904)
    new_metrics, new_histograms = parse_metrics(page("vllm"), "vllm")
    assert set(metrics) == set(new_metrics) - {"prompt_tokens_cached_total"}
    assert set(histograms) == set(new_histograms)


def test_vllm_failed_requests_are_the_5xx_answers_of_the_completion_endpoints() -> None:
    metrics, histograms = parse_metrics(page("vllm-errors"), "vllm")
    # 5xx on /v1/chat/completions and /v1/completions; not the 5xx on /v1/models, not the 4xx
    # (the client's errors, and handler "none" for unknown paths), not the 2xx.
    assert metrics["requests_failed_total"] == 12 + 5
    base_metrics, base_histograms = parse_metrics(page("vllm"), "vllm")
    assert {k: v for k, v in metrics.items() if k != "requests_failed_total"} == {
        k: v for k, v in base_metrics.items() if k != "requests_failed_total"}
    assert histograms == base_histograms
    assert parse_metrics(page("vllm-errors"), "sim") == (metrics, histograms)


def test_the_label_matcher_keeps_only_the_series_it_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    custom = parse_mappings({"vllm": {"metrics": {
        "failed": {"from": ["http_requests_total"], "agg": "sum",
                   "labels": {"status": "5xx", "handler": ["/v1/completions", "/v1/models"]}},
        "all": {"from": ["http_requests_total"], "agg": "sum"},
        "client_errors": {"from": ["http_requests_total"], "agg": "sum",
                          "labels": {"status": ["4xx"]}},
        "biggest_3xx": {"from": ["http_requests_total"], "agg": "max",
                        "labels": {"status": "3xx"}},
        "by_missing_label": {"from": ["http_requests_total"], "agg": "sum",
                             "labels": {"code": "500"}},
    }}})
    monkeypatch.setattr(metric_map, "mappings", lambda: custom)
    metrics, _ = parse_metrics(page("vllm-errors"), "vllm")
    assert metrics == {
        "failed": 5 + 2,
        "all": 2669 + 31 + 12 + 2078 + 5 + 2393 + 2 + 17,
        "client_errors": 31 + 17,
        # biggest_3xx: a max of no series is not reported
        "by_missing_label": 0,  # a series without the label does not match
    }


def test_a_release_with_both_names_reports_the_current_one_only() -> None:
    text = (
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5\n'
    )
    assert parse_metrics(text, "vllm")[0] == {"kv_cache_usage": 0.5}


def test_sglang() -> None:
    metrics, histograms = parse_metrics(page("sglang"), "sglang")
    assert metrics == {
        "requests_running": 18,
        "requests_waiting": 4,
        "kv_cache_usage": 0.62,
        "prompt_tokens_total": 2.219628e6,
        "generation_tokens_total": 520609,
        "requests_finished_total": 2210,
        "prefix_cache_hit_rate": 0.375,
        "gen_throughput": 1432.5,
    }
    assert {name: h.count for name, h in histograms.items()} == {
        "ttft_seconds": 2210, "itl_seconds": 44185, "e2e_seconds": 2210, "queue_seconds": 2210}
    assert histograms["itl_seconds"].sum == pytest.approx(934.5794424426958)
    assert histograms["queue_seconds"].buckets[0] == (0.0, 0.0)


def test_llamacpp() -> None:
    # Recorded after 3 completions and 1 chat completion of 8 tokens each, one at a time on one
    # slot, so nothing is running or deferred at scrape time.
    metrics, histograms = parse_metrics(page("llamacpp"), "llamacpp")
    assert metrics == {
        "requests_running": 0,
        "requests_waiting": 0,
        "prompt_tokens_total": 74,  # 11 + 12 + 23 + 31 prompt tokens, less 0 + 1 + 1 + 1 cached
        "generation_tokens_total": 32,  # 4 requests x 8 tokens
        "prompt_tokens_cached_total": 3,
        "prompt_seconds_total": 0.024883,
        "generation_seconds_total": 0.009477,
        "n_decode_total": 32,
        "n_tokens_max": 38,  # a counter without `_total`
        "n_busy_slots_per_decode": 1,
        "prompt_tokens_per_second": 2973.92,
        "generation_tokens_per_second": 2954.52,
        "spec_draft_tokens_total": 0,
        "spec_accepted_tokens_total": 0,
        "spec_drafts_total": 0,
    }
    assert histograms == {}


def test_the_simulator_speaks_vllm_names() -> None:
    assert parse_metrics(page("vllm"), "sim") == parse_metrics(page("vllm"), "vllm")


def test_every_runtime_maps_the_core_canonical_names() -> None:
    core = {"requests_running", "requests_waiting", "prompt_tokens_total",
            "generation_tokens_total"}
    assert set(mappings()) == {"vllm", "sim", "sglang", "llamacpp"}
    for mapping in mappings().values():
        assert core <= set(mapping.metrics), mapping.runtime
    # Failed requests where the runtime counts them: vLLM (and the simulator) only.
    assert {m.runtime for m in mappings().values() if "requests_failed_total" in m.metrics} == {
        "vllm", "sim"}
    for runtime in ("vllm", "sglang"):
        assert set(mappings()[runtime].histograms) == {
            "ttft_seconds", "itl_seconds", "e2e_seconds", "queue_seconds"}


def test_a_bad_mapping_names_the_key() -> None:
    bad = {"vllm": {"metrics": {"kv_cache_usage": {"from": ["vllm:x"], "agg": "avg"}}}}
    with pytest.raises(MetricsMappingError, match=r"\[vllm\.metrics\.kv_cache_usage\].*'avg'"):
        parse_mappings(bad)
    with pytest.raises(MetricsMappingError, match=r"\[sim\]"):
        parse_mappings({"sim": {"same_as": "tgi"}})


def test_a_label_matcher_parses_to_allowed_value_sets() -> None:
    parsed = parse_mappings({"vllm": {"metrics": {"failed": {
        "from": ["http_requests_total"], "agg": "sum",
        "labels": {"status": "5xx", "handler": ["/v1/completions", "/v1/chat/completions"]}}}}})
    spec = parsed["vllm"].metrics["failed"]
    assert spec.labels == (("handler", frozenset({"/v1/completions", "/v1/chat/completions"})),
                           ("status", frozenset({"5xx"})))
    assert spec.matches({"handler": "/v1/completions", "method": "POST", "status": "5xx"})
    assert not spec.matches({"handler": "/v1/completions", "method": "POST", "status": "4xx"})
    assert not spec.matches({"handler": "/v1/models", "status": "5xx"})
    assert not spec.matches({"status": "5xx"})
    assert parse_mappings({"vllm": {"metrics": {"x": {
        "from": ["vllm:x"], "agg": "sum"}}}})["vllm"].metrics["x"].labels == ()


@pytest.mark.parametrize(("labels", "message"), [
    ("5xx", r"labels as a non-empty table of label name = value\(s\), got '5xx'"),
    ({}, r"labels as a non-empty table of label name = value\(s\), got \{\}"),
    ({"sta-tus": "5xx"}, r"labels keyed by Prometheus label names, got 'sta-tus'"),
    ({"__name__": "x"}, r"labels keyed by Prometheus label names, got '__name__'"),
    ({"status": 500}, r"labels\.status as a string or a non-empty list of strings, got 500"),
    ({"status": []}, r"labels\.status as a string or a non-empty list of strings, got \[\]"),
    ({"status": ["5xx", 4]}, r"labels\.status as a string .*, got \['5xx', 4\]"),
])
def test_a_bad_label_matcher_names_the_key_and_what_is_wrong(labels: object,
                                                             message: str) -> None:
    bad = {"vllm": {"metrics": {"requests_failed_total": {
        "from": ["http_requests_total"], "agg": "sum", "labels": labels}}}}
    with pytest.raises(MetricsMappingError,
                       match=r"^metric_names\.toml: \[vllm\.metrics\.requests_failed_total\]: "
                             r"expected " + message):
        parse_mappings(bad)


def test_a_misspelt_labels_key_is_refused() -> None:
    bad = {"vllm": {"metrics": {"requests_failed_total": {
        "from": ["http_requests_total"], "agg": "sum", "label": {"status": "5xx"}}}}}
    with pytest.raises(MetricsMappingError, match=r"optionally labels = \{ \.\.\. \}, got"):
        parse_mappings(bad)


# --- the remembered layout gives what a fresh parse gives ------------------------------------


@pytest.mark.parametrize(("name", "runtime"), [
    ("vllm", "vllm"), ("vllm-old", "vllm"), ("vllm-errors", "vllm"), ("sglang", "sglang"),
    ("llamacpp", "llamacpp")])
def test_later_scrapes_read_the_same_as_a_fresh_parse(
        name: str, runtime: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = MetricsParser(runtime)
    first, later = page(name), scaled(page(name), 3.0)
    assert parser.parse(first) == parse_metrics(first, runtime)
    expected = parse_metrics(later, runtime)
    assert expected != parse_metrics(first, runtime)

    def no_parser(text: str) -> Any:
        raise AssertionError("a page of known shape went through the parser again")
    monkeypatch.setattr(runtime_module, "text_string_to_metric_families", no_parser)
    assert parser.parse(later) == expected


def test_later_scrapes_of_known_shape_read_the_failed_requests_from_the_known_lines(
        monkeypatch: pytest.MonkeyPatch) -> None:
    parser = MetricsParser("vllm")
    assert parser.parse(page("vllm-errors"))[0]["requests_failed_total"] == 17

    def no_parser(text: str) -> Any:
        raise AssertionError("a page of known shape went through the parser again")
    monkeypatch.setattr(runtime_module, "text_string_to_metric_families", no_parser)
    # Every value moves, the 2xx/4xx and /v1/models lines too: only the 5xx lines of the
    # completion endpoints, remembered as such, are summed.
    later = page("vllm-errors").replace(
        'handler="/v1/chat/completions",method="POST",status="5xx"} 12.0',
        'handler="/v1/chat/completions",method="POST",status="5xx"} 40.0').replace(
        'handler="/v1/models",method="GET",status="5xx"} 2.0',
        'handler="/v1/models",method="GET",status="5xx"} 900.0').replace(
        'handler="none",method="GET",status="4xx"} 17.0',
        'handler="none",method="GET",status="4xx"} 800.0')
    assert parser.parse(later)[0]["requests_failed_total"] == 40 + 5
    assert parser.parse(scaled(page("vllm-errors"), 2.0))[0]["requests_failed_total"] == 34


def test_a_first_5xx_series_on_a_known_page_is_counted() -> None:
    parser = MetricsParser("vllm")
    first = page("vllm")
    assert parser.parse(first)[0]["requests_failed_total"] == 0
    failing = first.replace(
        "# HELP http_requests_created",
        'http_requests_total{handler="/v1/completions",method="POST",status="5xx"} 3.0\n'
        'http_requests_total{handler="/v1/models",method="GET",status="5xx"} 9.0\n'
        "# HELP http_requests_created")
    assert parser.parse(failing)[0]["requests_failed_total"] == 3
    assert parser.parse(scaled(failing, 2.0))[0]["requests_failed_total"] == 6
    # The counter family gone (a restart before any request): not reported, not 0.
    fresh = "\n".join(line for line in first.splitlines() if "http_requests_total" not in line)
    assert "requests_failed_total" not in parser.parse(fresh)[0]


def test_a_new_series_on_a_known_page_is_counted() -> None:
    parser = MetricsParser("vllm")
    first = page("vllm")
    parser.parse(first)
    repeat = ('vllm:request_success_total{engine="1",finished_reason="repetition",'
              'model_name="x"} 7.0\n')
    metrics, _ = parser.parse(first + repeat)
    assert metrics["requests_finished_total"] == 2980 + 7
    gone = "\n".join(line for line in first.splitlines() if 'engine="1"' not in line)
    metrics, histograms = parser.parse(gone)
    assert metrics == parse_metrics(gone, "vllm")[0]
    assert metrics["requests_running"] == 12
    assert histograms["ttft_seconds"].count == 1500


# --- pages that are not metrics ------------------------------------------------------------


def test_a_page_without_the_runtimes_metrics_is_unparseable() -> None:
    with pytest.raises(MetricsParseError, match="none of the vllm metrics"):
        parse_metrics("<html><body>It works!</body></html>", "vllm")
    with pytest.raises(MetricsParseError, match="none of the sglang metrics"):
        parse_metrics(page("vllm"), "sglang")


def test_a_malformed_line_of_a_mapped_family_is_unparseable() -> None:
    with pytest.raises(MetricsParseError):
        parse_metrics("vllm:num_requests_running{engine=0} 1\n", "vllm")
    with pytest.raises(MetricsParseError):
        parse_metrics("vllm:num_requests_running{engine=\"0\"} one\n", "vllm")


def test_unknown_runtime_or_url_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown runtime 'tgi'; known: llamacpp, sglang, sim"):
        ScrapeTarget("r1", "tgi", "http://127.0.0.1:8000/metrics")
    with pytest.raises(ValueError, match="metrics_url must be an http"):
        ScrapeTarget("r1", "vllm", "127.0.0.1:8000/metrics")
    with pytest.raises(ValueError, match="unknown runtime"):
        parse_metrics(page("vllm"), "tgi")


# --- real HTTP -----------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Starts one real aiohttp server per handler, on 127.0.0.1 and a free port."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_get("/metrics", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        runners.append(runner)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"

    yield start
    for runner in runners:
        await runner.cleanup()


def fixture_handler(name: str) -> Handler:
    body = page(name)

    async def handler(_: web.Request) -> web.Response:
        return web.Response(text=body, headers={"Content-Type": PROM_TEXT})
    return handler


async def status_501(_: web.Request) -> web.Response:  # llama.cpp without --metrics, as recorded
    return web.Response(status=501, content_type="application/json",
                        text='{"error":{"code":501,"message":"This server does not support metrics '
                        'endpoint. Start it with `--metrics`","type":"not_supported_error"}}')


async def garbage(_: web.Request) -> web.Response:
    return web.Response(text="<html><body>It works!</body></html>", content_type="text/html")


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/metrics"


async def test_collect_scrapes_every_target_concurrently_and_reports_each_failure(
        serve: Callable[[Handler], Awaitable[str]]) -> None:
    release = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="")

    targets = [
        ScrapeTarget("vllm-0", "vllm", await serve(fixture_handler("vllm"))),
        ScrapeTarget("vllm-old", "vllm", await serve(fixture_handler("vllm-old"))),
        ScrapeTarget("sglang-0", "sglang", await serve(fixture_handler("sglang"))),
        ScrapeTarget("llama-0", "llamacpp", await serve(fixture_handler("llamacpp"))),
        ScrapeTarget("llama-off", "llamacpp", await serve(status_501)),
        ScrapeTarget("gone", "vllm", closed_port_url()),
        ScrapeTarget("stuck", "sim", await serve(hang)),
        ScrapeTarget("wrong", "vllm", await serve(garbage)),
    ]
    collector = RuntimeCollector(lambda: targets, timeout_s=0.5)
    try:
        start = time.perf_counter()
        collected = await collector.collect()
        elapsed = time.perf_counter() - start
        release.set()
        assert elapsed < 0.5 + 0.3  # the hung target costs the timeout once, not in series
        replicas = {r.name: r for r in collected.replicas or []}
        assert list(replicas) == [t.name for t in targets]
        for target, fixture in [(targets[0], "vllm"), (targets[1], "vllm-old"),
                                (targets[2], "sglang"), (targets[3], "llamacpp")]:
            sample = replicas[target.name]
            assert (sample.up, sample.error, sample.runtime) == (True, None, target.runtime)
            assert (sample.metrics, sample.histograms) == parse_metrics(page(fixture),
                                                                        target.runtime)
            assert sample.scrape_ms is not None
            assert 0 < sample.scrape_ms < 500
        down = {name: (r.up, r.error) for name, r in replicas.items() if not r.up}
        assert down == {
            "llama-off": (False, f"HTTP 501 from {targets[4].metrics_url} "
                                 "(llama.cpp runs without --metrics?)"),
            "gone": (False, f"connection refused to {targets[5].metrics_url}"),
            "stuck": (False, "timed out after 0.5 s"),
            "wrong": (False, "unparseable metrics: none of the vllm metrics in 35 characters "
                             "starting '<html><body>It works!</body></html>'"),
        }
        # What the collector produced travels on the wire and back unchanged.
        telemetry = Telemetry(host="h1", run_id="r", seq=1, ts=time.time(), interval_s=1.0,
                              replicas=collected.replicas or [])
        assert codec.decode(codec.encode(telemetry), Telemetry) == telemetry
    finally:
        release.set()
        await collector.close()


async def test_targets_are_asked_for_on_every_tick_and_the_session_outlives_ticks(
        serve: Callable[[Handler], Awaitable[str]]) -> None:
    targets = [ScrapeTarget("a", "vllm", await serve(fixture_handler("vllm"))),
               ScrapeTarget("b", "llamacpp", await serve(fixture_handler("llamacpp")))]
    collector = RuntimeCollector(lambda: targets, timeout_s=2.0)
    try:
        first = await collector.collect()
        second = await collector.collect()  # read through the remembered layout
        assert [r.metrics for r in second.replicas or []] == [
            r.metrics for r in first.replicas or []]
        targets.pop()
        third = await collector.collect()
        assert [r.name for r in third.replicas or []] == ["a"]
        await collector.close()
        again = await collector.collect()  # a closed collector opens a new session when used
        assert [r.up for r in again.replicas or []] == [True]
    finally:
        await collector.close()
    await collector.close()  # closing twice is harmless


async def test_a_non_utf8_body_is_unparseable(
        serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def binary(_: web.Request) -> web.Response:
        return web.Response(body=b"\xff\xfe\x00garbage", content_type="application/octet-stream")

    url = await serve(binary)
    collector = RuntimeCollector(lambda: [ScrapeTarget("x", "vllm", url)], timeout_s=2.0)
    try:
        (sample,) = (await collector.collect()).replicas or []
    finally:
        await collector.close()
    assert not sample.up
    assert sample.error is not None
    assert sample.error.startswith("unparseable metrics: ")


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        RuntimeCollector(lambda: [], timeout_s=0)
