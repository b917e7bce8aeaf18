"""Launch plans of every runtime: exact argv, URLs, env, and the errors that name the cause."""

from __future__ import annotations

import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from llm_ops_helper.agent.runtimes.base import LaunchPlan, Runtime, RuntimeError_
from llm_ops_helper.agent.runtimes.command import CommandRuntime, http_base
from llm_ops_helper.agent.runtimes.llamacpp import LlamaCppRuntime, find_llama_server
from llm_ops_helper.agent.runtimes.registry import (
    RUNTIMES,
    available_runtimes,
    unavailable_reasons,
)
from llm_ops_helper.agent.runtimes.sglang import SglangRuntime
from llm_ops_helper.agent.runtimes.sim import SimRuntime
from llm_ops_helper.agent.runtimes.vllm import VllmRuntime
from llm_ops_helper.proto.messages import ArtifactRef, ReplicaSpec

MODEL = Path("/var/cache/llmops/ab12/model.gguf")
BASE = "http://127.0.0.1:9001"


def spec(**kw: Any) -> ReplicaSpec:
    fields: dict[str, Any] = {"name": "tiny-r1-abc123", "deployment": "tiny",
                              "version": "tiny@3", "runtime": "llamacpp"}
    return ReplicaSpec(**{**fields, **kw})


def plan(runtime: Runtime, replica: ReplicaSpec, model_path: Path | None = MODEL) -> LaunchPlan:
    return runtime.plan(replica, model_path=model_path, host="127.0.0.1", port=9001)


# --- registry ------------------------------------------------------------------------------


def test_registry_names_every_runtime_by_its_own_name() -> None:
    assert sorted(RUNTIMES) == ["command", "llamacpp", "sglang", "sim", "vllm"]
    assert all(runtime.name == name for name, runtime in RUNTIMES.items())
    assert {n for n, r in RUNTIMES.items() if r.needs_artifact} == {"llamacpp", "sim"}


def test_available_runtimes_here_include_the_ones_that_ship_with_the_tests() -> None:
    # xllamacpp is a test dependency, sim and command need nothing.
    available = available_runtimes()
    assert {"command", "llamacpp", "sim"} <= set(available)
    assert available == sorted(available)
    reasons = unavailable_reasons()
    assert set(reasons) == set(RUNTIMES) - set(available)


def test_unavailable_says_what_is_missing(tmp_path: Path) -> None:
    assert VllmRuntime(binary="no-such-vllm-binary").unavailable() == (
        "no-such-vllm-binary is not on PATH (pip install vllm)")
    not_executable = tmp_path / "llama-server"
    not_executable.write_text("")
    why = LlamaCppRuntime(server_binary=str(not_executable)).unavailable()
    assert why == f"llama-server {str(not_executable)!r} is not an executable file"
    assert LlamaCppRuntime(server_binary=None).unavailable() is None  # xllamacpp is installed
    assert SimRuntime().unavailable() is None
    assert CommandRuntime().unavailable() is None
    sglang = SglangRuntime().unavailable()
    assert sglang is None or sglang.startswith(f"sglang is not installed in {sys.executable}")


