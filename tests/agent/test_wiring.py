"""Start-up wiring: which GPU identities replicas are given."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_ops_helper.agent import config as agent_config
from llm_ops_helper.agent import wiring
from llm_ops_helper.agent.collectors.nvml import NvmlUnavailable
from llm_ops_helper.agent.replicas.process import gpu_env


@pytest.mark.parametrize("backend", ["auto", "simulated"])
def test_simulated_gpus_are_handed_to_replicas_by_index_never_by_their_made_up_uuid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    def no_nvml(host: str) -> None:
        raise NvmlUnavailable("no driver")

    monkeypatch.setattr(wiring.NvmlCollector, "open", no_nvml)
    toml = tmp_path / "agent.toml"
    toml.write_text(f'[broker]\nhost = "localhost"\n[gpus]\nbackend = "{backend}"\n'
                    f'[supervisor]\nstate_dir = "{tmp_path / "state"}"\n')
    config = agent_config.load(str(toml))
    gpus = wiring.build_gpus(config)
    assert gpus is not None and gpus.inventory()[0].uuid.startswith("GPU-")
    supervisor = wiring.build_supervisor(config, gpus)
    assert not supervisor.gpu_uuids
    assert gpu_env([1], gpus.inventory(), uuids=supervisor.gpu_uuids) == {
        "CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
