"""TRITON_FLASH_ATTN: attnrt's own FlashAttention-2-style Triton kernel, on CUDA and ROCm.

Shapes: B batch, N query length, M key length, H heads, Hkv kv heads (H % Hkv == 0), D head size;
q [B, N, H, D], k/v [B, M, Hkv, D]. The kernel is `attnrt.kernels.triton_flash.flash_attention`
(its pure-torch reference sits beside it); this module only picks its block config and turns
compile failures into KernelCompileError.

Configs are data in the platform pack (`attnrt.platforms.<platform>.triton_flash_configs`,
`select_config(arch, head_size, sixteen_bit)`), looked up by the arch of the device the tensors
live on; a platform without such a module gets the kernel's conservative DEFAULT_CONFIG. Triton
is imported on the first forward, never when attnrt is imported.

Only compile-time failures (CompilationError, OutOfResources, PTXASError) become
KernelCompileError, so the layer can move to the next ranked backend; anything raised while the
kernel runs, CUDA errors included, propagates unchanged.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch

from attnrt.device import device_for_tensor
from attnrt.errors import KernelCompileError
from attnrt.interfaces import AttentionBackend, AttentionMetadata, ScaledImpl
from attnrt.support import Package

NAME = "TRITON_FLASH_ATTN"
_COMPILE_ERRORS = (("triton.compiler.errors", "CompilationError"),
                   ("triton.runtime.errors", "OutOfResources"),
                   ("triton.runtime.errors", "PTXASError"))


@cache
def compile_error_types() -> tuple[type[BaseException], ...]:
    """Triton's compile-time exception classes present in the installed version."""
    found: list[type[BaseException]] = []
    for module_name, attr in _COMPILE_ERRORS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, attr, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


@cache
def block_config(platform: str, arch: str, head_size: int,
                 sixteen_bit: bool) -> dict[str, dict[str, int]] | None:
    """The pack's config for (arch, D, dtype class), or None where the pack ships none."""
    module_name = f"attnrt.platforms.{platform}.triton_flash_configs"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the configs module exists but is broken: say so
        return None
    config: dict[str, dict[str, int]] = module.select_config(arch, head_size, sixteen_bit)
    return config


def config_for(q: torch.Tensor) -> dict[str, dict[str, int]] | None:
    device = device_for_tensor(q.device)
    return block_config(device.platform, device.arch, q.shape[3], q.dtype != torch.float32)


def triton_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                 scale: float | None) -> torch.Tensor:
    """flash_attention with the device's config; compile failures -> KernelCompileError."""
    from attnrt.kernels.triton_flash import flash_attention

    config = config_for(q)
    try:
        out: torch.Tensor = flash_attention(q, k, v, causal=causal, softmax_scale=scale,
                                            config=config)
    except compile_error_types() as exc:
        first = str(exc).strip().splitlines()
        raise KernelCompileError(
            f"{NAME} failed to compile for q{tuple(q.shape)}, k{tuple(k.shape)}, {q.dtype}, "
            f"causal={causal}, config={config}: {type(exc).__name__}: "
            f"{first[-1] if first else ''}") from exc
    return out


class TritonFlashAttnImpl(ScaledImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        return triton_flash(query, key, value, self.causal, self.softmax_scale)


class TritonFlashAttnBackend(AttentionBackend):
    """Portable: any NVIDIA GPU from Ampere, any AMD GPU from MI200 (bf16 dots need both)."""

    PLATFORMS = frozenset({"cuda", "rocm"})
    ARCHS = (">=sm80", ">=gfx90a")
    DTYPES = frozenset({"fp16", "bf16", "fp32"})
    HEAD_SIZES = range(32, 257, 8)
    PACKAGES = (Package("triton", min_version="3.0", hint="pip install 'triton>=3.0'"),)

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[TritonFlashAttnImpl]:
        return TritonFlashAttnImpl