def test_llama_server_is_the_configured_binary_else_the_one_on_path(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    assert find_llama_server({"PATH": str(tmp_path)}) == str(binary)
    assert find_llama_server({"PATH": str(tmp_path),
                              "LLMOPS_LLAMA_SERVER": "/opt/llama/bin/llama-server"}) == (
        "/opt/llama/bin/llama-server")
    assert find_llama_server({"PATH": str(tmp_path / "empty")}) is None


# --- llamacpp ------------------------------------------------------------------------------


def test_llamacpp_with_a_binary_offloads_all_layers_to_the_replicas_gpus() -> None:
    runtime = LlamaCppRuntime(server_binary="/usr/local/bin/llama-server")
    got = plan(runtime, spec(gpus=[0, 1], args=["-c", "8192"], served_model_name="tiny-chat"))
    assert got == LaunchPlan(
        argv=["/usr/local/bin/llama-server", "-m", str(MODEL), "--host", "127.0.0.1",
              "--port", "9001", "--metrics", "--alias", "tiny-chat", "-ngl", "999",
              "-c", "8192"],
        env={}, health_url=f"{BASE}/health", metrics_url=f"{BASE}/metrics",
        metrics_format="llamacpp", base_url=BASE)


def test_llamacpp_with_a_binary_and_no_gpus_runs_on_cpu() -> None:
    got = plan(LlamaCppRuntime(server_binary="llama-server"), spec())
    assert got.argv[-2:] == ["-ngl", "0"]


def test_llamacpp_without_a_binary_runs_the_xllamacpp_launcher() -> None:
    got = plan(LlamaCppRuntime(server_binary=None), spec(args=["--ctx-size", "512"],
                                                         env={"LLAMA_LOG": "1"}))
    assert got.argv == [sys.executable, "-m", "llm_ops_helper.agent.runtimes.llamacpp_server",
                        "--model", str(MODEL), "--host", "127.0.0.1", "--port", "9001",
                        "--alias", "tiny", "--ctx-size", "512"]
    assert got.env == {"LLAMA_LOG": "1"}
    assert (got.health_url, got.metrics_url, got.metrics_format, got.base_url) == (
        f"{BASE}/health", f"{BASE}/metrics", "llamacpp", BASE)


def test_llamacpp_without_an_artifact_is_refused() -> None:
    with pytest.raises(RuntimeError_, match=r"replica tiny-r1-abc123: llamacpp needs a GGUF "
                                            r"artifact; the spec has none"):
        plan(LlamaCppRuntime(server_binary=None), spec(source_uri="hf://org/model"), None)


# --- vllm and sglang -----------------------------------------------------------------------


def test_vllm_serves_the_fetched_artifact_under_the_served_name() -> None:
    got = plan(VllmRuntime(), spec(runtime="vllm", args=["--max-model-len", "4096"]))
    assert got.argv == ["vllm", "serve", str(MODEL), "--host", "127.0.0.1", "--port", "9001",
                        "--served-model-name", "tiny", "--max-model-len", "4096"]
    assert (got.health_url, got.metrics_url, got.metrics_format) == (
        f"{BASE}/health", f"{BASE}/metrics", "vllm")


def test_vllm_fetches_a_source_uri_itself_and_needs_one_or_the_other() -> None:
    got = plan(VllmRuntime(), spec(runtime="vllm", source_uri="meta-llama/Llama-3.1-8B"), None)
    assert got.argv[:3] == ["vllm", "serve", "meta-llama/Llama-3.1-8B"]
    with pytest.raises(RuntimeError_, match="vllm needs a model: the spec has neither an "
                                            "artifact nor a source_uri"):
        plan(VllmRuntime(), spec(runtime="vllm"), None)


def test_sglang_turns_its_metrics_on() -> None:
    got = plan(SglangRuntime(), spec(runtime="sglang", source_uri="Qwen/Qwen2.5-7B",
                                     args=["--tp", "2"]), None)
    assert got.argv == [sys.executable, "-m", "sglang.launch_server",
                        "--model-path", "Qwen/Qwen2.5-7B", "--host", "127.0.0.1",
                        "--port", "9001", "--served-model-name", "tiny", "--enable-metrics",
                        "--tp", "2"]
    assert got.metrics_format == "sglang"


# --- sim -----------------------------------------------------------------------------------


def test_sim_runs_the_simulator_on_its_model_card() -> None:
    card = Path("/cache/card.toml")
    got = plan(SimRuntime(), spec(runtime="sim", served_model_name="m"), card)
    assert got.argv == [sys.executable, "-m", "llm_ops_helper.agent.runtimes.simserver",
                        "--model-card", str(card), "--host", "127.0.0.1", "--port", "9001",
                        "--served-model-name", "m"]
    assert (got.health_url, got.metrics_url, got.metrics_format) == (
        f"{BASE}/health", f"{BASE}/metrics", "sim")
    with pytest.raises(RuntimeError_, match="needs its model card"):
        plan(SimRuntime(), spec(runtime="sim"), None)


# --- command -------------------------------------------------------------------------------


def test_command_fills_its_placeholders_and_uses_the_specs_paths() -> None:
    replica = spec(runtime="command", served_model_name="chat",
                   command=["/opt/srv", "--listen={host}:{port}", "--model", "{model}",
                            "--name", "{name}", "--json={{}}"],
                   args=["--verbose"], health_path="/ready", metrics_path="/stats",
                   metrics_format="vllm", env={"A": "1"})
    got = plan(CommandRuntime(), replica)
    assert got == LaunchPlan(
        argv=["/opt/srv", "--listen=127.0.0.1:9001", "--model", str(MODEL), "--name", "chat",
              "--json={}", "--verbose"],
        env={"A": "1"}, health_url=f"{BASE}/ready", metrics_url=f"{BASE}/stats",
        metrics_format="vllm", base_url=BASE)


def test_command_without_metrics() -> None:
    got = plan(CommandRuntime(), spec(runtime="command", command=["srv", "{port}"],
                                      metrics_path=None), None)
    assert (got.argv, got.metrics_url, got.metrics_format) == (["srv", "9001"], None, None)


@pytest.mark.parametrize(("command", "kw", "message"), [
    ([], {}, "the command runtime needs a command"),
    (["srv", "{hots}"], {}, r"command argument '\{hots\}': unknown placeholder \{hots\}; "
                            r"known: \{host\}, \{port\}, \{model\}, \{name\}"),
    (["srv", "{host.real}"], {}, "unknown placeholder"),
    (["srv", "{port!r}"], {}, "unknown placeholder"),
    (["srv", "{}"], {}, "unknown placeholder"),
    (["srv", "{port"], {}, "command argument '\\{port'"),
    (["srv", "{model}"], {"no_model": True}, "uses \\{model\\} but the spec has neither"),
    (["srv"], {"metrics_format": "nginx"}, "unknown metrics_format 'nginx'; known: llamacpp"),
    (["srv"], {"health_path": "health"}, "health_path must start with '/', got 'health'"),
])
def test_command_errors_name_the_cause(command: list[str], kw: dict[str, Any],
                                       message: str) -> None:
    model = None if kw.pop("no_model", False) else MODEL
    with pytest.raises(RuntimeError_, match=message):
        plan(CommandRuntime(), spec(runtime="command", command=command, **kw), model)


def test_urls_reach_a_wildcard_bind_on_loopback_and_bracket_ipv6() -> None:
    assert http_base("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert http_base("::1", 80) == "http://[::1]:80"
    assert http_base("10.0.0.7", 80) == "http://10.0.0.7:80"


def test_the_plans_env_is_the_specs_env_in_a_dict_of_its_own() -> None:
    replica = spec(runtime="sim", env={"OMP_NUM_THREADS": "2"})
    got = plan(SimRuntime(), replica, Path("card.toml"))
    assert got.env == {"OMP_NUM_THREADS": "2"}
    got.env["X"] = "y"
    assert replica.env == {"OMP_NUM_THREADS": "2"}


def test_artifact_ref_is_not_needed_to_plan() -> None:
    # The supervisor passes the fetched path; the spec's ArtifactRef is only what to fetch.
    replica = spec(artifact=ArtifactRef(sha256="ab" * 32, size_bytes=1, url="http://c/a"))
    assert plan(LlamaCppRuntime(server_binary=None), replica).argv[4] == str(MODEL)
