"""What ``llmops demo`` checks and writes before it starts anything.

Pre-flight (:func:`preflight`) finds Mosquitto (installing it only when run as root, as
``scripts/bootstrap.sh`` does), the controller's analytics extra and the runtime to serve; it
raises :class:`PreflightError` with the exact command to run instead. The fault scenarios and
the model (a tiny llama.cpp GGUF, or a card for the ``sim`` runtime) are generated here so the
demo needs no file beyond the package.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from llm_ops_helper.broker import BrokerUnavailable, mosquitto_binary

EX_UNAVAILABLE = 69
# The fault: on the last agent, GPU fault_gpu(gpus), this long after the agent starts.
FAULT_AT_S = 18.0
FAULT_XID = 79  # "GPU has fallen off the bus": critical
FAULT_GONE_S = 20.0


class PreflightError(RuntimeError):
    """The demo cannot start; the message ends with the command that fixes it."""


APT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Preflight:
    runtime: str  # "llamacpp" or "sim"


def fault_gpu(gpus: int) -> int:
    """The GPU the fault scenario takes off the bus: 1, or 0 on a one-GPU host."""
    return min(1, gpus - 1)


def pip_install(extras: str) -> str:
    """The command that installs ``extras`` into the Python this runs on."""
    return f"{sys.executable} -m pip install 'llm-ops-helper[{extras}]'"


def _apt_install(package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False,
                                  timeout=APT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise PreflightError(f"{' '.join(argv)} took over {APT_TIMEOUT_S} s; install it "
                                 f"yourself with: apt-get install -y {package}") from None
        if done.returncode != 0:
            raise PreflightError(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}\n"
                                 f"install it yourself with: apt-get install -y {package}")


def find_mosquitto() -> str:
    """Mosquitto's path; as root with apt-get, installed first if missing. Without root,
    :class:`PreflightError` naming ``sudo apt-get install -y mosquitto``."""
    try:
        return mosquitto_binary()
    except BrokerUnavailable:
        pass
    root = os.geteuid() == 0
    command = "apt-get install -y mosquitto" if root else "sudo apt-get install -y mosquitto"
    if not root or shutil.which("apt-get") is None:
        raise PreflightError(f"mosquitto is not installed; install it with:\n    {command}")
    print("llmops demo: installing mosquitto (apt-get install -y mosquitto)", flush=True)
    _apt_install("mosquitto")
    try:
        return mosquitto_binary()
    except BrokerUnavailable as exc:
        raise PreflightError(f"{exc}\n    {command}") from None


def _importable(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def choose_runtime(wanted: str) -> str:
    """``auto``: llama.cpp where its wheel (and gguf, for the tiny model) import, else ``sim``."""
    llamacpp_ok = _importable("xllamacpp", "gguf", "numpy")
    if wanted == "auto":
        return "llamacpp" if llamacpp_ok else "sim"
    if wanted == "llamacpp" and not llamacpp_ok:
        raise PreflightError("the llamacpp runtime needs the xllamacpp wheel and gguf; "
                             "install them with:\n"
                             f"    {pip_install('llamacpp,tinymodel')}")
    return wanted


def preflight(runtime: str) -> Preflight:
    """Everything the demo needs, checked before anything starts."""
    find_mosquitto()
    if not _importable("river", "numpy"):
        raise PreflightError("the controller needs its analytics extra; install it with:\n"
                             f"    {pip_install('controller')}")
    return Preflight(choose_runtime(runtime))


def scenario_text(gpus: int, fault: bool, period_s: float) -> str:
    """A scenario for one demo host: a slow utilisation wave on every GPU and, with ``fault``,
    GPU 1 (or 0) falling off the bus: XID 79, then unreadable for a while."""
    lines = ['description = "llmops demo' + (': XID 79 on one GPU"' if fault else '"'),
             "[[events]]", "at_s = 0", 'kind = "utilization"', 'pattern = "sine"',
             "level_pct = 70", f"period_s = {period_s:g}"]
    if fault:
        gpu = fault_gpu(gpus)
        lines += ["[[events]]", f"at_s = {FAULT_AT_S:g}", f"gpu = {gpu}", 'kind = "xid"',
                  f"xid = {FAULT_XID}",
                  "[[events]]", f"at_s = {FAULT_AT_S:g}", f"gpu = {gpu}", 'kind = "disappear"',
                  f"for_s = {FAULT_GONE_S:g}"]
    return "\n".join(lines) + "\n"


def write_model(runtime: str, folder: Path) -> Path:
    """The file to push: a tiny random-weight GGUF (llama.cpp) or a model card (``sim``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if runtime == "llamacpp":
        from llm_ops_helper.tinymodel import write_tiny_llama
        return write_tiny_llama(folder / "demo-chat.gguf", variant="demo")
    from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
    return write_model_card(folder / "demo-chat.toml", startup_s=1.0, ttft_base_ms=20.0,
                            itl_ms=15.0, max_concurrency=8, max_tokens=8)
