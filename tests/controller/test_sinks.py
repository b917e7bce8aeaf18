"""Webhooks against a real HTTP server: Alertmanager's formats, retries, nothing lost."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from llm_ops_helper.broker import free_port
from llm_ops_helper.controller.config import WebhookConfig
from llm_ops_helper.controller.sinks import WebhookSender, webhook_payload
from llm_ops_helper.controller.store import Store
from llm_ops_helper.proto.messages import Alert


def alert(n: int, state: str = "firing") -> Alert:
    return Alert(id=f"abc{n}-1", key=f"gpu_xid|h1|{n}||", state=state,  # type: ignore[arg-type]
                 severity="critical", rule="gpu_xid", host="h1", gpu=n, summary=f"XID on {n}",
                 ts=1_700_000_000.0 + n, started_at=1_700_000_000.0,
                 resolved_at=1_700_000_100.0 if state == "resolved" else None)


def test_webhook_payload_is_alertmanagers_version_4() -> None:
    body = webhook_payload([alert(1)], "http://dash")
    assert body["version"] == "4" and body["status"] == "firing"
    assert body["groupKey"] == '{}:{alertname="gpu_xid"}'
    assert body["commonLabels"] == {"alertname": "gpu_xid", "severity": "critical",
                                    "source": "llmops", "host": "h1", "gpu": "1"}
    [a] = body["alerts"]
    assert a["startsAt"] == "2023-11-14T22:13:20.000Z"
    assert a["endsAt"] == "0001-01-01T00:00:00Z"
    assert a["generatorURL"] == "http://dash/api/v1/alerts?id=abc1-1"
    assert a["annotations"] == {"summary": "XID on 1"} and a["fingerprint"] == "abc1"
    done = webhook_payload([alert(1, "resolved")], "")["alerts"][0]
    assert done["status"] == "resolved" and done["endsAt"] == "2023-11-14T22:15:00.000Z"


class Receiver:
    def __init__(self, port: int, fail_first: int = 0) -> None:
        self.port, self.fail_first = port, fail_first
        self.bodies: list[Any] = []
        self.runner: web.AppRunner | None = None

    async def post(self, request: web.Request) -> web.Response:
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503)
        self.bodies.append(await request.json())
        return web.Response()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.post)
        app.router.add_post("/api/v2/alerts", self.post)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def until(predicate: Any, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_unreachable_webhook_keeps_alerts_in_sqlite_then_delivers_them_in_order(
        tmp_path: Path) -> None:
    port = free_port()
    store = Store(tmp_path / "c.db")
    sender = WebhookSender(WebhookConfig(url=f"http://127.0.0.1:{port}/hook", retry_min_s=0.05,
                                         retry_max_s=0.2, timeout_s=1.0), store)
    task = asyncio.create_task(sender.run())
    for n in range(3):
        sender([alert(n)])  # returns at once: the caller (ingest) never waits on the network
    await until(lambda: sender.failures >= 2)
    counts = store.delivery_counts()
    assert counts == {(sender.name, "pending"): 3}
    [row] = store.db.execute("SELECT last_error FROM deliveries WHERE id = 1").fetchall()
    assert "Cannot connect" in row[0] or "Connect" in row[0]
    receiver = Receiver(port, fail_first=1)  # it comes up, answers 503 once, then accepts
    await receiver.start()
    try:
        await until(lambda: sum(len(b["alerts"]) for b in receiver.bodies) == 3)
        # One notification for the run of same-rule alerts, in the order they fired.
        assert len(receiver.bodies) == 1
        assert [a["labels"]["gpu"] for a in receiver.bodies[0]["alerts"]] == ["0", "1", "2"]
        assert receiver.bodies[0]["commonLabels"] == {
            "alertname": "gpu_xid", "severity": "critical", "source": "llmops", "host": "h1"}
        assert store.delivery_counts() == {(sender.name, "delivered"): 3}
    finally:
        task.cancel()
        await receiver.stop()


async def test_alertmanager_format_posts_the_api_v2_list(tmp_path: Path) -> None:
    port = free_port()
    receiver = Receiver(port)
    await receiver.start()
    store = Store(tmp_path / "c.db")
    sender = WebhookSender(WebhookConfig(url=f"http://127.0.0.1:{port}/api/v2/alerts",
                                         format="alertmanager"), store, "http://dash")
    task = asyncio.create_task(sender.run())
    try:
        sender([alert(1)])
        sender([alert(1, "resolved")])
        await until(lambda: sum(len(b) for b in receiver.bodies) == 2)
        items = [item for body in receiver.bodies for item in body]
        assert all(isinstance(b, list) for b in receiver.bodies)
        assert [i["labels"]["alertname"] for i in items] == ["gpu_xid", "gpu_xid"]
        assert items[1]["endsAt"] == "2023-11-14T22:15:00.000Z"
    finally:
        task.cancel()
        await receiver.stop()


async def test_pending_deliveries_survive_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    config = WebhookConfig(url=f"http://127.0.0.1:{free_port()}/hook")
    WebhookSender(config, store)([alert(7)])
    store.close()
    port = int(config.url.split(":")[2].split("/")[0])
    receiver = Receiver(port)
    await receiver.start()
    sender = WebhookSender(config, Store(tmp_path / "c.db"))
    task = asyncio.create_task(sender.run())
    try:
        await until(lambda: len(receiver.bodies) == 1)
        assert receiver.bodies[0]["alerts"][0]["labels"]["gpu"] == "7"
    finally:
        task.cancel()
        await receiver.stop()


async def test_a_refused_alert_is_kept_as_failed_and_does_not_block_the_next(
        tmp_path: Path) -> None:
    port = free_port()
    refused: list[Any] = []

    async def post(request: web.Request) -> web.Response:
        body = await request.json()
        if body["alerts"][0]["labels"]["gpu"] == "1":
            refused.append(body)
            return web.Response(status=400, text="bad label")
        accepted.append(body)
        return web.Response()

    accepted: list[Any] = []
    app = web.Application()
    app.router.add_post("/hook", post)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    store = Store(tmp_path / "c.db")
    sender = WebhookSender(WebhookConfig(url=f"http://127.0.0.1:{port}/hook"), store)
    task = asyncio.create_task(sender.run())
    try:
        sender([alert(1)])
        sender([alert(2, "resolved")])
        await until(lambda: len(accepted) == 1)
        assert len(refused) == 1  # not retried: 400 says it never will work
        assert store.delivery_counts() == {(sender.name, "failed"): 1,
                                           (sender.name, "delivered"): 1}
        [row] = store.db.execute("SELECT last_error FROM deliveries WHERE state = 'failed'")
        assert row[0] == "HTTP 400: bad label"
    finally:
        task.cancel()
        await runner.cleanup()
