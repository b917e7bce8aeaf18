"""What the broker link's log line says to check, from the errors aiomqtt raises (the strings
below are the ones a real Mosquitto produced; tests/integration/test_tls_fleet.py shows the
hints in a real controller's log)."""

from __future__ import annotations

import pytest

from llm_ops_helper.brokertls import connect_hint, handshake_hint
from llm_ops_helper.controller.config import BrokerConfig

TLS = BrokerConfig(host="broker", port=8883, tls=True, ca_file="/etc/llmops/ca.crt",
                   username="llmops-controller", password_file="/etc/llmops/broker.password")
PLAIN = BrokerConfig(host="broker", port=8883, username="llmops-controller",
                     password_file="/etc/llmops/broker.password")


@pytest.mark.parametrize("error", ["[code:135] Not authorized",
                                   "[code:134] Bad user name or password"])
def test_a_refused_login_names_the_user_and_the_password_file(error: str) -> None:
    hint = connect_hint(error, TLS)
    assert hint is not None
    assert "'llmops-controller'" in hint and "/etc/llmops/broker.password" in hint
    anonymous = connect_hint(error, BrokerConfig(host="broker"))
    assert anonymous is not None and "set broker.username and broker.password_file" in anonymous


def test_no_connack_without_tls_suggests_the_tls_listener() -> None:
    hint = connect_hint("Operation timed out", PLAIN)
    assert hint is not None and "set broker.tls = true" in hint


def test_no_connack_over_tls_without_a_client_certificate_suggests_one() -> None:
    hint = connect_hint("Operation timed out", TLS)
    assert hint is not None and "broker.cert_file and broker.key_file" in hint
    with_cert = BrokerConfig(host="broker", tls=True, cert_file="c.crt", key_file="c.key")
    assert connect_hint("Operation timed out", with_cert) is None


@pytest.mark.parametrize("error", ["[Errno 111] Connection refused",
                                   "[code:7] The connection was lost."])
def test_other_errors_get_no_hint(error: str) -> None:
    assert connect_hint(error, TLS) is None
    assert connect_hint(error, PLAIN) is None
    assert handshake_hint(error, TLS.ca_file) is None


def test_a_handshake_reset_by_a_plain_listener_asks_for_the_tls_port() -> None:
    hint = handshake_hint("[Errno 104] Connection reset by peer", TLS.ca_file)
    assert hint is not None and "TLS port" in hint
    verify = handshake_hint("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed",
                            TLS.ca_file)
    assert verify is not None and "/etc/llmops/ca.crt" in verify
