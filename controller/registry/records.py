"""What the registry stores and answers with, and the rules for names and references."""

from __future__ import annotations

import re
from typing import Final

import msgspec

from llm_ops_helper.controller.registry.errors import Invalid

NAME: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
TAG_KEY: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
SHA256: Final = re.compile(r"[0-9a-f]{64}")
# The alias that follows the production stage; moved only by stage changes.
PRODUCTION: Final = "production"
_SUFFIXES: Final = {"k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


class Artifact(msgspec.Struct, frozen=True, kw_only=True):
    sha256: str
    size_bytes: int
    filename: str


class Version(msgspec.Struct, frozen=True, kw_only=True):
    """One registered version. Everything but stage, aliases and replaces is fixed forever."""

    model: str
    version: int
    ref: str
    stage: str
    aliases: tuple[str, ...]
    runtime: str
    format: str
    artifact: Artifact | None
    source_uri: str | None
    parameters: int | None
    quantization: str | None
    tags: dict[str, str]
    description: str
    created_by: str
    created_at: float
    # The version this one took over production from, when it did.
    replaces: int | None
    stage_changed_at: float


class NewVersion(msgspec.Struct, frozen=True, kw_only=True):
    """What a client states about an upload; format and runtime may be left to inference."""

    runtime: str | None = None
    format: str | None = None
    filename: str | None = None
    source_uri: str | None = None
    parameters: int | None = None
    quantization: str | None = None
    description: str = ""
    tags: dict[str, str] = {}


class ModelSummary(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    latest: int | None
    versions: int
    aliases: dict[str, int]
    created_at: float
    updated_at: float


class LineageEvent(msgspec.Struct, frozen=True, kw_only=True):
    ts: float
    by: str
    action: str
    version: int | None
    detail: str


def check_name(kind: str, value: str) -> str:
    if not NAME.fullmatch(value):
        raise Invalid(f"{kind} {value!r}: expected 1-63 of a-z 0-9 . _ - starting with a "
                      "letter or digit")
    return value


def check_alias(value: str) -> str:
    check_name("alias", value)
    if value.isascii() and value.isdigit():
        raise Invalid(f"alias {value!r}: an alias may not be a number (numbers are versions)")
    return value


def is_number(value: str) -> bool:
    """ASCII digits only (``str.isdigit`` takes Arabic-Indic digits and superscripts too),
    at most 9 of them."""
    return value.isascii() and value.isdigit() and len(value) <= 9


def check_sha256(value: str) -> str:
    if not SHA256.fullmatch(value):
        raise Invalid(f"sha256 {value!r}: expected 64 lowercase hex digits")
    return value


def parse_tag(raw: str) -> tuple[str, str]:
    key, sep, value = raw.partition("=")
    if not sep or not TAG_KEY.fullmatch(key):
        raise Invalid(f"tag {raw!r}: expected key=value with a key of letters, digits, "
                      ". _ / - (at most 63)")
    return key, value


def parse_parameters(raw: str) -> int:
    """A parameter count: ``7000000000``, ``7B``, ``1.5b``, ``500M``."""
    text = raw.strip().lower()
    scale = _SUFFIXES.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = float(number) * scale if "." in number else int(number) * scale
    except ValueError:
        raise Invalid(f"parameters {raw!r}: expected a count such as 7000000000, 7B or "
                      "500M") from None
    if value <= 0:
        raise Invalid(f"parameters {raw!r}: expected a positive count")
    return int(value)


def split_ref(ref: str) -> tuple[str, str | None]:
    """``name@N`` / ``name@alias`` / ``name`` -> (name, "N" | alias | None), names checked."""
    name, sep, selector = ref.partition("@")
    check_name("model", name)
    if not sep:
        return name, None
    if not is_number(selector):
        check_alias(selector)
    return name, selector
