"""A real Mosquitto on the shipped TLS config and ACL (systemd/mosquitto-tls.conf,
mosquitto.acl), with certificates made for the test, and the files an operator hands each of
its clients: the CA, a password file of its own, the ``[broker]`` keys of its TOML."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from llm_ops_helper.broker import (
    BrokerSecurity,
    BrokerUnavailable,
    LocalMosquitto,
    Pki,
    make_pki,
    password_file,
)

# The user systemd/mosquitto.acl gives the controller's rights to.
CONTROLLER = "llmops-controller"


def make_test_pki(root: Path) -> Pki:
    """A throwaway CA, server and client certificates (openssl); the test fails without them."""
    try:
        return make_pki(root)
    except BrokerUnavailable as exc:
        pytest.fail(str(exc))


def secure_broker(root: Path, pki: Pki, passwords: Mapping[str, str], *,
                  require_certificate: bool = False) -> LocalMosquitto:
    """Mosquitto (not started) with TLS, ``passwords`` (user -> password) in its password file
    and the shipped ACL, on a free loopback port; its files under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        security = BrokerSecurity(pki.ca, pki.server_cert, pki.server_key,
                                  password_file(root / "passwd", passwords),
                                  require_certificate=require_certificate)
        return LocalMosquitto(root / "mosquitto", security=security)
    except BrokerUnavailable as exc:
        pytest.fail(f"these tests need a real Mosquitto: {exc}")


async def start_secure_broker(root: Path, pki: Pki, passwords: Mapping[str, str], *,
                              require_certificate: bool = False) -> LocalMosquitto:
    """:func:`secure_broker`, started."""
    broker = secure_broker(root, pki, passwords, require_certificate=require_certificate)
    try:
        await broker.start()
    except BrokerUnavailable as exc:
        pytest.fail(f"these tests need a real Mosquitto: {exc}")
    return broker


def secret_file(path: Path, password: str) -> Path:
    """A client's broker password in a file of its own, mode 600, as broker.password_file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(password + "\n")
    return path


def tls_login(broker: LocalMosquitto, pki: Pki, user: str, password: Path, *,
              client_certificate: bool = False) -> dict[str, Any]:
    """The ``[broker]`` keys of an agent's or the controller's TOML for ``broker``: TLS
    verified against the test CA, ``user`` with the password in ``password`` and, with
    ``client_certificate``, the test's client certificate."""
    keys: dict[str, Any] = {"host": broker.host, "port": broker.port, "tls": True,
                            "ca_file": str(pki.ca), "username": user,
                            "password_file": str(password)}
    if client_certificate:
        keys |= {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    return keys
