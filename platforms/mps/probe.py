"""Apple probe: torch.backends.mps. The macOS version decides bf16 support (14+).

The version goes into Device.versions as ("macos", "14.2"), where the backends' dtype checks read
it (`macos_version`); an unreadable version is recorded as "unknown", never a probe failure.
"""

from __future__ import annotations

import platform as host

import torch
from packaging.version import InvalidVersion, Version

from attnrt.selection.device import Device, PlatformUnavailable, torch_versions

UNKNOWN = "unknown"


def parse_mac_version(raw: str) -> str:
    """platform.mac_ver()[0] ('14.2.1', '15.0', '') -> '14.2.1', '15.0', 'unknown'."""
    text = raw.strip()
    try:
        parsed = Version(text)
    except InvalidVersion:
        return UNKNOWN
    return text if parsed.release and not parsed.local else UNKNOWN


def macos_version(device: Device) -> Version | None:
    """The device's macOS version, or None when the probe could not read one."""
    raw = dict(device.versions).get("macos")
    if raw is None or raw == UNKNOWN:
        return None
    try:
        return Version(raw)
    except InvalidVersion:
        return None


def probe() -> Device:
    if not torch.backends.mps.is_built():
        raise PlatformUnavailable(f"torch {torch.__version__} is built without MPS")
    if not torch.backends.mps.is_available():
        raise PlatformUnavailable("torch.backends.mps.is_available() is False (MPS needs macOS "
                                  "12.3+ on Apple silicon or an AMD GPU Mac)")
    mac = parse_mac_version(host.mac_ver()[0])
    return Device("mps", "apple", name=f"Apple {host.machine()}",
                  versions=(*torch_versions(), ("macos", mac)))
