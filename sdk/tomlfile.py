"""Reading a TOML file into frozen msgspec structs, with errors that name the key.

msgspec says ``Expected `int`, got `str` - at `$.events[2].xid```; operators want
``events[2].xid: expected int, got str``. :func:`problem` does that split once for every file
the daemons read (their configs, scenarios), and :func:`load` gives every config file the same
one-line errors: ``FILE: key 'x.y': expected ...``, raised as :class:`ConfigError`, which each
``__main__`` turns into exit code 78 (EX_CONFIG, which the unit files do not restart).
"""

from __future__ import annotations

import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import msgspec

EX_CONFIG = 78

T = TypeVar("T", bound=msgspec.Struct)


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A table of a config file: read-only, and a key it does not know is an error."""

_MESSAGE = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD = re.compile(r"Object (?P<kind>contains unknown|missing required) field `(?P<field>[^`]+)`")


@dataclass(frozen=True, slots=True)
class Problem:
    kind: Literal["unknown_key", "missing_key", "invalid"]
    key: str  # dotted, with list indices: "replicas[0].metrics_url"; "" for the top level
    detail: str  # msgspec's words without backticks, first letter lowercased


def problem(exc: msgspec.ValidationError) -> Problem:
    match = _MESSAGE.match(str(exc))
    assert match is not None  # the pattern matches any string
    what, path = match["what"], (match["path"] or "").lstrip(".")
    if field := _FIELD.fullmatch(what):
        key = f"{path}.{field['field']}" if path else field["field"]
        kind: Literal["unknown_key", "missing_key"] = (
            "unknown_key" if field["kind"] == "contains unknown" else "missing_key")
        return Problem(kind, key, what)
    detail = what.replace("`", "")
    return Problem("invalid", path, detail[:1].lower() + detail[1:])


def describe(exc: msgspec.ValidationError, root: type[msgspec.Struct]) -> tuple[str, str]:
    """(key, what was expected) for one validation error of a ``root`` document."""
    found = problem(exc)
    if found.kind == "unknown_key":
        return found.key, "unknown key (remove it or check its spelling)"
    if found.kind == "missing_key":
        return found.key, "required key is missing"
    if found.detail.startswith("invalid enum value"):
        allowed = ", ".join(repr(a) for a in _literal_values(root, found.key))
        return found.key, f"{found.detail.split('value ', 1)[1]} is not one of {allowed}"
    return found.key or "(top level)", found.detail


def _literal_values(root: type[msgspec.Struct], path: str) -> tuple[object, ...]:
    """The allowed values of the Literal field at a dotted path."""
    node: object = root
    for part in re.sub(r"\[\d+\]", "", path).split("."):
        node = typing.get_type_hints(node, include_extras=True)[part]
        while typing.get_origin(node) in (list, typing.Annotated):
            node = typing.get_args(node)[0]
    return typing.get_args(node)


def parse(text: str, source: str, root: type[T]) -> T:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return msgspec.convert(raw, root)
    except msgspec.ValidationError as exc:
        key, expected = describe(exc, root)
        raise ConfigError(f"{source}: key '{key}': {expected}") from None


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from None


def resolve(source: str, path: str) -> Path:
    """A path written in the config file ``source``, relative to that file's directory."""
    p = Path(path)
    return p if p.is_absolute() or not source else Path(source).parent / p


def read_secret(source: str, path: str, key: str) -> bytes:
    """A secret named by a config key: read from its own file, never from the TOML itself."""
    try:
        secret = resolve(source, path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{source}: key '{key}': cannot read secret file "
                          f"{path!r}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"{source}: key '{key}': secret file {path!r} is empty")
    return secret
