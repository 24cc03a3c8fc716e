"""TRITON_FLASH_ATTN: attnrt's own FlashAttention-2-style Triton kernel, on CUDA and ROCm.

Shapes: B batch, N query length, M key length, H heads, Hkv kv heads (H % Hkv == 0), D head size;
q [B, N, H, D], k/v [B, M, Hkv, D]. The kernel is `attnrt.kernels.flash.launch.flash_attention`
(its pure-torch reference sits beside it); this module only picks its block config and turns
compile failures into KernelCompileError.

Configs are data beside the kernel (`attnrt.kernels.flash.configs_cuda`, `configs_rocm`, each
with `select_config(arch, head_size, sixteen_bit)`), looked up by the platform and arch of the
device the tensors live on; a platform without a table gets the kernel's conservative
DEFAULT_CONFIG. Triton is imported on the first forward, never when attnrt is imported.

`ATTNRT_TRITON_AUTOTUNE=1` (or `triton_autotune=True` in a layer's extra_impl_args) times the
arch's forward candidates once per shape bucket and keeps the fastest
(attnrt.kernels.flash.autotune).

Only compile-time failures (CompilationError, OutOfResources, PTXASError) become
KernelCompileError, so the layer can move to the next ranked backend; anything raised while the
kernel runs, CUDA errors included, propagates unchanged.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch

from attnrt.errors import KernelCompileError
from attnrt.interfaces import AttentionBackend, AttentionMetadata, ScaledImpl
from attnrt.kernels import compile_error_types
from attnrt.kernels.flash import configs_cuda, configs_rocm
from attnrt.kernels.flash.checks import HEAD_SIZES, NAME, SUPPORTED_DTYPES
from attnrt.selection.capability import Package
from attnrt.selection.device import device_for_tensor
from attnrt.selection.request import DTYPE_NAMES

# Per-arch config tables, by the platform whose arches they name.
_TABLES = {module.PLATFORM: module for module in (configs_cuda, configs_rocm)}
def configs_module(platform: str) -> Any:
    """The per-arch config table for `platform`'s arches, or None where there is none."""
    return _TABLES.get(platform)


@cache
def block_config(platform: str, arch: str, head_size: int,
                 sixteen_bit: bool) -> dict[str, dict[str, int]] | None:
    """The config for (arch, D, dtype class), or None where the platform has no table."""
    module = configs_module(platform)
    if module is None:
        return None
    config: dict[str, dict[str, int]] = module.select_config(arch, head_size, sixteen_bit)
    return config


def clear_config_caches() -> None:
    block_config.cache_clear()


def config_for(q: torch.Tensor) -> dict[str, dict[str, int]] | None:
    device = device_for_tensor(q.device)
    return block_config(device.platform, device.arch, q.shape[3], q.dtype != torch.float32)


def autotune_requested(extra_impl_args: dict[str, Any]) -> bool:
    if "triton_autotune" in extra_impl_args:
        return bool(extra_impl_args["triton_autotune"])
    value = os.environ.get("ATTNRT_TRITON_AUTOTUNE", "0").strip().lower()
    if value not in ("", "0", "1", "true", "false"):
        raise ValueError(f"ATTNRT_TRITON_AUTOTUNE={value!r} is not allowed; allowed: 0, 1")
    return value in ("1", "true")


def autotuned_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                     scale: float | None) -> dict[str, dict[str, int]] | None:
    """The arch's config with its forward replaced by the fastest of the arch's candidates."""
    from attnrt.kernels.flash.autotune import tuned_config, tuning_key
    from attnrt.kernels.flash.configs import DEFAULT_CONFIG
    from attnrt.kernels.flash.launch import flash_attention

    device = device_for_tensor(q.device)
    module = configs_module(device.platform)
    base = config_for(q) or DEFAULT_CONFIG
    candidates = getattr(module, "forward_candidates", lambda arch, d: ())(device.arch, q.shape[3])
    if not candidates or q.dtype == torch.float32:
        return base

    def run(config: dict[str, dict[str, int]]) -> Any:
        return flash_attention(q, k, v, causal=causal, softmax_scale=scale, config=config)

    key = tuning_key(device.platform, device.arch, q, k, causal)
    return tuned_config(key, base, candidates, run, skip=compile_error_types())


def triton_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                 scale: float | None, config: dict[str, dict[str, int]] | None = None,
                 return_lse: bool = False) -> Any:
    """flash_attention with `config` or the device's; compile failures -> KernelCompileError."""
    from attnrt.kernels.flash.launch import flash_attention

    config = config if config is not None else config_for(q)
    try:
        out = flash_attention(q, k, v, causal=causal, softmax_scale=scale, config=config,
                              return_lse=return_lse)
    except compile_error_types() as exc:
        first = str(exc).strip().splitlines()
        raise KernelCompileError(
            f"{NAME} failed to compile for q{tuple(q.shape)}, k{tuple(k.shape)}, {q.dtype}, "
            f"causal={causal}, config={config}: {type(exc).__name__}: "
            f"{first[-1] if first else ''}") from exc
    return out


class TritonFlashAttnImpl(ScaledImpl):
    EXTRA_IMPL_ARGS = frozenset({"triton_autotune"})  # the extras it reads (attnrt.layer_args)

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "",
                 **extra_impl_args: Any) -> None:
        super().__init__(num_heads, head_size, softmax_scale, causal, num_kv_heads, prefix,
                         **extra_impl_args)
        self.autotune = autotune_requested(extra_impl_args)
        self._tuned: dict[tuple[Any, ...], dict[str, dict[str, int]] | None] = {}

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        config = self._tuned_config(query, key, value) if self.autotune else None
        return triton_flash(query, key, value, self.causal, self.softmax_scale, config)

    def forward_with_lse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_metadata: AttentionMetadata | None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        config = self._tuned_config(query, key, value) if self.autotune else None
        out, lse = triton_flash(query, key, value, self.causal, self.softmax_scale, config,
                                return_lse=True)
        return out, lse

    def _tuned_config(self, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> dict[str, dict[str, int]] | None:
        """Per impl, keyed like the tuner but without the device lookup on every call."""
        from attnrt.kernels.flash.autotune import sequence_bucket

        local = (q.device, q.dtype, sequence_bucket(q.shape[1], k.shape[1]), k.shape[2])
        if local not in self._tuned:
            self._tuned[local] = autotuned_config(q, k, v, self.causal, self.softmax_scale)
        return self._tuned[local]


class TritonFlashAttnBackend(AttentionBackend):
    """Portable: any NVIDIA GPU from Ampere, any AMD GPU from MI200 (bf16 dots need both)."""

    PLATFORMS = frozenset({"cuda", "rocm"})
    ARCHS = (">=sm80", ">=gfx90a")
    DTYPES = frozenset(DTYPE_NAMES[dtype] for dtype in SUPPORTED_DTYPES)
    HEAD_SIZES = HEAD_SIZES
    PACKAGES = (Package("triton", min_version="3.0", hint="pip install 'triton>=3.0'"),)

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[TritonFlashAttnImpl]:
        return TritonFlashAttnImpl
