"""The daemons' command lines (the demo's own tests are tests/e2e/test_demo.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_controller_without_its_config_file_exits_78_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    done = subprocess.run([sys.executable, "-m", "llm_ops_helper.controller", "-c", str(missing)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 78
    assert f"{missing}: cannot read config file: No such file or directory" in done.stderr
