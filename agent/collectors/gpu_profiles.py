"""What a simulated GPU looks like, per board, taken from real ``nvidia-smi -q -x`` dumps.

Each profile that names a ``dump`` was read off that file in ``shared/data/nvidia-smi/``, and
``tests/agent/test_simulated.py`` parses the dumps and checks the values still match. The
profiles without a dump (H100, H200) come from NVIDIA's datasheets and commonly seen
``nvidia-smi`` output; their idle readings are estimates, and ``notes`` says so.

What a board reports matters as much as the numbers: pre-Ampere boards (T4) retire pages and
have no row remapper; Ampere and newer (A10G, A100, Ada, Hopper) remap rows and report no
retired pages; a board with ECC off (the RTX 4000 SFF Ada in its dump) has no ECC counters.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GpuProfile:
    key: str
    name: str
    memory_total_mib: int
    power_limit_default_w: float
    power_limit_min_w: float
    power_limit_max_w: float
    sm_clock_max_mhz: int
    ecc_enabled: bool
    # Pre-Ampere page retirement (nvmlDeviceGetRetiredPages) vs Ampere+ row remapping.
    page_retirement: bool
    row_remapping: bool
    # The dump's readings at rest: the simulator's starting point.
    idle_temperature_c: float
    idle_power_w: float
    idle_sm_clock_mhz: int
    idle_memory_used_mib: int
    # Software thermal slowdown starts above ``max_operating``, hardware slowdown at ``slowdown``
    # (nvidia-smi's gpu_temp_max_gpu_threshold and gpu_temp_slow_threshold). None where the
    # dump gives only T.Limit-relative thresholds.
    max_operating_temperature_c: float | None
    slowdown_temperature_c: float | None
    dump: str | None = None
    notes: str = ""

    @property
    def memory_total_bytes(self) -> int:
        return self.memory_total_mib * MIB


PROFILES: dict[str, GpuProfile] = {
    p.key: p
    for p in (
        GpuProfile(
            key="a100-sxm4-80gb",
            name="NVIDIA A100-SXM4-80GB",
            memory_total_mib=81920,
            power_limit_default_w=500.0,
            power_limit_min_w=100.0,
            power_limit_max_w=500.0,
            sm_clock_max_mhz=1410,
            ecc_enabled=True,
            page_retirement=False,
            row_remapping=True,
            idle_temperature_c=27.0,
            idle_power_w=67.03,
            idle_sm_clock_mhz=1275,
            idle_memory_used_mib=50,
            max_operating_temperature_c=85.0,
            slowdown_temperature_c=89.0,
            dump="a100-sxm4-v12.xml",
            notes=(
                "The dump was taken with MIG enabled, so it reads N/A for whole-GPU utilisation "
                "and for remapped rows. The profile simulates the board with MIG off: "
                "utilisation reported and row remapping on (the A100 introduced it)."
            ),
        ),
        GpuProfile(
            key="a10g",
            name="NVIDIA A10G",
            memory_total_mib=23028,
            power_limit_default_w=300.0,
            power_limit_min_w=100.0,
            power_limit_max_w=300.0,
            sm_clock_max_mhz=1710,
            ecc_enabled=True,
            page_retirement=False,
            row_remapping=True,
            idle_temperature_c=17.0,
            idle_power_w=25.58,
            idle_sm_clock_mhz=210,
            idle_memory_used_mib=22,
            max_operating_temperature_c=88.0,
            slowdown_temperature_c=95.0,
            dump="a10g.xml",
        ),
        GpuProfile(
            key="t4",
            name="Tesla T4",
            memory_total_mib=15360,
            power_limit_default_w=70.0,
            power_limit_min_w=60.0,
            power_limit_max_w=70.0,
            sm_clock_max_mhz=1590,
            ecc_enabled=True,
            page_retirement=True,
            row_remapping=False,
            idle_temperature_c=40.0,
            idle_power_w=26.78,
            idle_sm_clock_mhz=585,
            idle_memory_used_mib=1032,
            max_operating_temperature_c=85.0,
            slowdown_temperature_c=93.0,
            dump="tesla-t4.xml",
        ),
        GpuProfile(
            key="rtx-4000-sff-ada",
            name="NVIDIA RTX 4000 SFF Ada Generation",
            memory_total_mib=20475,
            power_limit_default_w=70.0,
            power_limit_min_w=30.0,
            power_limit_max_w=70.0,
            sm_clock_max_mhz=3105,
            ecc_enabled=False,
            page_retirement=False,
            row_remapping=True,
            idle_temperature_c=38.0,
            idle_power_w=8.81,
            idle_sm_clock_mhz=210,
            idle_memory_used_mib=3534,
            max_operating_temperature_c=None,
            slowdown_temperature_c=None,
            dump="rtx-4000-sff-ada-v13.xml",
            notes=(
                "ECC is off in the dump (no ECC counters) yet the row remapper still reports. "
                "Idle power is the dump's average_power_draw; its memory use includes a desktop."
            ),
        ),
        GpuProfile(
            key="h100-sxm5-80gb",
            name="NVIDIA H100 80GB HBM3",
            memory_total_mib=81559,
            power_limit_default_w=700.0,
            power_limit_min_w=200.0,
            power_limit_max_w=700.0,
            sm_clock_max_mhz=1980,
            ecc_enabled=True,
            page_retirement=False,
            row_remapping=True,
            idle_temperature_c=30.0,
            idle_power_w=70.0,
            idle_sm_clock_mhz=345,
            idle_memory_used_mib=1,
            max_operating_temperature_c=87.0,
            slowdown_temperature_c=90.0,
            notes=(
                "Not from a dump: limits and clocks from NVIDIA's datasheet and typical "
                "nvidia-smi output; idle readings and thermal thresholds are estimates."
            ),
        ),
        GpuProfile(
            key="h200-sxm-141gb",
            name="NVIDIA H200",
            memory_total_mib=143771,
            power_limit_default_w=700.0,
            power_limit_min_w=200.0,
            power_limit_max_w=700.0,
            sm_clock_max_mhz=1980,
            ecc_enabled=True,
            page_retirement=False,
            row_remapping=True,
            idle_temperature_c=30.0,
            idle_power_w=75.0,
            idle_sm_clock_mhz=345,
            idle_memory_used_mib=1,
            max_operating_temperature_c=87.0,
            slowdown_temperature_c=90.0,
            notes=(
                "Not from a dump: limits and clocks from NVIDIA's datasheet and typical "
                "nvidia-smi output; idle readings and thermal thresholds are estimates."
            ),
        ),
    )
}


def get_profile(key: str) -> GpuProfile:
    """The profile named ``key``; a ValueError listing the known ones if there is none."""
    try:
        return PROFILES[key]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown GPU profile {key!r} (known: {known})") from None
