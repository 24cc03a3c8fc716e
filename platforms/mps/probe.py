"""Apple probe: torch.backends.mps. The macOS version decides bf16 support (14+)."""

from __future__ import annotations

import platform as host

import torch

from attnrt.device import Device, PlatformUnavailable, torch_versions


def probe() -> Device:
    if not torch.backends.mps.is_built():
        raise PlatformUnavailable(f"torch {torch.__version__} is built without MPS")
    if not torch.backends.mps.is_available():
        raise PlatformUnavailable("torch.backends.mps.is_available() is False (not macOS 12.3+ "
                                  "on Apple silicon)")
    mac = host.mac_ver()[0] or "unknown"
    return Device("mps", "apple", name=f"Apple {host.machine()}",
                  versions=(*torch_versions(), ("macos", mac)))
