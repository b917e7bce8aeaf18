"""Reading a TOML file into frozen msgspec structs, with errors that name the key.

msgspec says ``Expected `int`, got `str` - at `$.events[2].xid```; operators want
``events[2].xid: expected int, got str``. :func:`problem` does that split once for every file
the agent reads (its config, scenarios).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import msgspec

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
