"""The stage table as a pure function, and the names, references and formats rules."""

from __future__ import annotations

import pytest

from llm_ops_helper.controller.registry import formats, lifecycle
from llm_ops_helper.controller.registry.errors import Invalid
from llm_ops_helper.controller.registry.records import (
    check_alias,
    check_name,
    parse_parameters,
    parse_tag,
    split_ref,
)

LEGAL = {("registered", "staging"), ("registered", "archived"), ("registered", "retired"),
         ("staging", "production"), ("staging", "archived"), ("staging", "retired"),
         ("production", "archived"), ("production", "retired"),
         ("archived", "staging"), ("archived", "production"), ("archived", "retired")}


def test_allowed_is_exactly_the_contract_table() -> None:
    pairs = {(a, b) for a in lifecycle.STAGES for b in lifecycle.STAGES if a != b}
    assert {p for p in pairs if lifecycle.allowed(*p)} == LEGAL
    for a, b in LEGAL:
        assert lifecycle.refusal(a, b) is None


def test_refusal_names_from_to_and_the_legal_targets() -> None:
    assert lifecycle.refusal("registered", "production") == (
        "cannot move from 'registered' to 'production': from 'registered' a version can "
        "move to: staging, archived, retired")
    assert lifecycle.refusal("retired", "staging") == (
        "cannot move from 'retired' to 'staging': 'retired' is final")
    assert lifecycle.refusal("staging", "live") == (
        "unknown stage 'live': expected one of registered, staging, production, archived, "
        "retired")


@pytest.mark.parametrize("name", ["tiny", "llama-3.1-8b", "a", "0x_y", "a" * 63])
def test_good_names(name: str) -> None:
    assert check_name("model", name) == name


@pytest.mark.parametrize("name", ["", "Tiny", "-x", ".x", "a/b", "a b", "a" * 64, "tiny@3"])
def test_bad_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(Invalid, match=r"expected 1-63 of a-z 0-9"):
        check_name("model", name)


def test_an_alias_may_not_be_a_number() -> None:
    assert check_alias("canary") == "canary"
    assert check_alias("v2") == "v2"
    with pytest.raises(Invalid, match="may not be a number"):
        check_alias("2")


def test_split_ref_forms() -> None:
    assert split_ref("tiny") == ("tiny", None)
    assert split_ref("tiny@3") == ("tiny", "3")
    assert split_ref("tiny@production") == ("tiny", "production")
    with pytest.raises(Invalid, match="alias 'Prod!'"):
        split_ref("tiny@Prod!")
    with pytest.raises(Invalid, match="model 'Tiny'"):
        split_ref("Tiny@3")


def test_parameters_and_tags() -> None:
    assert parse_parameters("7B") == 7_000_000_000
    assert parse_parameters("1.5b") == 1_500_000_000
    assert parse_parameters("500M") == 500_000_000
    assert parse_parameters("124439808") == 124_439_808
    for bad in ("lots", "-3", "0", "7X"):
        with pytest.raises(Invalid, match="parameters"):
            parse_parameters(bad)
    assert parse_tag("team=search") == ("team", "search")
    assert parse_tag("note=a=b") == ("note", "a=b")
    with pytest.raises(Invalid, match="key=value"):
        parse_tag("novalue")


def test_format_sniffing_and_default_runtime() -> None:
    assert formats.sniff(b"GGUF\x03\x00\x00\x00", 10_000_000, "x.bin") == "gguf"
    card = b'[sim]\nttft_base_s = 0.05\n'
    assert formats.sniff(card, len(card), None) == "sim"
    assert formats.sniff(b"[other]\nx = 1\n", 14, None) == "unknown"
    assert formats.sniff(b"\x00\x01", 2, "model.safetensors") == "safetensors"
    assert formats.sniff(b"\x00\x01", 2, "pytorch_model.BIN") == "bin"
    assert formats.sniff(b"\xff\xfe[sim]", 7, None) == "unknown"
    # a head that is not the whole file is not parsed as a card
    assert formats.sniff(card, len(card) + 1, None) == "unknown"
    assert formats.DEFAULT_RUNTIME == {"gguf": "llamacpp", "sim": "sim"}
    assert formats.RUNTIMES == ("llamacpp", "vllm", "sglang", "sim", "command")
