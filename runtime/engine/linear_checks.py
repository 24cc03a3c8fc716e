"""Input checks of LinearAttentionEngine: every refusal is a typed error raised before a kernel.

Shapes: B batch, N sequence, H heads, Dk query/key head size, Dv value head size.
q, k [B, N, H, Dk]; v [B, N, H, Dv]; decay [H], [B, N, H] or [B, N, H, Dk]; states [B, H, Dk, Dv].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnrt.kernels.linear.errors import (
    LinearAttentionDeviceError,
    LinearAttentionError,
    LinearAttentionTypeError,
    ModShapeError,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape_of(t: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def check_meta(qkv_meta: Any) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """qkv_meta: three objects with .shape and .dtype ([B, N, H, Dk] twice, [B, N, H, Dv])."""
    if not isinstance(qkv_meta, Sequence) or len(qkv_meta) != 3 or not all(
            hasattr(m, "shape") and hasattr(m, "dtype") for m in qkv_meta):
        raise LinearAttentionTypeError(
            f"qkv_meta={qkv_meta!r} is not allowed; allowed: a tuple of three tensors or "
            f"meta_tensor(B, N, H, D, dtype=...) for q, k and v")
    shapes = tuple(shape_of(m) for m in qkv_meta)
    q, k, v = shapes
    if len(q) != 4 or k != q or len(v) != 4 or v[:3] != q[:3]:
        raise LinearAttentionError(
            f"qkv_meta shapes={shapes} are not allowed; allowed: q and k [B, N, H, Dk], "
            f"v [B, N, H, Dv]")
    dtypes = [m.dtype for m in qkv_meta]
    if dtypes[0] not in FLOAT_DTYPES or len(set(dtypes)) != 1:
        raise LinearAttentionTypeError(
            f"qkv_meta dtypes={dtypes} are not allowed; allowed: one of {FLOAT_DTYPES} for all "
            f"three")
    return q, k, v


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, dk: int, dv: int,
              dtype: torch.dtype) -> None:
    """Batch and length may differ from qkv_meta; heads, head sizes and dtype may not."""
    for name, t, d in (("q", q, dk), ("k", k, dk), ("v", v, dv)):
        if not isinstance(t, torch.Tensor):
            raise LinearAttentionTypeError(f"{name}={type(t).__name__} is not allowed; allowed: "
                                           f"a torch.Tensor")
        if t.dim() != 4 or t.shape[2] != heads or t.shape[3] != d:
            raise LinearAttentionError(
                f"{name} shape={shape_of(t)} is not allowed; allowed: [B, N, {heads}, {d}] "
                f"(from qkv_meta)")
        if t.dtype != dtype:
            raise LinearAttentionTypeError(
                f"{name} dtype={t.dtype} is not allowed; allowed: {dtype} (from qkv_meta)")
        if t.device != q.device:
            raise LinearAttentionDeviceError(
                f"{name} device={t.device} is not allowed; allowed: {q.device} (q's device)")
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise LinearAttentionError(
            f"k/v shapes={shape_of(k)}/{shape_of(v)} are not allowed; allowed: the batch and "
            f"length of q {shape_of(q)[:2]}")


def allowed_decay_shapes(q: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    b, n, h, dk = q.shape
    return (h,), (b, n, h), (b, n, h, dk)


def check_decay(decay: torch.Tensor | None, q: torch.Tensor, name: str = "decay") -> None:
    """decay (before or after decay_mod): None, [H], [B, N, H] or [B, N, H, Dk], on q's device."""
    if decay is None:
        return
    if not isinstance(decay, torch.Tensor) or not decay.is_floating_point():
        what = decay.dtype if isinstance(decay, torch.Tensor) else type(decay).__name__
        raise LinearAttentionTypeError(
            f"{name}={what} is not allowed; allowed: a floating-point tensor or None")
    allowed = allowed_decay_shapes(q)
    if shape_of(decay) not in allowed:
        raise LinearAttentionError(
            f"{name} shape={shape_of(decay)} is not allowed; allowed: "
            f"{', '.join(str(list(s)) for s in allowed)} ([H], [B, N, H], [B, N, H, Dk])")
    if decay.device != q.device:
        raise LinearAttentionDeviceError(
            f"{name} device={decay.device} is not allowed; allowed: {q.device} (q's device)")


