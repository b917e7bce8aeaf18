"""The controller's SQLite file, as each part opens it: one WAL database, a connection per part.

Alerts (``store``), the model registry and the deployments keep their own tables in the same
file, each with its own connection and its own schema version. WAL lets the readers run
beside one writer; ``synchronous=NORMAL`` is durable across a process crash (what WAL
promises) and loses at most the last commits to a power cut, for a fraction of the fsyncs.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating its folder) in autocommit mode; transactions are explicit (``with db``).

    Raises :class:`sqlite3.Error` or :class:`OSError`; callers name the file in their error.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")  # another part's write transaction: wait, not fail
    return db
