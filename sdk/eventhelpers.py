"""Helper functions that log on their callers' behalf, for :mod:`llm_ops_helper.eventcatalogue`.

A log call whose event name or level is a parameter of its function (``Ledger.event(deployment,
kind, ...)``, ``run_until_signalled(run, name, ...)``) makes that function a helper: each call
of it names an event. A call is taken for a call of the helper only when it can be one: a
function by its own name in its module or through the caller's imports (``from
llm_ops_helper.lifecycle import run_until_signalled``, ``lifecycle.run_until_signalled``); a
method on ``self`` in its module or on a receiver named after its class (``self.ledger.event``,
``ledger.event`` for ``Ledger.event``). Another function that happens to share the name
(``views.event(row)``, the dashboard stream's ``event(name, data)``) is not.

Event names and levels are *templates*: strings whose parts may still be a parameter
(:class:`Param`) of the enclosing function, filled in from each call's arguments.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass

PACKAGE = "llm_ops_helper"


@dataclass(frozen=True)
class Param:
    """A template part that is a parameter of a helper function."""
    name: str


Template = tuple[str | Param, ...]


def param_names(fn: ast.AST) -> set[str]:
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        return set()
    a = fn.args
    names = {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]}
    if a.vararg:
        names.add(a.vararg.arg)
    if a.kwarg:
        names.add(a.kwarg.arg)
    return names


def resolve(expr: ast.expr, scopes: list[ast.AST], depth: int = 0) -> list[Template] | None:
    """The strings ``expr`` can be, as templates over the enclosing functions' parameters."""
    if depth > 8:
        return None
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return [(expr.value,)]
    if isinstance(expr, ast.IfExp):
        a, b = resolve(expr.body, scopes, depth + 1), resolve(expr.orelse, scopes, depth + 1)
        return None if a is None or b is None else a + b
    if isinstance(expr, ast.JoinedStr):
        out: list[Template] = [()]
        for part in expr.values:
            if isinstance(part, ast.FormattedValue):
                if part.format_spec is not None or part.conversion != -1:
                    return None
                options = resolve(part.value, scopes, depth + 1)
            else:
                options = resolve(part, scopes, depth + 1)
            if options is None:
                return None
            out = [t + o for t in out for o in options]
        return out
    if isinstance(expr, ast.Name):
        for fn in scopes:
            assigned = [n.value for n in ast.walk(fn) if isinstance(n, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == expr.id for t in n.targets)]
            if assigned:
                found: list[Template] = []
                for value in assigned:
                    options = resolve(value, scopes, depth + 1)
                    if options is None:
                        return None
                    found += options
                return found
            if expr.id in param_names(fn):
                return [(Param(expr.id),)]
    return None


def fill(t: Template, values: dict[str, list[Template]]) -> list[Template] | None:
    out: list[Template] = [()]
    for part in t:
        if isinstance(part, Param):
            if part.name not in values:
                return None
            out = [a + b for a in out for b in values[part.name]]
        else:
            out = [(*a, part) for a in out]
    return out


def text(t: Template) -> str | None:
    parts = [p for p in t if isinstance(p, str)]
    return "".join(parts) if len(parts) == len(t) else None


@dataclass
class Helper:
    """A function whose log call takes its event name or level from the function's callers."""
    module: str
    name: str
    owner_class: str | None     # the class it is a method of, if any
    params: list[str]           # positional-or-keyword, ``self`` dropped for methods
    defaults: dict[str, ast.expr]
    kwargs: str | None          # the ``**name`` parameter, if any
    events: list[Template]
    levels: list[Template]
    fields: set[str]
    passes_kwargs: bool         # the helper's ``**kwargs`` go into the log call
    line: int


def helper_of(module: str, tree: ast.Module, fn: ast.AST, line: int, events: list[Template],
              levels: list[Template], fields: set[str], splat: list[str]) -> Helper | None:
    """``fn`` as a helper of the log call at ``line``, or None when it is not a def."""
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    a = fn.args
    params = [p.arg for p in [*a.posonlyargs, *a.args]]
    if params and params[0] in ("self", "cls"):
        params = params[1:]
    positional_defaults = dict(zip(reversed([p.arg for p in [*a.posonlyargs, *a.args]]),
                                   reversed(a.defaults), strict=False))
    keyword_defaults = {p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
                        if d is not None}
    kwargs = a.kwarg.arg if a.kwarg else None
    owner = next((n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                  and fn in n.body), None)
    return Helper(module, fn.name, owner, params + [p.arg for p in a.kwonlyargs],
                  {**positional_defaults, **keyword_defaults}, kwargs, events, levels,
                  fields | {f"**{x}" for x in splat if x != kwargs},
                  kwargs is not None and kwargs in splat, line)


