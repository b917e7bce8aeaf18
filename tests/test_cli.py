"""The README's main job, `llmops demo`, end to end: real broker, real agent, printed telemetry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_prints_status_telemetry_and_stops_cleanly(tmp_path: Path) -> None:
    scenario = tmp_path / "xid.toml"
    scenario.write_text('[[events]]\nat_s = 1\ngpu = 5\nkind = "xid"\nxid = 48\n')
    done = subprocess.run(
        [sys.executable, "-m", "llm_ops_helper.cli", "demo", "--duration", "5", "--gpus", "6",
         "--interval", "0.5", "--scenario", str(scenario)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "demo-gpu-01 STATUS online agent" in out and "6 GPUs" in out
    telemetry = [line for line in out.splitlines() if " seq=" in line]
    assert len(telemetry) >= 5
    assert "EVENT CRITICAL xid gpu 5" in out
    assert "agent exited with 0; broker stopped" in out


def test_controller_without_its_config_file_exits_78_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    done = subprocess.run([sys.executable, "-m", "llm_ops_helper.controller", "-c", str(missing)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 78
    assert f"{missing}: cannot read config file: No such file or directory" in done.stderr
