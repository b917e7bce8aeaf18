"""Where a profiled controller's time went: a cProfile file from ``bench/ingest.py --profile``.

Three views: the functions with the most cumulative time (ours marked), those with the most
own time, and own time (tottime) summed by where the code lives: the controller and its siblings (ours), aiomqtt, paho-mqtt,
msgspec, SQLite, structlog, the HTTP side, asyncio's loop, waiting in epoll (idle), the rest.
Built-ins and the standard library count for whoever called them (``socket.recv`` under paho is
paho's, a ``threading.Condition`` made for each message by paho is paho's), through up to
three callers, shared out by the time each caller spent in them.

    python bench/ingest_profile.py FILE [--top 30]
"""

from __future__ import annotations

import argparse
import pstats
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OURS = ("controller", "proto", "sdk", "agent")
# (marker in the file path or the built-in's name, group); the first that matches wins.
GROUPS = (
    ("select.epoll", "idle (epoll wait)"),
    ("aiomqtt", "aiomqtt"),
    ("paho", "paho-mqtt"),
    ("msgspec", "msgspec"),
    ("sqlite3", "SQLite"),
    ("structlog", "structlog"),
    ("aiohttp", "aiohttp"),
    ("prometheus_client", "prometheus_client"),
    ("asyncio", "asyncio"),
)

Func = tuple[str, int, str]


def where(func: Func) -> str:
    filename, _, name = func
    path = Path(filename).resolve() if filename != "~" else Path(filename)
    if path.is_absolute() and path.is_relative_to(ROOT) and ".venv" not in path.parts:
        rel = path.relative_to(ROOT)
        if rel.parts and rel.parts[0] in OURS:
            return f"ours ({rel.parts[0]})"
    text = f"{filename} {name}"
    return next((group for marker, group in GROUPS if marker in text), "other")


def shared_out(table: dict[Func, Any], func: Func, tt: float, groups: dict[str, float],
               depth: int = 3) -> None:
    """Adds ``tt`` of ``func``'s own time to its group, or where it has none, to its callers'."""
    group = where(func)
    callers = table[func][4] if func in table else {}
    if group != "other" or depth == 0 or not callers:
        groups[group] += tt
        return
    spent = {caller: v[2] for caller, v in callers.items()}
    total = sum(spent.values())
    for caller, part in spent.items():
        share = tt * part / total if total else tt / len(spent)
        shared_out(table, caller, share, groups, depth - 1)


def label(func: Func) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    path = Path(filename).resolve()  # the editable install links each module into build/
    short = (str(path.relative_to(ROOT)) if path.is_relative_to(ROOT)
             and ".venv" not in path.parts else "/".join(path.parts[-3:]))
    return f"{short}:{line}({name})"


def summary(path: Path, top: int) -> str:
    stats = pstats.Stats(str(path))
    table = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in table.values())
    lines = [f"{path}: {total:.1f} s of own time in all"]
    lines.append(f"\ntop {top} by cumulative time (s, % of all; * ours)")
    by_cum = sorted(table.items(), key=lambda kv: kv[1][3], reverse=True)
    for func, (_, nc, _, ct, _) in by_cum[:top]:
        mark = "*" if where(func).startswith("ours") else " "
        lines.append(f"  {ct:8.2f} {100 * ct / total:5.1f} % {mark} {nc:>9} calls  {label(func)}")
    lines.append(f"\ntop {top // 2} by own time (s, % of all; * ours)")
    by_own = sorted(table.items(), key=lambda kv: kv[1][2], reverse=True)
    for func, (_, nc, tt, _, _) in by_own[:top // 2]:
        mark = "*" if where(func).startswith("ours") else " "
        lines.append(f"  {tt:8.2f} {100 * tt / total:5.1f} % {mark} {nc:>9} calls  {label(func)}")
    groups: dict[str, float] = defaultdict(float)
    for func, (_, _, tt, _, _) in table.items():
        shared_out(table, func, tt, groups)
    lines.append("\nown time by where the code lives (s, % of all)")
    for group, tt in sorted(groups.items(), key=lambda kv: kv[1], reverse=True):
        lines.append(f"  {tt:8.2f} {100 * tt / total:5.1f} %  {group}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(summary(args.file, args.top))


if __name__ == "__main__":
    main()
