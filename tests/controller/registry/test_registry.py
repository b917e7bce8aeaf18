"""The registry's Python API on a real SQLite file: lifecycle, aliases, lineage, GC, resolve."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from llm_ops_helper.controller.registry import (
    Conflict,
    Invalid,
    NewVersion,
    NotFound,
    Registry,
    StorageError,
)
from llm_ops_helper.controller.store import Store
from tests.controller.registry.helpers import CARD, add, gguf, make_registry, pieces


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    r = make_registry(tmp_path)
    yield r
    r.close()


async def test_register_infers_format_runtime_and_numbers_per_model(registry: Registry) -> None:
    data = gguf()
    v1 = await add(registry, "tiny", data, parameters=124_000_000, quantization="Q4_K_M",
                   tags={"team": "search"}, description="first")
    assert (v1.ref, v1.version, v1.stage, v1.format, v1.runtime) == (
        "tiny@1", 1, "registered", "gguf", "llamacpp")
    assert v1.artifact is not None
    assert v1.artifact.sha256 == hashlib.sha256(data).hexdigest()
    assert (v1.artifact.size_bytes, v1.artifact.filename) == (4096, "model.gguf")
    assert (v1.created_by, v1.tags, v1.replaces, v1.aliases) == ("alice", {"team": "search"},
                                                                  None, ())
    card = await add(registry, "sim-small", CARD)
    assert (card.format, card.runtime, card.version) == ("sim", "sim", 1)
    v2 = await add(registry, "tiny", gguf(), filename="tiny-q8.gguf")
    assert v2.version == 2 and v2.artifact and v2.artifact.filename == "tiny-q8.gguf"
    remote = await add(registry, "big", None, runtime="vllm",
                       source_uri="hf://meta-llama/Llama-3.1-8B-Instruct")
    assert remote.artifact is None and (remote.format, remote.runtime) == ("unknown", "vllm")
    assert [m.name for m in registry.models()] == ["big", "sim-small", "tiny"]
    tiny = next(m for m in registry.models() if m.name == "tiny")
    assert (tiny.latest, tiny.versions) == (2, 2)


async def test_refusals_before_anything_is_stored(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(Invalid, match=r"unknown runtime 'tgi': expected one of llamacpp, "
                                      r"vllm, sglang, sim, command"):
        await add(registry, "tiny", gguf(), runtime="tgi")
    with pytest.raises(Invalid, match=r"runtime: none is implied by format 'safetensors'"):
        await add(registry, "tiny", b"\x00" * 100, filename="model.safetensors")
    with pytest.raises(Invalid, match="empty body and no source_uri"):
        await add(registry, "tiny", b"")
    with pytest.raises(Invalid, match="model 'Tiny'"):
        await add(registry, "Tiny", gguf())
    assert registry.models() == [] and registry.blobs.blobs() == []
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


async def test_versions_are_immutable_in_the_database(registry: Registry) -> None:
    await add(registry, "tiny", gguf())
    with pytest.raises(sqlite3.IntegrityError, match="registry versions are immutable"):
        registry.db.execute("UPDATE registry_versions SET runtime = 'vllm'")
    registry.db.execute("UPDATE registry_versions SET stage = 'staging'")  # stage may move


async def test_lifecycle_legal_and_illegal_moves(registry: Registry) -> None:
    await add(registry, "tiny", gguf())
    with pytest.raises(Conflict) as err:
        registry.set_stage("tiny", 1, "production")
    assert err.value.message == ("tiny@1: cannot move from 'registered' to 'production': from "
                                 "'registered' a version can move to: staging, archived, "
                                 "retired")
    with pytest.raises(Invalid, match="unknown stage 'live'"):
        registry.set_stage("tiny", 1, "live")
    assert registry.set_stage("tiny", 1, "staging").stage == "staging"
    assert registry.set_stage("tiny", 1, "staging").stage == "staging"  # a retry: no-op
    prod = registry.set_stage("tiny", 1, "production", by="bob")
    assert (prod.stage, prod.aliases) == ("production", ("production",))
    assert registry.set_stage("tiny", 1, "archived").aliases == ()  # production alias follows
    assert registry.set_stage("tiny", 1, "production").aliases == ("production",)
    registry.set_stage("tiny", 1, "retired")
    with pytest.raises(Conflict, match="'retired' is final"):
        registry.set_stage("tiny", 1, "staging")
    with pytest.raises(NotFound, match="tiny has no version 7 \\(latest is 1\\)"):
        registry.set_stage("tiny", 7, "staging")


async def test_promotion_archives_previous_moves_alias_and_records_lineage(
        registry: Registry) -> None:
    for _ in range(3):
        await add(registry, "tiny", gguf())
    for n in (2, 3):
        registry.set_stage("tiny", n, "staging")
    registry.set_stage("tiny", 2, "production")
    three = registry.set_stage("tiny", 3, "production", by="carol")
    assert (three.stage, three.replaces, three.aliases) == ("production", 2, ("production",))
    two = registry.version("tiny", "2")
    assert (two.stage, two.aliases) == ("archived", ())
    assert registry.aliases("tiny") == {"production": 3}
    events = registry.lineage("tiny")
    details = [e.detail for e in events]
    assert "tiny@3 replaced tiny@2" in details
    assert "tiny@2: production -> archived" in details
    assert "production: tiny@2 -> tiny@3" in details
    replaced = next(e for e in events if e.action == "replaced")
    assert (replaced.by, replaced.version) == ("carol", 3)
    assert [e.action for e in events][:3] == ["registered"] * 3
    # without archive_previous the old version keeps its stage but not the alias
    registry.set_stage("tiny", 2, "production")
    registry.set_stage("tiny", 3, "production", archive_previous=False)
    assert registry.version("tiny", "2").stage == "production"
    assert registry.version("tiny", "3").replaces == 2


async def test_a_failed_promotion_changes_nothing(registry: Registry) -> None:
    for _ in range(2):
        await add(registry, "tiny", gguf())
    for n in (1, 2):
        registry.set_stage("tiny", n, "staging")
    registry.set_stage("tiny", 1, "production")
    before = registry.versions("tiny"), registry.aliases("tiny"), registry.lineage("tiny")
    # the last statement of the transaction fails: everything before it must roll back
    registry.db.execute("CREATE TEMP TRIGGER fail AFTER INSERT ON registry_events"
                        " WHEN NEW.detail = 'tiny@2: staging -> production'"
                        " BEGIN SELECT RAISE(ABORT, 'injected'); END")
    with pytest.raises(StorageError, match=r"controller\.db: model registry: injected"):
        registry.set_stage("tiny", 2, "production")
    assert (registry.versions("tiny"), registry.aliases("tiny"),
            registry.lineage("tiny")) == before


async def test_aliases_move_atomically_and_resolve(registry: Registry) -> None:
    for _ in range(3):
        await add(registry, "tiny", gguf())
    assert registry.set_alias("tiny", "canary", 2, by="dan") is None
    assert registry.set_alias("tiny", "canary", 3) == 2
    assert registry.resolve("tiny@canary").version == 3
    assert registry.version("tiny", "3").aliases == ("canary",)
    registry.db.execute("CREATE TEMP TRIGGER fail AFTER INSERT ON registry_events"
                        " WHEN NEW.action = 'alias_moved'"
                        " BEGIN SELECT RAISE(ABORT, 'injected'); END")
    with pytest.raises(StorageError, match="injected"):
        registry.set_alias("tiny", "canary", 1)
    assert registry.aliases("tiny") == {"canary": 3}  # not moved without its lineage event
    registry.db.execute("DROP TRIGGER fail")
    with pytest.raises(Conflict, match="alias 'production' follows the production stage"):
        registry.set_alias("tiny", "production", 1)
    with pytest.raises(Invalid, match="may not be a number"):
        registry.set_alias("tiny", "3", 1)
    with pytest.raises(NotFound, match="no version 9"):
        registry.set_alias("tiny", "canary", 9)
    assert registry.delete_alias("tiny", "canary") == 3
    with pytest.raises(NotFound, match="tiny has no alias 'canary' \\(aliases: none\\)"):
        registry.delete_alias("tiny", "canary")
    actions = [e.action for e in registry.lineage("tiny")]
    assert actions.count("alias_moved") == 2 and actions[-1] == "alias_deleted"


async def test_resolve_three_forms(registry: Registry) -> None:
    with pytest.raises(NotFound, match="no such model: 'tiny'"):
        registry.resolve("tiny")
    for _ in range(3):
        await add(registry, "tiny", gguf())
    assert registry.resolve("tiny").ref == "tiny@3"  # no production: latest not retired
    registry.set_stage("tiny", 3, "retired")
    with pytest.raises(Invalid):  # an Arabic-Indic 1 is no version number
        registry.resolve("tiny@\u0661")
    assert registry.resolve("tiny").ref == "tiny@2"
    registry.set_stage("tiny", 1, "staging")
    registry.set_stage("tiny", 1, "production")
    assert registry.resolve("tiny").ref == "tiny@1"  # production wins over latest
    assert registry.resolve("tiny@production").ref == "tiny@1"
    assert registry.resolve("tiny@2").ref == "tiny@2"
    with pytest.raises(Conflict, match="tiny@3 is retired"):
        registry.resolve("tiny@3")
    assert registry.version("tiny", "3").stage == "retired"  # still readable
    with pytest.raises(NotFound, match="no alias 'beta' \\(aliases: production\\)"):
        registry.resolve("tiny@beta")
    with pytest.raises(Invalid):
        registry.resolve("tiny@")
    for n in (1, 2):
        registry.set_stage("tiny", n, "retired")
    with pytest.raises(NotFound, match="tiny has no version that is not retired"):
        registry.resolve("tiny")


async def test_retire_collects_blobs_only_when_unreferenced(tmp_path: Path) -> None:
    in_use: set[str] = set()
    registry = make_registry(tmp_path, in_use)
    shared, alone = gguf(), gguf()
    one = await add(registry, "tiny", shared)
    await add(registry, "other", shared)  # same content, another model
    three = await add(registry, "tiny", alone)
    assert one.artifact and three.artifact
    path = registry.artifact_path(one.artifact.sha256)
    registry.set_stage("tiny", 1, "retired")
    assert path.exists()  # other@1 still uses it
    in_use.add("other@1")
    with pytest.raises(Conflict, match="other@1 is used by a deployment"):
        registry.set_stage("other", 1, "retired")
    in_use.clear()
    registry.set_stage("other", 1, "retired")
    assert not path.exists()
    with pytest.raises(NotFound, match="no artifact"):
        registry.artifact_path(one.artifact.sha256)
    in_use.add("tiny@2")  # a deployment's artifact survives a sweep
    orphan = registry.blobs.path("c" * 64)
    orphan.parent.mkdir(exist_ok=True)  # a random blob may already share the "cc" prefix
    orphan.write_bytes(b"left by a crash")
    assert registry.gc() == ["c" * 64]
    assert registry.artifact_path(three.artifact.sha256).exists()
    registry.close()


async def test_diff(registry: Registry) -> None:
    a = await add(registry, "tiny", gguf(), quantization="Q4_K_M", tags={"team": "x", "old": "1"})
    await add(registry, "tiny", gguf(8192), quantization="Q8_0", tags={"team": "y"},
              filename="tiny.gguf")
    registry.set_alias("tiny", "canary", 2)
    d = registry.diff("tiny", "1", "canary")
    assert d["from"] == a and d["to"].version == 2
    assert d["changes"] == {"quantization": ["Q4_K_M", "Q8_0"], "aliases": [(), ("canary",)],
                            "tags.old": ["1", None], "tags.team": ["x", "y"],
                            "filename": ["model.gguf", "tiny.gguf"]}
    assert d["artifact"] == {"same": False, "size_delta_bytes": 4096}
    assert registry.diff("tiny", "1", "1")["artifact"] == {"same": True, "size_delta_bytes": 0}


async def test_shares_the_controller_database_file(tmp_path: Path) -> None:
    store = Store(tmp_path / "controller.db")
    registry = make_registry(tmp_path)
    await add(registry, "tiny", gguf())
    registry.close()
    store.close()
    assert make_registry(tmp_path).resolve("tiny").ref == "tiny@1"
    assert Store(tmp_path / "controller.db").alerts() == []
    db = sqlite3.connect(tmp_path / "controller.db")
    db.execute("UPDATE registry_schema SET version = 99")
    db.commit()
    with pytest.raises(StorageError, match="model registry schema v99; this build reads v1"):
        make_registry(tmp_path)


async def test_register_with_checksum(registry: Registry) -> None:
    data = gguf()
    good = hashlib.sha256(data).hexdigest()
    v = await registry.register("tiny", NewVersion(), pieces(data), expected_sha256=good)
    assert v.artifact and v.artifact.sha256 == good
    with pytest.raises(Invalid, match="sha256 'XYZ'"):
        await registry.register("tiny", NewVersion(), pieces(data), expected_sha256="XYZ")


async def test_runtime_and_format_must_agree(registry: Registry) -> None:
    with pytest.raises(Invalid, match="runtime 'llamacpp' serves gguf artifacts, and this one "
                                      "is sim"):
        await add(registry, "tiny", CARD, runtime="llamacpp")
    with pytest.raises(Invalid, match="runtime 'sim' serves sim artifacts, and this one is gguf"):
        await add(registry, "tiny", gguf(), runtime="sim")
    with pytest.raises(Invalid, match="unknown format 'onnx'"):
        await add(registry, "tiny", gguf(), format="onnx")
    assert (await add(registry, "tiny", b"opaque", runtime="command")).format == "unknown"
    assert (await add(registry, "tiny", gguf(), runtime="vllm")).format == "gguf"


async def test_an_upload_racing_a_retire_keeps_its_blob(registry: Registry) -> None:
    data = gguf(1 << 20)
    old = await add(registry, "tiny", data)
    assert old.artifact
    halfway = asyncio.Event()
    go_on = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield data[:1000]
        halfway.set()
        await go_on.wait()
        yield data[1000:]

    upload = asyncio.create_task(registry.register("other", NewVersion(), slow()))
    await halfway.wait()
    registry.set_stage("tiny", 1, "retired")  # the only live user: its blob goes
    assert not registry.blobs.exists(old.artifact.sha256)
    # ...its name at once; the file itself is deleted by a worker thread, off the loop.
    assert len([p for p in registry.blobs.tmp.iterdir() if p.name.startswith("deleted-")]) == 1
    await registry.settle()
    assert [p.name for p in registry.blobs.tmp.iterdir()
            if p.name.startswith("deleted-")] == []
    go_on.set()
    new = await upload
    assert new.artifact and new.artifact.sha256 == old.artifact.sha256
    assert registry.artifact_path(new.artifact.sha256).read_bytes() == data
    assert registry.gc() == []
