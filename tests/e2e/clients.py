"""Clients for the end-to-end tests: a steady request sender and a wait for drained replicas."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import urllib.error
from collections import Counter

from llm_ops_helper.client import Deployment, LLMOpsHelper
from llm_ops_helper.localfleet import openai_chat


async def settled(helper: LLMOpsHelper, name: str, replicas: int,
                  timeout_s: float = 60.0) -> Deployment:
    """The deployment once the replicas it drained are gone (stopped and forgotten)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        deployment = await asyncio.to_thread(helper.status, name)
        assert isinstance(deployment, Deployment)
        if len(deployment.replicas) == replicas:
            return deployment
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{name} still has {deployment.replicas}")
        await asyncio.sleep(0.2)


class Client:
    """Sends chat requests without pause, each to a ready replica picked from the controller's
    endpoint list (refreshed before every request, as a client-side balancer would)."""

    def __init__(self, helper: LLMOpsHelper, deployment: str) -> None:
        self.helper = helper
        self.deployment = deployment
        self.ok: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for i in itertools.count():
            if self._stop.is_set():
                return
            endpoints = self.helper.endpoints(self.deployment)
            if not endpoints:
                self.failures.append("no ready endpoint")
                continue
            endpoint = endpoints[i % len(endpoints)]
            try:
                openai_chat(endpoint.url, self.deployment, f"request {i}", max_tokens=4)
                self.ok[endpoint.version] += 1
            except (OSError, urllib.error.HTTPError, json.JSONDecodeError) as exc:
                self.failures.append(f"{endpoint.replica} ({endpoint.version}): {exc}")

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
