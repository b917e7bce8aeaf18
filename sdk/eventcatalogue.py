"""Every ``event`` the daemons log, found by reading their source (``ast``), never by running it.

A log call is ``<logger>.<level>("event_name", key=value, **more)`` on a logger made by
``structlog.get_logger`` (or ``.bind``/``.new`` of one), or ``getattr(<logger>, level)(...)``.
An event name that is not a literal is followed as far as the source allows: a conditional
(``"a" if x else "b"``), a local variable assigned such values, or a parameter of the enclosing
function, in which case every call of that function (a helper such as ``Ledger.event``)
supplies the name, the level and the extra fields (which calls those are:
:mod:`llm_ops_helper.eventhelpers`). Code in the shared library (``sdk/``,
``proto/``) is attributed to the daemons whose modules call it. Whatever cannot be resolved is
reported, not guessed.

:mod:`llm_ops_helper.eventdoc` describes the events and writes ``docs/events.md``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import llm_ops_helper
from llm_ops_helper.eventhelpers import (
    Helper,
    Param,
    Template,
    calls_of,
    fill,
    helper_of,
    param_names,
    resolve,
    text,
)

# Level method -> the ``level`` value structlog's add_log_level writes.
LEVEL_METHODS = {"debug": "debug", "info": "info", "msg": "info", "warning": "warning",
                 "warn": "warning", "error": "error", "exception": "error",
                 "critical": "critical", "fatal": "critical"}
# Keyword arguments that structlog's processors turn into other keys.
RENAMED_FIELDS = {"exc_info": "exception", "stack_info": "stack"}
# Modules under these prefixes are library code: their events belong to whoever calls them.
SHARED_PREFIXES = ("proto.",)
DAEMON_PACKAGES = ("agent", "controller")


@dataclass
class Event:
    daemon: str
    name: str
    levels: set[str] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)
    modules: set[str] = field(default_factory=set)
    via: set[str] = field(default_factory=set)  # helper modules that do the logging


@dataclass(frozen=True)
class Unresolved:
    module: str
    line: int
    why: str


@dataclass
class Catalogue:
    events: list[Event]
    unresolved: list[Unresolved]

    def by_daemon(self) -> dict[str, list[Event]]:
        out: dict[str, list[Event]] = {}
        for e in sorted(self.events, key=lambda e: (daemon_order(e.daemon), e.name)):
            out.setdefault(e.daemon, []).append(e)
        return out


def daemon_of(module: str) -> str:
    """Which process logs what ``module`` emits, from where the module lives."""
    if module.startswith("agent.runtimes.simserver"):
        return "simserver"
    if module.startswith("controller.gateway"):
        return "gateway"
    for package in DAEMON_PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    return "cli"


def daemon_order(daemon: str) -> tuple[int, str]:
    order = ("agent", "controller", "gateway", "simserver", "cli")
    return (order.index(daemon) if daemon in order else len(order), daemon)


def is_shared(module: str) -> bool:
    """Library code (``sdk/``, ``proto/``): attributed to the daemons that call it, if any."""
    return daemon_of(module) == "cli" or module.startswith(SHARED_PREFIXES)


def package_sources(root: Path | None = None) -> Iterator[tuple[str, Path]]:
    """(module name relative to ``llm_ops_helper``, file) for every source file installed."""
    base = root or Path(llm_ops_helper.__path__[0])
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield ".".join(parts) or "__init__", path


# -- reading one module ---------------------------------------------------------------------

def _loggers(tree: ast.Module) -> dict[str, set[str]]:
    """Names bound to a structlog logger anywhere in the module -> fields bound on them."""
    found: dict[str, set[str]] = {}
    changed = True
    while changed:  # ``a = log.bind(...)`` may follow ``log = get_logger()`` in any order
        changed = False
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
                continue
            bound = _logger_call(node.value, found)
            if bound is None:
                continue
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id not in found:
                    found[target.id] = bound
                    changed = True
    return found


def _logger_call(call: ast.Call, known: dict[str, set[str]]) -> set[str] | None:
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr == "get_logger" and \
            isinstance(func.value, ast.Name) and func.value.id == "structlog":
        return set()
    if isinstance(func, ast.Name) and func.id == "get_logger":
        return set()
    if isinstance(func, ast.Attribute) and func.attr in ("bind", "new") and \
            isinstance(func.value, ast.Name) and func.value.id in known:
        return known[func.value.id] | {k.arg for k in call.keywords if k.arg}
    return None


def _parents(tree: ast.Module) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _functions(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> list[ast.AST]:
    """Enclosing functions, innermost first."""
    out: list[ast.AST] = []
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            out.append(node)
    return out


@dataclass
class _Site:
    """One log call, its event and level still templates."""
    module: str
    line: int
    events: list[Template]
    levels: list[Template]
    fields: set[str]
    splat: list[str]            # names of ``**x`` passed into the call
    outer: ast.AST | None       # the outermost enclosing def, if any
    owner: ast.AST | None       # the function whose parameters the templates use


def _log_calls(module: str, tree: ast.Module,
               unresolved: list[Unresolved]) -> Iterator[_Site]:
    loggers = _loggers(tree)
    parents = _parents(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        level_expr: ast.expr | None = None
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in LEVEL_METHODS:
            target = func.value
            level: list[Template] = [(LEVEL_METHODS[func.attr],)]
        elif isinstance(func, ast.Call) and isinstance(func.func, ast.Name) and \
                func.func.id == "getattr" and len(func.args) >= 2:
            target, level_expr, level = func.args[0], func.args[1], []
        else:
            continue
        bound: set[str] | None = None
        if isinstance(target, ast.Name) and target.id in loggers:
            bound = loggers[target.id]
        elif isinstance(target, ast.Call):
            bound = _logger_call(target, loggers)
        if bound is None:
            continue
        scopes = _functions(node, parents)
        if level_expr is not None:
            resolved = resolve(level_expr, scopes)
            if resolved is None:
                unresolved.append(Unresolved(module, node.lineno, "level is not static"))
                continue
            level = [(LEVEL_METHODS.get(name, name),) if (name := text(t)) else t
                     for t in resolved]
        event_expr = node.args[0] if node.args else next(
            (k.value for k in node.keywords if k.arg == "event"), None)
        events = None if event_expr is None else resolve(event_expr, scopes)
        if events is None:
            unresolved.append(Unresolved(module, node.lineno, "event name is not static"))
            continue
        fields = set(bound) | {RENAMED_FIELDS.get(k.arg, k.arg) for k in node.keywords
                               if k.arg and k.arg != "event"}
        if isinstance(func, ast.Attribute) and func.attr == "exception":
            fields.add("exception")
        splat = []
        for k in node.keywords:
            if k.arg is None:
                keys = _dict_keys(k.value, scopes)
                if keys is None:
                    splat.append(k.value.id if isinstance(k.value, ast.Name) else "?")
                else:
                    fields |= keys
        params = {p.name for t in events + level for p in t if isinstance(p, Param)}
        owner = next((fn for fn in scopes if params & param_names(fn)), None)
        yield _Site(module, node.lineno, events, level, fields, splat,
                    scopes[-1] if scopes else None, owner)


def _dict_keys(expr: ast.expr, scopes: list[ast.AST]) -> set[str] | None:
    """The keys of a ``**splat`` that is a dict literal (or a local variable holding one)."""
    if isinstance(expr, ast.Dict):
        keys = [k.value for k in expr.keys if isinstance(k, ast.Constant)]
        return {k for k in keys if isinstance(k, str)} if len(keys) == len(expr.keys) else None
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and \
            expr.func.id == "dict" and not expr.args:
        names = [k.arg for k in expr.keywords]
        return {k for k in names if k} if all(names) else None
    if isinstance(expr, ast.Name) and scopes:
        values = [n.value for n in ast.walk(scopes[0])
                  if isinstance(n, ast.Assign | ast.AnnAssign) and n.value is not None
                  and any(isinstance(t, ast.Name) and t.id == expr.id
                          for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))]
        if len(values) == 1:
            return _dict_keys(values[0], [])
    return None


# -- the whole package ----------------------------------------------------------------------

def scan(root: Path | None = None) -> Catalogue:
    unresolved: list[Unresolved] = []
    trees: dict[str, ast.Module] = {}
    packages: set[str] = set()
    sites: list[_Site] = []
    for module, path in package_sources(root):
        tree = ast.parse(path.read_text(), str(path))
        trees[module] = tree
        if path.name == "__init__.py":
            packages.add(module)
        sites += _log_calls(module, tree, unresolved)

    events: dict[tuple[str, str], Event] = {}

    def add(daemon: str, name: str, levels: list[str], fields: set[str], module: str,
            via: str | None) -> None:
        e = events.setdefault((daemon, name), Event(daemon, name))
        e.levels.update(levels)
        e.fields.update(fields)
        e.modules.add(module)
        if via:
            e.via.add(via)

    helpers: list[Helper] = []
    for s in sites:
        fn = s.owner or (s.outer if is_shared(s.module) else None)
        helper = None if fn is None else helper_of(s.module, trees[s.module], fn, s.line,
                                                   s.events, s.levels, s.fields, s.splat)
        if helper is not None:
            helpers.append(helper)
            continue
        if s.owner is not None:
            unresolved.append(Unresolved(s.module, s.line, "event from a parameter of a "
                                                           "function that is not a def"))
            continue
        for t in s.events:
            add(daemon_of(s.module), text(t) or "?", [text(lv) or "?" for lv in s.levels],
                s.fields | {f"**{x}" for x in s.splat}, s.module, None)

    for h in helpers:
        used = False
        for module, call, args in calls_of(h, trees, packages):
            values = {}
            for name, expr in args.items():
                resolved = resolve(expr, [])
                if resolved is not None:
                    values[name] = resolved
            names = [text(x) or "" for t in h.events for x in fill(t, values) or [()]]
            levels = [text(x) or "" for t in h.levels for x in fill(t, values) or [()]]
            if not all(names) or not all(levels):
                unresolved.append(Unresolved(module, call.lineno,
                                             f"call of {h.name} with a non-static event"))
                continue
            used = True
            extra = {k.arg for k in call.keywords if k.arg and k.arg not in h.params} \
                if h.passes_kwargs else set()
            for name in names:
                add(daemon_of(module), name, [LEVEL_METHODS.get(lv, lv) for lv in levels],
                    h.fields | extra, module, h.module)
        if not used:
            if all(text(t) for t in h.events + h.levels):  # shared code nobody here calls
                for t in h.events:
                    add(daemon_of(h.module), text(t) or "?",
                        [text(lv) or "?" for lv in h.levels], h.fields, h.module, None)
            else:
                unresolved.append(Unresolved(h.module, h.line,
                                             f"{h.name} is never called with a static event"))
    return Catalogue(list(events.values()), sorted(set(unresolved), key=lambda u:
                                                    (u.module, u.line)))
