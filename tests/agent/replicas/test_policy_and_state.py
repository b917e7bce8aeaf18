"""Pure crash-loop decisions, spec hashes, the state file, ports and GPU environment."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from llm_ops_helper.agent.replicas import statefile
from llm_ops_helper.agent.replicas.policy import give_up_reason, recent_exits
from llm_ops_helper.agent.replicas.ports import NoFreePort, pick_port
from llm_ops_helper.agent.replicas.process import gpu_env, last_log_line, trim_log
from llm_ops_helper.proto.messages import GpuInfo
from tests.agent.replicas.helpers import spec


def test_recent_exits_keep_only_the_window() -> None:
    assert recent_exits([1.0, 50.0, 90.0], now=100.0, window_s=60.0) == [50.0, 90.0]


@pytest.mark.parametrize(("count", "ever_ready", "expected"), [
    (3, False, None),
    (4, False, "exited at start with code 1: OSError: model.gguf: no such file"),
    (4, True, "crash loop: exited 4 times in 300 s; last: exit code 1: OSError: model.gguf: "
              "no such file"),
])
def test_give_up_after_more_exits_than_the_limit(count: int, ever_ready: bool,
                                                 expected: str | None) -> None:
    assert give_up_reason(exits_in_window=count, limit=3, window_s=300, ever_ready=ever_ready,
                          exit_text="exit code 1",
                          last_line="OSError: model.gguf: no such file") == expected


def test_spec_hash_is_the_sorted_canonical_json_and_ignores_field_order() -> None:
    s = spec("tiny-r1-aaaaaa", "--x")
    canonical = json.dumps(msgspec.to_builtins(s), sort_keys=True, separators=(",", ":"))
    assert statefile.spec_hash(s) == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert statefile.spec_hash(s) != statefile.spec_hash(spec("tiny-r1-aaaaaa", "--y"))


def test_state_file_round_trips_and_a_corrupt_one_is_an_error(tmp_path: Path) -> None:
    record = statefile.ReplicaRecord(spec=spec(), spec_hash="abc", state="ready", pid=12,
                                     pgid=12, create_time=1.5, port=20001)
    statefile.save(tmp_path, [record])
    assert statefile.load(tmp_path) == [record]
    assert [p.name for p in tmp_path.iterdir()] == ["replicas.json"], "no temp file left"
    (tmp_path / "replicas.json").write_text("{half")
    with pytest.raises(statefile.StateFileError, match=r"replicas\.json: not a replica state"):
        statefile.load(tmp_path)


async def test_a_corrupt_state_file_is_logged_and_the_supervisor_starts_empty(
        make_supervisor, state_dir: Path) -> None:
    os.makedirs(state_dir)
    (state_dir / "replicas.json").write_text("not json")
    with capture_logs() as logs:
        sup = await make_supervisor()
    assert sup.replicas == {}
    assert any(e["event"] == "state_file_unreadable" for e in logs)


def test_pick_port_skips_ports_in_use_and_taken() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(NoFreePort, match=r"supervisor\.port_range"):
            pick_port("127.0.0.1", port, port, taken=set())
        assert pick_port("127.0.0.1", port, port + 1, taken=set()) == port + 1


def test_gpu_env_prefers_uuids_and_falls_back_to_pci_ordered_indices() -> None:
    inventory = [GpuInfo(index=0, uuid="GPU-aaa", name="H100"),
                 GpuInfo(index=1, uuid="GPU-bbb", name="H100")]
    assert gpu_env([1, 0], inventory) == {"CUDA_VISIBLE_DEVICES": "GPU-bbb,GPU-aaa"}
    assert gpu_env([1], []) == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert gpu_env([], inventory) == {"CUDA_VISIBLE_DEVICES": ""}


def test_log_is_trimmed_to_its_tail_at_a_line_boundary(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    trim_log(log, keep=100)
    text = log.read_text()
    assert len(text) <= 100 and text.startswith("line ") and text.endswith("line 999\n")
    assert last_log_line(log) == "line 999"
