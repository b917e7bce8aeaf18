"""Log lines: JSON off a TTY (one event per line, UTC ISO 8601), readable console on one."""

from __future__ import annotations

import io
import json
import re

import structlog

from llm_ops_helper import logs


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_off_a_tty_carry_event_level_host_and_utc_timestamp() -> None:
    out = io.StringIO()
    logs.configure("info", stream=out, host="gpu-07")
    log = structlog.get_logger("t")
    log.info("replica_ready", replica="vllm-0")
    log.debug("not_shown")
    log.warning("collector_failed", collector="nvml", error="GPU is lost")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "replica_ready" and first["host"] == "gpu-07"
    assert first["level"] == "info" and second["level"] == "warning"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", first["timestamp"])


def test_console_output_on_a_tty_is_not_json() -> None:
    out = _Tty()
    logs.configure("info", stream=out, host="gpu-07")
    structlog.get_logger("t").info("agent_started", gpus=8)
    text = out.getvalue()
    assert "agent_started" in text and "gpus" in text
    assert not text.lstrip().startswith("{")
