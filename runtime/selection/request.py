"""The selector's one input: a frozen, hashable request, also the decision cache key."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnrt.selection.methods import DENSE, check_method

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}
NAME_DTYPES: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}
_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32",
            "float": "fp32", "float64": "fp64", "double": "fp64"}


def dtype_name(dtype: torch.dtype | str) -> str:
    """'bf16' for torch.bfloat16 or 'bfloat16'; raises for non-floating dtypes."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"dtype={dtype} is not supported; supported: "
                            f"{', '.join(str(d) for d in DTYPE_NAMES)}")
        return DTYPE_NAMES[dtype]
    name = _ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in NAME_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; supported: "
                         f"{', '.join(NAME_DTYPES)} (or float16, bfloat16, float32, float64)")
    return name


@dataclass(frozen=True)
class AttentionRequest:
    """What a layer asks for. `allowed` is the layer's supported_attention_backends, or None.

    Heads are the ones the kernel sees: for sequence-parallel layers, the count after sharding.
    `grad`: the call runs with autograd on (training), so the backward's speed counts too; rules
    may rank differently for it (the `grad` key), since the fastest forward need not be the
    fastest forward and backward.
    `seq_len`: the query length, where known; rules with a `seq_len` key match only requests
    that carry one inside their range (layers pass it where the manifest has such rules).
    `method`: what is computed (`dense`, `vsa`, `sla`, ...: attnrt.selection.methods); only
    backends that implement it may serve the request.
    """

    head_size: int
    dtype: str
    num_heads: int = 1
    num_kv_heads: int | None = None
    causal: bool = False
    allowed: tuple[str, ...] | None = None
    grad: bool = False
    seq_len: int | None = None
    method: str = DENSE

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "method", check_method(self.method))
        if not isinstance(self.grad, bool):
            raise TypeError(f"grad={self.grad!r} must be True or False")
        for field in ("head_size", "num_heads"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be a positive integer")
        n = self.seq_len
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"seq_len={n!r} is not allowed; allowed: None (unknown) or a query "
                             "length >= 0")
        kv = self.num_kv_heads
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1
                               or self.num_heads % kv):
            raise ValueError(f"num_kv_heads={kv!r} must be a positive integer dividing "
                             f"num_heads={self.num_heads}")
        if kv is None:  # canonical form, so equal requests hash equal (the cache key)
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.allowed is not None:
            object.__setattr__(self, "allowed", tuple(_backend_name(n) for n in self.allowed))

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def is_gqa(self) -> bool:
        return self.kv_heads < self.num_heads

    def describe(self) -> str:
        kv = f", {_count(self.kv_heads, 'kv head')}" if self.is_gqa else ""
        causal = "causal" if self.causal else "non-causal"
        grad = ", with backward" if self.grad else ""
        seq = f", N={self.seq_len}" if self.seq_len is not None else ""
        method = f", method {self.method}" if self.method != DENSE else ""
        return (f"{_count(self.num_heads, 'head')}{kv} of {self.head_size}, {self.dtype}, "
                f"{causal}{seq}{grad}{method}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _backend_name(name: object) -> str:
    # FastVideo passes AttentionBackendEnum members; accept those by their name.
    return str(getattr(name, "name", name)).upper()
