"""AITER: AMD's AI Tensor Engine for ROCm; its CK/ASM flash-attention forward, flash_attn_func.

Shapes: B batch, N query sequence, M key sequence, H query heads, Hkv key/value heads, D head size.
Inputs q [B, N, H, D], k/v [B, M, Hkv, D]; output [B, N, H, D].

Documented entry point (ROCm/aiter, aiter/ops/mha.py; re-exported as `aiter.flash_attn_func`)::

    flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), bias=None, alibi_slopes=None, deterministic=True,
                    return_lse=False, return_attn_probs=False)

It takes flash_attn's [B, N, H, D] layout, supports GQA (H % Hkv == 0) and aligns the causal mask
to the bottom-right corner, as every attnrt backend does. Only arguments present in every released
signature are passed (older releases lack `bias`; newer ones add `how_v3_bf16_cvt`).

Equivalent PyTorch: `attnrt.backends.reference.chunked_attention(q, k, v, causal, softmax_scale)`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch

from attnrt.interfaces import AttentionBackend, AttentionMetadata, ScaledImpl
from attnrt.selection.capability import PACKAGE_MISSING, Package, Reason

if TYPE_CHECKING:
    from attnrt.selection.device import Device
    from attnrt.selection.request import AttentionRequest

INSTALL_HINT = ("pip install amd-aiter on a ROCm build of torch, or build it: git clone "
                "--recursive https://github.com/ROCm/aiter && cd aiter && python3 setup.py develop")


def _entry_point_problem() -> str:
    """Why the importable `aiter` is not AMD's (PyPI's unrelated async `aiter` shares the name).

    Not cached: it runs only after PACKAGES imported aiter, so it is a sys.modules lookup.
    """
    try:
        module = importlib.import_module("aiter")
    except (ImportError, OSError, RuntimeError) as exc:
        return f"import aiter failed: {exc}"
    if not callable(getattr(module, "flash_attn_func", None)):
        origin = getattr(module, "__file__", None) or "?"
        return (f"the importable aiter ({origin}) has no flash_attn_func; it is not AMD's AITER "
                "(PyPI's async-iterator package 'aiter' uses the same import name)")
    return ""


def flash_attn_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    softmax_scale: float) -> torch.Tensor:
    """One `aiter.flash_attn_func` call on [B, N, H, D] tensors -> [B, N, H, D]."""
    aiter = importlib.import_module("aiter")
    out = aiter.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=softmax_scale,
                                causal=causal)
    # Older releases return a tuple (out, [lse], [probs]) even for out alone; newer ones a tensor.
    return out[0] if isinstance(out, (tuple, list)) else out


class AiterFlashAttnImpl(ScaledImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        return flash_attn_call(query, key, value, self.causal, self.softmax_scale)


class AiterFlashAttnBackend(AttentionBackend):
    """AITER's flash attention forward on AMD Instinct CDNA3/CDNA4 (MI300, MI325, MI350, MI355).

    AITER's README lists gfx942 and gfx950 as supported; its CK and ASM kernels are CDNA-only and
    MI200 (gfx90a) is not listed. Head sizes up to 256 (the CK fmha limit; AITER pads D to a
    multiple of 8 itself). fp16 and bf16 only.
    """

    PLATFORMS = frozenset({"rocm"})
    ARCHS = ("gfx942", "gfx950")
    DTYPES = frozenset({"fp16", "bf16"})
    HEAD_SIZES = range(1, 257)
    SUPPORTS_CAUSAL = True
    SUPPORTS_GQA = True
    PACKAGES = (Package("aiter", dist="amd-aiter", hint=INSTALL_HINT),)

    @staticmethod
    def get_name() -> str:
        return "AITER"

    @staticmethod
    def get_impl_cls() -> type[AiterFlashAttnImpl]:
        return AiterFlashAttnImpl

    @classmethod
    def extra_reasons(cls, request: AttentionRequest, device: Device) -> list[Reason]:
        problem = "" if device.packages_assumed else _entry_point_problem()
        return [Reason(PACKAGE_MISSING, problem, INSTALL_HINT)] if problem else []

