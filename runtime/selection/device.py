"""Which device this is: `probe()`, simulated devices, and the per-platform probe report.

Probe order is fixed: a simulated device first, then the installed platform packs in the order
they declare (`Platform.probe_order`: ROCm before CUDA, because ROCm builds of PyTorch also answer
`torch.cuda.is_available()`; the CPU, which always answers, last). Each pack's probe raises
`PlatformUnavailable(reason)` when its stack is absent or broken; the reason is kept for
`attnrt info`, never turned into a crash.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from functools import cache

import torch

from attnrt.errors import DeviceSpecError
from attnrt.selection import packs


class PlatformUnavailable(Exception):
    """Raised by a platform probe; its message is the reason shown by `attnrt info`."""


@dataclass(frozen=True)
class Device:
    """A probed or simulated device. Hashable: part of the decision cache key."""

    platform: str
    arch: str
    name: str = ""
    memory_bytes: int | None = field(default=None, compare=False)
    # Compared (and hashed): selection may read versions, e.g. MPS bf16 needs macOS 14.
    versions: tuple[tuple[str, str], ...] = ()
    simulated: bool = False
    # A simulated device's plan is the real device's: the packages its backends import are
    # assumed installed there, not looked up here (ATTNRT_SIMULATED_PACKAGES=local looks).
    packages_assumed: bool = False

    def describe(self) -> str:
        tag = " (simulated)" if self.simulated else ""
        return f"{self.platform}:{self.arch} {self.name}".rstrip() + tag

    def to_dict(self) -> dict[str, object]:
        return {"platform": self.platform, "arch": self.arch, "name": self.name,
                "memory_bytes": self.memory_bytes, "versions": dict(self.versions),
                "simulated": self.simulated,
                **({"packages": "assumed installed"} if self.packages_assumed else {})}


def torch_versions() -> tuple[tuple[str, str], ...]:
    return (("torch", torch.__version__),)


def parse_device_spec(spec: str) -> Device:
    """'cuda:sm90', 'rocm:gfx942', 'npu:ascend910b', 'mps', 'cpu' -> a simulated Device.

    The platform is any installed pack's name; without an arch, the pack's default_arch."""
    name, _, arch = spec.strip().lower().partition(":")
    if name not in packs.names():
        examples = ", ".join(f"{p.name}:{p.default_arch}" for p in packs.installed())
        raise DeviceSpecError(f"device={spec!r} names an unknown platform; allowed: "
                              f"{', '.join(packs.names())} (e.g. {examples})")
    platform = packs.get(name)
    arch = arch or platform.default_arch
    if not platform.is_arch(arch):
        raise DeviceSpecError(f"device={spec!r}: arch {arch!r} is not a {name} arch; "
                              f"allowed pattern: {platform.arch_pattern}")
    return Device(name, arch, name="", versions=torch_versions(), simulated=True,
                  packages_assumed=_packages_assumed())


SIMULATED_PACKAGES_ENV = "ATTNRT_SIMULATED_PACKAGES"


def _packages_assumed() -> bool:
    """ATTNRT_SIMULATED_PACKAGES: unset or "assumed" (a simulated device's backends find their
    packages installed), or "local" (checked against what is installed on this machine)."""
    value = os.environ.get(SIMULATED_PACKAGES_ENV, "assumed").strip().lower() or "assumed"
    if value not in ("assumed", "local"):
        raise DeviceSpecError(f"{SIMULATED_PACKAGES_ENV}={value!r} is not allowed; allowed: "
                              "assumed (the default) or local")
    return value == "assumed"


_SIMULATED: ContextVar[Device | None] = ContextVar("attnrt_simulated_device", default=None)


@contextlib.contextmanager
def simulated_device(spec: str | Device) -> Iterator[Device]:
    """Within the block, `probe()` answers this simulated device (e.g. 'cuda:sm90')."""
    device = spec if isinstance(spec, Device) else parse_device_spec(spec)
    if not device.simulated:
        device = replace(device, simulated=True)
    token = _SIMULATED.set(device)
    try:
        yield device
    finally:
        _SIMULATED.reset(token)


def probe() -> Device:
    """The device attention runs on: simulated if asked, else the first platform that answers."""
    sim = _SIMULATED.get()
    if sim is not None:
        return sim
    env = os.environ.get("ATTNRT_DEVICE")
    if env:
        return parse_device_spec(env)
    return _probe_real()


@cache
def _probe_real() -> Device:
    for platform in packs.names():
        with contextlib.suppress(PlatformUnavailable):
            return probe_platform(platform)
    raise RuntimeError("no platform answered; the cpu pack's probe cannot fail")  # pragma: no cover


@cache
def probe_platform(platform: str) -> Device:
    """Run one pack's probe; raises PlatformUnavailable with the pack's reason."""
    module = importlib.import_module(f"attnrt.platforms.{platform}.probe")
    return module.probe()


def probe_report() -> list[tuple[str, Device | None, str]]:
    """(platform, device or None, reason) for every platform, in probe order, for `attnrt info`."""
    rows: list[tuple[str, Device | None, str]] = []
    for platform in packs.names():
        try:
            rows.append((platform, probe_platform(platform), "available"))
        except PlatformUnavailable as exc:
            rows.append((platform, None, str(exc)))
    return rows


def device_for_tensor(tensor_device: torch.device) -> Device:
    """The Device a tensor lives on, for re-selection when it differs from a layer's device."""
    for platform in packs.for_torch_type(tensor_device.type):
        with contextlib.suppress(PlatformUnavailable):
            return probe_platform(platform)
    raise DeviceSpecError(f"tensor device={tensor_device} is on no platform attnrt knows; "
                          f"allowed: {', '.join(packs.torch_types())}")


def platform_of_tensor(tensor_device: torch.device) -> tuple[str, ...]:
    """The platforms whose tensors have this device type, in probe order."""
    return packs.for_torch_type(tensor_device.type)


def torch_device_of(device: Device) -> torch.device | None:
    """Where tensors for a real `device` live now (None for a simulated one)."""
    return None if device.simulated else packs.get(device.platform).current_torch_device()


def clear_probe_cache() -> None:
    _probe_real.cache_clear()
    probe_platform.cache_clear()
    packs.clear_pack_cache()
