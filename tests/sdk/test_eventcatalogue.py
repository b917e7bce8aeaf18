"""The event catalogue: read from the package source, every event described, the doc current."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from llm_ops_helper.eventcatalogue import Catalogue, Event, scan
from llm_ops_helper.eventdoc import DESCRIPTIONS, REGENERATE, description, markdown

REPO = Path(__file__).resolve().parents[2]


def events(c: Catalogue) -> dict[tuple[str, str], Event]:
    return {(e.daemon, e.name): e for e in c.events}


def test_every_event_the_daemons_emit_is_described_and_no_description_is_stale() -> None:
    c = scan()
    missing = sorted(f"{e.daemon}:{e.name}" for e in c.events if not description(e.daemon, e.name))
    assert not missing, (f"events without a description: {missing}; add them to DESCRIPTIONS in "
                         f"sdk/eventdoc.py, then run: {REGENERATE}")
    emitted = {key for e in c.events for key in (e.name, f"{e.daemon}:{e.name}")}
    stale = sorted(set(DESCRIPTIONS) - emitted)
    assert not stale, f"described but no longer emitted: {stale}; remove them from sdk/eventdoc.py"


def test_every_log_call_in_the_package_is_resolved() -> None:
    unresolved = scan().unresolved
    assert not unresolved, ("log calls whose event or level the catalogue cannot read from the "
                            f"source: {unresolved}")


def test_docs_events_md_is_what_the_generator_writes_now() -> None:
    doc = REPO / "docs" / "events.md"
    assert doc.exists(), f"docs/events.md is missing; run: {REGENERATE}"
    assert doc.read_text() == markdown(scan()), f"docs/events.md is stale; run: {REGENERATE}"


def test_the_real_package_yields_helper_and_shared_events_with_their_daemons() -> None:
    found = events(scan())
    # Ledger.event(deployment, kind, message, now, level="info", **data): the name, level and
    # fields come from each caller.
    placed = found["controller", "replica_placed"]
    assert {"deployment", "message", "replica", "host", "gpus"} <= placed.fields
    assert placed.modules == {"controller.deployments.dispatch"}
    assert placed.via == {"controller.deployments.ledger"}
    assert found["controller", "rollout_failed"].levels == {"warning"}
    # run_until_signalled(run, name, ...) logs f"{name}_stopping" for each daemon that calls it.
    for daemon in ("agent", "controller", "gateway"):
        assert found[daemon, f"{daemon}_stopping"].fields == {"signal"}
        assert found[daemon, "shutdown_timeout"].levels == {"error"}
    # A local variable holding either name; a log.exception carries the traceback.
    assert {("controller", "alert_fired"), ("controller", "alert_resolved")} <= set(found)
    assert "exception" in found["controller", "reconcile_failed"].fields
    # The gateway lives under controller/ but is its own daemon.
    assert ("gateway", "gateway_listening") in found
    assert ("controller", "gateway_listening") not in found
    counts = {d: len(evs) for d, evs in scan().by_daemon().items()}
    assert set(counts) >= {"agent", "controller", "gateway"}, counts


def write(root: Path, rel: str, source: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def test_scan_follows_conditionals_variables_helpers_binds_and_reports_what_it_cannot(
        tmp_path: Path) -> None:
    write(tmp_path, "lifecycle.py", """
        import structlog

        def run(name, limit):
            log = structlog.get_logger(name)
            def on_signal(n):
                log.info(f"{name}_stopping", signal=n)
            log.error("shutdown_timeout", limit_s=limit)
    """)
    write(tmp_path, "agent/__main__.py", """
        from lifecycle import run
        run("agent", 5)
    """)
    write(tmp_path, "agent/work.py", """
        import structlog
        log = structlog.get_logger("llmops.agent")
        bound = log.bind(replica="r1")

        def go(ok, name):
            bound.warning("job_done" if ok else "job_failed", took_s=1, exc_info=True)
            event = "a_event" if ok else "b_event"
            data = {"x": 1, "y": 2}
            log.info(event, **data)
            log.exception("job_crashed")
            log.info(name)  # a parameter nobody calls with a constant
            log.info(compute())  # not static at all

        def compute():
            return "z"
    """)
    write(tmp_path, "controller/ledger.py", """
        import structlog
        log = structlog.get_logger("llmops.controller")

        class Ledger:
            def event(self, deployment, kind, message, level="info", **data):
                getattr(log, level)(kind, deployment=deployment, message=message, **data)

            def remove(self, d):
                self.event(d, "deployment_deleted", "gone")
    """)
    write(tmp_path, "controller/dispatch.py", """
        from views import event

        def place(self, d, phase):
            self.ledger.event(d, "replica_draining" if phase else "replica_stopping", "m",
                              replica="r", level="warning")
            # Other functions called event, called as Ledger.event could be: not its calls.
            views.event(d, "not_an_event", "m")
            event(d, "nor_this", "m")
    """)
    write(tmp_path, "controller/__main__.py", """
        import lifecycle
        lifecycle.run("controller", 5)
    """)
    write(tmp_path, "controller/other.py", """
        def run(what, limit):  # its own run, not lifecycle's
            return what

        run("unrelated", 1)
    """)
    write(tmp_path, "controller/gateway/app.py", """
        import structlog
        structlog.get_logger("llmops.gateway").info("gateway_listening", port=1)
    """)
    c = scan(tmp_path)
    found = events(c)
    assert set(found) == {
        ("agent", "agent_stopping"), ("agent", "shutdown_timeout"),
        ("agent", "job_done"), ("agent", "job_failed"), ("agent", "a_event"),
        ("agent", "b_event"), ("agent", "job_crashed"),
        ("controller", "controller_stopping"), ("controller", "shutdown_timeout"),
        ("controller", "deployment_deleted"), ("controller", "replica_draining"),
        ("controller", "replica_stopping"), ("gateway", "gateway_listening")}
    assert found["agent", "agent_stopping"].modules == {"agent.__main__"}
    assert found["agent", "agent_stopping"].via == {"lifecycle"}
    assert found["controller", "controller_stopping"].modules == {"controller.__main__"}
    assert found["agent", "job_done"].fields == {"replica", "took_s", "exception"}
    assert found["agent", "job_done"].levels == {"warning"}
    assert found["agent", "a_event"].fields == {"x", "y"}
    assert found["agent", "job_crashed"].levels == {"error"}
    assert found["agent", "job_crashed"].fields == {"exception"}
    assert found["controller", "replica_draining"].levels == {"warning"}
    assert found["controller", "replica_draining"].fields == {"deployment", "message", "replica"}
    assert found["controller", "deployment_deleted"].levels == {"info"}
    assert [(u.module, u.why) for u in c.unresolved] == [
        ("agent.work", "go is never called with a static event"),
        ("agent.work", "event name is not static")]


def test_llmops_logs_catalogue_prints_the_catalogue_filtered_by_event_glob() -> None:
    done = subprocess.run([sys.executable, "-m", "llm_ops_helper.cli", "logs", "--catalogue",
                           "--event", "replica_*"], capture_output=True, text=True, check=True)
    assert "agent (llmops-agent.service)" in done.stdout
    assert "replica_ready" in done.stdout and "fields: replica, seconds, url" in done.stdout
    assert "agent_started" not in done.stdout
    everything = subprocess.run([sys.executable, "-m", "llm_ops_helper.cli", "logs",
                                 "--catalogue"], capture_output=True, text=True, check=True)
    assert all(e.name in everything.stdout for e in scan().events)
