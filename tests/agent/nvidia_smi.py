"""Reading the real ``nvidia-smi -q -x`` dumps in ../shared/data/nvidia-smi, for golden tests."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

DUMPS = Path(__file__).parents[2].parent / "shared" / "data" / "nvidia-smi"


def dump(name: str) -> ET.Element:
    path = DUMPS / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: these tests read real nvidia-smi dumps from the "
                    "shared/ folder, which must sit beside the repository")
    gpu = ET.parse(path).getroot().find("gpu")
    assert gpu is not None, f"{path} holds no <gpu>"
    return gpu


def text(gpu: ET.Element, *paths: str) -> str | None:
    """The first of ``paths`` present; None where it reads N/A (or is deprecated)."""
    for path in paths:
        element = gpu.find(path)
        if element is not None:
            value = (element.text or "").strip()
            return None if value == "N/A" or value.startswith("Requested functionality") else value
    return None


def number(gpu: ET.Element, *paths: str) -> float | None:
    """A quantity such as ``81920 MiB`` or ``67.03 W``, without its unit."""
    value = text(gpu, *paths)
    return None if value is None else float(value.split()[0])


def integer(gpu: ET.Element, *paths: str) -> int | None:
    value = number(gpu, *paths)
    return None if value is None else int(value)
