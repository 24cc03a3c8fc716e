"""Ascend probe: torch_npu, imported here and nowhere at import time. Arch from the SoC name.

torch_npu registers `torch.npu` when imported, so it is imported first; a missing or broken CANN
install shows up as the import's own message.
"""

from __future__ import annotations

import importlib
import re

import torch

from attnrt.selection.device import Device, PlatformUnavailable, torch_versions

_SOC = re.compile(r"^\s*ascend\s*(\d{3})(.*)$", re.IGNORECASE)


def parse_soc_name(name: str) -> str:
    """The SoC name torch.npu.get_device_name() reports -> an attnrt arch.

    'Ascend910B3' -> 'ascend910b' (Atlas A2); 'Ascend310P3' -> 'ascend310p';
    'Ascend910_9392' -> 'ascend910c' (Atlas A3, sold as Ascend 910C);
    'Ascend910A', 'Ascend910ProB', 'Ascend910PremiumA' -> 'ascend910a' (first-generation 910:
    its "Pro B" is a board of that generation, not a 910B).
    """
    m = _SOC.match(name)
    if m is None:
        raise PlatformUnavailable(f"SoC name {name!r} is not an Ascend name such as Ascend910B3")
    digits, rest = m.group(1), m.group(2).strip().lower()
    if rest.startswith("_93"):
        variant = "c"
    elif rest.startswith(("pro", "premium")):
        variant = "a"
    else:
        variant = rest[:1] if rest[:1].isalpha() else ""
    return f"ascend{digits}{variant}"


def probe() -> Device:
    try:
        torch_npu = importlib.import_module("torch_npu")
    except (ImportError, OSError, RuntimeError) as exc:
        raise PlatformUnavailable(f"import torch_npu failed: {exc}") from None
    npu = getattr(torch, "npu", None)
    try:
        if npu is None or not npu.is_available():
            raise PlatformUnavailable("torch.npu.is_available() is False (no NPU or no CANN "
                                      "driver; check ASCEND_RT_VISIBLE_DEVICES and npu-smi)")
        name = str(npu.get_device_name(npu.current_device()))
    except RuntimeError as exc:  # a broken driver raises from inside the runtime
        raise PlatformUnavailable(f"Ascend device query failed: {exc}") from None
    versions = (*torch_versions(), ("torch_npu", str(getattr(torch_npu, "__version__", "?"))))
    return Device("npu", parse_soc_name(name), name=name, versions=versions)
