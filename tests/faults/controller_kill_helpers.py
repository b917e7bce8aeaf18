"""What the controller-kill test reads from outside the controller: its SQLite file, its
checkpoint files, the agents' logs and state files, and the replica processes in /proc."""

from __future__ import annotations

import os
import pickle
import sqlite3
from pathlib import Path
from typing import Any

from llm_ops_helper.controller.analytics.bank import DetectorBank
from llm_ops_helper.localfleet import LocalFleet

SIM_MODULE = "llm_ops_helper.agent.runtimes.simserver"
# The rows a restart must find again: the registry and the deployments' desired state.
DURABLE = {
    "registry_versions": "SELECT model, version, stage, sha256 FROM registry_versions",
    "registry_aliases": "SELECT model, alias, version FROM registry_aliases",
    "deployments": "SELECT name FROM deployments",
    "deployment_revisions": "SELECT deployment, revision, version FROM deployment_revisions",
}


def durable_rows(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The registry's and the deployments' durable rows, as one reader sees them now."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        return {table: sorted(conn.execute(sql).fetchall()) for table, sql in DURABLE.items()}
    finally:
        conn.close()


def integrity(db: Path) -> tuple[str, str]:
    """(``PRAGMA integrity_check``, the journal mode) of the file as a fresh opener finds it."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        return str(check), str(mode)
    finally:
        conn.close()


def detector_counts(path: Path) -> dict[str, int]:
    """Series key -> samples its detector has learned, from a ``detectors.npz`` checkpoint."""
    if not path.exists():
        return {}
    bank = DetectorBank.load(path)
    keys = list(filter(None, bank.keys()))  # "" marks a freed slot
    counts = bank.learned([bank.slot(k) for k in keys])
    return {k: int(c) for k, c in zip(keys, counts, strict=True)}


def most_learned_per_host(counts: dict[str, int], keys: set[str] | None = None
                          ) -> dict[str, int]:
    """Host -> the most samples any of its series (``keys`` only, if given) has learned. A
    series key starts with its host: ``host|gpu|0|util``."""
    out: dict[str, int] = {}
    for key, n in counts.items():
        if keys is None or key in keys:
            host = key.split("|", 1)[0]
            out[host] = max(out.get(host, 0), n)
    return out


def forecaster_history(path: Path, deployment: str) -> list[float]:
    """The load values the deployment's forecaster has learned (its point model's window),
    from an ``autoscale.pickle`` checkpoint; [] when it tracks none."""
    try:
        with path.open("rb") as f:
            saved = pickle.load(f)  # the controller's own checkpoint
    except (OSError, EOFError, pickle.UnpicklingError):
        return []
    if deployment not in saved:
        return []
    forecaster = saved[deployment][0]
    return list(forecaster.model._values)


def line_count(path: Path) -> int:
    return len(path.read_text(errors="replace").splitlines()) if path.exists() else 0


def replica_processes(mark: str) -> dict[int, int]:
    """Pid -> process group of every simulator server (a replica) carrying ``mark``."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes().split(b"\0")
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            if f"LLMOPS_FAULT_MARK={mark}".encode() in environ and SIM_MODULE.encode() in argv:
                found[int(entry.name)] = os.getpgid(int(entry.name))
        except OSError:
            continue
    return found


def replica_groups(fleet: LocalFleet) -> dict[int, str]:
    """Process group -> replica name, from every agent's state file."""
    return {pgid: name for agent in fleet.agents
            for name, pgid in agent.replica_groups().items()}
