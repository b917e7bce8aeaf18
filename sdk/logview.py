"""``llmops logs``: the daemons' JSON log lines, readable and filtered.

Reads files, standard input, or ``journalctl -o cat -u UNIT`` and prints each event as
``HH:MM:SS.mmm LEVEL host event key=value ...``. Times are shown in UTC, as the lines carry
them (logs from many hosts line up whatever the reader's time zone). Colours only on a
terminal (and not with ``NO_COLOR``); a traceback (``exception``, ``stack``) is printed
indented below its event. A line that is not a JSON event is printed unchanged: the daemons'
children write such lines too. With any filter active those lines are left out, since
nothing in them can be matched.

Filters: ``--host`` (glob on the ``host`` field), ``--deployment`` (the ``deployment`` field,
the gateway's ``model``, or a ``replica`` named ``DEPLOYMENT-rN-xxxx`` as the controller names
them), ``--level`` (a minimum) and ``--event`` (glob). Several values of one filter match any
of them; different filters must all match.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
ALIASES = {"warn": "warning", "exception": "error", "fatal": "critical", "notset": "debug"}
COLOURS = {"debug": "\x1b[2m", "info": "\x1b[32m", "warning": "\x1b[33m", "error": "\x1b[31m",
           "critical": "\x1b[1;41m"}
BOLD, DIM, RESET = "\x1b[1m", "\x1b[2m", "\x1b[0m"
# Shown in the fixed columns or below the line, not as key=value.
PLACED = ("timestamp", "level", "host", "event", "exception", "stack")
TRACEBACKS = ("exception", "stack")
FOLLOW_POLL_S = 0.25
EXIT_USAGE = 2


def level_number(name: str) -> int | None:
    name = name.lower()
    return LEVELS.get(ALIASES.get(name, name))


@dataclass(frozen=True)
class Filters:
    hosts: tuple[str, ...] = ()
    deployments: tuple[str, ...] = ()
    min_level: int | None = None
    events: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.hosts or self.deployments or self.events) or self.min_level is not None


def parse(line: str) -> dict[str, Any] | None:
    """The event on a log line, or None when the line is not one."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        return None
    return record


def names_deployment(record: dict[str, Any], deployment: str) -> bool:
    if record.get("deployment") == deployment or record.get("model") == deployment:
        return True
    replica = record.get("replica")
    return isinstance(replica, str) and \
        re.fullmatch(re.escape(deployment) + r"-r\d+-[^-]+", replica) is not None


def matches(record: dict[str, Any], f: Filters) -> bool:
    if f.hosts and not any(fnmatch.fnmatchcase(str(record.get("host", "")), h)
                           for h in f.hosts):
        return False
    if f.deployments and not any(names_deployment(record, d) for d in f.deployments):
        return False
    if f.min_level is not None:
        level = level_number(str(record.get("level", "")))
        if level is None or level < f.min_level:
            return False
    return not f.events or any(fnmatch.fnmatchcase(record["event"], g) for g in f.events)


def clock(timestamp: Any) -> str:
    """``HH:MM:SS.mmm`` in UTC from structlog's ISO 8601 timestamp (or a Unix time)."""
    try:
        if isinstance(timestamp, int | float):
            at = datetime.fromtimestamp(timestamp, UTC)
        else:
            at = datetime.fromisoformat(str(timestamp))
            at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        return "--:--:--.---"
    return at.strftime("%H:%M:%S.") + f"{at.microsecond // 1000:03d}"


def value_text(value: Any) -> str:
    if isinstance(value, str) and value and not re.search(r'[\s"=\\]', value):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def render(record: dict[str, Any], colour: bool = False) -> str:
    level = str(record.get("level", "?")).lower()
    label = level.upper()[:8].ljust(8)
    event = str(record["event"])
    pairs = [(k, value_text(v)) for k, v in record.items() if k not in PLACED]
    if colour:
        label = COLOURS.get(ALIASES.get(level, level), "") + label + RESET
        event = BOLD + event + RESET
        fields = " ".join(f"{DIM}{k}={RESET}{v}" for k, v in pairs)
    else:
        fields = " ".join(f"{k}={v}" for k, v in pairs)
    line = f"{clock(record.get('timestamp'))} {label} {record.get('host', '-')} {event}"
    out = [f"{line} {fields}" if fields else line]
    for key in TRACEBACKS:
        trace = record.get(key)
        if trace:
            out += ["    " + t for t in str(trace).rstrip("\n").splitlines()]
    return "\n".join(out)


def show(line: str, f: Filters, colour: bool) -> str | None:
    """What to print for one input line, or None to print nothing."""
    record = parse(line)
    if record is None:
        return None if f.active else line.rstrip("\r\n")
    return render(record, colour) if matches(record, f) else None


# -- where the lines come from ------------------------------------------------------------

def journal_command(units: list[str], follow: bool) -> list[str]:
    command = ["journalctl", "-o", "cat", "--no-pager"]
    if follow:
        command.append("-f")
    for unit in units:
        command += ["-u", unit]
    return command


def after_rest(opened: os.stat_result, position: int, now: os.stat_result | None) -> str | None:
    """What ``tail -F`` does once an open file has nothing more to read: ``"reopen"`` when its
    path now names another file (rotated: the old one is read to its end first), ``"rewind"``
    when the file shrank below what was read (truncated, as copytruncate does), else None (wait;
    also while a rotated path has no file yet)."""
    if now is None:
        return None
    if (now.st_ino, now.st_dev) != (opened.st_ino, opened.st_dev):
        return "reopen"
    return "rewind" if now.st_size < position else None


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def follow_files(paths: Sequence[str]) -> Generator[str, None, None]:
    """``tail -F`` over files: what they hold, then what is appended, line by line, across
    rotation and truncation."""
    handles = [open(p, "rb") for p in paths]  # noqa: SIM115 (closed below, or replaced)
    partial = [b"" for _ in paths]
    try:
        while True:
            got = False
            for n, path in enumerate(paths):
                while chunk := handles[n].readline():
                    got = True
                    if not chunk.endswith(b"\n"):  # the writer is mid-line: wait for the rest
                        partial[n] += chunk
                        break
                    yield (partial[n] + chunk).decode(errors="replace")
                    partial[n] = b""
                else:
                    handle = handles[n]
                    action = after_rest(os.fstat(handle.fileno()), handle.tell(), _stat(path))
                    if action is None:
                        continue
                    if partial[n]:  # the writer left it unfinished: show what there is
                        yield partial[n].decode(errors="replace") + "\n"
                        partial[n] = b""
                    if action == "rewind":
                        handle.seek(0)
                    else:
                        with contextlib.suppress(OSError):  # gone again: try next round
                            handles[n] = open(path, "rb")  # noqa: SIM115
                            handle.close()
                    got = True
            if not got:
                time.sleep(FOLLOW_POLL_S)
    finally:
        for handle in handles:
            handle.close()


def _stdin_lines() -> Iterator[str]:
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="replace")
    return iter(sys.stdin.readline, "")


@contextlib.contextmanager
def opened(args: argparse.Namespace, status: list[int]) -> Iterator[Iterator[str]]:
    """The input lines; ``status`` gets journalctl's exit status when it ran."""
    if args.unit:
        command = journal_command(args.unit, args.follow)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                                   errors="replace", bufsize=1)
        assert process.stdout is not None
        try:
            yield iter(process.stdout.readline, "")
        finally:
            if process.poll() is None:
                process.terminate()
            process.stdout.close()
            status.append(process.wait())
        return
    if not args.files or args.files == ["-"]:
        yield _stdin_lines()
        return
    if args.follow:  # problem() has refused "-" among the files
        lines = follow_files(args.files)
        try:
            yield lines
        finally:
            lines.close()
        return
    with contextlib.ExitStack() as stack:
        sources = [_stdin_lines() if p == "-" else
                   iter(stack.enter_context(open(p, errors="replace")).readline, "")
                   for p in args.files]
        yield (line for source in sources for line in source)


def problem(args: argparse.Namespace) -> str | None:
    """Why these arguments cannot be run, or None."""
    if args.level is not None and level_number(args.level) is None:
        return f"--level {args.level!r}: expected one of {', '.join(LEVELS)}"
    if args.unit and args.files:
        return "give log files or --unit, not both"
    if args.unit and shutil.which("journalctl") is None:
        return ("--unit reads the systemd journal, but journalctl is not installed here; "
                "pipe the logs in instead: llmops logs < FILE")
    if not args.unit and not args.files and sys.stdin.isatty():
        return "nothing to read: give log FILEs, --unit UNIT, or pipe lines in"
    if args.follow and "-" in args.files and args.files != ["-"]:
        return "-f cannot follow standard input beside files: give one or the other"
    for path in args.files:
        if path != "-" and not os.path.isfile(path):
            return f"{path}: no such file"
    return None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_logs(args: argparse.Namespace) -> int:
    if args.catalogue:
        from llm_ops_helper.eventcatalogue import scan
        from llm_ops_helper.eventdoc import text
        sys.stdout.write(text(scan(), args.event))
        return 0
    why = problem(args)
    if why is not None:
        print(f"llmops logs: {why}", file=sys.stderr)
        return EXIT_USAGE
    filters = Filters(tuple(args.host), tuple(args.deployment),
                      None if args.level is None else level_number(args.level),
                      tuple(args.event))
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    # Reading files to their end, output may be buffered; anything live is written as it comes.
    live = bool(args.follow or args.unit or not args.files or "-" in args.files)
    if args.unit and threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so that journalctl is stopped too, not left behind.
        signal.signal(signal.SIGTERM, _interrupt)
    out = sys.stdout
    status: list[int] = []
    try:
        with opened(args, status) as lines:
            for line in lines:
                shown = show(line, filters, colour)
                if shown is not None:
                    out.write(shown + "\n")
                    if live:
                        out.flush()
            out.flush()
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, and keep Python's exit flush quiet.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    # journalctl said why on stderr; a non-zero status (no such journal) is passed on.
    return next((rc for rc in status if rc > 0), 0)
