"""``{state_dir}/replicas.json``: what this agent runs, so its next run adopts it.

Written atomically (temp file, fsync, rename, fsync of the directory) on every change, so a
power cut or a SIGKILL leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgspec

from llm_ops_helper.proto.messages import ReplicaSpec, ReplicaState

STATE_FILE = "replicas.json"
VERSION = 1


class StateFileError(Exception):
    """The state file exists but cannot be read as one."""


class ReplicaRecord(msgspec.Struct, kw_only=True, frozen=True):
    spec: ReplicaSpec
    spec_hash: str
    state: ReplicaState
    reason: str | None = None
    port: int | None = None
    pid: int | None = None
    pgid: int | None = None
    # psutil's create_time: a pid alone may have been reused by the time the agent returns.
    create_time: float | None = None
    restarts: int = 0
    started_at: float | None = None
    ever_ready: bool = False


class _File(msgspec.Struct, kw_only=True):
    v: int = VERSION
    replicas: list[ReplicaRecord] = []


def spec_hash(spec: ReplicaSpec) -> str:
    """First 16 hex of the sha256 of the spec's canonical JSON (sorted keys)."""
    canonical = msgspec.json.encode(msgspec.to_builtins(spec), order="sorted")
    return hashlib.sha256(canonical).hexdigest()[:16]


def load(state_dir: Path) -> list[ReplicaRecord]:
    path = state_dir / STATE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return msgspec.json.decode(data, type=_File).replicas
    except msgspec.DecodeError as exc:
        raise StateFileError(f"{path}: not a replica state file: {exc}") from None


def save(state_dir: Path, records: list[ReplicaRecord]) -> None:
    path = state_dir / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.tmp")
    data = msgspec.json.encode(_File(replicas=records))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
