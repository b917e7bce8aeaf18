"""The model repository: models, immutable versions, aliases, stages and their lineage.

Tables of its own (``registry_*``) in the controller's SQLite file, through a connection of
its own, WAL. Every change (a registration, a stage move, an alias move) is one transaction
together with its lineage event, so a reader sees all of it or none of it. Artifacts live in
a content-addressed :class:`BlobStore`; a retired version's blob is deleted once no other
live version and no deployment uses the same digest.

Versions are immutable once registered: runtime, format, artifact, source, parameters,
quantization, tags and description never change (a trigger refuses it); only the stage, the
aliases pointing at a version and ``replaces`` move. Register a new version to change anything.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import structlog

from llm_ops_helper.controller import database
from llm_ops_helper.controller.registry import formats, lifecycle
from llm_ops_helper.controller.registry.blobs import BlobStore, Staged
from llm_ops_helper.controller.registry.errors import (
    Conflict,
    Invalid,
    NotFound,
    RegistryError,
    StorageError,
)
from llm_ops_helper.controller.registry.records import (
    PRODUCTION,
    Artifact,
    LineageEvent,
    ModelSummary,
    NewVersion,
    Version,
    check_alias,
    check_name,
    check_sha256,
    is_number,
    split_ref,
)
from llm_ops_helper.controller.registry.schema import SCHEMA, SCHEMA_VERSION

log = structlog.get_logger("llmops.controller.registry")

_COLUMNS = ("model, version, stage, runtime, format, sha256, size_bytes, filename, source_uri,"
            " parameters, quantization, tags, description, created_by, created_at, replaces,"
            " stage_changed_at")
_tags = msgspec.json.Decoder(dict[str, str])
_DIFFED = ("stage", "runtime", "format", "source_uri", "parameters", "quantization",
           "description", "created_by", "aliases", "replaces")


class Registry:
    def __init__(self, db_path: Path, blob_dir: Path, *,
                 in_use: Callable[[], set[str]] = set,
                 max_artifact_bytes: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = db_path
        self.blobs = BlobStore(blob_dir)
        self.in_use = in_use
        self.max_artifact_bytes = max_artifact_bytes
        self.clock = clock
        # Digests of uploads between staging and their row: never collected.
        self._pending: Counter[str] = Counter()
        # Deletions of collected blobs running in worker threads.
        self._deleting: set[asyncio.Task[None]] = set()
        try:
            self.db = database.connect(db_path)
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
            row = self.db.execute("SELECT version FROM registry_schema").fetchone()
            if row is None:
                self.db.execute("INSERT INTO registry_schema (version) VALUES (?)",
                                (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise StorageError(f"{db_path}: model registry schema v{row[0]}; this build "
                                   f"reads v{SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StorageError(f"{db_path}: cannot open the model registry: {exc}") from None

    def close(self) -> None:
        self.db.close()

    # registration

    def check_new(self, name: str, meta: NewVersion) -> None:
        """Refuse a bad upload before its body is read."""
        check_name("model", name)
        if meta.runtime is not None and meta.runtime not in formats.RUNTIMES:
            raise Invalid(f"unknown runtime {meta.runtime!r}: expected one of "
                          f"{', '.join(formats.RUNTIMES)}")
        if meta.format is not None:
            if meta.format not in formats.FORMATS:
                raise Invalid(f"unknown format {meta.format!r}: expected one of "
                              f"{', '.join(formats.FORMATS)}")
            _runtime(meta, meta.format)
        if meta.filename is not None and ("/" in meta.filename or meta.filename in ("", ".",
                                                                                  "..")):
            raise Invalid(f"filename {meta.filename!r}: expected a plain file name")

    async def register(self, name: str, meta: NewVersion,
                       chunks: AsyncIterable[bytes] | None, *,
                       expected_sha256: str | None = None, by: str = "anonymous") -> Version:
        """Store the artifact streamed in ``chunks`` (if any) and register the next version."""
        self.check_new(name, meta)
        if expected_sha256 is not None:
            check_sha256(expected_sha256)
        body = await _non_empty(chunks) if chunks is not None else None
        if body is None:
            if expected_sha256 is not None:
                raise Invalid("sha256 given but the body is empty: upload the artifact")
            if meta.source_uri is None:
                raise Invalid("empty body and no source_uri: upload the artifact, or pass "
                              "source_uri= naming where the runtime finds the model")
            fmt = meta.format or formats.from_name(meta.filename or meta.source_uri)
            return self._insert(name, meta, fmt, None, by)
        try:
            staged = await self.blobs.stage(body, expected_sha256=expected_sha256,
                                            max_bytes=self.max_artifact_bytes,
                                            head_bytes=formats.CARD_MAX_BYTES)
        except (Exception, asyncio.CancelledError) as exc:
            reason = exc.message if isinstance(exc, RegistryError) else repr(exc)
            log.warning("model_upload_failed", model=name, by=by, reason=reason)
            raise
        self._pending[staged.sha256] += 1
        registered = False
        try:
            fmt = meta.format or formats.sniff(staged.head, staged.size, meta.filename)
            _runtime(meta, fmt)
            await self.blobs.commit(staged)
            version = self._insert(name, meta, fmt, staged, by)
            registered = True
            return version
        finally:
            self.blobs.discard(staged)
            self._pending[staged.sha256] -= 1
            if self._pending[staged.sha256] <= 0:
                del self._pending[staged.sha256]
            if not registered:  # a blob committed for a row that never came
                self._collect(staged.sha256)

    def _insert(self, name: str, meta: NewVersion, fmt: str, staged: Staged | None,
                by: str) -> Version:
        runtime = _runtime(meta, fmt)
        now = self.clock()
        filename = meta.filename or formats.default_filename(fmt)
        with self._tx():
            self.db.execute("INSERT INTO registry_models (name, created_at, updated_at)"
                            " VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
                            " updated_at = excluded.updated_at", (name, now, now))
            (number,) = self.db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM"
                                        " registry_versions WHERE model = ?", (name,)).fetchone()
            self.db.execute(
                f"INSERT INTO registry_versions ({_COLUMNS}) VALUES"
                " (?, ?, 'registered', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                (name, number, runtime, fmt, staged and staged.sha256, staged and staged.size,
                 filename if staged else None, meta.source_uri, meta.parameters,
                 meta.quantization, msgspec.json.encode(meta.tags).decode(), meta.description,
                 by, now, now))
            size = f"{staged.size} bytes" if staged else f"source {meta.source_uri}"
            self._event(name, now, by, "registered", number,
                        f"{name}@{number} registered ({runtime}, {fmt}, {size})")
        log.info("model_version_registered", model=name, version=number, runtime=runtime,
                 format=fmt, sha256=staged and staged.sha256, size_bytes=staged and staged.size,
                 by=by)
        return self._version(name, number)

    # reading

    def models(self) -> list[ModelSummary]:
        rows = self.db.execute(
            "SELECT m.name, MAX(v.version), COUNT(v.version), m.created_at, m.updated_at"
            " FROM registry_models m LEFT JOIN registry_versions v ON v.model = m.name"
            " GROUP BY m.name ORDER BY m.name").fetchall()
        return [ModelSummary(name=n, latest=latest, versions=count, aliases=self.aliases(n),
                             created_at=created, updated_at=updated)
                for n, latest, count, created, updated in rows]

    def aliases(self, name: str) -> dict[str, int]:
        rows = self.db.execute("SELECT alias, version FROM registry_aliases WHERE model = ?"
                               " ORDER BY alias", (name,))
        return dict(rows.fetchall())

    def versions(self, name: str) -> list[Version]:
        self._model(name)
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM registry_versions WHERE model = ?"
                               " ORDER BY version", (name,)).fetchall()
        return self._rows(name, rows)

    def version(self, name: str, selector: str) -> Version:
        """Version ``N`` or the one alias ``selector`` points at, whatever its stage."""
        self._model(name)
        if is_number(selector):
            return self._version(name, int(selector))
        aliases = self.aliases(name)
        if check_alias(selector) not in aliases:
            known = ", ".join(aliases) or "none"
            raise NotFound(f"{name} has no alias {selector!r} (aliases: {known})")
        return self._version(name, aliases[selector])

    def resolve(self, ref: str) -> Version:
        """A deployable version: ``name@N``, ``name@alias`` or ``name`` (production, else
        the latest version not retired)."""
        name, selector = split_ref(ref)
        if selector is not None:
            found = self.version(name, selector)
        elif PRODUCTION in (aliases := self.aliases(name)):
            found = self._version(name, aliases[PRODUCTION])
        else:
            self._model(name)
            row = self.db.execute("SELECT MAX(version) FROM registry_versions WHERE model = ?"
                                  " AND stage != 'retired'", (name,)).fetchone()
            if row[0] is None:
                raise NotFound(f"{name} has no version that is not retired")
            found = self._version(name, row[0])
        if found.stage == "retired":
            raise Conflict(f"{found.ref} is retired (its artifact may be gone): deploy "
                           "another version")
        return found

    def has_artifact(self, sha256: str) -> bool:
        return self.blobs.exists(sha256)

    def artifact_path(self, sha256: str) -> Path:
        check_sha256(sha256)
        path = self.blobs.path(sha256)
        if not path.is_file():
            raise NotFound(f"no artifact {sha256}")
        return path

    def lineage(self, name: str) -> list[LineageEvent]:
        self._model(name)
        rows = self.db.execute("SELECT ts, by, action, version, detail FROM registry_events"
                               " WHERE model = ? ORDER BY id", (name,))
        return [LineageEvent(ts=ts, by=by, action=action, version=v, detail=detail)
                for ts, by, action, v, detail in rows]

    def diff(self, name: str, a: str, b: str) -> dict[str, Any]:
        old, new = self.version(name, a), self.version(name, b)
        changes: dict[str, list[Any]] = {
            field: [getattr(old, field), getattr(new, field)] for field in _DIFFED
            if getattr(old, field) != getattr(new, field)}
        for key in sorted(old.tags.keys() | new.tags.keys()):
            if old.tags.get(key) != new.tags.get(key):
                changes[f"tags.{key}"] = [old.tags.get(key), new.tags.get(key)]
        if _filename(old) != _filename(new):
            changes["filename"] = [_filename(old), _filename(new)]
        sizes = [v.artifact.size_bytes if v.artifact else 0 for v in (old, new)]
        same = (old.artifact and old.artifact.sha256) == (new.artifact and new.artifact.sha256)
        return {"from": old, "to": new, "changes": changes,
                "artifact": {"same": same, "size_delta_bytes": sizes[1] - sizes[0]}}

    # changes

    def set_stage(self, name: str, number: int, stage: str, *, archive_previous: bool = True,
                  by: str = "anonymous") -> Version:
        """Move a version to ``stage``; the same stage again is a no-op (retries are safe)."""
        current = self._version(name, number)
        if current.stage == stage:
            return current
        refusal = lifecycle.refusal(current.stage, stage)
        if refusal is not None:
            raise (Invalid if stage not in lifecycle.STAGES else Conflict)(
                f"{current.ref}: {refusal}")
        if stage == "retired" and current.ref in self.in_use():
            raise Conflict(f"{current.ref} is used by a deployment: move the deployment to "
                           "another version before retiring it")
        now = self.clock()
        with self._tx():
            if stage == PRODUCTION:
                previous = self.aliases(name).get(PRODUCTION)
                if previous is not None and previous != number:
                    if archive_previous and self._version(name, previous).stage == PRODUCTION:
                        self._move(name, previous, PRODUCTION, "archived", now, by)
                    self.db.execute("UPDATE registry_versions SET replaces = ? WHERE"
                                    " model = ? AND version = ?", (previous, name, number))
                    self._event(name, now, by, "replaced", number,
                                f"{name}@{number} replaced {name}@{previous}")
                self._set_alias(name, PRODUCTION, number, now, by)
            self._move(name, number, current.stage, stage, now, by)
            for alias in current.aliases:
                if stage == "retired" or (alias == PRODUCTION and stage != PRODUCTION):
                    self._drop_alias(name, alias, number, now, by)
        if stage == "retired" and current.artifact is not None:
            self._collect(current.artifact.sha256)
        return self._version(name, number)

    def set_alias(self, name: str, alias: str, number: int, *,
                  by: str = "anonymous") -> int | None:
        """Point ``alias`` at version ``number`` (one transaction); returns where it was."""
        self._check_movable(name, check_alias(alias))
        target = self._version(name, number)
        if target.stage == "retired":
            raise Conflict(f"{target.ref} is retired: an alias cannot point at it")
        with self._tx():
            return self._set_alias(name, alias, number, self.clock(), by)

    def delete_alias(self, name: str, alias: str, *, by: str = "anonymous") -> int:
        self._check_movable(name, check_alias(alias))
        aliases = self.aliases(name)
        if alias not in aliases:
            raise NotFound(f"{name} has no alias {alias!r} (aliases: "
                           f"{', '.join(aliases) or 'none'})")
        with self._tx():
            self._drop_alias(name, alias, aliases[alias], self.clock(), by)
        return aliases[alias]

    def gc(self) -> list[str]:
        """Delete every blob no live version, deployment or upload in progress refers to."""
        rows = self.db.execute("SELECT DISTINCT sha256 FROM registry_versions WHERE sha256 IS"
                               " NOT NULL AND stage != 'retired'")
        keep = {sha for (sha,) in rows} | self._in_use_digests() | set(self._pending)
        return self.blobs.gc(keep)

    # internals

    def _check_movable(self, name: str, alias: str) -> None:
        self._model(name)
        if alias == PRODUCTION:
            raise Conflict(f"alias {PRODUCTION!r} follows the production stage: POST "
                           f"/api/v1/models/{name}/versions/N/stage "
                           '{"stage": "production"} moves it')

    def _set_alias(self, name: str, alias: str, number: int, now: float,
                   by: str) -> int | None:
        previous = self.aliases(name).get(alias)
        if previous == number:
            return previous
        self.db.execute("INSERT INTO registry_aliases (model, alias, version) VALUES (?, ?, ?)"
                        " ON CONFLICT(model, alias) DO UPDATE SET version = excluded.version",
                        (name, alias, number))
        was = f"{name}@{previous}" if previous is not None else "nothing"
        self._event(name, now, by, "alias_moved", number,
                    f"{alias}: {was} -> {name}@{number}")
        return previous

    def _drop_alias(self, name: str, alias: str, number: int, now: float, by: str) -> None:
        self.db.execute("DELETE FROM registry_aliases WHERE model = ? AND alias = ?",
                        (name, alias))
        self._event(name, now, by, "alias_deleted", number,
                    f"{alias}: {name}@{number} -> nothing")

    def _move(self, name: str, number: int, frm: str, to: str, now: float, by: str) -> None:
        self.db.execute("UPDATE registry_versions SET stage = ?, stage_changed_at = ?"
                        " WHERE model = ? AND version = ?", (to, now, name, number))
        self._event(name, now, by, "stage_changed", number, f"{name}@{number}: {frm} -> {to}")
        log.info("model_stage_changed", model=name, version=number, stage_from=frm,
                 stage_to=to, by=by)

    def _event(self, name: str, now: float, by: str, action: str, number: int | None,
               detail: str) -> None:
        self.db.execute("UPDATE registry_models SET updated_at = ? WHERE name = ?", (now, name))
        self.db.execute("INSERT INTO registry_events (model, ts, by, action, version, detail)"
                        " VALUES (?, ?, ?, ?, ?, ?)", (name, now, by, action, number, detail))

    def _collect(self, sha256: str) -> None:
        live = self.db.execute("SELECT COUNT(*) FROM registry_versions WHERE sha256 = ? AND"
                               " stage != 'retired'", (sha256,)).fetchone()[0]
        if live or sha256 in self._pending or sha256 in self._in_use_digests():
            return
        trash = self.blobs.detach(sha256)
        if trash is None:
            return
        log.info("blob_collected", sha256=sha256)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop (a tool, a test): delete here
            trash.unlink(missing_ok=True)
            return
        task = asyncio.create_task(self._unlink(trash))
        self._deleting.add(task)
        task.add_done_callback(self._deleting.discard)

    async def _unlink(self, trash: Path) -> None:
        try:
            await asyncio.to_thread(trash.unlink, missing_ok=True)
        except OSError as exc:  # left in tmp/, which start-up empties
            log.error("blob_delete_failed", path=str(trash), error=str(exc))

    async def settle(self) -> None:
        """Wait for the blob deletions under way."""
        if self._deleting:
            await asyncio.gather(*self._deleting)

    def _in_use_digests(self) -> set[str]:
        found: set[str] = set()
        for ref in self.in_use():
            name, _, number = ref.partition("@")
            row = self.db.execute("SELECT sha256 FROM registry_versions WHERE model = ? AND"
                                  " version = ?", (name, number)).fetchone()
            if row and row[0]:
                found.add(row[0])
        return found

    def _model(self, name: str) -> None:
        check_name("model", name)
        if self.db.execute("SELECT 1 FROM registry_models WHERE name = ?",
                           (name,)).fetchone() is None:
            raise NotFound(f"no such model: {name!r} (GET /api/v1/models lists them)")

    def _version(self, name: str, number: int) -> Version:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM registry_versions WHERE model = ? AND"
                              " version = ?", (name, number)).fetchone()
        if row is None:
            self._model(name)
            latest = self.db.execute("SELECT MAX(version) FROM registry_versions WHERE"
                                     " model = ?", (name,)).fetchone()[0]
            raise NotFound(f"{name} has no version {number} (latest is {latest})")
        return self._rows(name, [row])[0]

    def _rows(self, name: str, rows: list[tuple[Any, ...]]) -> list[Version]:
        by_version: dict[int, list[str]] = {}
        for alias, number in self.aliases(name).items():
            by_version.setdefault(number, []).append(alias)
        return [_to_version(row, tuple(by_version.get(row[1], ()))) for row in rows]

    @contextmanager
    def _tx(self) -> Iterator[None]:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: model registry: {exc}") from None
        try:
            yield
        except sqlite3.Error as exc:
            self.db.execute("ROLLBACK")
            raise StorageError(f"{self.path}: model registry: {exc}") from None
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            self.db.execute("ROLLBACK")
            raise StorageError(f"{self.path}: model registry: {exc}") from None


def _to_version(row: tuple[Any, ...], aliases: tuple[str, ...]) -> Version:
    (model, number, stage, runtime, fmt, sha, size, filename, source_uri, parameters,
     quantization, tags, description, created_by, created_at, replaces, changed_at) = row
    return Version(
        model=model, version=number, ref=f"{model}@{number}", stage=stage, aliases=aliases,
        runtime=runtime, format=fmt,
        artifact=Artifact(sha256=sha, size_bytes=size, filename=filename) if sha else None,
        source_uri=source_uri, parameters=parameters, quantization=quantization,
        tags=_tags.decode(tags), description=description, created_by=created_by,
        created_at=created_at, replaces=replaces, stage_changed_at=changed_at)


def _filename(v: Version) -> str | None:
    return v.artifact.filename if v.artifact else None


def _runtime(meta: NewVersion, fmt: str) -> str:
    runtime = meta.runtime or formats.DEFAULT_RUNTIME.get(fmt)
    if runtime is None:
        raise Invalid(_no_runtime(fmt))
    if (refusal := formats.mismatch(runtime, fmt)) is not None:
        raise Invalid(refusal)
    return runtime


def _no_runtime(fmt: str) -> str:
    return (f"runtime: none is implied by format {fmt!r}; pass runtime= one of "
            f"{', '.join(formats.RUNTIMES)}")


async def _non_empty(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes] | None:
    """``chunks`` again if it holds at least one byte, else None (an empty body)."""
    it = aiter(chunks)
    async for first in it:
        if first:
            return _chain(first, it)
    return None


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk
