"""Implementations of method `linear`: attnrt's Triton kernel, flash-linear-attention, reference.

Shapes: B batch, N sequence, H heads, Dk query/key head size, Dv value head size.
Each `run` takes modded q, k [B, N, H, Dk], v [B, N, H, Dv], g None | [B, N, H] | [B, N, H, Dk]
(natural-log decay, a per-head constant already expanded), initial_state [B, H, Dk, Dv] float32
or None, and returns (o [B, N, H, Dv], final state or None); causal only (the engine computes the
non-causal form, two matrix products, itself). The classes are AttentionBackends with
METHODS = {"linear"}; registering and ranking them is the integrator's (see the report).
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from typing import Any, ClassVar

import torch

from attnrt.interfaces import AttentionBackend
from attnrt.kernels.linear.reference import linear_attention_reference
from attnrt.selection.capability import Package

FLA_HINT = ("pip install fla-core einops (pure-python wheels; flash-linear-attention also "
            "works)")
_FLA_OPS = (("fla.ops.linear_attn", "chunk_linear_attn"), ("fla.ops.simple_gla",
                                                          "chunk_simple_gla"),
            ("fla.ops.gla", "chunk_gla"))


def run_reference(q, k, v, g, initial_state, output_final_state):  # type: ignore[no-untyped-def]
    return linear_attention_reference(q, k, v, g, causal=True, initial_state=initial_state,
                                      output_final_state=output_final_state)


def run_triton(q, k, v, g, initial_state, output_final_state,  # type: ignore[no-untyped-def]
               mods=None):
    """The chunked kernel; `mods` (a KernelMods) are q/k/v mods fused into it: q, k, v raw."""
    from attnrt.kernels.linear.chunked import NO_MODS, chunked_linear_attention

    return chunked_linear_attention(q, k, v, g, initial_state, output_final_state,
                                    mods=mods if mods is not None else NO_MODS)


def fla_functions() -> dict[str, Any] | str:
    """{name: function} of fla's chunked kernels, or the reason they cannot be imported."""
    return _import_fla()


@cache
def _import_fla() -> dict[str, Any] | str:
    found = {}
    for module_name, attr in _FLA_OPS:
        try:
            module = importlib.import_module(module_name)
        except (ImportError, OSError, RuntimeError) as exc:
            return f"import {module_name} failed: {exc}"
        found[attr] = getattr(module, attr)
    return found


def clear_fla_cache() -> None:
    """Forget the fla import result (for attnrt.clear_caches)."""
    _import_fla.cache_clear()


def run_fla(q, k, v, g, initial_state, output_final_state):  # type: ignore[no-untyped-def]
    """fla's chunked kernel for the variant: chunk_linear_attn (no decay), chunk_simple_gla
    ([B, N, H] log-decay), chunk_gla ([B, N, H, Dk]); scale=1.0 (scaling lives in q_mod)."""
    from attnrt.errors import BackendUnavailableError

    functions = fla_functions()
    if isinstance(functions, str):
        raise BackendUnavailableError(f"FLA_LINEAR_ATTN cannot run: {functions} "
                                      f"(hint: {FLA_HINT})")
    common = {"scale": 1.0, "initial_state": initial_state,
              "output_final_state": output_final_state}
    if g is None:
        o, ht = functions["chunk_linear_attn"](q, k, v, normalize=False, **common)
    elif g.dim() == 3:
        o, ht = functions["chunk_simple_gla"](q, k, v, g=g, **common)
    else:
        o, ht = functions["chunk_gla"](q, k, v, g=g, **common)
    return o, (ht if output_final_state else None)


@cache
def impl_for(run: str) -> type:
    """The LinearAttnImpl subclass that runs backend `run` (one class per backend)."""
    from attnrt.engine.linear_impl import LinearAttnImpl

    return type(f"LinearAttnImpl_{run}", (LinearAttnImpl,), {"RUN": run})


class _LinearBackend(AttentionBackend):
    """Shared data: method `linear`, no GQA (one key/value head per query head)."""

    METHODS: ClassVar[frozenset[str]] = frozenset({"linear"})
    SUPPORTS_GQA = False
    RUN: ClassVar[str] = "reference"

    @classmethod
    def get_impl_cls(cls) -> type:
        return impl_for(cls.RUN)


class TritonLinearAttnBackend(_LinearBackend):
    """TRITON_LINEAR_ATTN: attnrt's chunked Triton kernel (attnrt.kernels.linear.chunked)."""

    PLATFORMS = frozenset({"cuda"})
    ARCHS = ">=sm80"
    DTYPES = frozenset({"fp16", "bf16", "fp32"})
    HEAD_SIZES = range(16, 257)
    PACKAGES = (Package("triton", min_version="3.0", hint="pip install 'triton>=3.0'"),)
    RUN = "triton"

    @staticmethod
    def get_name() -> str:
        return "TRITON_LINEAR_ATTN"


class FlaLinearAttnBackend(_LinearBackend):
    """FLA_LINEAR_ATTN: flash-linear-attention's chunked kernels (chunk_linear_attn,
    chunk_simple_gla, chunk_gla), imported only by the availability check."""

    PLATFORMS = frozenset({"cuda"})
    ARCHS = ">=sm80"
    DTYPES = frozenset({"fp16", "bf16", "fp32"})
    HEAD_SIZES = range(16, 257)
    PACKAGES = (Package("fla.ops", dist="fla-core", hint=FLA_HINT),)
    RUN = "fla"

    @staticmethod
    def get_name() -> str:
        return "FLA_LINEAR_ATTN"


class ReferenceLinearAttnBackend(_LinearBackend):
    """REFERENCE_LINEAR_ATTN: the token-by-token recurrence in PyTorch; any device and dtype."""

    RUN = "reference"

    @staticmethod
    def get_name() -> str:
        return "REFERENCE_LINEAR_ATTN"


RUNNERS = {"triton": run_triton, "fla": run_fla, "reference": run_reference}
BACKENDS: dict[str, type[_LinearBackend]] = {
    "triton": TritonLinearAttnBackend, "fla": FlaLinearAttnBackend,
    "reference": ReferenceLinearAttnBackend}


def unavailable_reason(name: str, q: torch.Tensor) -> str | None:
    """Why backend `name` cannot run on q here (None: it can): its declared packages, dtypes,
    and the kernels' device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    from attnrt.selection.capability import declared, package_status
    from attnrt.selection.request import DTYPE_NAMES

    backend = BACKENDS[name]
    for pkg in declared(backend, "PACKAGES"):
        status = package_status(pkg)
        if status.reason is not None:
            return str(status.reason)
    if name == "fla" and isinstance(fla_functions(), str):
        return f"{fla_functions()} (hint: {FLA_HINT})"
    dtypes = declared(backend, "DTYPES")
    if DTYPE_NAMES.get(q.dtype) not in dtypes:
        return (f"dtype={q.dtype} is not supported by {backend.get_name()}; supported: "
                f"{', '.join(sorted(dtypes))}")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if name != "reference" and q.device.type != "cuda" and not interpreting:
        return f"{backend.get_name()} runs on CUDA tensors; q is on {q.device}"
    return None
