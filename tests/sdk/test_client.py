"""`LLMOpsHelper` over real HTTP against the controller's test double (tests/sdk/fake_controller).

The client is synchronous; the tests run it in a worker thread (`asyncio.to_thread`) so the
aiohttp server keeps serving on the test's event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from llm_ops_helper import LLMOpsHelper as Exported
from llm_ops_helper.client import (
    ApiError,
    Conflict,
    ControllerUnreachable,
    Deployment,
    DeploymentFailed,
    DeployTimeout,
    LLMOpsError,
    LLMOpsHelper,
    ModelFileError,
    NotFound,
    deployment_name,
)
from tests.sdk.conftest import free_port, model_file
from tests.sdk.fake_controller import FakeController

MiB = 1 << 20


async def test_push_streams_the_file_in_chunks_with_its_sha256_and_length(
        helper: LLMOpsHelper, fake: FakeController, tmp_path: Path) -> None:
    path = model_file(tmp_path / "tiny.gguf", size=3 * MiB + 17)
    seen: list[tuple[str, int, int]] = []
    version = await asyncio.to_thread(
        helper.push_model, path, "tiny", tags={"team": "sre", "quant": "f32"},
        description="first cut", progress=lambda *a: seen.append(a))

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    [upload] = fake.uploads
    assert upload.content_length == 3 * MiB + 17 and upload.transfer_encoding is None
    assert len(upload.chunks) > 1 and sum(upload.chunks) == 3 * MiB + 17
    assert upload.sha256 == sha and upload.query["sha256"] == [sha]
    assert upload.query["filename"] == ["tiny.gguf"]
    assert sorted(upload.query["tag"]) == ["quant=f32", "team=sre"]
    # Read and sent in 1 MiB pieces: four of each for 3 MiB + 17 bytes.
    assert [s for s in seen if s[0] == "hash"][-1] == ("hash", 3 * MiB + 17, 3 * MiB + 17)
    assert [done for stage, done, _ in seen if stage == "upload"] == [
        MiB, 2 * MiB, 3 * MiB, 3 * MiB + 17]

    assert version.ref == "tiny@1" and version.stage == "registered"
    assert version.format == "gguf" and version.runtime == "llamacpp"
    assert version.artifact is not None and version.artifact.sha256 == sha
    assert version.tags == {"team": "sre", "quant": "f32"} and version.description == "first cut"
    assert version.created_by == "tester"
    assert fake.requests[0].headers["X-LLMOps-User"] == "tester"


async def test_a_file_changed_after_hashing_is_refused_by_the_checksum(
        helper: LLMOpsHelper, fake: FakeController, tmp_path: Path) -> None:
    path = model_file(tmp_path / "tiny.gguf", size=MiB + 5)

    def tamper(stage: str, done: int, total: int) -> None:
        if stage == "hash" and done == total:
            path.write_bytes(b"GGUF" + b"x" * (total - 4))

    with pytest.raises(ApiError, match="checksum mismatch: expected") as caught:
        await asyncio.to_thread(helper.push_model, path, "tiny", progress=tamper)
    assert caught.value.status == 400
    assert fake.versions == {}


async def test_an_unknown_runtime_is_the_controllers_error_text(
        helper: LLMOpsHelper, tmp_path: Path) -> None:
    path = model_file(tmp_path / "tiny.gguf")
    with pytest.raises(ApiError) as caught:
        await asyncio.to_thread(helper.push_model, path, runtime="tensorrt")
    assert caught.value.status == 400
    assert caught.value.message == ("unknown runtime 'tensorrt': expected one of llamacpp, vllm, "
                                    "sglang, sim, command")


async def test_deploy_model_path_pushes_then_puts_then_waits_until_available(
        helper: LLMOpsHelper, fake: FakeController, tmp_path: Path) -> None:
    path = model_file(tmp_path / "Tiny Llama.Q4.gguf")
    states: list[Deployment] = []
    result = await asyncio.to_thread(helper.deploy_model, path, replicas=2,
                                     gpus_per_replica=1, args=["--ctx-size", "64"],
                                     on_update=states.append)

    assert [(r.method, r.path.split("?")[0]) for r in fake.requests] == [
        ("POST", "/api/v1/models/tiny-llama-q4/versions"),
        ("PUT", "/api/v1/deployments/tiny-llama-q4"),
        ("GET", "/api/v1/deployments/tiny-llama-q4"),
        ("GET", "/api/v1/deployments/tiny-llama-q4")]
    assert fake.requests[1].body == {"model": "tiny-llama-q4@1", "runtime": None, "replicas": 2,
                                     "gpus_per_replica": 1, "args": ["--ctx-size", "64"]}
    assert [(s.phase, s.ready) for s in states] == [
        ("progressing", 0), ("progressing", 0), ("available", 2)]
    assert [r.state for r in states[1].replicas] == ["starting", "starting"]
    assert result.phase == "available" and result.version == "tiny-llama-q4@1"
    assert result.ready == result.desired == 2
    endpoints = await asyncio.to_thread(helper.endpoints, "tiny-llama-q4")
    assert [e.url for e in endpoints] == ["http://gpu-1:9000/v1", "http://gpu-1:9001/v1"]


async def test_deploy_model_ref_deploys_without_uploading(
        helper: LLMOpsHelper, fake: FakeController, tmp_path: Path) -> None:
    await asyncio.to_thread(helper.push_model, model_file(tmp_path / "a.gguf"), "tiny")
    await asyncio.to_thread(helper.push_model, model_file(tmp_path / "b.gguf", seed=1), "tiny")
    await asyncio.to_thread(helper.promote, "tiny", 1, "staging")
    await asyncio.to_thread(helper.promote, "tiny", 1)
    result = await asyncio.to_thread(helper.deploy_model, "tiny@production", "chat", wait=False)
    assert result.name == "chat" and result.phase == "progressing" and result.version == "tiny@1"
    assert len(fake.uploads) == 2
    done = await asyncio.to_thread(helper.deploy_model, "tiny@2", "chat")
    assert (done.version, done.previous_version, done.revision) == ("tiny@2", "tiny@1", 2)


async def test_a_failed_rollout_raises_deployment_failed_with_the_controllers_message(
        helper: LLMOpsHelper, fake: FakeController, tmp_path: Path) -> None:
    fake.rollout = [{"phase": "progressing", "replica_state": "starting"},
                    {"phase": "failed", "replica_state": "failed",
                     "message": "replica tiny-r1-000000 crash loop: exit code 1",
                     "replica_reason": "exit code 1"}]
    with pytest.raises(DeploymentFailed, match="crash loop: exit code 1") as caught:
        await asyncio.to_thread(helper.deploy_model, model_file(tmp_path / "tiny.gguf"))
    assert caught.value.deployment is not None
    assert caught.value.deployment.replicas[0].reason == "exit code 1"


async def test_a_rollback_away_from_the_new_version_is_a_failure(
        helper: LLMOpsHelper, fake: FakeController, tmp_path: Path) -> None:
    await asyncio.to_thread(helper.deploy_model, model_file(tmp_path / "tiny.gguf"))
    fake.rollout = [{"phase": "progressing"},
                    {"phase": "rolling_back", "version": "tiny@1",
                     "message": "error rate 0.31 above tiny@1's 0.01"}]
    with pytest.raises(DeploymentFailed,
                       match=r"rolled back from tiny@2 to tiny@1: error rate 0.31"):
        await asyncio.to_thread(helper.deploy_model, model_file(tmp_path / "tiny.gguf", seed=3))


async def test_the_wait_times_out_naming_the_replicas_not_ready(
        helper: LLMOpsHelper, fake: FakeController, tmp_path: Path) -> None:
    fake.rollout = [{"phase": "progressing", "replica_state": "fetching",
                     "replica_reason": "artifact 40% downloaded"}]
    with pytest.raises(DeployTimeout) as caught:
        await asyncio.to_thread(helper.deploy_model, model_file(tmp_path / "tiny.gguf"),
                                timeout=0.05)
    assert isinstance(caught.value, TimeoutError)
    text = str(caught.value)
    assert "deployment tiny not available after 0.05 s: phase progressing" in text
    assert "0/1 replicas ready on tiny@1" in text
    assert "not ready: tiny-r1-000000 (fetching: artifact 40% downloaded)" in text


async def test_rollback_waits_through_rolling_back_to_the_previous_version(
        helper: LLMOpsHelper, fake: FakeController, tmp_path: Path) -> None:
    await asyncio.to_thread(helper.deploy_model, model_file(tmp_path / "tiny.gguf"))
    await asyncio.to_thread(helper.deploy_model, model_file(tmp_path / "tiny.gguf", seed=2))
    states: list[Deployment] = []
    result = await asyncio.to_thread(helper.rollback, "tiny", on_update=states.append)
    assert "rolling_back" in [s.phase for s in states]
    assert (result.phase, result.version, result.ready) == ("available", "tiny@1", 1)
    assert fake.requests[-len(states) - 1].body == {}
    again = await asyncio.to_thread(helper.rollback, "tiny", 2)
    assert again.version == "tiny@2"
    assert [r.body for r in fake.requests if r.path.endswith("/rollback")][-1] == {
        "version": "tiny@2"}


async def test_a_missing_file_fails_before_any_request(
        helper: LLMOpsHelper, fake: FakeController, tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelFileError, match=f"{missing}: no such file") as caught:
        await asyncio.to_thread(helper.deploy_model, missing)
    assert caught.value.path == str(missing)
    with pytest.raises(ModelFileError, match="not a regular file"):
        await asyncio.to_thread(helper.push_model, tmp_path)
    with pytest.raises(ModelFileError, match="no such file"):
        await asyncio.to_thread(helper.deploy_model, "models/llama.gguf")
    assert fake.requests == []


def test_an_unreachable_controller_names_the_url_and_what_to_do() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ControllerUnreachable) as caught:
        LLMOpsHelper(url).list_models()
    assert caught.value.url == url
    assert str(caught.value).startswith(f"cannot reach the controller at {url}: ")
    assert "llmops-controller" in str(caught.value) and "LLMOPS_URL" in str(caught.value)
    assert isinstance(caught.value, LLMOpsError)


async def test_conflicts_and_not_found_carry_the_controllers_text(
        helper: LLMOpsHelper, fake: FakeController, tmp_path: Path) -> None:
    await asyncio.to_thread(helper.deploy_model, model_file(tmp_path / "tiny.gguf"))
    with pytest.raises(Conflict, match="tiny@1 is used by a deployment: move the deployment "
                                       "to another version before retiring it") as caught:
        await asyncio.to_thread(helper.retire, "tiny", 1)
    assert caught.value.status == 409
    await asyncio.to_thread(helper.delete_deployment, "tiny")
    retired = await asyncio.to_thread(helper.retire, "tiny", 1)
    assert retired.stage == "retired"
    with pytest.raises(Conflict) as final:
        await asyncio.to_thread(helper.promote, "tiny", 1)
    assert final.value.message == (
        "tiny@1: cannot move from 'retired' to 'production': 'retired' is final")
    with pytest.raises(NotFound) as missing:
        await asyncio.to_thread(helper.get_model, "nope")
    assert missing.value.status == 404
    assert missing.value.message == "no such model: 'nope' (GET /api/v1/models lists them)"
    with pytest.raises(NotFound, match="no deployment named 'tiny'"):
        await asyncio.to_thread(helper.status, "tiny")


async def test_registry_calls_round_trip(
        helper: LLMOpsHelper, fake: FakeController, tmp_path: Path) -> None:
    await asyncio.to_thread(helper.push_model, model_file(tmp_path / "a.gguf"), "tiny")
    await asyncio.to_thread(helper.push_model, model_file(tmp_path / "b.gguf", size=5000),
                            "tiny", description="bigger")
    with pytest.raises(Conflict) as refused:
        await asyncio.to_thread(helper.promote, "tiny", 1)
    assert refused.value.message == (
        "tiny@1: cannot move from 'registered' to 'production': from 'registered' a version "
        "can move to: staging, archived, retired")
    await asyncio.to_thread(helper.promote, "tiny", 1, "staging")
    assert (await asyncio.to_thread(helper.promote, "tiny", 1)).aliases == ("production",)
    promoted = await asyncio.to_thread(helper.promote, "tiny", 2, "staging")
    assert promoted.stage == "staging"
    second = await asyncio.to_thread(helper.promote, "tiny", 2)
    assert (second.stage, second.replaces) == ("production", 1)
    change = await asyncio.to_thread(helper.set_alias, "tiny", "canary", 1)
    assert (change.alias, change.version, change.previous) == ("canary", 1, None)
    assert (await asyncio.to_thread(helper.get_version, "tiny", "canary")).version == 1
    gone = await asyncio.to_thread(helper.delete_alias, "tiny", "canary")
    assert (gone.version, gone.previous) == (None, 1)
    model = await asyncio.to_thread(helper.get_model, "tiny")
    assert model.aliases == {"production": 2}
    assert [(v.version, v.stage) for v in model.versions] == [(1, "archived"),
                                                              (2, "production")]
    [summary] = await asyncio.to_thread(helper.list_models)
    assert (summary.name, summary.latest, summary.versions) == ("tiny", 2, 2)
    diff = await asyncio.to_thread(helper.diff, "tiny", 1, "production")
    assert (diff.from_.ref, diff.to.ref) == ("tiny@1", "tiny@2")
    assert diff.changes["description"] == ("", "bigger")
    assert diff.artifact is not None and diff.artifact.size_delta_bytes == 5000 - 4096

    await asyncio.to_thread(helper.deploy_model, "tiny", "chat")
    scaled = await asyncio.to_thread(helper.scale, "chat", 3, True)
    assert (scaled.desired, scaled.ready, scaled.version) == (3, 3, "tiny@2")
    assert [d.name for d in await asyncio.to_thread(helper.status)] == ["chat"]


def test_settings_come_from_arguments_then_environment_then_defaults(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("getpass.getuser", lambda: "login")
    default = LLMOpsHelper()
    assert (default.url, default.token, default.user) == ("http://127.0.0.1:8470", None, "login")

    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("LLMOPS_URL", "head-1:9000")
    monkeypatch.setenv("LLMOPS_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("LLMOPS_USER", "ops")
    env = LLMOpsHelper()
    assert (env.url, env.token, env.user) == ("http://head-1:9000", "from-file", "ops")
    monkeypatch.setenv("LLMOPS_TOKEN", "from-env")
    assert LLMOpsHelper().token == "from-env"
    explicit = LLMOpsHelper("https://ctl.example:8443/", "from-arg", user="me")
    assert (explicit.url, explicit.token, explicit.user) == (
        "https://ctl.example:8443", "from-arg", "me")

    monkeypatch.delenv("LLMOPS_TOKEN")
    monkeypatch.setenv("LLMOPS_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(LLMOpsError, match=f"{tmp_path / 'missing'}: cannot read the token"):
        LLMOpsHelper()
    assert Exported is LLMOpsHelper


async def test_the_token_and_user_travel_as_headers(fake: FakeController,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOPS_URL", fake.url)
    monkeypatch.setenv("LLMOPS_TOKEN", "s3cret")
    monkeypatch.setenv("LLMOPS_USER", "ops")
    await asyncio.to_thread(LLMOpsHelper().list_models)
    [seen] = fake.requests
    assert seen.headers["Authorization"] == "Bearer s3cret"
    assert seen.headers["X-LLMOps-User"] == "ops"


def test_names_made_from_file_stems_fit_deployment_names() -> None:
    assert deployment_name("Llama-3.1 8B.Q4_K_M") == "llama-3-1-8b-q4-k-m"
    assert deployment_name("___") == "model"
    long = deployment_name("x" * 100)
    assert len(long) == 40 and long == "x" * 40


async def test_a_version_without_a_file_names_its_source(
        helper: LLMOpsHelper, fake: FakeController) -> None:
    version = await asyncio.to_thread(helper.push_model, None, "llama-70b", runtime="vllm",
                                      source_uri="hf://meta-llama/Llama-3.1-70B-Instruct",
                                      parameters="70B", quantization="fp8")
    assert (version.artifact, version.source_uri) == (
        None, "hf://meta-llama/Llama-3.1-70B-Instruct")
    assert (version.parameters, version.quantization) == (70_000_000_000, "fp8")
    [upload] = fake.uploads
    assert upload.chunks == [] and upload.content_length == 0
    with pytest.raises(LLMOpsError, match="needs a model name and a source_uri"):
        helper.push_model(None, "llama-70b")