def check_log_decay(g: torch.Tensor, has_decay_mod: bool) -> None:
    """The decay the kernel uses is a natural-log decay g <= 0 (a factor exp(g) in (0, 1])."""
    detached = g.detach()
    bad = ~(detached <= 0) | torch.isinf(detached)  # NaN, > 0 (factor > 1), -inf (factor 0)
    if not bool(bad.any()):
        return
    value = detached[bad].flatten()[0].item()
    hint = ("decay_mod must return log-decays (e.g. decay.log() for factors)" if has_decay_mod
            else "without decay_mod, decay is a log-decay; pass decay_mod=lambda d, io: d.log() "
                 "for factors in (0, 1]")
    raise LinearAttentionError(
        f"decay after decay_mod={value} is not allowed; allowed: finite log-decays <= 0 "
        f"(factors in (0, 1]); {hint}")


def check_mod_output(name: str, before: torch.Tensor, after: Any) -> torch.Tensor:
    """A mod is element-wise: it returns a tensor of the shape it was given."""
    if not isinstance(after, torch.Tensor):
        raise ModShapeError(f"{name} returned {type(after).__name__}; allowed: a tensor of "
                            f"shape {shape_of(before)}")
    if after.shape != before.shape:
        raise ModShapeError(
            f"{name} changed the shape {shape_of(before)} to {shape_of(after)}; allowed: "
            f"element-wise mods that keep the shape")
    return after


def check_state(state: torch.Tensor | None, q: torch.Tensor, dv: int, name: str) -> None:
    """state: [B, H, Dk, Dv], float32 (float64 for float64 inputs), on q's device."""
    if state is None:
        return
    b, _, h, dk = q.shape
    want_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not isinstance(state, torch.Tensor) or state.dtype != want_dtype:
        what = state.dtype if isinstance(state, torch.Tensor) else type(state).__name__
        raise LinearAttentionTypeError(f"{name} dtype={what} is not allowed; allowed: "
                                       f"{want_dtype}")
    if shape_of(state) != (b, h, dk, dv):
        raise LinearAttentionError(f"{name} shape={shape_of(state)} is not allowed; allowed: "
                                   f"[B, H, Dk, Dv] = {[b, h, dk, dv]}")
    if state.device != q.device:
        raise LinearAttentionDeviceError(
            f"{name} device={state.device} is not allowed; allowed: {q.device} (q's device)")


def check_custom_inputs(names: Sequence[str], tensors: Any, device: torch.device,
                        ) -> dict[str, torch.Tensor]:
    """custom_io at call time: a list (declaration order) or dict of tensors on q's device."""
    if tensors is None:
        tensors = []
    given: dict[str, Any] | None
    if isinstance(tensors, dict):
        given = dict(tensors)
    elif isinstance(tensors, Sequence):
        given = dict(zip(names, tensors, strict=False)) if len(tensors) == len(names) else None
    else:
        given = None
    if given is None or set(given) != set(names):
        raise LinearAttentionError(
            f"custom_io={_describe(tensors)} is not allowed; allowed: {len(names)} tensors "
            f"named {list(names)} (a list in that order or a dict)")
    for name, t in given.items():
        if not isinstance(t, torch.Tensor):
            raise LinearAttentionTypeError(
                f"custom input {name!r}={type(t).__name__} is not allowed; allowed: a tensor")
        if t.device != device:
            raise LinearAttentionDeviceError(
                f"custom input {name!r} device={t.device} is not allowed; allowed: {device} "
                f"(q's device)")
    return given


def _describe(tensors: Any) -> str:
    if isinstance(tensors, dict):
        return f"dict with keys {sorted(tensors)}"
    if isinstance(tensors, Sequence):
        return f"{len(tensors)} tensors"
    return type(tensors).__name__


FUSE_MODS = ("kernel", "compile", "eager")


def check_fuse_mods(value: Any) -> str:
    """fuse_mods: "kernel", "compile" or "eager"; the old booleans are refused with the value
    that keeps their meaning."""
    if isinstance(value, bool):
        now = "compile" if value else "eager"
        raise LinearAttentionTypeError(
            f"fuse_mods={value} is not allowed; allowed: 'kernel' (default: element-wise mods "
            f"fused into the Triton kernels), 'compile' or 'eager'; fuse_mods={value} meant "
            f"{'a torch.compiled' if value else 'an eager'} pre-pass: write fuse_mods={now!r}")
    if value not in FUSE_MODS:
        raise LinearAttentionError(
            f"fuse_mods={value!r} is not allowed; allowed: 'kernel' (default), 'compile' "
            f"(a torch.compile'd pre-pass), 'eager' (an eager pre-pass)")
    return str(value)
