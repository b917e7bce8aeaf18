"""The configuration reference (``docs/config.md``), generated from the config types.

Keys, types, defaults and constraints come from the frozen msgspec structs the daemons load
(:class:`~llm_ops_helper.agent.config.AgentConfig`,
:class:`~llm_ops_helper.controller.config.ControllerConfig`,
:class:`~llm_ops_helper.controller.gateway.config.GatewayConfig`), so the page cannot drift from
the code. A key's description is the comment written above it (or after it) in its class (the
few fields of classes outside the config modules are described in :data:`DOCS`); a key without
one is an error, so a new key cannot land undocumented.

    python -m llm_ops_helper.configdoc --write docs/config.md   # regenerate
    python -m llm_ops_helper.configdoc --check docs/config.md   # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from llm_ops_helper.agent.config import AgentConfig
from llm_ops_helper.controller.config import ControllerConfig
from llm_ops_helper.controller.gateway.config import GatewayConfig
from llm_ops_helper.controller.gateway.guards import GuardConfig

REGENERATE = "python -m llm_ops_helper.configdoc --write docs/config.md"

# Fields load() fills in, never read from the file.
INTERNAL = frozenset({"source", "controller_token"})

# Descriptions for the fields of a class outside the daemons' config modules, which this
# generator cannot ask to carry comments: "daemon:dotted.key", named tables as
# "guards.NAME.key". Anything in CONFIG_MODULES is described by the comment on its field, and an
# entry here naming one of those is an error, so a description lives in one place only.
DOCS: dict[str, str] = {
    "gateway:guards.NAME.max_request_chars": "Input (all message text together) longer than "
                                             "this is blocked.",
    "gateway:guards.NAME.injection_threshold": "Injection score that blocks; unset: the "
                                               "heuristic's tuned threshold.",
    "gateway:guards.NAME.deny_words": "Whole words (case-insensitive) that deny_action acts "
                                      "on.",
    "gateway:guards.NAME.deny_patterns": "Python regular expressions (case-insensitive) that "
                                         "deny_action acts on.",
    "gateway:guards.NAME.max_prompt_tokens": "Estimated prompt tokens above this are blocked.",
    "gateway:guards.NAME.injection": "Score the input for prompt injection and block above the "
                                     "threshold.",
    "gateway:guards.NAME.deny_action": "What a deny_words / deny_patterns match does: block the "
                                       "request or redact the match.",
    "gateway:guards.NAME.redact_output": "Redact secrets and personal data in answers, streamed "
                                         "ones too.",
    "gateway:guards.NAME.redact_kinds": "Which kinds of data output redaction replaces.",
}
# Modules whose config fields carry their own descriptions as comments.
CONFIG_MODULES = frozenset({AgentConfig.__module__, ControllerConfig.__module__,
                            GatewayConfig.__module__})


@dataclass(frozen=True)
class Key:
    name: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class Table:
    header: str  # "[broker]", "[[replicas]]", "[guards.NAME]", "(top level)"
    cls: type[msgspec.Struct]
    keys: list[Key]


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment block right above it plus its trailing comment, in ``cls``."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    text = "\n".join(lines) + "\n"
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][:tok.start[1]].strip():
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    found: dict[str, str] = {}
    (body,) = ast.parse(text).body
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        row = node.lineno - 2  # the line before the field, 0-based
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        parts = above + ([trailing[node.lineno]] if node.lineno in trailing else [])
        if parts:
            joined = " ".join(parts)
            found[node.target.id] = joined[:1].upper() + joined[1:]
    return found


def _constraints(meta: list[msgspec.Meta]) -> str:
    words = []
    for m in meta:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(m, attr)
            if value is not None:
                # typing caches Annotated[float, Meta(ge=1)] and Meta(ge=1.0) as one (they
                # compare equal), so which one a field gets depends on import order.
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                words.append(f"{sign} {value}")
        if m.pattern is not None:
            words.append(f"matches `{m.pattern}`")
    return ", ".join(words)


def type_name(hint: Any) -> str:
    """What a TOML writer needs to know of a field's type, with its constraints."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        limits = _constraints([a for a in args[1:] if isinstance(a, msgspec.Meta)])
        return f"{type_name(args[0])} ({limits})" if limits else type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(_toml(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = " or ".join(type_name(a) for a in args if a is not type(None))
        return named + (" (optional)" if type(None) in args else "")
    if origin in (list, frozenset, set):
        return f"array of {type_name(args[0])}"
    if origin is tuple:
        return f"[{', '.join(type_name(a) for a in args)}]"
    if origin is dict or (isinstance(hint, type) and issubclass(hint, msgspec.Struct)):
        return "table"
    names: dict[Any, str] = {str: "string", int: "integer", float: "float", bool: "boolean"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple, frozenset, set)):
        items = sorted(value) if isinstance(value, (frozenset, set)) else list(value)
        return "[" + ", ".join(_toml(v) for v in items) + "]"
    if isinstance(value, dict):
        return "{}" if not value else "{" + ", ".join(f"{k} = {_toml(v)}"
                                                      for k, v in value.items()) + "}"
    return repr(value)


def _default(field: msgspec.structs.FieldInfo) -> str:
    if field.default is not msgspec.NODEFAULT:
        value = field.default
    elif field.default_factory is not msgspec.NODEFAULT:
        value = field.default_factory()
    else:
        return "**required**"
    return "unset" if value is None else f"`{_toml(value)}`"


def _struct_of(hint: Any) -> tuple[type[msgspec.Struct], bool] | None:
    """(struct, is an array of tables) when a field is a table or an array of tables."""
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return hint, False
    if typing.get_origin(hint) is list:
        inner = typing.get_args(hint)[0]
        if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
            return inner, True
    return None


# Tables of named tables, each converted by the loader into this struct.
NAMED_TABLES: dict[str, type[msgspec.Struct]] = {"gateway:guards": GuardConfig}


def tables(daemon: str, root: type[msgspec.Struct]) -> list[Table]:
    """Every table of a daemon's config file, top level first, with its keys.

    Raises ValueError naming every key that has no description."""
    out: list[Table] = []
    missing: list[str] = []
    misplaced: list[str] = []

    def walk(cls: type[msgspec.Struct], header: str, prefix: str) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        comments = _comments(cls)
        keys: list[Key] = []
        nested: list[tuple[type[msgspec.Struct], str, str]] = []
        for field in msgspec.structs.fields(cls):
            if field.name in INTERNAL:
                continue
            dotted = prefix + field.name
            hint = hints[field.name]
            struct = _struct_of(hint)
            named = NAMED_TABLES.get(f"{daemon}:{dotted}")
            if struct is not None and not struct[1]:
                nested.append((struct[0], f"[{dotted}]", f"{dotted}."))
                continue
            entry = DOCS.get(f"{daemon}:{dotted}")
            if entry is not None and cls.__module__ in CONFIG_MODULES:
                misplaced.append(f"{daemon}:{dotted} ({cls.__name__}.{field.name})")
            doc = entry or comments.get(field.name, "")
            if not doc:
                missing.append(f"{daemon}:{dotted} ({cls.__name__}.{field.name})")
            if struct is not None:
                nested.append((struct[0], f"[[{dotted}]]", f"{dotted}."))
                kind, default = "array of tables", "none"
            elif named is not None:
                nested.append((named, f"[{dotted}.NAME]", f"{dotted}.NAME."))
                kind, default = "tables, one per NAME", "none"
            else:
                kind, default = type_name(hint), _default(field)
            keys.append(Key(field.name, kind, default, doc))
        out.append(Table(header, cls, keys))
        for child, child_header, child_prefix in nested:
            walk(child, child_header, child_prefix)

    walk(root, "(top level)", "")
    if missing:
        raise ValueError("config keys without a description (comment the field in its "
                         "class): " + ", ".join(missing))
    if misplaced:
        raise ValueError("llm_ops_helper.configdoc.DOCS describes fields that carry their own "
                         "comments (move the text there): " + ", ".join(misplaced))
    return out


# (daemon, example file in systemd/, installed path, root struct)
FILES: list[tuple[str, str, str, type[msgspec.Struct]]] = [
    ("agent", "agent.example.toml", "/etc/llmops/agent.toml", AgentConfig),
    ("controller", "controller.example.toml", "/etc/llmops/controller.toml", ControllerConfig),
    ("gateway", "gateway.example.toml", "/etc/llmops/gateway.toml", GatewayConfig),
]

_INTRO = f"""\
# Configuration reference

<!-- Generated from the config types by `{REGENERATE}`; do not edit. -->

Each daemon reads one TOML file once, at start-up, into frozen typed objects. A key the daemon
does not know, a value of the wrong type or out of range stops the start with one line naming
the file, the key and what was expected, and exit code 78 (`EX_CONFIG`), which the unit files
do not restart. Relative paths are relative to the config file's directory. Secrets (broker
passwords, command keys, API tokens) are never written in the TOML: the `*_file` and `*_dir`
keys name the files that hold them.

The annotated examples in [`systemd/`](../systemd/) show the keys with their defaults;
[install.md](install.md) puts them to use.

- [llmops-agent](#llmops-agent) (every GPU host)
- [llmops-controller](#llmops-controller) (the head node)
- [llmops-gateway](#llmops-gateway) (the OpenAI-compatible gateway)
"""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """docs/config.md."""
    out = [_INTRO]
    for daemon, example, path, root in FILES:
        out += ["", f"## llmops-{daemon}", "",
                f"`{path}`; annotated example: [`systemd/{example}`](../systemd/{example}).", ""]
        for table in tables(daemon, root):
            out += [f"### {daemon}: top level" if table.header == "(top level)"
                    else f"### {daemon} `{table.header}`", ""]
            own = inspect.cleandoc(table.cls.__dict__.get("__doc__") or "").split("\n\n")[0]
            if own:
                out += [_cell(own.replace("``", "`")), ""]
            out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
            out += [f"| `{k.name}` | {_cell(k.type)} | {_cell(k.default)} | "
                    f"{_cell(k.description)} |" for k in table.keys]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def documented_keys() -> dict[str, set[str]]:
    """Example file name -> every table and dotted key the reference documents for its daemon
    (arrays of tables without an index, named tables as ``guards.NAME.key``)."""
    found: dict[str, set[str]] = {}
    for daemon, example, _path, root in FILES:
        keys: set[str] = set()
        for table in tables(daemon, root):
            name = "" if table.header == "(top level)" else table.header.strip("[]")
            keys.update(([name] if name else []) + [(name and name + ".") + key.name
                                                    for key in table.keys])
        found[example] = keys
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_ops_helper.configdoc",
                                     description="Generate docs/config.md from the config "
                                                 "types (stdout without an option).")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="FILE", help="write the reference here")
    group.add_argument("--check", type=Path, metavar="FILE",
                       help="exit 1 when FILE is not what would be generated")
    args = parser.parse_args(argv)
    text = render()
    if args.write is not None:
        args.write.write_text(text)
    elif args.check is not None:
        if not args.check.is_file() or args.check.read_text() != text:
            print(f"{args.check} is stale: run {REGENERATE}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
