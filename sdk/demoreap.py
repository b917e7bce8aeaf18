"""Every process the demo started, remembered while it runs, so that nothing outlives it.

Each process the demo starts carries ``LLMOPS_DEMO_RUN=<run id>`` in its environment, and the
replicas the agents start inherit it. Replicas run in sessions of their own and outlive a
killed agent by design, and once their agent is gone they are no longer our descendants: so
the tree is sampled while the demo runs (:meth:`Reaper.remember`), and a kill takes the
remembered processes, the tree as it is at that moment, the process groups the agents' state
files name, and any process marked with this run's id. Nothing is matched by command line: a
``tail -f`` of a demo log is not the demo's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
from collections.abc import Iterable

import psutil

MARK = "LLMOPS_DEMO_RUN"


def new_run_id() -> str:
    return secrets.token_hex(8)


class Reaper:
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.me = psutil.Process()
        self.spared = {self.me.pid, *(p.pid for p in self.me.parents())}
        self.known: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()  # remember() runs in a worker thread

    @property
    def env(self) -> dict[str, str]:
        """What to add to the environment of every process the demo starts."""
        return {MARK: self.run_id}

    def remember(self) -> None:
        """Add the current descendants (pid and start time, so a reused pid is not killed)."""
        with contextlib.suppress(psutil.Error):
            children = self.me.children(recursive=True)
            with self._lock:
                for p in children:
                    self.known.setdefault(p.pid, p)

    def _marked(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            if p.pid in self.spared:
                continue
            with contextlib.suppress(psutil.Error):  # gone, or another user's
                if p.environ().get(MARK) == self.run_id:
                    found.append(p)
        return found

    def _targets(self) -> dict[int, psutil.Process]:
        self.remember()
        with self._lock:
            known = dict(self.known)
        return {**known, **{p.pid: p for p in self._marked()}}

    def alive(self) -> list[psutil.Process]:
        """What the demo started that still runs (zombies count as gone)."""
        out = []
        for p in self._targets().values():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
        return out

    def kill_all(self, first: Iterable[int] = (), groups: Iterable[int] = (),
                 wait_s: float = 2.0) -> int:
        """SIGKILL everything: ``first`` (the daemons that start others), then the rest, the
        process ``groups``, and marked processes. Returns how many processes were signalled."""
        targets = self._targets()
        head = [targets[pid] for pid in first if pid in targets]
        killed = 0
        for p in [*head, *(p for p in targets.values() if p not in head)]:
            with contextlib.suppress(psutil.Error):
                p.kill()
                killed += 1
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for p in self._marked():  # started by an agent between the two looks
            with contextlib.suppress(psutil.Error):
                p.kill()
                killed += 1
        if wait_s > 0:
            psutil.wait_procs(list(targets.values()), timeout=wait_s)  # reaps our children too
        return killed
