"""Which device this is: `probe()`, simulated devices, and the per-platform probe report.

Probe order is fixed (see `PROBE_ORDER`): a simulated device first, then ROCm before CUDA, because
ROCm builds of PyTorch also answer `torch.cuda.is_available()`; then Ascend, Apple, and the CPU,
which always answers. Each platform pack's probe raises `PlatformUnavailable(reason)` when its stack
is absent or broken; the reason is kept for `attnrt info`, never turned into a crash.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from functools import cache

import torch

from attnrt.errors import DeviceSpecError

PLATFORMS = ("cuda", "rocm", "npu", "mps", "cpu")
# ROCm before CUDA: a HIP build answers torch.cuda too, so it must be told apart first.
PROBE_ORDER = ("rocm", "cuda", "npu", "mps", "cpu")
_TORCH_DEVICE_TYPES = {"cuda": ("rocm", "cuda"), "npu": ("npu",), "mps": ("mps",), "cpu": ("cpu",)}
ARCH_PATTERNS = {
    "cuda": re.compile(r"^sm\d{2,3}[a-z]?$"),
    "rocm": re.compile(r"^gfx[0-9]{1,2}[0-9a-f]{2}$"),
    "npu": re.compile(r"^ascend[0-9]{3}[a-z0-9]*$"),
    "mps": re.compile(r"^apple$"),
    "cpu": re.compile(r"^(x86_64|aarch64|ppc64le|s390x|riscv64)$"),
}
DEFAULT_ARCH = {"cuda": "sm90", "rocm": "gfx942", "npu": "ascend910b", "mps": "apple"}


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

    def describe(self) -> str:
        tag = " (simulated)" if self.simulated else ""
        return f"{self.platform}:{self.arch} {self.name}".rstrip() + tag

    def to_dict(self) -> dict[str, object]:
        return {"platform": self.platform, "arch": self.arch, "name": self.name,
                "memory_bytes": self.memory_bytes, "versions": dict(self.versions),
                "simulated": self.simulated}


def torch_versions() -> tuple[tuple[str, str], ...]:
    return (("torch", torch.__version__),)


def parse_device_spec(spec: str) -> Device:
    """'cuda:sm90', 'rocm:gfx942', 'npu:ascend910b', 'mps', 'cpu' -> a simulated Device."""
    platform, _, arch = spec.strip().lower().partition(":")
    if platform not in PLATFORMS:
        raise DeviceSpecError(f"device={spec!r} names an unknown platform; allowed: "
                              f"{', '.join(PLATFORMS)} (e.g. cuda:sm90, rocm:gfx942, cpu)")
    arch = arch or DEFAULT_ARCH.get(platform) or _host_arch()
    if not ARCH_PATTERNS[platform].match(arch):
        raise DeviceSpecError(f"device={spec!r}: arch {arch!r} is not a {platform} arch; "
                              f"allowed pattern: {ARCH_PATTERNS[platform].pattern}")
    return Device(platform, arch, name="",
                  versions=torch_versions(), simulated=True)


def _host_arch() -> str:
    import platform as host

    machine = host.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


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
    for platform in PROBE_ORDER:
        with contextlib.suppress(PlatformUnavailable):
            return probe_platform(platform)
    raise RuntimeError("the cpu probe cannot fail")  # pragma: no cover


@cache
def probe_platform(platform: str) -> Device:
    """Run one pack's probe; raises PlatformUnavailable with the pack's reason."""
    module = importlib.import_module(f"attnrt.platforms.{platform}.probe")
    return module.probe()


def probe_report() -> list[tuple[str, Device | None, str]]:
    """(platform, device or None, reason) for every platform, in probe order, for `attnrt info`."""
    rows: list[tuple[str, Device | None, str]] = []
    for platform in PROBE_ORDER:
        try:
            rows.append((platform, probe_platform(platform), "available"))
        except PlatformUnavailable as exc:
            rows.append((platform, None, str(exc)))
    return rows


def device_for_tensor(tensor_device: torch.device) -> Device:
    """The Device a tensor lives on, for re-selection when it differs from a layer's device."""
    for platform in _TORCH_DEVICE_TYPES.get(tensor_device.type, ()):
        with contextlib.suppress(PlatformUnavailable):
            return probe_platform(platform)
    raise DeviceSpecError(f"tensor device={tensor_device} is on no platform attnrt knows; "
                          f"allowed: {', '.join(_TORCH_DEVICE_TYPES)}")


def platform_of_tensor(tensor_device: torch.device) -> tuple[str, ...]:
    return _TORCH_DEVICE_TYPES.get(tensor_device.type, ())


def clear_probe_cache() -> None:
    _probe_real.cache_clear()
    probe_platform.cache_clear()
