"""The simulated engine: a scheduler with a concurrency limit and a KV cache, and vLLM's metrics.

Requests run when a slot is free and the KV cache can hold their prompt plus the output they
asked for; the rest wait in arrival order (vLLM's waiting queue). Time is the only cost: a
running request sleeps through its time to first token and its inter-token gaps, so one
process carries dozens of concurrent requests on almost no CPU.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llm_ops_helper.agent.runtimes.simserver.card import LatencyModel

# vLLM's bucket bounds (vllm/v1/metrics/loggers.py, 0.33).
TTFT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                       2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS: Final = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                      5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS: Final = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                                  30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
                                  7680.0)
FINISHED_REASONS: Final = ("stop", "length", "abort")
# The routes vLLM's prometheus-fastapi-instrumentator leaves out of http_requests_total
# (vllm/entrypoints/serve/instrumentator/metrics.py); the instrumentator matches them with
# re.search against the route template.
UNINSTRUMENTED_HANDLERS: Final = ("/metrics", "/health", "/health/decode", "/load", "/ping",
                                  "/version", "/server_info")


def prompt_tokens(chars: int) -> int:
    """Tokens of a prompt of ``chars`` characters: about four characters a token."""
    return max(1, math.ceil(chars / 4))


@dataclass(eq=False, slots=True)
class Request:
    prompt_tokens: int
    max_tokens: int
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    itl_s: float = 0.0

    def kv_tokens(self, now: float) -> int:
        """Tokens this request holds in the KV cache now: its prompt and its output so far."""
        if self.first_token is None:
            return self.prompt_tokens
        made = 1 + (int((now - self.first_token) / self.itl_s) if self.itl_s > 0 else
                    self.max_tokens)
        return self.prompt_tokens + min(made, self.max_tokens)


class Metrics:
    """vLLM's names, types, labels and buckets, on a registry of this server's own."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"engine": "0", "model_name": model_name}
        names = list(labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets,
                             registry=self.registry).labels(**labels)

        self.running = gauge("vllm:num_requests_running",
                             "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting",
                             "Number of requests waiting to be processed.")
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc",
                                    "KV-cache usage. 1 means 100 percent usage.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.")
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*names, "finished_reason"], registry=self.registry)
        self.finished = {reason: success.labels(finished_reason=reason, **labels)
                         for reason in FINISHED_REASONS}
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.",
                               REQUEST_LATENCY_BUCKETS)
        # prometheus-fastapi-instrumentator's default counter, as vLLM's API server has it:
        # no vLLM labels, the status grouped by its first digit ("2xx", "4xx", "5xx").
        self._http_requests = Counter(
            "http_requests_total", "Total number of requests by method, status and handler.",
            ("method", "status", "handler"), registry=self.registry)

    def http_request(self, method: str, status: int, handler: str, templated: bool) -> None:
        """Count one answered request: ``handler`` is its route template, or its path where no
        route matched (``templated`` false), which is counted as handler "none"."""
        if any(re.search(pattern, handler) for pattern in UNINSTRUMENTED_HANDLERS):
            return
        self._http_requests.labels(method, f"{str(status)[0]}xx",
                                   handler if templated else "none").inc()


class Engine:
    """Admission, the waiting queue and KV-cache accounting; the handlers do the sleeping."""

    def __init__(self, model: LatencyModel, metrics: Metrics) -> None:
        self.model = model
        self.metrics = metrics
        self.running: set[Request] = set()
        self._waiting: deque[tuple[Request, asyncio.Future[None]]] = deque()
        self._reserved = 0  # prompt + max_tokens of every running request
        metrics.running.set_function(lambda: len(self.running))
        metrics.waiting.set_function(lambda: len(self._waiting))
        metrics.kv_cache_usage.set_function(self.kv_cache_usage)

    def new_request(self, prompt_chars: int, max_tokens: int) -> Request:
        return Request(prompt_tokens(prompt_chars), max_tokens, itl_s=self.model.itl_ms / 1000)

    def ttft_s(self, request: Request) -> float:
        """Prefill time once running: base plus a cost per prompt token."""
        m = self.model
        return (m.ttft_base_ms + m.ttft_per_prompt_token_ms * request.prompt_tokens) / 1000

    def kv_cache_usage(self) -> float:
        now = time.monotonic()
        held = sum(r.kv_tokens(now) for r in self.running)
        return min(1.0, held / self.model.kv_cache_tokens)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _fits(self, request: Request) -> bool:
        if len(self.running) >= self.model.max_concurrency:
            return False
        need = request.prompt_tokens + request.max_tokens
        # An empty engine takes anything: a request bigger than the cache must not wait forever.
        return not self.running or self._reserved + need <= self.model.kv_cache_tokens

    def _start(self, request: Request) -> None:
        request.admitted = time.monotonic()
        self.running.add(request)
        self._reserved += request.prompt_tokens + request.max_tokens
        self.metrics.queue.observe(request.admitted - request.arrived)

    async def admit(self, request: Request) -> None:
        """Return once ``request`` runs; first come, first served."""
        if not self._waiting and self._fits(request):
            self._start(request)
            return
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (request, ticket)
        self._waiting.append(entry)
        try:
            await ticket
        except asyncio.CancelledError:
            if not ticket.cancelled():
                self.finish(request, "abort")  # admitted just as it was cancelled
            elif entry in self._waiting:
                self._waiting.remove(entry)
            raise

    def first_token(self, request: Request) -> None:
        request.first_token = now = time.monotonic()
        self.metrics.ttft.observe(now - request.arrived)
        self.metrics.prompt_tokens.inc(request.prompt_tokens)

    def token(self, gap_s: float | None) -> None:
        """One output token; ``gap_s`` since the previous one (None for the first)."""
        self.metrics.generation_tokens.inc()
        if gap_s is not None:
            self.metrics.itl.observe(gap_s)

    def finish(self, request: Request, reason: str) -> None:
        if request not in self.running:
            return
        self.running.discard(request)
        self._reserved -= request.prompt_tokens + request.max_tokens
        self.metrics.finished[reason].inc()
        self.metrics.e2e.observe(time.monotonic() - request.arrived)
        while self._waiting:
            waiting, ticket = self._waiting[0]
            if not ticket.cancelled():  # a client that gave up while queued
                if not self._fits(waiting):
                    break
                self._start(waiting)
                ticket.set_result(None)
            self._waiting.popleft()
