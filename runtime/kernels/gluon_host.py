"""Host-side checks and the import switch shared by attnrt's Gluon sm90 paths (the dense and
block-sparse flash kernels, the engine's generated forward). Importing this needs torch alone.

Shapes: tensors read by TMA are [B, L, Hx, D] (L rows of Hx heads of D elements), read as the
2D tensor [B * L, Hx * D].
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

INT32 = 2**31  # the first offset (in elements) that int32 arithmetic cannot reach


def device_reason(q: torch.Tensor) -> str | None:
    """Why q's device cannot run a Gluon sm90 kernel (not CUDA, ROCm, or not compute
    capability 9.0), or None."""
    if not q.is_cuda or torch.version.hip is not None:
        return f"device={q.device} (supported: CUDA sm90)"
    from attnrt.kernels import capability

    if capability(q.device) != (9, 0):
        return f"compute capability={capability(q.device)} (supported: (9, 0))"
    return None


DTYPES = (torch.float16, torch.bfloat16)  # what the Gluon kernels' wgmma operands take


def dtype_reason(q: torch.Tensor) -> str | None:
    """Why q's dtype cannot run a Gluon sm90 kernel, or None."""
    if q.dtype not in DTYPES:
        return f"dtype={q.dtype} (supported: {', '.join(map(str, DTYPES))})"
    return None


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset any index of t reaches from its first element."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))


def tma_readable(t: torch.Tensor) -> bool:
    """Whether [B, L, Hx, D] t can be read by TMA as [B * L, Hx * D] with int32 offsets."""
    from attnrt.kernels import reads_as_2d

    return reads_as_2d(t) and t.numel() < INT32


def tma_reason(named: tuple[tuple[str, torch.Tensor], ...]) -> str | None:
    """Why the first of these (name, [B, L, Hx, D] tensor) pairs that TMA cannot read as
    [B * L, Hx * D] with int32 offsets cannot, or None where all can."""
    for name, t in named:
        if not tma_readable(t):
            return (f"{name} with shape {tuple(t.shape)}, strides {t.stride()} cannot be read "
                    "by TMA as [B * L, Hx * D] with int32 offsets")
    return None


class GluonSwitch:
    """The Gluon modules of one path by kind ("forward", "backward"), each imported on first
    use. One that does not import with the installed Triton, or whose kernel fails to compile,
    is turned off for the process with one WARNING naming the reason.

    owner: the name the WARNING opens with; package: where the modules live; modules: kind ->
    module name in package (empty where the caller builds its own modules and uses only the
    turned-off state)."""

    def __init__(self, owner: str, package: str = "", modules: dict[str, str] | None = None):
        self.owner = owner
        self.package = package
        self.modules = dict(modules or {})
        self.loaded: dict[str, ModuleType | None] = {}  # kind -> module, or None once off
        self.off: dict[str, str] = {}  # kind -> why it was turned off

    def module(self, kind: str) -> ModuleType | None:
        """The Gluon module of `kind`, or None where it is off."""
        if kind not in self.loaded:
            try:
                self.loaded[kind] = importlib.import_module(
                    f"{self.package}.{self.modules[kind]}")
            except Exception as exc:  # noqa: BLE001 (an optional fast path: any import failure)
                import triton

                self.turn_off(kind, f"it does not import with Triton {triton.__version__}: "
                                    f"{exc!r}")
        return self.loaded[kind]

    def turn_off(self, kind: str, why: str) -> None:
        """Stop using the Gluon `kind` in this process, saying why once."""
        self.loaded[kind] = None
        self.off[kind] = why
        logging.getLogger("attnrt").warning(
            "%s: the Gluon %s is off (%s); the Triton %s serves instead", self.owner, kind, why,
            kind)

    def compile_failed(self, kind: str, exc: BaseException) -> None:
        """Turn `kind` off because compiling its kernel raised exc."""
        self.turn_off(kind, f"compiling it failed: {exc!r}"[:500])

    def reset(self) -> None:
        """Forget the imports and turned-off states; the next call imports again."""
        self.loaded.clear()
        self.off.clear()
