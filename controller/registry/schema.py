"""The registry's tables, in the controller's database file beside those of ``store.py``.

The registry keeps its own schema number (table ``registry_schema``): ``PRAGMA user_version``
belongs to the controller store.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS registry_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS registry_models (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS registry_versions (
    model TEXT NOT NULL REFERENCES registry_models (name),
    version INTEGER NOT NULL,
    stage TEXT NOT NULL,
    runtime TEXT NOT NULL,
    format TEXT NOT NULL,
    sha256 TEXT,
    size_bytes INTEGER,
    filename TEXT,
    source_uri TEXT,
    parameters INTEGER,
    quantization TEXT,
    tags TEXT NOT NULL,
    description TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    replaces INTEGER,
    stage_changed_at REAL NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE INDEX IF NOT EXISTS registry_versions_by_sha256 ON registry_versions (sha256);
CREATE TRIGGER IF NOT EXISTS registry_versions_immutable
BEFORE UPDATE OF model, version, runtime, format, sha256, size_bytes, filename, source_uri,
    parameters, quantization, tags, description, created_by, created_at
ON registry_versions
BEGIN
    SELECT RAISE(ABORT, 'registry versions are immutable: only stage and replaces change');
END;
CREATE TABLE IF NOT EXISTS registry_aliases (
    model TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (model, alias),
    FOREIGN KEY (model, version) REFERENCES registry_versions (model, version)
);
CREATE TABLE IF NOT EXISTS registry_events (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL REFERENCES registry_models (name),
    ts REAL NOT NULL,
    by TEXT NOT NULL,
    action TEXT NOT NULL,
    version INTEGER,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS registry_events_by_model ON registry_events (model, id);
"""
