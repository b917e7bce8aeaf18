"""``llmops logs`` on real daemon output: a fleet (Mosquitto, the controller, an agent with a
simulated GPU, one ``sim`` replica) runs, loses its broker, and stops; its log files are then
read back through the command as an operator would, from files, stdin and journalctl."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.client import LLMOpsHelper
from llm_ops_helper.eventcatalogue import scan
from llm_ops_helper.localfleet import LocalFleet
from llm_ops_helper.logview import (
    FOLLOW_POLL_S,
    Filters,
    after_rest,
    clock,
    matches,
    parse,
    render,
    show,
)

LLMOPS = [sys.executable, "-m", "llm_ops_helper.cli", "logs"]
LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} [A-Z]+ +\S+ [a-z0-9_]+( .*)?")
DEPLOYMENT = "sim-logs"


async def run_fleet(workdir: Path) -> tuple[str, str]:
    async with LocalFleet(workdir, agents_count=1, gpus_per_agent=1) as fleet:
        helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
        card = write_model_card(workdir / f"{DEPLOYMENT}.toml", startup_s=0.2)
        d = await asyncio.to_thread(helper.deploy_model, str(card), name=DEPLOYMENT, replicas=1,
                                    gpu_memory_bytes=1 << 30, timeout=120)
        assert d.ready == 1
        assert fleet.broker is not None and fleet.controller is not None
        await fleet.broker.stop()  # both daemons now warn that the broker is unreachable
        agent = fleet.agents[0].daemon
        for _ in range(600):
            if "broker_unreachable" in agent.log() and \
                    "broker_unreachable" in fleet.controller.log():
                break
            await asyncio.sleep(0.1)
    return fleet.controller.log(), agent.log()


@pytest.fixture(scope="module")
def real_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The controller's and the agent's real output, one after the other, in one file."""
    workdir = tmp_path_factory.mktemp("fleet")
    controller, agent = asyncio.run(run_fleet(workdir))
    path = workdir / "all.log"
    path.write_text(controller + agent)
    return path


def records(path: Path) -> list[dict[str, object]]:
    return [r for line in path.read_text().splitlines() if (r := parse(line)) is not None]


