"""Pure crash-loop decisions, spec hashes, the state file, ports and GPU environment."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import msgspec
import pytest

from llm_ops_helper.agent.replicas import statefile
from llm_ops_helper.agent.replicas.policy import give_up_reason, recent_exits
from llm_ops_helper.agent.replicas.ports import NoFreePort, pick_port, port_is_free
from llm_ops_helper.agent.replicas.process import cap_log, gpu_env, last_log_line, trim_log
from llm_ops_helper.agent.replicas.supervisor import SupervisorError
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


@pytest.mark.parametrize("content", [b"not json", b'{"v": 1, "replicas": [{"spec": 1}]}'])
async def test_an_unreadable_state_file_stops_the_start_naming_the_file(
        make_supervisor, state_dir: Path, content: bytes) -> None:
    # Starting empty would kill every replica it lists as an orphan.
    os.makedirs(state_dir)
    (state_dir / "replicas.json").write_bytes(content)
    with pytest.raises(SupervisorError, match=r"replicas\.json.*move it aside"):
        await make_supervisor()


def test_an_unreadable_state_file_is_a_config_error_of_the_agent(tmp_path: Path) -> None:
    from llm_ops_helper.agent import config as agent_config
    from llm_ops_helper.agent.wiring import build_supervisor

    state = tmp_path / "state"
    state.mkdir()
    (state / "replicas.json").write_text("{")
    toml = tmp_path / "agent.toml"
    toml.write_text(f'[broker]\nhost = "localhost"\n[supervisor]\nstate_dir = "{state}"\n')
    with pytest.raises(agent_config.ConfigError, match="move it aside"):
        build_supervisor(agent_config.load(str(toml)), None)


def test_pick_port_skips_ports_in_use_and_taken() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not port_is_free("127.0.0.1", port)
        with pytest.raises(NoFreePort, match=r"supervisor\.port_range"):
            pick_port("127.0.0.1", port, port, taken=set())
    in_use = {100, 102}
    for _ in range(20):  # whatever the random start
        assert pick_port("h", 100, 103, taken={101}, preferred=102,
                         is_free=lambda _h, p: p not in in_use) == 103


def test_gpu_env_prefers_uuids_and_falls_back_to_pci_ordered_indices() -> None:
    inventory = [GpuInfo(index=0, uuid="GPU-aaa", name="H100"),
                 GpuInfo(index=1, uuid="GPU-bbb", name="H100")]
    assert gpu_env([1, 0], inventory) == {"CUDA_VISIBLE_DEVICES": "GPU-bbb,GPU-aaa"}
    assert gpu_env([1], []) == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert gpu_env([], inventory) == {"CUDA_VISIBLE_DEVICES": ""}
    # Simulated GPUs: their UUIDs mean nothing to a real CUDA.
    assert gpu_env([1], inventory, uuids=False) == {"CUDA_VISIBLE_DEVICES": "1",
                                                     "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_log_is_trimmed_to_its_tail_at_a_line_boundary(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    trim_log(log, keep=100)
    text = log.read_text()
    assert len(text) <= 100 and text.startswith("line ") and text.endswith("line 999\n")
    assert last_log_line(log) == "line 999"


def test_a_running_replicas_log_is_cut_to_its_tail_past_the_cap(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    with log.open("ab") as appender:  # the replica's own descriptor, O_APPEND
        appender.write(b"".join(b"line %d\n" % i for i in range(10000)))
        appender.flush()
        assert not cap_log(log, max_bytes=1 << 20, keep=100)
        assert cap_log(log, max_bytes=1000, keep=100)
        appender.write(b"after the cut\n")
    lines = log.read_text().splitlines()
    assert "log cut at" in lines[0]
    assert lines[-2:] == ["line 9999", "after the cut"]
    assert log.stat().st_size < 200


async def test_the_state_writer_coalesces_changes_and_writes_the_latest_in_order(
        tmp_path: Path) -> None:
    current: list[statefile.ReplicaRecord] = []
    snapshots = 0

    def records() -> list[statefile.ReplicaRecord]:
        nonlocal snapshots
        snapshots += 1
        return list(current)

    writer = statefile.StateWriter(tmp_path, records)
    writer.start()
    for i in range(50):  # a burst of transitions, faster than the disk
        current = [statefile.ReplicaRecord(spec=spec(f"r{i}"), spec_hash="h", state="ready")]
        writer.changed()
    assert await writer.flush()
    assert snapshots <= 3, "one write per burst, not one per change"
    assert [r.spec.name for r in statefile.load(tmp_path)] == ["r49"]
    current = []
    writer.changed()
    await writer.close()  # the final state is flushed
    assert statefile.load(tmp_path) == []
    assert (tmp_path / "replicas.json").stat().st_mode & 0o777 == 0o600


async def test_a_failed_state_write_is_retried_on_the_next_change(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    writer = statefile.StateWriter(missing, list)
    writer.start()
    assert not await writer.flush(), "the directory is missing: the write fails"
    missing.mkdir()
    assert await writer.flush()
    assert statefile.load(missing) == []
    await writer.close()
