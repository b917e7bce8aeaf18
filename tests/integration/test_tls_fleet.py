"""The real controller and a real agent, as processes, on the shipped TLS Mosquitto
(systemd/mosquitto-tls.conf, a password file, systemd/mosquitto.acl), each configured as an
operator configures them: ``broker.tls``, ``ca_file``, ``username`` and ``password_file`` in its
TOML, the password in a file of its own.

- The controller sees the agent online with its telemetry, and a deployment of the ``sim``
  runtime goes through: every command the controller signed and sent reached the agent, was
  applied, and its result came back to the controller; the replica serves.
- A controller that speaks plain MQTT to the TLS port, has the wrong password, speaks TLS to a
  plain port or lacks the client certificate a broker requires stays up, answers ``/healthz``
  with 503 and says in its log what failed and what to check.
- With ``require_certificate true`` both present a client certificate and the fleet works.

:class:`LocalFleet` starts a plain Mosquitto of its own as well; the TOML overrides point the
controller and the agent at the TLS broker instead, and nothing connects to the plain one.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.broker import LocalMosquitto, Pki, free_port
from llm_ops_helper.client import LLMOpsHelper
from llm_ops_helper.localfleet import LocalFleet, openai_chat
from tests.faults.fleetwatch import log_events, until
from tests.integration.harness import ControllerProcess, controller_config
from tests.integration.tlsbroker import (
    CONTROLLER,
    make_test_pki,
    secret_file,
    start_secure_broker,
    tls_login,
)

HOST = "gpu-01"  # LocalFleet's first agent; with the shipped ACL its user must be its host name
PASSWORDS = {CONTROLLER: secrets.token_urlsafe(16), HOST: secrets.token_urlsafe(16)}
WAIT_S = 60.0  # an upper bound on waiting for what must happen, never a measured threshold
RESULTS = 'llmops_ingest_messages_total{kind="results"}'


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_test_pki(tmp_path / "pki")


@pytest.fixture
async def secure_broker(tmp_path: Path, pki: Pki) -> AsyncIterator[LocalMosquitto]:
    broker = await start_secure_broker(tmp_path / "tls-broker", pki, PASSWORDS)
    try:
        yield broker
    finally:
        await broker.stop()


def tls_fleet(workdir: Path, broker: LocalMosquitto, pki: Pki, *,
              client_certificate: bool = False) -> LocalFleet:
    """One agent and the controller, each logging in to ``broker`` as its own user."""
    secrets_dir = workdir.parent / "secrets"

    def login(user: str) -> dict[str, Any]:
        password = secret_file(secrets_dir / f"{user}.password", PASSWORDS[user])
        return tls_login(broker, pki, user, password, client_certificate=client_certificate)

    return LocalFleet(workdir, agents_count=1, gpus_per_agent=1,
                      controller_overrides={"broker": login(CONTROLLER)},
                      host_overrides={HOST: {"broker": login(HOST)}})


def connected_users(broker: LocalMosquitto) -> set[str]:
    """The users the broker logged as connected (``connection_messages true``)."""
    log = broker.log_path.read_text(errors="replace") if broker.log_path.exists() else ""
    return set(re.findall(r"New client connected from .* u'([^']*)'\)", log))


def metric(fleet: LocalFleet, sample: str) -> float:
    request = urllib.request.Request(fleet.url + "/metrics",
                                     headers={"Authorization": f"Bearer {fleet.token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        for line in response.read().decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name == sample:
                return float(value)
    raise AssertionError(f"no {sample} on the controller's /metrics")


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


async def test_the_controller_commands_an_agent_over_tls_with_their_own_passwords(
        tmp_path: Path, pki: Pki, secure_broker: LocalMosquitto) -> None:
    fleet = tls_fleet(tmp_path / "fleet", secure_broker, pki)
    async with fleet:  # returns once the controller has telemetry from the agent
        assert fleet.controller is not None
        agent = fleet.agents[0].daemon
        host = fleet.get(f"/api/v1/hosts/{HOST}")
        assert host["online"] and host["last_ts"] and host["gpus"] == 1, host
        assert healthz(fleet.http_port) == (200, {"status": "ok", "broker_connected": True})
        tls_address = f"{secure_broker.host}:{secure_broker.port}"
        for daemon in (fleet.controller, agent):
            assert {r["broker"] for r in log_events(daemon.log_path, "broker_connected")} \
                == {tls_address}, daemon.log()[-3000:]
        assert connected_users(secure_broker) == {CONTROLLER, HOST}
        assert fleet.broker is not None and connected_users(fleet.broker) == set()

        helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
        card = write_model_card(tmp_path / "sim-tls.toml", startup_s=0.2, itl_ms=1.0)
        deployment = await asyncio.to_thread(helper.deploy_model, str(card), name="sim-tls",
                                             replicas=1, timeout=WAIT_S)
        assert (deployment.ready, deployment.phase) == (1, "available")
        assert [r.host for r in deployment.replicas] == [HOST]
        [endpoint] = await asyncio.to_thread(helper.endpoints, "sim-tls")
        reply = await asyncio.to_thread(openai_chat, endpoint.url, "sim-tls")
        assert reply["model"] == "sim-tls"

        # Each command the controller signed and sent was applied by the agent, and the
        # controller took in a result for each.
        sent = {r["command_id"]: r["kind"] for r in
                log_events(fleet.controller.log_path, "command_sent")}
        assert "deploy_replica" in sent.values(), sent
        applied = {r["command_id"] for r in log_events(agent.log_path, "command_applied")}
        assert set(sent) <= applied, (sent, agent.log()[-3000:])
        await until(lambda: metric(fleet, RESULTS) >= len(sent), WAIT_S,
                    f"results for the {len(sent)} commands sent")
        assert log_events(fleet.controller.log_path, "command_result_error") == []
        assert log_events(agent.log_path, "command_rejected") == []


async def test_with_client_certificates_required_both_present_theirs(
        tmp_path: Path, pki: Pki) -> None:
    broker = await start_secure_broker(tmp_path / "tls-broker", pki, PASSWORDS,
                                       require_certificate=True)
    try:
        # LocalFleet.start returns once the controller has the agent's telemetry.
        async with tls_fleet(tmp_path / "fleet", broker, pki, client_certificate=True) as fleet:
            assert fleet.get(f"/api/v1/hosts/{HOST}")["online"]
            assert healthz(fleet.http_port) == (200, {"status": "ok", "broker_connected": True})
        assert connected_users(broker) == {CONTROLLER, HOST}
    finally:
        await broker.stop()


@dataclass(frozen=True)
class Misconfigured:
    """A controller login that must fail, and what the controller must log about it."""

    event: str
    error: str  # in the log line's ``error``
    hint: str  # in its ``hint``
    keys: dict[str, Any] = field(default_factory=dict)  # over the good TLS login
    password: str = PASSWORDS[CONTROLLER]
    dial_plain_port: bool = False
    require_certificate: bool = False


MISCONFIGURED = {
    "plain MQTT to the TLS port": Misconfigured(
        "broker_unreachable", "Operation timed out", "set broker.tls = true",
        keys={"tls": False, "ca_file": ""}),
    "a wrong password": Misconfigured(
        "broker_unreachable", "Not authorized", f"refused user '{CONTROLLER}'",
        password="not-the-password"),
    "TLS to a plain port": Misconfigured(
        "broker_tls_failed", "Connection reset by peer", "is this its TLS port?",
        dial_plain_port=True),
    "no client certificate where the broker requires one": Misconfigured(
        "broker_unreachable", "Operation timed out", "set broker.cert_file and broker.key_file",
        require_certificate=True),
}


@pytest.mark.parametrize("case", MISCONFIGURED)
async def test_a_controller_that_cannot_log_in_stays_up_degraded_and_says_why(
        case: str, tmp_path: Path, pki: Pki, mosquitto: LocalMosquitto) -> None:
    wrong = MISCONFIGURED[case]
    password = secret_file(tmp_path / "controller.password", wrong.password)
    broker = await start_secure_broker(tmp_path / "tls-broker", pki, PASSWORDS,
                                       require_certificate=wrong.require_certificate)
    keys = tls_login(broker, pki, CONTROLLER, password) | wrong.keys
    if wrong.dial_plain_port:
        keys["port"] = mosquitto.port
    http_port = free_port()
    controller = ControllerProcess(tmp_path / "controller", controller_config(
        broker, state_dir=tmp_path / "state", http_port=http_port, broker=keys))
    try:
        controller.start()
        failures = await until(lambda: log_events(controller.log_path, wrong.event), WAIT_S,
                               f"{wrong.event} in the controller's log")
        assert wrong.error in failures[0]["error"], failures[0]
        assert wrong.hint in str(failures[0]["hint"]), failures[0]
        assert await until(lambda: healthz(http_port), WAIT_S, "/healthz") == (
            503, {"status": "degraded", "broker_connected": False})
        assert controller.process is not None and controller.process.poll() is None, \
            controller.log()
        assert log_events(controller.log_path, "broker_connected") == []
        assert connected_users(broker) == set()
        controller.signal(signal.SIGTERM)
        assert await controller.wait(WAIT_S) == 0, controller.log()
    finally:
        await controller.close()
        await broker.stop()
