"""Pure decisions of the supervisor: when a crashing replica is given up on, and why."""

from __future__ import annotations

from collections.abc import Sequence


def recent_exits(exits: Sequence[float], now: float, window_s: float) -> list[float]:
    """The exit times (monotonic seconds) that fall within the crash-loop window."""
    return [t for t in exits if now - t <= window_s]


def give_up_reason(*, exits_in_window: int, limit: int, window_s: float, ever_ready: bool,
                   exit_text: str, last_line: str) -> str | None:
    """Why a replica that just exited is failed rather than restarted; None: restart it.

    More than ``limit`` exits within the window is a crash loop. A replica that never became
    ready says so ("exited at start"): its log's last line is usually the whole story (a bad
    argument, a missing file, out of memory while loading).
    """
    if exits_in_window <= limit:
        return None
    line = f": {last_line}" if last_line else ""
    code = exit_text.removeprefix("exit ")
    if not ever_ready:
        return f"exited at start with {code}{line}"
    return (f"crash loop: exited {exits_in_window} times in {window_s:g} s; "
            f"last: {exit_text}{line}")
