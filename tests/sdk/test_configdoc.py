"""docs/config.md is generated from the config types: it must match them and cover the examples."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from llm_ops_helper import configdoc

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "config.md"


_HEADER = re.compile(r"^#?\s?(\[\[?)([A-Za-z0-9_.]+)\]\]?\s*(#.*)?$")
_COMMENTED_KEY = re.compile(r"^#\s?([a-z_]+)\s*=\s*\S")


def _dotted(table: dict[str, Any], prefix: str = "") -> set[str]:
    """Every key of a parsed TOML document: arrays of tables without an index, a table of
    [guards.X] profiles as guards.NAME."""
    keys: set[str] = set()
    for name, value in table.items():
        key = prefix + name
        keys.add(key)
        if key == "guards" and isinstance(value, dict):
            for profile in value.values():
                keys |= _dotted(profile, "guards.NAME.")
        elif isinstance(value, dict) and not key.endswith(".guards"):
            keys |= _dotted(value, key + ".")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                keys |= _dotted(item, key + ".")
    return keys


def _commented_keys(text: str) -> set[str]:
    """Keys an example shows commented out ("# cache_dir = ..."), under their table."""
    keys: set[str] = set()
    table = ""
    for line in text.splitlines():
        if header := _HEADER.match(line):
            table = header[2] + "."
        elif match := _COMMENTED_KEY.match(line):
            keys.add(table + match[1])
    return keys


def test_committed_reference_is_what_the_types_generate() -> None:
    assert DOC.is_file(), f"docs/config.md is missing: run {configdoc.REGENERATE}"
    assert DOC.read_text() == configdoc.render(), (
        f"docs/config.md is stale (the config types changed): run {configdoc.REGENERATE}")


def test_check_command_agrees(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "llm_ops_helper.configdoc", "--check"]
    assert subprocess.run([*command, str(DOC)], capture_output=True).returncode == 0
    stale = tmp_path / "config.md"
    stale.write_text("# old\n")
    out = subprocess.run([*command, str(stale)], capture_output=True, text=True)
    assert out.returncode == 1 and configdoc.REGENERATE in out.stderr


@pytest.mark.parametrize("example", [f[1] for f in configdoc.FILES])
def test_every_key_of_the_shipped_examples_is_documented(example: str) -> None:
    text = (REPO / "systemd" / example).read_text()
    written = _dotted(tomllib.loads(text)) | _commented_keys(text)
    documented = configdoc.documented_keys()[example]
    assert written - documented == set(), f"systemd/{example}: keys missing from docs/config.md"


def test_a_key_without_a_description_fails() -> None:
    class Bare(msgspec.Struct, kw_only=True, frozen=True):
        documented: int = 1  # says what it is
        undocumented_new_key: int = 2

    with pytest.raises(ValueError, match=r"agent:undocumented_new_key \(Bare"):
        configdoc.tables("agent", Bare)


def test_every_key_has_type_default_and_description() -> None:
    for daemon, _example, _path, root in configdoc.FILES:
        for table in configdoc.tables(daemon, root):
            for key in table.keys:
                assert key.type and key.default and key.description, (daemon, table.header, key)


def test_a_config_field_is_described_by_its_comment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # A second description in configdoc.DOCS could drift from the field's comment: refused.
    monkeypatch.setitem(configdoc.DOCS, "agent:host", "A description kept somewhere else.")
    with pytest.raises(ValueError, match=r"agent:host \(AgentConfig\.host\)"):
        configdoc.tables("agent", configdoc.AgentConfig)


def test_docs_holds_only_the_guard_profile_keys() -> None:
    # What is left there: GuardConfig's fields (controller/gateway/guards.py), each one a key.
    assert all(key.startswith("gateway:guards.NAME.") for key in configdoc.DOCS)
    gateway = configdoc.documented_keys()["gateway.example.toml"]
    assert {key.split(":", 1)[1] for key in configdoc.DOCS} <= gateway
