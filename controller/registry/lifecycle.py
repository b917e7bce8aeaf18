"""A version's stages and the moves between them: a pure table, no I/O.

registered -> staging -> production -> archived -> retired, and also registered|staging ->
archived, archived -> staging|production, and any stage but retired -> retired. Retired is
final: its artifact may already be deleted.
"""

from __future__ import annotations

from typing import Final

STAGES: Final = ("registered", "staging", "production", "archived", "retired")

TRANSITIONS: Final[dict[str, tuple[str, ...]]] = {
    "registered": ("staging", "archived", "retired"),
    "staging": ("production", "archived", "retired"),
    "production": ("archived", "retired"),
    "archived": ("staging", "production", "retired"),
    "retired": (),
}


def allowed(frm: str, to: str) -> bool:
    return to in TRANSITIONS.get(frm, ())


def refusal(frm: str, to: str) -> str | None:
    """Why ``frm -> to`` is not a legal move, naming both and the legal targets; else None."""
    if to not in STAGES:
        return f"unknown stage {to!r}: expected one of {', '.join(STAGES)}"
    if allowed(frm, to):
        return None
    targets = TRANSITIONS.get(frm, ())
    where = (f"from {frm!r} a version can move to: {', '.join(targets)}" if targets
             else f"{frm!r} is final")
    return f"cannot move from {frm!r} to {to!r}: {where}"
