"""What a backend can run, declared as data, and the one generic check that turns it into reasons.

A backend class declares its limits beside its code (xformers style)::

    class FlashAttn3Backend(AttentionBackend):
        PLATFORMS = frozenset({"cuda"})
        ARCHS = ">=sm90"
        DTYPES = frozenset({"fp16", "bf16"})
        HEAD_SIZES = (64, 96, 128, 192, 256)
        PACKAGES = (Package("flash_attn_interface", dist="flash-attn-3", hint="..."),)

`check(backend_cls, request, device)` reads those attributes (defaults on AttentionBackend, so a
FastVideo-style backend that declares nothing still works) and returns a list of `Reason`s;
empty means "can serve".
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from packaging.version import InvalidVersion, Version

from attnrt.interfaces import AttentionBackend
from attnrt.selection import packs
from attnrt.selection.methods import alias_method
from attnrt.selection.ranges import ArchRange, describe_sizes

if TYPE_CHECKING:
    from attnrt.selection.device import Device
    from attnrt.selection.request import AttentionRequest

# Stable reason codes, for scripts that read `explain --json`.
PLATFORM = "PLATFORM"
ARCH = "ARCH"
DTYPE = "DTYPE"
HEAD_SIZE = "HEAD_SIZE"
CAUSAL = "CAUSAL"
GQA = "GQA"
PACKAGE_MISSING = "PACKAGE_MISSING"
VERSION_WINDOW = "VERSION_WINDOW"
NOT_ALLOWED = "NOT_ALLOWED"
RUNTIME = "RUNTIME"
COMPILE_FAILED = "COMPILE_FAILED"
NOT_REGISTERED = "NOT_REGISTERED"
NUM_HEADS = "NUM_HEADS"
METHOD = "METHOD"
BACKWARD = "BACKWARD"


@dataclass(frozen=True)
class Reason:
    """Why a backend refuses a request: a stable code, a sentence, and an optional hint."""

    code: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


@dataclass(frozen=True)
class Package:
    """An optional vendor package a backend needs, with its accepted version window [min, below)."""

    module: str
    dist: str | None = None
    min_version: str | None = None
    below_version: str | None = None
    hint: str = ""

    def window(self) -> str:
        parts = [f">={self.min_version}" if self.min_version else "",
                 f"<{self.below_version}" if self.below_version else ""]
        return ",".join(p for p in parts if p) or "any"


@dataclass(frozen=True)
class PackageStatus:
    module: str
    version: str | None
    reason: Reason | None


@cache
def package_status(pkg: Package) -> PackageStatus:
    """Import `pkg.module` once and check its version; the exception text becomes the reason."""
    hint = pkg.hint or f"pip install {pkg.dist or pkg.module}"
    try:
        module = importlib.import_module(pkg.module)
    except (ImportError, OSError, RuntimeError) as exc:  # broken CUDA extensions raise OSError
        message = f"import {pkg.module} failed: {exc}"
        return PackageStatus(pkg.module, None, Reason(PACKAGE_MISSING, message, hint))
    version = _installed_version(pkg, module)
    if version is None or (pkg.min_version is None and pkg.below_version is None):
        return PackageStatus(pkg.module, version, None)
    try:
        parsed = Version(version)
    except InvalidVersion:
        message = f"{pkg.module} version {version!r} cannot be parsed; required {pkg.window()}"
        return PackageStatus(pkg.module, version, Reason(VERSION_WINDOW, message, hint))
    too_old = pkg.min_version is not None and parsed < Version(pkg.min_version)
    too_new = pkg.below_version is not None and parsed >= Version(pkg.below_version)
    if too_old or too_new:
        message = f"{pkg.module} {version} is outside the supported window {pkg.window()}"
        return PackageStatus(pkg.module, version, Reason(VERSION_WINDOW, message, hint))
    return PackageStatus(pkg.module, version, None)


def _installed_version(pkg: Package, module: Any) -> str | None:
    if pkg.dist:
        try:
            return importlib.metadata.version(pkg.dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    version = getattr(module, "__version__", None)
    return str(version) if version is not None else None


def declared(backend_cls: type, attr: str) -> Any:
    """A backend's declared capability attribute, or AttentionBackend's default (which means
    "any") where the class, e.g. a FastVideo backend that does not subclass it, declares none."""
    value = getattr(backend_cls, attr, None)
    if attr == "METHODS" and value is None:
        # A FastVideo backend declares no method: its name tells (VIDEO_SPARSE_ATTN is vsa).
        alias = alias_method(getattr(backend_cls, "get_name", str)())
        return frozenset({alias}) if alias else AttentionBackend.METHODS
    if value is None and not hasattr(backend_cls, attr):
        value = getattr(AttentionBackend, attr)
    if attr == "HEAD_SIZES" and value is None:
        getter = getattr(backend_cls, "get_supported_head_sizes", None)  # FastVideo's spelling
        return tuple(getter()) if callable(getter) else None
    return value


def check(backend_cls: Any, request: AttentionRequest, device: Device) -> list[Reason]:
    """Every reason `backend_cls` cannot serve `request` on `device`; empty when it can."""
    name = backend_cls.get_name()
    reasons = _declared_reasons(backend_cls, name, request, device)
    if reasons and reasons[0].code == METHOD:
        return reasons  # another computation: its packages and platform do not matter
    for pkg in () if device.packages_assumed else declared(backend_cls, "PACKAGES"):
        status = package_status(pkg)
        if status.reason is not None:
            reasons.append(status.reason)
    if not reasons:
        reasons.extend(_platform_reasons(request, device, name))
    extra = getattr(backend_cls, "extra_reasons", None)
    if callable(extra) and not reasons:
        reasons.extend(extra(request, device))
    return reasons


def check_device(backend_cls: Any, name: str, request: AttentionRequest,
                 device: Device) -> list[Reason]:
    """Only the platform and arch reasons: whether `backend_cls` runs on `device` at all."""
    return [r for r in _declared_reasons(backend_cls, name, request, device)
            if r.code in (PLATFORM, ARCH)]


def _platform_reasons(request: AttentionRequest, device: Device, name: str) -> list[Reason]:
    """Limits of a platform's stack that bind every backend on it (e.g. MPS: bf16 needs macOS 14),
    from the pack's optional `platform_reasons(request, device, name)`."""
    hook = packs.pack_hook(device.platform, "platform_reasons")
    return list(hook(request, device, name)) if hook is not None else []


