"""Topics: building, parsing and refusing what does not fit ``llmops/v1/agents/{host}/{kind}``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_ops_helper.proto import AgentTopic, TopicError, TopicKind
from llm_ops_helper.proto.topics import ALERTS, PREFIX, agent_topic, all_agents, validate_host

_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_REST = _FIRST + "._-"

# Host names the contract accepts: 1-63 of [A-Za-z0-9._-], starting with a letter or digit.
VALID_HOSTS = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_FIRST),
    st.text(alphabet=_REST, max_size=62),
)


@settings(max_examples=200, deadline=None)
@given(host=VALID_HOSTS, kind=st.sampled_from(TopicKind))
def test_build_parse_round_trip(host: str, kind: TopicKind) -> None:
    topic = agent_topic(host, kind)
    assert topic == f"llmops/v1/agents/{host}/{kind.value}"
    parsed = AgentTopic.parse(topic)
    assert parsed == AgentTopic(host, kind)
    assert parsed.host == host
    assert parsed.kind is kind
    assert str(parsed) == topic


@pytest.mark.parametrize("kind", list(TopicKind))
def test_every_kind_round_trips(kind: TopicKind) -> None:
    topic = f"llmops/v1/agents/gpu-node-01.dc1/{kind.value}"
    assert AgentTopic.parse(topic) == AgentTopic("gpu-node-01.dc1", kind)
    assert agent_topic("gpu-node-01.dc1", kind) == topic


def test_kinds_are_the_contracts() -> None:
    assert {k.value for k in TopicKind} == {"status", "telemetry", "events", "commands", "results"}
    assert ALERTS == "llmops/v1/alerts"
    assert PREFIX == "llmops/v1"


@pytest.mark.parametrize("kind", list(TopicKind))
def test_all_agents_filter(kind: TopicKind) -> None:
    assert all_agents(kind) == f"llmops/v1/agents/+/{kind.value}"
    # The filter has the same shape as a concrete topic, with the wildcard in the host level.
    assert all_agents(kind).replace("+", "h1") == agent_topic("h1", kind)


@pytest.mark.parametrize("host", ["a", "A", "0", "a" * 63, "gpu-01", "node_7.dc-2", "9.9.9.9"])
def test_valid_hosts(host: str) -> None:
    assert validate_host(host) == host
    assert AgentTopic(host, TopicKind.STATUS).host == host


@pytest.mark.parametrize(
    "host",
    [
        "", "+", "#", "gpu+1", "gpu#1", "a/b", "/", "a" * 64, "-gpu", ".gpu", "_gpu",
        "gpu 1", "gpu\n", "\ngpu", "gpu\x00", "gpü", "gpu\u0661",  # an Arabic-Indic digit
    ],
)
def test_bad_hosts_raise_topic_error(host: str) -> None:
    with pytest.raises(TopicError, match="host name"):
        validate_host(host)
    with pytest.raises(TopicError, match="host name"):
        AgentTopic(host, TopicKind.TELEMETRY)
    with pytest.raises(TopicError, match="host name"):
        agent_topic(host, TopicKind.COMMANDS)


def test_topic_error_is_a_value_error() -> None:
    assert issubclass(TopicError, ValueError)


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        # Wrong prefix or layout.
        ("llmops/v2/agents/h1/status", "is not of the form"),
        ("LLMOPS/v1/agents/h1/status", "is not of the form"),
        ("other/v1/agents/h1/status", "is not of the form"),
        ("llmops/v1/agent/h1/status", "is not of the form"),
        ("/llmops/v1/agents/h1/status", "is not of the form"),
        ("llmops/v1/alerts", "is not of the form"),
        ("", "is not of the form"),
        ("llmops/v1/agents/h1", "is not of the form"),
        # Extra levels.
        ("llmops/v1/agents/h1/status/extra", "is not of the form"),
        ("llmops/v1/agents/h1/status/", "is not of the form"),
        ("llmops/v1/agents/h1/x/status", "is not of the form"),
        # Wildcards where a host must be.
        ("llmops/v1/agents/+/status", "host name '\\+'"),
        ("llmops/v1/agents/#/status", "host name '#'"),
        ("llmops/v1/agents/h+/status", "host name"),
        # Empty and too long hosts.
        ("llmops/v1/agents//status", "host name ''"),
        (f"llmops/v1/agents/{'h' * 64}/status", "host name"),
        # Unknown kinds.
        ("llmops/v1/agents/h1/alerts", "unknown kind 'alerts'"),
        ("llmops/v1/agents/h1/Status", "unknown kind 'Status'"),
        ("llmops/v1/agents/h1/", "unknown kind ''"),
        ("llmops/v1/agents/h1/#", "unknown kind '#'"),
        ("llmops/v1/agents/h1/+", "unknown kind '\\+'"),
    ],
)
def test_hostile_topics(topic: str, problem: str) -> None:
    with pytest.raises(TopicError, match=problem):
        AgentTopic.parse(topic)


def test_unknown_kind_message_lists_known_kinds() -> None:
    with pytest.raises(TopicError) as info:
        AgentTopic.parse("llmops/v1/agents/h1/bogus")
    for kind in TopicKind:
        assert kind.value in str(info.value)


@settings(deadline=None)
@given(host=VALID_HOSTS, kind=st.sampled_from(TopicKind), extra=st.text(min_size=1, max_size=8))
def test_extra_levels_property(host: str, kind: TopicKind, extra: str) -> None:
    with pytest.raises(TopicError, match="is not of the form"):
        AgentTopic.parse(f"{agent_topic(host, kind)}/{extra}")


@settings(max_examples=300, deadline=None)
@given(topic=st.text(max_size=80) | st.builds(
    lambda host, kind: f"llmops/v1/agents/{host}/{kind}", st.text(max_size=70), st.text(max_size=12),
))
def test_parse_arbitrary_text(topic: str) -> None:
    """Any string either parses to a topic that prints back as itself, or raises TopicError."""
    try:
        parsed = AgentTopic.parse(topic)
    except TopicError as exc:
        assert str(exc)
    else:
        assert str(parsed) == topic
        assert "+" not in parsed.host
        assert "#" not in parsed.host
        assert 1 <= len(parsed.host) <= 63


def test_topics_are_frozen_values() -> None:
    topic = AgentTopic("h1", TopicKind.EVENTS)
    assert hash(topic) == hash(AgentTopic("h1", TopicKind.EVENTS))
    with pytest.raises(AttributeError):
        topic.host = "h2"  # type: ignore[misc]
