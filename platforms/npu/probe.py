"""Ascend probe: torch_npu, imported here and nowhere at import time. Arch from the SoC name."""

from __future__ import annotations

import importlib
import re

import torch

from attnrt.device import Device, PlatformUnavailable, torch_versions

_SOC = re.compile(r"ascend\s*(\d{3})([a-z]?)", re.IGNORECASE)


def parse_soc_name(name: str) -> str:
    """'Ascend910B3' -> 'ascend910b'; 'Ascend310P3' -> 'ascend310p'."""
    m = _SOC.search(name)
    if m is None:
        raise PlatformUnavailable(f"SoC name {name!r} is not an Ascend name such as Ascend910B3")
    return f"ascend{m.group(1)}{m.group(2).lower()}"


def probe() -> Device:
    try:
        torch_npu = importlib.import_module("torch_npu")
    except (ImportError, OSError, RuntimeError) as exc:
        raise PlatformUnavailable(f"import torch_npu failed: {exc}") from None
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        raise PlatformUnavailable("torch.npu.is_available() is False (no NPU or no CANN driver)")
    name = str(npu.get_device_name(npu.current_device()))
    versions = (*torch_versions(), ("torch_npu", str(getattr(torch_npu, "__version__", "?"))))
    return Device("npu", parse_soc_name(name), name=name, versions=versions)