def _declared_reasons(cls: type, name: str, request: AttentionRequest,
                      device: Device) -> list[Reason]:
    methods = declared(cls, "METHODS")
    if request.method not in methods:
        # Nothing else matters: this backend computes something else.
        return [Reason(METHOD, f"method={request.method} is not implemented by {name}; it "
                               f"implements: {', '.join(sorted(methods))}")]
    return _limit_reasons(cls, name, request, device)


def _limit_reasons(cls: type, name: str, request: AttentionRequest,
                   device: Device) -> list[Reason]:
    reasons = []
    platforms = declared(cls, "PLATFORMS")
    if platforms is not None and device.platform not in platforms:
        reasons.append(Reason(PLATFORM, f"platform={device.platform} is not supported by {name}; "
                                        f"supported: {', '.join(sorted(platforms))}"))
        return reasons  # arch and the rest mean nothing on a foreign platform
    archs = declared(cls, "ARCHS")
    if archs is not None and not ArchRange.parse(archs).contains(device.platform, device.arch):
        reasons.append(Reason(ARCH, f"arch={device.arch} is not supported by {name}; "
                                    f"supported: {ArchRange.parse(archs)}"))
    dtypes = declared(cls, "DTYPES")
    if request.dtype not in dtypes:
        reasons.append(Reason(DTYPE, f"dtype={request.dtype} is not supported by {name}; "
                                     f"supported: {', '.join(sorted(dtypes))}"))
    sizes: Collection[int] | None = declared(cls, "HEAD_SIZES")
    if sizes is not None and request.head_size not in sizes:
        reasons.append(Reason(HEAD_SIZE, f"head_size={request.head_size} is not supported by "
                                         f"{name}; supported: {describe_sizes(sizes)}"))
    if request.causal and not declared(cls, "SUPPORTS_CAUSAL"):
        reasons.append(Reason(CAUSAL, f"causal=True is not supported by {name}; supported: False"))
    backward = declared(cls, "BACKWARD_PLATFORMS")
    if request.grad and backward is not None and device.platform not in backward:
        reasons.append(Reason(BACKWARD, f"grad=True (a call under autograd) is not supported by "
                                        f"{name} on platform={device.platform}: it has no "
                                        f"backward there; supported: grad=False, or platforms "
                                        f"{', '.join(sorted(backward)) or '(none)'}",
                              "run under torch.no_grad() for inference"))
    if request.is_gqa and not declared(cls, "SUPPORTS_GQA"):
        reasons.append(Reason(GQA, f"num_kv_heads={request.num_kv_heads} < num_heads="
                                   f"{request.num_heads} (GQA) is not supported by {name}"))
    return reasons
