"""The dashboard in headless Chromium against real processes: Mosquitto, the controller, three
agents with simulated GPUs and a ``sim`` deployment under load, at version 2 of its model.

Signed in through the URL fragment, the page renders the hosts and GPUs, its live values move
with the stream, it draws the deployment's load and decisions, and its Rollback button takes the
deployment back to version 1; all without one console error. A viewer token, signed in through
the form, is told clearly that rolling back needs an operator. The screenshot is kept as
``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.client import LLMOpsHelper
from llm_ops_helper.controller.auth import TokenStore
from llm_ops_helper.localfleet import LocalFleet, openai_chat
from tests.e2e.cdp import INSTALL, Browser, Page, chromium_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "test-artifacts" / "dashboard.png"
PNG = b"\x89PNG\r\n\x1a\n"
ARMED = "document.getElementById('rollback-btn').classList.contains('armed')"
ANSWERED = "document.getElementById('rollback-result').dataset.status !== ''"


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[LocalFleet]:
    if chromium_path() is None:
        pytest.fail(f"the dashboard test needs Debian's chromium on PATH: {INSTALL}")
    local = LocalFleet(tmp_path / "fleet", agents_count=3, gpus_per_agent=2,
                       controller_overrides={"autoscale": {"interval_s": 1.0,
                                                           "default_cold_start_s": 2.0}})
    async with local:
        yield local


@contextmanager
def load(helper: LLMOpsHelper, deployment: str, per_s: float = 4.0) -> Iterator[list[str]]:
    """Requests at a steady rate to the deployment's ready replicas, in a thread; yields the
    outcomes ("ok" or the error)."""
    stop = threading.Event()
    outcomes: list[str] = []

    def run() -> None:
        i = 0
        while not stop.wait(1.0 / per_s):
            try:
                endpoints = helper.endpoints(deployment)
                if endpoints:
                    openai_chat(endpoints[i % len(endpoints)].url, deployment, max_tokens=4)
                    outcomes.append("ok")
            except (OSError, urllib.error.HTTPError, ValueError) as exc:
                outcomes.append(repr(exc))  # a replica going away during the rollback
            i += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield outcomes
    finally:
        stop.set()
        thread.join(timeout=30)


async def wait_version(fleet: LocalFleet, name: str, ref: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (await asyncio.to_thread(fleet.get, f"/api/v1/deployments/{name}"))["version"] == ref:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{name} not at {ref} after 60 s")


async def sign_in_and_read(page: Page, fleet: LocalFleet) -> None:
    await page.navigate(fleet.url + "/")
    assert await page.evaluate("!document.getElementById('signin').hidden")
    assert await page.evaluate("document.getElementById('app').hidden")
    # The token in the fragment signs in (a same-document navigation: no reload).
    await page.navigate(f"{fleet.url}/#token={fleet.token}", wait_load=False)
    await page.wait_for("!document.getElementById('app').hidden", "signed in")
    assert await page.evaluate("location.hash") == ""  # taken out of the address bar
    assert await page.evaluate("sessionStorage.getItem('llmops_token')") == fleet.token

    hosts = await page.wait_for(
        "(() => { const h = [...document.querySelectorAll('.host')].map(e => e.dataset.host);"
        " return h.length === 3 ? h : null; })()", "three hosts")
    assert hosts == [a.host for a in fleet.agents]
    gpus = await page.wait_for(
        "(() => { const g = [...document.querySelectorAll('.gpu')];"
        " return g.length === 6 && g.every(e => e.dataset.util !== '' && e.dataset.temp !== '')"
        " ? g.map(e => [e.dataset.host, e.dataset.gpu, e.dataset.health]) : null; })()",
        "six GPUs with readings")
    assert {(h, g) for h, g, _ in gpus} == {(a.host, str(i)) for a in fleet.agents
                                            for i in range(2)}
    assert {health for _, _, health in gpus} <= {"ok", "warning", "critical"}

    # Live: the stream moves the page's values without a reload.
    await page.wait_for("document.getElementById('live-status').dataset.state === 'live'",
                        "the live indicator")
    first = float(await page.evaluate("document.getElementById('last-update').dataset.ts"))
    seen_at = await page.evaluate(
        "[...document.querySelectorAll('.host')].map(e => e.dataset.lastTs).join()")
    later = float(await page.wait_for(
        f"(() => {{ const t = document.getElementById('last-update').dataset.ts;"
        f" return Number(t) > {first} ? t : null; }})()", "a newer overview"))
    assert later > first
    await page.wait_for(
        f"[...document.querySelectorAll('.host')].map(e => e.dataset.lastTs).join()"
        f" !== {seen_at!r}", "newer telemetry on the host cards")


async def test_dashboard_shows_the_fleet_live_and_rolls_back(fleet: LocalFleet,
                                                            tmp_path: Path) -> None:
    helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
    autoscale = {"mode": "advisory", "interval_s": 1.0, "capacity_tokens_per_s": 40.0}

    async def deploy(n: int, itl_ms: float) -> None:
        card = write_model_card(tmp_path / f"chat-v{n}.toml", startup_s=0.2, itl_ms=itl_ms,
                                max_tokens=4)
        deployment = await asyncio.to_thread(helper.deploy_model, str(card), name="chat",
                                             replicas=2, min_replicas=1, max_replicas=4,
                                             timeout=90, autoscale=autoscale)
        assert deployment.version == f"chat@{n}"

    await deploy(1, 5.0)
    browser = Browser(tmp_path / "chromium-profile")
    with load(helper, "chat") as outcomes:  # from version 1 on: the chart has a history
        await deploy(2, 8.0)
        try:
            await browser.start()
            page = await browser.new_page()
            await sign_in_and_read(page, fleet)

            row = await page.wait_for(
                "(() => { const r = document.getElementById('dep-chat');"
                " return r && r.dataset.version === '2' && r.dataset.ready === '2'"
                " ? {...r.dataset} : null; })()", "chat at version 2 with its replicas")
            assert (row["phase"], row["desired"]) == ("available", "2")
            states = await page.evaluate("[...document.querySelectorAll("
                                         "'#dep-chat .replica')].map(e => e.dataset.state)")
            assert states.count("ready") == 2, states  # v1's may still be listed, stopping
            # The chart and the decisions of the selected deployment, and its versions.
            await page.wait_for("document.getElementById('detail-title').dataset.deployment"
                                " === 'chat'", "chat selected")
            await page.wait_for("Number(document.querySelector('[data-series=load]')"
                                ".dataset.count) >= 2", "load on the chart", timeout_s=90)
            reasons = await page.wait_for(
                "(() => { const r = [...document.querySelectorAll('#decisions tr.decision"
                " td.reason')].map(e => e.textContent); return r.length ? r : null; })()",
                "autoscaler decisions")
            assert all(reasons)
            versions = await page.wait_for(
                "(() => { const v = [...document.querySelectorAll('#versions"
                " tr[data-model-version]')].map(e => e.dataset.modelVersion);"
                " return v.length === 2 ? v : null; })()", "two model versions")
            assert versions == ["2", "1"]
            assert "ok" in outcomes, outcomes[-5:]
            await asyncio.sleep(1.5)  # one more frame for the screenshot's bars
            png = await page.screenshot(SCREENSHOT)
            assert png.startswith(PNG) and len(png) > 10_000, len(png)

            # Rollback: the first click arms the button, the second confirms; both name the
            # version in full, and the POST names it too.
            label = await page.evaluate("document.getElementById('rollback-btn').textContent")
            assert label == "Roll back to chat@1"
            await page.click("#rollback-btn", expect=ARMED)
            assert await page.evaluate(
                "document.getElementById('rollback-btn').textContent"
            ) == "Confirm: roll chat back to chat@1"
            await page.click("#rollback-btn", expect=ANSWERED)
            await page.wait_for("document.getElementById('rollback-result').dataset.status"
                                " === 'ok'", "the rollback's answer")
            assert "chat@1" in await page.evaluate(
                "document.getElementById('rollback-result').textContent")
            await wait_version(fleet, "chat", "chat@1")
            await page.wait_for("document.getElementById('dep-chat').dataset.version === '1'",
                                "the page showing version 1")
            await page.wait_for("document.getElementById('detail-title').textContent"
                                ".endsWith('v1')", "the detail header at v1")
            # What a plain rollback would take now is chat@2 (the version rolled back from
            # never is): the button follows the overview's previous_ref.
            await page.wait_for("document.getElementById('rollback-btn').textContent"
                                " === 'Roll back to chat@2'", "the button naming chat@2")
            assert page.problems == [], page.problems

            # A viewer, signed in through the form, is told it needs an operator.
            viewer = TokenStore(fleet.workdir / "controller-state" / "controller.db")
            try:
                viewer_token = viewer.create("dashboard-viewer", "viewer", "test")
            finally:
                viewer.close()
            await page.click("#sign-out", expect="!document.getElementById('signin').hidden")
            await page.wait_for("!document.getElementById('signin').hidden", "signed out")
            assert await page.evaluate("document.querySelectorAll('.host, #versions tbody tr')"
                                       ".length") == 0  # nothing left of the last session
            assert await page.evaluate("sessionStorage.getItem('llmops_token')") is None
            await page.evaluate(f"document.getElementById('token-input').value ="
                                f" {viewer_token!r}")
            await page.click("#signin-button",
                             expect="document.getElementById('token-input').value === ''")
            await page.wait_for("!document.getElementById('app').hidden", "the viewer in")
            await page.wait_for("document.querySelectorAll('#versions button.rollback-to')"
                                ".length === 1", "the other version's button")
            await page.click("#versions button.rollback-to",
                             expect="!!document.querySelector('#versions button.armed')")
            await page.click("#versions button.rollback-to", expect=ANSWERED)
            await page.wait_for("document.getElementById('rollback-result').dataset.status"
                                " === 'forbidden'", "the refusal")
            text = await page.evaluate("document.getElementById('rollback-result').textContent")
            assert "needs an operator token" in text and "'viewer'" in text, text
            # The refused call is the only thing the browser logs (its failed load).
            assert len(page.problems) == 1 and "403" in page.problems[0], page.problems
            assert (await asyncio.to_thread(fleet.get, "/api/v1/deployments/chat")
                    )["version"] == "chat@1"
        finally:
            await browser.stop()