def bind(helper: Helper, call: ast.Call) -> dict[str, ast.expr] | None:
    """Arguments of ``call`` by parameter name, or None if it cannot be a call of ``helper``."""
    if any(isinstance(a, ast.Starred) for a in call.args) or len(call.args) > len(helper.params):
        return None
    bound = dict(zip(helper.params, call.args, strict=False))
    for k in call.keywords:
        if k.arg is None:
            return None
        if k.arg in helper.params:
            bound[k.arg] = k.value
        elif helper.kwargs is None:
            return None
    for name in helper.params:
        if name not in bound:
            if name not in helper.defaults:
                return None
            bound[name] = helper.defaults[name]
    return bound


# -- which calls are calls of a helper ------------------------------------------------------

def _module_name(dotted: str) -> str:
    """An imported module's name as the catalogue names modules (relative to the package)."""
    if dotted == PACKAGE:
        return "__init__"
    return dotted.removeprefix(PACKAGE + ".")


def imports(module: str, tree: ast.Module, is_package: bool) -> dict[str, str]:
    """Local name -> what it names: a module (``"lifecycle"``) or a module's attribute
    (``"lifecycle:run_until_signalled"``)."""
    here = module if is_package else module.rpartition(".")[0]
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    found[alias.asname] = _module_name(alias.name)
                else:
                    top = alias.name.split(".")[0]
                    found[top] = _module_name(top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                source = ".".join(p for p in (base, node.module or "") if p)
            else:
                source = _module_name(node.module or "")
            for alias in node.names:
                found[alias.asname or alias.name] = f"{source}:{alias.name}"
    return found


def _child(base: str, name: str) -> str:
    return name if base == "__init__" else f"{base}.{name}"


def _dotted(expr: ast.expr, names: dict[str, str]) -> str | None:
    """The module an expression such as ``lifecycle`` or ``llm_ops_helper.lifecycle`` names."""
    if isinstance(expr, ast.Name):
        named = names.get(expr.id)
        if named is None:
            return None
        base, _, attr = named.partition(":")
        return _child(base, attr) if attr else base
    if isinstance(expr, ast.Attribute):
        outer = _dotted(expr.value, names)
        return None if outer is None else _child(outer, expr.attr)
    return None


def _receiver_name(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        return expr.attr
    return None


def is_call_of(h: Helper, call: ast.Call, module: str, names: dict[str, str]) -> bool:
    """Whether ``call`` (in ``module``, with its imports ``names``) can be a call of ``h``."""
    f = call.func
    if h.owner_class is not None:  # a method: on self in its module, or on a named receiver
        if not (isinstance(f, ast.Attribute) and f.attr == h.name):
            return False
        receiver = _receiver_name(f.value)
        if receiver is None:
            return False
        if receiver in ("self", "cls"):
            return module == h.module
        return receiver.lstrip("_").lower().endswith(h.owner_class.lower())
    if isinstance(f, ast.Name):
        if f.id != h.name:
            return False
        return names.get(f.id) == f"{h.module}:{h.name}" or \
            (module == h.module and f.id not in names)
    if isinstance(f, ast.Attribute) and f.attr == h.name:
        return _dotted(f.value, names) == h.module
    return False


def calls_of(h: Helper, trees: dict[str, ast.Module], packages: set[str]
             ) -> Iterator[tuple[str, ast.Call, dict[str, ast.expr]]]:
    """(module, call, its arguments by parameter name) for every call of ``h``."""
    for module, tree in trees.items():
        names = imports(module, tree, module in packages)
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call) or (module == h.module and call.lineno == h.line):
                continue
            if not is_call_of(h, call, module, names):
                continue
            args = bind(h, call)
            if args is not None:
                yield module, call, args
