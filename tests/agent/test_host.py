"""The host collector against the machine the tests run on."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
import psutil
import pytest

from llm_ops_helper.agent.collectors.base import Collector
from llm_ops_helper.agent.collectors.host import HostCollector
from llm_ops_helper.proto.messages import HostSample


def meminfo_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def external_nic_bytes() -> tuple[int, int]:
    nics = psutil.net_io_counters(pernic=True)
    return (sum(c.bytes_recv for n, c in nics.items() if n != "lo"),
            sum(c.bytes_sent for n, c in nics.items() if n != "lo"))


async def test_a_sample_matches_the_machine() -> None:
    collector = HostCollector()
    assert isinstance(collector, Collector)
    recv_before, sent_before = external_nic_bytes()
    collected = await collector.collect()
    recv_after, sent_after = external_nic_bytes()
    await collector.close()
    host = collected.host
    assert host is not None
    assert host.memory_total_bytes == meminfo_total_bytes()
    assert 0 < host.memory_available_bytes <= host.memory_total_bytes
    assert 0 < host.memory_used_bytes <= host.memory_total_bytes
    assert host.swap_used_bytes >= 0
    vfs = os.statvfs("/")
    assert host.disk_path == "/"
    assert host.disk_total_bytes == vfs.f_blocks * vfs.f_frsize
    assert 0 < host.disk_used_bytes <= host.disk_total_bytes
    assert host.cpu_count == os.cpu_count()
    assert 0.0 <= host.cpu_pct <= 100.0
    load = os.getloadavg()
    assert host.load_15m == pytest.approx(load[2], abs=0.5)
    assert host.boot_time == pytest.approx(psutil.boot_time(), abs=1)
    assert 0 < host.boot_time < time.time()
    # Loopback traffic is not the host's traffic.
    assert recv_before <= host.net_recv_bytes_total <= recv_after
    assert sent_before <= host.net_sent_bytes_total <= sent_after
    assert host.net_errors_total >= 0
    assert host.net_drops_total >= 0
    if psutil.disk_io_counters() is not None:
        assert host.disk_read_bytes_total is not None
        assert host.disk_read_bytes_total >= 0
    assert msgspec.json.decode(msgspec.json.encode(host), type=HostSample) == host


def test_counters_rise_and_cpu_is_measured_between_samples() -> None:
    collector = HostCollector()
    first = collector.sample()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # keep one core busy for a moment
        pass
    second = collector.sample()
    assert second.net_recv_bytes_total >= first.net_recv_bytes_total
    assert second.cpu_pct > 0.0


def test_disk_path_is_the_filesystem_reported(tmp_path: Path) -> None:
    host = HostCollector(disk_path=str(tmp_path)).sample()
    vfs = os.statvfs(tmp_path)
    assert host.disk_path == str(tmp_path)
    assert host.disk_total_bytes == vfs.f_blocks * vfs.f_frsize


def test_a_missing_disk_path_fails_at_construction(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-mount")
    with pytest.raises(FileNotFoundError, match="disk_path does not exist") as info:
        HostCollector(disk_path=missing)
    assert info.value.filename == missing
    assert missing in str(info.value)


def test_no_disk_io_counters_means_none_not_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    # Some containers have no /proc/diskstats; psutil then answers None.
    monkeypatch.setattr(psutil, "disk_io_counters", lambda **_: None)
    host = HostCollector().sample()
    assert host.disk_read_bytes_total is None
    assert host.disk_write_bytes_total is None