def logs(*args: str, stdin: Path | None = None, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    with (stdin or Path(os.devnull)).open() as feed:
        return subprocess.run([*LLMOPS, *args], stdin=feed, capture_output=True, text=True,
                              env=env, timeout=120)


def events_in(output: str) -> list[str]:
    return [line.split()[3] for line in output.splitlines() if LINE.fullmatch(line)]


# -- real daemon output ---------------------------------------------------------------------

def test_real_lines_print_one_readable_line_each_and_are_all_in_the_catalogue(
        real_logs: Path) -> None:
    real = records(real_logs)
    names = {str(r["event"]) for r in real}
    assert {"controller_started", "agent_started", "replica_ready", "broker_unreachable",
            "agent_stopping", "controller_stopped"} <= names
    catalogued = {e.name for e in scan().events}
    assert names <= catalogued, f"logged but not in the catalogue: {names - catalogued}"

    done = logs(str(real_logs))
    assert done.returncode == 0 and done.stderr == ""
    printed = done.stdout.splitlines()
    assert events_in(done.stdout) == [r["event"] for r in real]
    first = next(r for r in real if r["event"] == "agent_started")
    line = next(p for p in printed if " agent_started " in p)
    assert line.startswith(f"{clock(first['timestamp'])} INFO     gpu-01 agent_started ")
    assert f"run_id={first['run_id']}" in line
    assert "\x1b[" not in done.stdout  # not a terminal: no colours


def test_host_filter_keeps_the_agent_and_what_the_controller_says_about_it(
        real_logs: Path) -> None:
    done = logs("--host", "gpu-01", str(real_logs))
    shown = events_in(done.stdout)
    assert "agent_started" in shown and "host_online" in shown  # the controller's line
    assert "controller_started" not in shown
    assert events_in(logs("--host", "gpu-9*", str(real_logs)).stdout) == []
    assert "controller_started" not in events_in(logs("--host", "gpu-*", str(real_logs)).stdout)


def test_deployment_filter_matches_deployment_fields_and_replica_names(real_logs: Path) -> None:
    shown = events_in(logs("--deployment", DEPLOYMENT, str(real_logs)).stdout)
    # The controller's records name the deployment; the agent's name the replica.
    assert {"replica_placed", "replica_accepted", "replica_started", "replica_ready",
            "deployment_phase"} <= set(shown)
    assert "agent_started" not in shown and "broker_unreachable" not in shown
    assert events_in(logs("--deployment", "other", str(real_logs)).stdout) == []


def test_level_filter_is_a_minimum(real_logs: Path) -> None:
    real = records(real_logs)
    shown = events_in(logs("--level", "warning", str(real_logs)).stdout)
    assert "broker_unreachable" in shown
    assert shown == [r["event"] for r in real if r["level"] in ("warning", "error", "critical")]
    assert len(events_in(logs("--level", "debug", str(real_logs)).stdout)) == len(real)
    bad = logs("--level", "loud", str(real_logs))
    assert bad.returncode == 2 and "--level 'loud'" in bad.stderr


def test_event_globs_or_together_and_filters_and_together(real_logs: Path) -> None:
    both = events_in(logs("--event", "replica_*", "--event", "broker_*", str(real_logs)).stdout)
    assert {"replica_ready", "broker_connected", "broker_unreachable"} <= set(both)
    assert all(e.startswith(("replica_", "broker_")) for e in both)
    anded = logs("--event", "broker_*", "--host", "gpu-01", "--level", "warning",
                 str(real_logs)).stdout
    assert set(events_in(anded)) == {"broker_unreachable"}
    assert all(" gpu-01 " in line for line in anded.splitlines())


def test_stdin_through_a_real_process(real_logs: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.log"
    mixed.write_text("not json at all\n" + real_logs.read_text() + '{"truncated": \n'
                     + "\x00\x01 binary\n" + '["a list"]\n')
    done = logs("--level", "warning", stdin=mixed)
    assert done.returncode == 0 and done.stderr == ""
    assert "broker_unreachable" in events_in(done.stdout)
    assert "not json" not in done.stdout and "truncated" not in done.stdout
    unfiltered = logs(stdin=mixed)
    assert unfiltered.returncode == 0
    out = unfiltered.stdout.splitlines()
    assert out[0] == "not json at all"  # passed through unchanged: it is output too
    assert out[-3:] == ['{"truncated": ', "\x00\x01 binary", '["a list"]']


def test_a_closed_pipe_ends_it_quietly(real_logs: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.log"
    big.write_text(real_logs.read_text() * 200)
    with big.open() as feed:
        process = subprocess.Popen(LLMOPS, stdin=feed, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        assert process.stdout is not None and process.stderr is not None
        assert LINE.fullmatch(process.stdout.readline().rstrip("\n"))
        process.stdout.close()  # as `| head -1` does
        assert process.wait(timeout=120) == 0
        assert process.stderr.read() == ""


# -- journalctl -----------------------------------------------------------------------------

FAKE_JOURNALCTL = """#!{python}
# journalctl's narrowest stand-in: systemd's journal cannot run in this container. It records
# its arguments, prints the lines it was given, and with -f waits as the real one does.
import sys, time
open({args!r}, "w").write(" ".join(sys.argv[1:]))
for line in open({lines!r}):
    sys.stdout.write(line)
    sys.stdout.flush()
if "-f" in sys.argv:
    time.sleep(600)
"""


@pytest.fixture
def journal_bin(tmp_path: Path, real_logs: Path) -> tuple[Path, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "journalctl"
    args = tmp_path / "journalctl.args"
    script.write_text(FAKE_JOURNALCTL.format(python=sys.executable, args=str(args),
                                             lines=str(real_logs)))
    script.chmod(0o755)
    return bin_dir, args


def env_with_path(bin_dir: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_units_are_read_through_journalctl(journal_bin: tuple[Path, Path],
                                           real_logs: Path) -> None:
    bin_dir, args = journal_bin
    done = logs("-u", "llmops-agent", "--unit", "llmops-controller", "--level", "warning",
                env=env_with_path(bin_dir))
    assert done.returncode == 0, done.stderr
    assert args.read_text() == "-o cat --no-pager -u llmops-agent -u llmops-controller"
    assert "broker_unreachable" in events_in(done.stdout)
    assert "agent_started" not in events_in(done.stdout)


def test_follow_streams_each_line_as_journalctl_writes_it(journal_bin: tuple[Path, Path],
                                                          real_logs: Path) -> None:
    bin_dir, args = journal_bin
    process = subprocess.Popen([*LLMOPS, "-f", "-u", "llmops-agent"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env_with_path(bin_dir))
    try:
        assert process.stdout is not None
        wanted = [r["event"] for r in records(real_logs)]
        seen: list[str] = []
        while len(seen) < len(wanted):  # journalctl still runs: each line came as written
            seen += events_in(process.stdout.readline())
        assert seen == wanted
        assert args.read_text() == "-o cat --no-pager -f -u llmops-agent"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 130
    assert process.stderr is not None and process.stderr.read() == ""
    # Its journalctl went with it.
    left = subprocess.run(["pgrep", "-f", str(bin_dir / "journalctl")], capture_output=True)
    assert left.stdout == b""


def test_a_missing_journalctl_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    done = logs("-u", "llmops-agent", env={**os.environ, "PATH": str(empty)})
    assert done.returncode == 2
    assert "journalctl is not installed" in done.stderr and "llmops logs < FILE" in done.stderr


# -- files: follow, colours, fixtures -------------------------------------------------------

def record_line(event: str, **more: object) -> str:
    return json.dumps({"event": event, "level": "info", "host": "gpu-01",
                       "timestamp": "2025-01-02T03:04:05.678901Z", **more}) + "\n"


def nothing_to_read(process: subprocess.Popen[str]) -> bool:
    """Whether the process has written nothing more after a few of its poll rounds."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], FOLLOW_POLL_S * 4)
    return not ready


def test_follow_on_a_file_prints_lines_appended_later_and_only_whole_ones(tmp_path: Path
                                                                          ) -> None:
    path = tmp_path / "agent.log"
    path.write_text(record_line("agent_started"))
    process = subprocess.Popen([*LLMOPS, "-f", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert " agent_started" in process.stdout.readline()
        half = record_line("replica_ready", replica="chat-r1-abc")
        with path.open("a") as log:
            log.write(half[:40])
            log.flush()
            assert nothing_to_read(process)  # half a line is not printed
            log.write(half[40:])
        assert " replica_ready replica=chat-r1-abc" in process.stdout.readline()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130


def test_follow_goes_on_across_rotation_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    path.write_text(record_line("agent_started", note="a long first line " * 4))
    process = subprocess.Popen([*LLMOPS, "-f", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert " agent_started" in process.stdout.readline()
        # logrotate's default: the file is renamed, a new one created; the old one's last
        # lines still count.
        with path.open("a") as log:
            log.write(record_line("before_rotation"))
        path.rename(tmp_path / "agent.log.1")
        path.write_text(record_line("after_rotation", note="long enough to shrink from " * 3))
        assert " before_rotation" in process.stdout.readline()
        assert " after_rotation" in process.stdout.readline()
        # copytruncate: the same file cut to nothing, then written again from its start.
        with path.open("w") as log:
            log.write(record_line("after_truncation"))
        assert " after_truncation" in process.stdout.readline()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130


def test_after_rest_decides_like_tail_capital_f(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_text("0123456789\n")
    opened = os.stat(path)
    assert after_rest(opened, 11, os.stat(path)) is None
    assert after_rest(opened, 11, None) is None  # rotated away, no new file yet
    path.write_text("01\n")  # truncated in place: same inode, smaller
    assert after_rest(opened, 11, os.stat(path)) == "rewind"
    other = tmp_path / "b.log"
    other.write_text("x\n")
    assert after_rest(opened, 11, os.stat(other)) == "reopen"


def test_a_dash_among_files_reads_stdin_there(tmp_path: Path) -> None:
    first, last = tmp_path / "first.log", tmp_path / "last.log"
    first.write_text(record_line("from_first"))
    last.write_text(record_line("from_last"))
    piped = tmp_path / "piped.log"
    piped.write_text(record_line("from_stdin"))
    done = logs(str(first), "-", str(last), stdin=piped)
    assert done.returncode == 0, done.stderr
    assert events_in(done.stdout) == ["from_first", "from_stdin", "from_last"]
    refused = logs("-f", str(first), "-", stdin=piped)
    assert refused.returncode == 2 and "standard input" in refused.stderr


def test_colours_only_on_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "one.log"
    path.write_text(json.dumps({"event": "replica_lost", "level": "warning", "host": "gpu-01",
                                "timestamp": "2025-01-02T03:04:05Z"}) + "\n")
    primary, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    process = subprocess.Popen([*LLMOPS, str(path)], stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    out = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    assert process.wait(timeout=30) == 0
    assert b"\x1b[33mWARNING" in out and b"replica_lost" in out


def test_render_places_time_level_host_event_then_fields_and_indents_tracebacks() -> None:
    record = {"event": "reconcile_failed", "level": "error", "deployment": "chat",
              "timestamp": "2025-01-02T04:04:05.678901+01:00", "note": "two words",
              "gpus": [0, 1], "gone": None,
              "exception": "Traceback (most recent call last):\n  File \"x\"\nValueError: no"}
    assert render(record).splitlines() == [
        '03:04:05.678 ERROR    - reconcile_failed deployment=chat note="two words" '
        "gpus=[0,1] gone=null",
        "    Traceback (most recent call last):",
        '      File "x"',
        "    ValueError: no"]
    assert clock("not a time") == "--:--:--.---"
    assert clock(0) == "00:00:00.000"


def test_filters_or_within_and_across() -> None:
    ready = {"event": "replica_ready", "level": "info", "host": "gpu-01",
             "replica": "chat-r3-a1b2c3"}
    lost = {"event": "replica_lost", "level": "warning", "host": "gpu-02", "deployment": "chat"}
    gateway = {"event": "upstream_stream_failed", "level": "warning", "model": "chat"}
    other = {"event": "replica_ready", "level": "info", "replica": "chatter-r1-ffffff"}
    f = Filters(deployments=("chat",))
    assert [matches(r, f) for r in (ready, lost, gateway, other)] == [True, True, True, False]
    f = Filters(hosts=("gpu-01", "gpu-02"), min_level=30)
    assert [matches(r, f) for r in (ready, lost, gateway)] == [False, True, False]
    f = Filters(events=("*_lost", "upstream_*"))
    assert [matches(r, f) for r in (ready, lost, gateway)] == [False, True, True]
    assert show("plain output\n", Filters(), False) == "plain output"
    assert show("plain output\n", Filters(min_level=0), False) is None
    assert show("   \n", Filters(), False) == "   "
