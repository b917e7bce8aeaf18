"""The distribution's shape and the import rules of DESIGN.md."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> set[str]:
    found: set[str] = set()
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return found


def test_agent_and_controller_never_import_each_other_and_proto_imports_neither() -> None:
    assert not {m for m in _imports("agent") if m.startswith("llm_ops_helper.controller")}
    assert not {m for m in _imports("controller") if m.startswith("llm_ops_helper.agent")}
    assert not {m for m in _imports("proto") if m.startswith("llm_ops_helper")
                and not m.startswith("llm_ops_helper.proto")}


def test_running_agent_modules_do_not_load_river_or_numpy() -> None:
    code = ("import sys, llm_ops_helper.agent.wiring, llm_ops_helper.agent.__main__\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('river', 'numpy', 'pandas')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_wheel_holds_only_the_llm_ops_helper_namespace(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("llm_ops_helper-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"llm_ops_helper", wheel.name.split("-py3")[0] + ".dist-info"}
    for expected in ("llm_ops_helper/agent/__main__.py", "llm_ops_helper/proto/messages.py",
                     "llm_ops_helper/controller/__main__.py", "llm_ops_helper/cli.py",
                     "llm_ops_helper/agent/metric_names.toml",
                     "llm_ops_helper/systemd/llmops-agent.service",
                     "llm_ops_helper/systemd/mosquitto.conf",
                     "llm_ops_helper/systemd/agent.example.toml",
                     "llm_ops_helper/systemd/scenario.example.toml"):
        assert expected in names, expected
    assert not [n for n in names if n.startswith("llm_ops_helper/tests")]
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("llmops-agent", "llmops-controller", "llmops ="):
        assert script in entry_points
