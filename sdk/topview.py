"""What ``llmops top`` draws: a pure function from the controller's overview to screen lines.

``render(overview, width, height)`` lays out a header (fleet totals, the controller's clock and
a status line), then tables of hosts, GPUs, deployments with their replicas, and firing alerts.
Lines are built as styled spans, cut to ``width`` and only then painted, so colour codes never
count against the width; when there are more rows than ``height`` allows, the longest tables
give up rows first and say how many they hide.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# A span is (text, style); a line is a list of spans. Styles name SGR codes below.
Span = tuple[str, str]
Line = list[Span]

_SGR = {"ok": "32", "warn": "33", "crit": "1;31", "dim": "2", "bold": "1", "head": "7",
        "title": "1;36", "info": "36"}
_RESET = "\x1b[0m"
_GAP = "  "
# C0, DEL and C1 controls (U+009B is a one-character CSI): nothing from the API is an escape.
_UNPRINTABLE = {c: "?" for c in [*range(0x20), *range(0x7F, 0xA0)]}


@dataclass(frozen=True)
class Status:
    """The line under the header: what the fetch loop has to say, and how loudly."""

    text: str
    level: str = "dim"  # a style: "dim", "ok", "warn" or "crit"


@dataclass
class _Section:
    head: list[Line]
    rows: list[Line]
    shown: int = 0


def render(overview: Mapping[str, Any] | None, width: int, height: int | None = None, *,
           url: str = "", status: Status | None = None, color: bool = False) -> list[str]:
    """The screen as lines no wider than ``width`` and, unless ``height`` is None, no more
    than ``height`` of them. ``overview`` None (nothing fetched yet) draws the header only."""
    width = max(width, 1)
    lines = _header(overview, url, width)
    if status is not None:
        lines.append([(status.text, status.level)])
    sections = [] if overview is None else _sections(overview, width)
    body = _fit_height(sections, None if height is None else height - len(lines))
    out = [_paint(_cut(line, width), color) for line in lines + body]
    return out if height is None else out[:max(height, 0)]


# -- header ----------------------------------------------------------------------------------

def _header(overview: Mapping[str, Any] | None, url: str, width: int) -> list[Line]:
    ts = overview.get("ts") if overview else None
    clock = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, int | float) else ""
    left = "llmops top" + (f"  {url}" if url else "")
    pad = max(1, width - len(left) - len(clock))
    first: Line = [("llmops top", "title"), (left[len("llmops top"):], ""), (" " * pad, ""),
                   (clock, "bold")]
    if overview is None:
        return [first]
    return [first, _totals(overview)]


def _totals(overview: Mapping[str, Any]) -> Line:
    hosts = _list(overview, "hosts")
    online = sum(1 for h in hosts if h.get("online"))
    gpus = [g for h in hosts for g in _list(h, "gpus")]
    health = {level: sum(1 for g in gpus if g.get("health") == level)
              for level in ("warning", "critical")}
    deployments = _list(overview, "deployments")
    ready = sum(_int(d.get("replicas_ready")) for d in deployments)
    desired = sum(_int(d.get("replicas_desired")) for d in deployments)
    alerts = _list(overview, "alerts")
    critical = sum(1 for a in alerts if a.get("severity") == "critical")
    line: Line = [(f"hosts {online}/{len(hosts)} online", "ok" if online == len(hosts) else "warn"),
                  (f"   GPUs {len(gpus)}", "")]
    flagged = [(f"{count} {level}", "crit" if level == "critical" else "warn")
               for level, count in health.items() if count]
    for i, span in enumerate(flagged):
        line += [(" (" if i == 0 else ", ", ""), span]
    if flagged:
        line.append((")", ""))
    line.append((f"   replicas {ready}/{desired} ready in {len(deployments)} "
                 f"deployment{'' if len(deployments) == 1 else 's'}",
                 "" if ready == desired else "warn"))
    line.append((f"   alerts {len(alerts)} firing",
                 "crit" if critical else "warn" if alerts else ""))
    return line


# -- tables ----------------------------------------------------------------------------------

def _sections(overview: Mapping[str, Any], width: int) -> list[_Section]:
    ts = overview.get("ts")
    now = float(ts) if isinstance(ts, int | float) else time.time()
    hosts = sorted(_list(overview, "hosts"), key=lambda h: str(h.get("host")))
    sections = [_hosts(hosts, now, width), _gpus(hosts, width),
                _deployments(_list(overview, "deployments"), width)]
    alerts = _list(overview, "alerts")
    if alerts:
        sections.append(_alerts(alerts, now, width))
    return sections


def _hosts(hosts: list[Mapping[str, Any]], now: float, width: int) -> _Section:
    rows: list[list[Span]] = []
    for h in hosts:
        online = bool(h.get("online"))
        state = "online" if online else "offline" + (f" ({h['offline_reason']})"
                                                     if h.get("offline_reason") else "")
        alerts = _int(h.get("alerts"))
        rows.append([(str(h.get("host", "?")), "bold"), (state, "ok" if online else "crit"),
                     _pct(h.get("cpu_pct")), _pct(h.get("memory_used_pct")),
                     (str(len(_list(h, "gpus"))), ""),
                     (str(alerts), "crit" if alerts else ""),
                     (_age(h.get("last_ts"), now), "" if online else "dim"),
                     (str(h.get("agent_version") or "-"), "dim")])
    return _table(["HOST", "STATE", "CPU", "MEM", "GPUS", "ALERTS", "SEEN", "AGENT"],
                  rows, width, right={2, 3, 4, 5, 6}, empty="no hosts have reported yet")


def _gpus(hosts: list[Mapping[str, Any]], width: int) -> _Section:
    # What is left of the width after the other columns goes to the two bars.
    bar = max(5, min(30, (width - 75) // 2))
    rows: list[list[Span]] = []
    for h in hosts:
        dim = not h.get("online")
        for g in sorted(_list(h, "gpus"), key=lambda g: _int(g.get("index"))):
            util = _num(g.get("util_pct"))
            used, total = _num(g.get("memory_used_bytes")), _num(g.get("memory_total_bytes"))
            mem = None if used is None or not total else 100.0 * used / total
            temp, power = _num(g.get("temperature_c")), _num(g.get("power_w"))
            health = str(g.get("health") or ("ok" if g.get("healthy", True) else "critical"))
            rows.append([
                (f"{h.get('host', '?')}:{g.get('index', '?')}", "dim" if dim else "bold"),
                (_gpu_name(g.get("name")), "dim" if dim else ""),
                _bar(util, bar), ("-" if util is None else f"{util:.0f}%", ""),
                _bar(mem, bar), (_gib(used, total), ""),
                ("-" if temp is None else f"{temp:.0f}C",
                 "" if temp is None else _level(temp, 75, 85)),
                ("-" if power is None else f"{power:.0f}W", ""),
                (health, {"ok": "ok", "warning": "warn"}.get(health, "crit"))])
    return _table(["GPU", "NAME", "UTIL", "", "MEMORY", "", "TEMP", "POWER", "HEALTH"],
                  rows, width, right={3, 5, 6, 7}, empty="no GPUs reported")


def _deployments(deployments: list[Mapping[str, Any]], width: int) -> _Section:
    rows: list[list[Span]] = []
    for d in sorted(deployments, key=lambda d: str(d.get("name"))):
        phase = str(d.get("phase", "?"))
        ready, desired = _int(d.get("replicas_ready")), _int(d.get("replicas_desired"))
        detail = (f"{ready}/{desired} ready  model {d.get('model', '?')}  "
                  f"{d.get('runtime') or '-'}  autoscale {d.get('autoscale_mode', '-')}")
        rows.append([(str(d.get("name", "?")), "bold"), ("", ""), ("", ""),
                     (phase, _phase_style(phase)), (_version(d.get("version")), ""),
                     (detail, "" if ready == desired else "warn")])
        for r in sorted(_list(d, "replicas"), key=lambda r: str(r.get("name"))):
            state = str(r.get("state", "?"))
            gpus = ",".join(str(i) for i in r.get("gpus") or []) or "-"
            rows.append([(f"  {r.get('name', '?')}", ""), (str(r.get("host") or "-"), ""),
                         (gpus, ""), (state, _replica_style(state)),
                         (_version(r.get("version")), ""),
                         (str(r.get("reason") or r.get("url") or ""), "dim")])
    return _table(["DEPLOYMENT", "HOST", "GPUS", "STATE", "VERSION", "DETAIL"], rows,
                  width, empty="no deployments")


def _alerts(alerts: list[Mapping[str, Any]], now: float, width: int) -> _Section:
    order = {"critical": 0, "warning": 1}
    rows: list[list[Span]] = []
    for a in sorted(alerts, key=lambda a: (order.get(str(a.get("severity")), 2),
                                           -_num0(a.get("started_at")))):
        severity = str(a.get("severity", "?"))
        where = str(a.get("host") or "")
        if a.get("gpu") is not None:
            where += f":{a['gpu']}"
        if a.get("replica"):
            where += f" {a['replica']}" if where else str(a["replica"])
        rows.append([(str(a.get("rule", "?")), "bold"),
                     (severity, {"critical": "crit", "warning": "warn"}.get(severity, "info")),
                     (where.strip() or "-", ""),
                     (_age(a.get("started_at"), now), ""), (str(a.get("summary", "")), "")])
    return _table(["ALERT", "SEVERITY", "WHERE", "SINCE", "SUMMARY"], rows, width,
                  right={3})


def _table(headers: list[str], rows: list[list[Span]], width: int, *,
           right: set[int] | None = None, empty: str = "") -> _Section:
    """Columns as wide as their widest cell; the last column is left ragged."""
    right = right or set()
    widths = [max([len(headers[i])] + [len(row[i][0]) for row in rows])
              for i in range(len(headers))]

    def line(cells: Sequence[Span]) -> Line:
        out: Line = []
        for i, (text, style) in enumerate(cells):
            last = i == len(cells) - 1
            cell = text if last else text.rjust(widths[i]) if i in right else text.ljust(widths[i])
            out.append((cell, style))
            if not last:
                out.append((_GAP, ""))
        return out

    head_text = "".join(t for t, _ in line([(h, "") for h in headers]))
    head: list[Line] = [[("", "")], [(head_text.ljust(width), "head")]]
    body = [line(row) for row in rows] or [[(empty, "dim")]]
    return _Section(head, body)


def _fit_height(sections: list[_Section], height: int | None) -> list[Line]:
    """Every row when ``height`` allows. Else the blank lines between tables go first, then
    the tables with the most rows shown lose rows, each keeping at least one and a line that
    says how many more it has."""
    for s in sections:
        s.shown = len(s.rows)
    if height is not None:
        def total() -> int:
            return sum(len(s.head) + s.shown + (s.shown < len(s.rows)) for s in sections)
        if total() > height:
            for s in sections:
                s.head = s.head[1:]
        while total() > height:
            longest = max(sections, key=lambda s: s.shown, default=None)
            if longest is None or longest.shown <= 1:
                break
            # Hiding one row alone gains nothing: the "more" line takes its place.
            cut = 2 if longest.shown == len(longest.rows) else 1
            longest.shown = max(1, longest.shown - cut)
    out: list[Line] = []
    for s in sections:
        out += s.head + s.rows[:s.shown]
        if s.shown < len(s.rows):
            out.append([(f"  ... {len(s.rows) - s.shown} more (enlarge the terminal)", "dim")])
    return out if height is None else out[:max(height, 0)]


# -- cells -----------------------------------------------------------------------------------

def _bar(pct: float | None, width: int) -> Span:
    if pct is None:
        return ("[" + " " * width + "]", "dim")
    filled = round(max(0.0, min(100.0, pct)) / 100 * width)
    return ("[" + "|" * filled + " " * (width - filled) + "]", _level(pct, 60, 85))


def _level(value: float, warn: float, crit: float) -> str:
    return "crit" if value >= crit else "warn" if value >= warn else "ok"


def _pct(value: object) -> Span:
    number = _num(value)
    return ("-", "dim") if number is None else (f"{number:.0f}%", _level(number, 80, 95))


def _gib(used: float | None, total: float | None) -> str:
    if used is None or total is None:
        return "-"
    return f"{used / (1 << 30):.1f}/{total / (1 << 30):.1f}G"


def _gpu_name(name: object) -> str:
    text = str(name or "-").removeprefix("NVIDIA ")
    return text if len(text) <= 18 else text[:17] + "~"


def _age(ts: object, now: float) -> str:
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return "-"
    seconds = max(0.0, now - ts)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s" if seconds >= 60 \
            else f"{seconds:.0f}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _version(value: object) -> str:
    return "-" if value is None else f"v{value}"


def _phase_style(phase: str) -> str:
    return "ok" if phase == "available" else "crit" if phase in ("failed", "rolling_back") \
        else "warn"


def _replica_style(state: str) -> str:
    return "ok" if state == "ready" else "crit" if state in ("failed", "crashed", "lost") \
        else "warn"


def _list(mapping: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = mapping.get(key)
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _num0(value: object) -> float:
    return _num(value) or 0.0


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


# -- output ----------------------------------------------------------------------------------

def _cut(line: Line, width: int) -> Line:
    out: Line = []
    room = width
    for text, style in line:
        if room <= 0:
            break
        text = text.translate(_UNPRINTABLE)  # a summary from the controller holds no escapes
        out.append((text[:room], style))
        room -= len(text[:room])
    # Trailing blanks would only repaint what the caller clears anyway (except a header row).
    while out and not out[-1][0].strip() and out[-1][1] != "head":
        out.pop()
    return out


def _paint(line: Line, color: bool) -> str:
    if not color:
        return "".join(text for text, _ in line).rstrip()
    return "".join(f"\x1b[{_SGR[style]}m{text}{_RESET}" if style and text else text
                   for text, style in line)
