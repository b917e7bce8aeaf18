"""Command-signing keys on disk: the controller's per-host store, and key files read on change.

The controller's store, one directory per agent host::

    {keys_dir}/{host}/{key_id}.key   one secret each: 64 hex characters (32 random bytes), 0600
    {keys_dir}/{host}/current        the id the controller signs that host's commands with

A host has one key, or two during a rotation (the old one and the new one). An agent's own
``commands.keys_dir`` holds the same ``{key_id}.key`` files, so the host's directory here is
exactly what that agent accepts. Both sides read the files again when they change: a rotation
needs no restart of either daemon.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from llm_ops_helper.proto.topics import TopicError, validate_host

CURRENT: Final = "current"
SUFFIX: Final = ".key"
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NUMBERED = re.compile(r"k(\d+)")


class KeyStoreError(Exception):
    """A key operation that cannot be done; the message says why and what to do instead."""


def validate_key_id(key_id: str) -> str:
    if not _KEY_ID.fullmatch(key_id):
        raise KeyStoreError(f"key id {key_id!r}: expected 1-64 of letters, digits, '.', '_', "
                            "'-', starting with a letter or digit")
    return key_id


def read_key(path: Path) -> bytes:
    """A key file's secret (surrounding whitespace dropped); :class:`KeyStoreError` if none."""
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise KeyStoreError(f"cannot read key file {str(path)!r}: {exc.strerror}") from None
    if not secret:
        raise KeyStoreError(f"key file {str(path)!r} is empty")
    return secret


def write_new_key(path: Path) -> None:
    """A fresh secret in a new file, 0600 from its creation; never overwrites one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyStoreError(f"key file {str(path)!r} already exists") from None
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")


class KeyStore:
    """The controller's keys, per host (the layout in this module's docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def host_dir(self, host: str) -> Path:
        try:
            validate_host(host)
        except TopicError as exc:
            raise KeyStoreError(str(exc)) from None
        return self.root / host

    def path(self, host: str, key_id: str) -> Path:
        return self.host_dir(host) / f"{validate_key_id(key_id)}{SUFFIX}"

    def hosts(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.key_ids(p.name))

    def key_ids(self, host: str) -> list[str]:
        directory = self.host_dir(host)
        if not directory.is_dir():
            return []
        return sorted(p.name.removesuffix(SUFFIX) for p in directory.glob(f"*{SUFFIX}"))

    def current(self, host: str) -> str | None:
        try:
            text = (self.host_dir(host) / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyStoreError(f"cannot read {str(self.host_dir(host) / CURRENT)!r}: "
                                f"{exc.strerror}") from None
        return text or None

    def signing_key(self, host: str) -> tuple[str, bytes] | None:
        """(key id, secret) the controller signs ``host``'s commands with; None: no store."""
        key_id = self.current(host)
        if key_id is None:
            return None
        return key_id, read_key(self.path(host, key_id))

    def create(self, host: str, key_id: str | None = None) -> str:
        """The first key of a host, current at once."""
        if self.key_ids(host):
            raise KeyStoreError(f"host {host} already has keys ({', '.join(self.key_ids(host))})"
                                f"; use 'llmops keys rotate {host}' for a new one")
        key_id = validate_key_id(key_id or "k1")
        write_new_key(self.path(host, key_id))
        self._set_current(host, key_id)
        return key_id

    def rotate(self, host: str, key_id: str | None = None) -> str:
        """A new key beside the current one, which stays current until :meth:`activate`."""
        existing = self.key_ids(host)
        if not existing:
            raise KeyStoreError(f"host {host} has no keys; use 'llmops keys create {host}'")
        if len(existing) >= 2:
            raise KeyStoreError(f"host {host} is already rotating ({', '.join(existing)}); "
                                "retire the old key first")
        key_id = validate_key_id(key_id or _next_id(existing))
        write_new_key(self.path(host, key_id))
        return key_id

    def activate(self, host: str, key_id: str) -> None:
        """Sign ``host``'s commands with ``key_id`` from now on."""
        if not self.path(host, key_id).is_file():
            raise KeyStoreError(f"host {host} has no key {key_id!r} "
                                f"(it has: {', '.join(self.key_ids(host)) or 'none'})")
        self._set_current(host, key_id)

    def retire(self, host: str, key_id: str) -> None:
        """Remove a key that is no longer current."""
        path = self.path(host, key_id)
        if not path.is_file():
            raise KeyStoreError(f"host {host} has no key {key_id!r} "
                                f"(it has: {', '.join(self.key_ids(host)) or 'none'})")
        if self.current(host) == key_id:
            raise KeyStoreError(f"key {key_id!r} is the one {host}'s commands are signed with; "
                                f"activate another first ('llmops keys activate {host} ID')")
        path.unlink()

    def _set_current(self, host: str, key_id: str) -> None:
        # Written beside and renamed over: a reader sees the old id or the new, never half.
        target = self.host_dir(host) / CURRENT
        staging = target.with_name(f".{CURRENT}.tmp")
        staging.write_text(key_id + "\n")
        staging.replace(target)


def _next_id(existing: list[str]) -> str:
    numbers = [int(m.group(1)) for k in existing if (m := _NUMBERED.fullmatch(k))]
    return f"k{max(numbers, default=0) + 1}"


Stamp = tuple[int, int, int]


class KeyFiles:
    """Key ids to secrets, from named files and every ``{id}.key`` in a directory.

    :meth:`changed` looks at the files' metadata only; :meth:`load` reads them. A key named in
    ``files`` wins over a file of the same id in ``directory``.
    """

    def __init__(self, files: Mapping[str, Path], directory: Path | None = None) -> None:
        self.files = dict(files)
        self.directory = directory
        self._seen: dict[str, Stamp] | None = None

    def paths(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        if self.directory is not None:
            try:
                entries = sorted(self.directory.glob(f"*{SUFFIX}"))
            except OSError:
                entries = []
            for path in entries:
                key_id = path.name.removesuffix(SUFFIX)
                if _KEY_ID.fullmatch(key_id):
                    found[key_id] = path
        found.update(self.files)
        return found

    def stamps(self) -> dict[str, Stamp]:
        out: dict[str, Stamp] = {}
        for key_id, path in self.paths().items():
            try:
                st = path.stat()
            except OSError:
                continue
            out[key_id] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return out

    def changed(self) -> bool:
        return self.stamps() != self._seen

    def load(self, strict: bool = False) -> tuple[dict[str, bytes], dict[str, str]]:
        """(keys, problems by id). ``strict``: the first problem raises :class:`KeyStoreError`."""
        stamps = self.stamps()
        keys: dict[str, bytes] = {}
        problems: dict[str, str] = {}
        for key_id, path in self.paths().items():
            try:
                keys[key_id] = read_key(path)
            except KeyStoreError as exc:
                if strict:
                    raise
                problems[key_id] = str(exc)
        self._seen = stamps
        return keys, problems
