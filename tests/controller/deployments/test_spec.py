"""Deployment specs: defaults, and refusals that name the field."""

from __future__ import annotations

import pytest

from llm_ops_helper.controller.deployments.errors import Invalid
from llm_ops_helper.controller.deployments.spec import (
    DeploymentSpec,
    check_name,
    parse_spec,
    revision_key,
)


def test_defaults_match_the_contract() -> None:
    spec = parse_spec(b'{"model": "tiny@3"}')
    assert spec == DeploymentSpec(model="tiny@3")
    assert (spec.replicas, spec.gpus_per_replica, spec.max_surge, spec.max_unavailable) == \
        (1, 1, 1, 0)
    assert (spec.ready_timeout_s, spec.drain_timeout_s) == (300.0, 30.0)
    assert spec.rollback.auto and spec.rollback.observe_s == 30.0
    assert spec.rollback.error_rate_margin == 0.05 and spec.rollback.ttft_ratio_margin == 1.5


@pytest.mark.parametrize(("body", "message"), [
    (b"", "spec: the request body is empty"),
    (b"{", "spec: not valid JSON"),
    (b"{}", "spec field 'model': required key is missing"),
    (b'{"model": "tiny", "replicas": -1}', "spec field 'replicas': expected `int` >= 0"),
    (b'{"model": "tiny", "replica": 2}', "spec field 'replica': unknown key"),
    (b'{"model": "tiny", "replicas": "2"}', "spec field 'replicas': expected `int`, got `str`"),
    (b'{"model": "tiny", "rollback": {"ttft_ratio_margin": 0.5}}',
     "spec field 'rollback.ttft_ratio_margin': expected `float` >= 1.0"),
    (b'{"model": "Tiny Model"}', "spec field 'model': expected 'name', 'name@N' or"),
    (b'{"model": "tiny", "runtime": "tgi"}',
     "spec field 'runtime': unknown runtime 'tgi' (known: llamacpp, vllm, sglang, sim, "
     "command)"),
    (b'{"model": "tiny", "runtime": "command"}', "spec field 'command': the command runtime"),
    (b'{"model": "tiny", "replicas": 5, "max_replicas": 4}', "replicas: 5 is above "
     "max_replicas 4"),
    (b'{"model": "tiny", "replicas": 1, "min_replicas": 2}',
     "replicas: 1 is below min_replicas 2"),
    (b'{"model": "tiny", "min_replicas": 3, "max_replicas": 2, "replicas": 2}',
     "spec field 'max_replicas': 2 is below min_replicas 3"),
    (b'{"model": "tiny", "max_surge": 0}', "'max_surge' and 'max_unavailable' are both 0"),
    (b'{"model": "tiny", "env": {"A-B": "1"}}', "spec field 'env': 'A-B' is not a valid"),
    (b'{"model": "tiny", "health_path": "health"}', "spec field 'health_path': expected a "
     "path starting with '/'"),
])
def test_bad_specs_name_the_field(body: bytes, message: str) -> None:
    with pytest.raises(Invalid) as info:
        parse_spec(body)
    assert message.replace("`", "") in info.value.message.replace("`", ""), info.value.message


@pytest.mark.parametrize("name", ["chat", "a", "llama-3-8b", "x" * 40])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "Chat", "-chat", "chat-", "a_b", "x" * 41, "a.b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(Invalid, match="deployment name"):
        check_name(name)


def test_revision_key_ignores_what_acts_on_running_replicas() -> None:
    base = DeploymentSpec(model="tiny@1")
    scaled = DeploymentSpec(model="tiny@1", replicas=5, max_surge=2, max_replicas=9)
    assert revision_key(base, "tiny@1") == revision_key(scaled, "tiny@1")
    assert revision_key(base, "tiny@1") != revision_key(base, "tiny@2")
    assert revision_key(base, "tiny@1") != revision_key(
        DeploymentSpec(model="tiny@1", args=["--ctx", "4096"]), "tiny@1")
