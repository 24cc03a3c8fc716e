"""Shared test doubles and the float64 dense reference every parity test compares with."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from attnrt.interfaces import AttentionBackend, AttentionImpl


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None) -> torch.Tensor:
    """Float64 dense attention on [B, N, H, D] / [B, M, Hkv, D]; bottom-right causal."""
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))  # differentiable when inputs are
    group = q.shape[2] // k.shape[2]
    k64, v64 = k64.repeat_interleave(group, 2), v64.repeat_interleave(group, 2)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bnhd,bmhd->bhnm", q64, k64) * scale
    n, m = q.shape[1], k.shape[1]
    if causal:
        mask = torch.ones(n, m, dtype=torch.bool).triu(m - n + 1)
        s = s.masked_fill(mask, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return torch.einsum("bhnm,bmhd->bnhd", p, v64)


def randn_qkv(b: int, n: int, h: int, d: int, hkv: int | None = None, m: int | None = None,
              dtype: torch.dtype = torch.float32, seed: int | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    hkv, m = hkv or h, m or n
    q = torch.randn(b, n, h, d, generator=gen).to(dtype)
    k = torch.randn(b, m, hkv, d, generator=gen).to(dtype)
    v = torch.randn(b, m, hkv, d, generator=gen).to(dtype)
    return q, k, v


class CountingImpl(AttentionImpl):
    """Runs SDPA-equivalent attention through REFERENCE and counts calls on its backend class."""

    backend: ClassVar[type[CountingBackend]]

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "", **extra: Any) -> None:
        self.causal, self.scale = causal, softmax_scale
        self.extra = extra

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        from attnrt.backends.reference import chunked_attention

        type(self).backend.forward_calls += 1
        type(self).backend.last_metadata = attn_metadata
        return chunked_attention(query, key, value, self.causal, self.scale)


class CountingBackend(AttentionBackend):
    """A fake backend whose capability attributes tests set; counts checks and forwards."""

    NAME: ClassVar[str] = "FAKE"
    forward_calls: ClassVar[int] = 0
    check_calls: ClassVar[int] = 0
    last_metadata: ClassVar[Any] = None

    @classmethod
    def get_name(cls) -> str:
        return cls.NAME

    @classmethod
    def get_impl_cls(cls) -> type[CountingImpl]:
        impl = type(f"{cls.NAME}Impl", (CountingImpl,), {})
        impl.backend = cls
        return impl

    @classmethod
    def extra_reasons(cls, request: Any, device: Any) -> list[Any]:
        cls.check_calls += 1
        return []


def make_backend(name: str, **capabilities: Any) -> type[CountingBackend]:
    """A fresh CountingBackend subclass called `name` with the given declared capabilities."""
    return type(f"{name.title()}Backend", (CountingBackend,),
                {"NAME": name, "forward_calls": 0, "check_calls": 0, **capabilities})
