"""The installed platform packs and the facts each declares about its platform.

A pack is a subpackage of `attnrt.platforms` (platforms/<name>/ in the source tree) whose
`__init__.py` declares `PLATFORM = Platform(...)`: name, probe order, arch pattern and order,
default arch for simulation, torch device types, torch.distributed backend and its backends
table. By convention its `probe.py` holds `probe() -> Device`, and its `__init__.py` may define
`platform_reasons(request, device, name)` for limits of the platform's stack that bind every
backend on it. The core lists the packs (every subpackage on `attnrt.platforms.__path__`) and
builds its platform tables from them; it names no platform itself, so adding a folder under
platforms/ adds a platform.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import Any

import torch

from attnrt.errors import DeviceSpecError, RegistryError


@dataclass(frozen=True)
class Platform:
    """What the core knows of one platform, declared once as data in its pack's __init__.py.

    arch_pattern: a regex an arch name of this platform matches in full (lowercase). Where
    `arch_bases` is given, the pattern's groups are the arch's order key, read in those bases
    (CUDA "sm(\\d{2,3})[a-z]?" with (10,): sm80 < sm90 < sm100); () means arches have no order
    and arch ranges such as ">=x" cannot name them.
    default_arch: the arch a simulated device gets when the spec names none ("cuda" -> sm90).
    torch_device_types: torch.device types of tensors on this platform ("cuda" for ROCm too).
    indexed: whether those devices carry an index (torch.<type>.current_device(), set_device).
    dist_backend: torch.distributed backend for sequence parallelism (None: torch picks).
    backends: backend name -> lazy "module:Class", the pack's own backends.
    """

    name: str
    probe_order: int
    arch_pattern: str
    arch_bases: tuple[int, ...] = ()
    default_arch: str = ""
    torch_device_types: tuple[str, ...] = ()
    indexed: bool = False
    dist_backend: str | None = None
    backends: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    _arch_re: re.Pattern[str] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        regex = re.compile(self.arch_pattern)
        if self.arch_bases and regex.groups != len(self.arch_bases):
            raise RegistryError(f"platform {self.name}: arch_pattern {self.arch_pattern!r} has "
                                f"{regex.groups} groups; arch_bases gives {len(self.arch_bases)}")
        object.__setattr__(self, "_arch_re", regex)

    def is_arch(self, arch: str) -> bool:
        return self._arch_re.fullmatch(arch.lower()) is not None

    def arch_key(self, arch: str) -> tuple[int, ...] | None:
        """The arch's order key, or None where it is no arch of this platform or has no order."""
        m = self._arch_re.fullmatch(arch.lower()) if self.arch_bases else None
        if m is None:
            return None
        return tuple(int(g, base) for g, base in zip(m.groups(), self.arch_bases, strict=True))

    def current_torch_device(self) -> torch.device:
        """The torch.device tensors of this platform live on now (the current index, if any)."""
        kind = self.torch_device_types[0]
        if not self.indexed:
            return torch.device(kind)
        return torch.device(kind, getattr(torch, kind).current_device())


def _root_path() -> list[str]:
    import attnrt.platforms

    return list(attnrt.platforms.__path__)


@cache
def _installed(path: tuple[str, ...]) -> tuple[Platform, ...]:
    found: list[Platform] = []
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda i: i.name):
        if not info.ispkg:
            continue
        facts = getattr(pack_module(info.name), "PLATFORM", None)
        if not isinstance(facts, Platform) or facts.name != info.name:
            raise RegistryError(f"platform pack attnrt.platforms.{info.name} must declare "
                                f"PLATFORM = Platform(name={info.name!r}, ...) in its __init__.py")
        found.append(facts)
    return tuple(sorted(found, key=lambda p: (p.probe_order, p.name)))


def installed() -> tuple[Platform, ...]:
    """Every installed pack's Platform, in probe order."""
    return _installed(tuple(_root_path()))


def names() -> tuple[str, ...]:
    """Platform names in probe order."""
    return tuple(p.name for p in installed())


def get(name: str) -> Platform:
    """The Platform named `name`; DeviceSpecError names the installed ones otherwise."""
    for platform in installed():
        if platform.name == name:
            return platform
    raise DeviceSpecError(f"platform={name!r} is not installed; installed: {', '.join(names())}")


def pack_module(name: str) -> ModuleType:
    """The pack's package, attnrt.platforms.<name> (imports only its small __init__.py)."""
    return importlib.import_module(f"attnrt.platforms.{name}")


def pack_hook(name: str, hook: str) -> Any:
    """An optional function the pack's __init__.py defines (e.g. platform_reasons), or None."""
    found = getattr(pack_module(name), hook, None)
    return found if callable(found) else None


def for_torch_type(torch_type: str) -> tuple[str, ...]:
    """Platforms whose tensors have this torch.device type, in probe order."""
    return tuple(p.name for p in installed() if torch_type in p.torch_device_types)


def torch_types() -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for p in installed() for t in p.torch_device_types))


def arch_order(arch: str) -> tuple[str, tuple[int, ...]] | None:
    """(platform, sortable key) for an arch name that has an order, else None."""
    for platform in installed():
        key = platform.arch_key(arch)
        if key is not None:
            return platform.name, key
    return None


def ordered_examples() -> str:
    """'sm90 (cuda), gfx942 (rocm)': the default arch of each platform whose arches compare."""
    return ", ".join(f"{p.default_arch} ({p.name})" for p in installed() if p.arch_bases)


def clear_pack_cache() -> None:
    _installed.cache_clear()
