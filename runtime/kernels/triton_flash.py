"""FlashAttention-2-style attention in Triton: forward, and backward without atomics.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size.
Inputs are q [B, N, H, D] and k, v [B, M, Hkv, D]; any strides (passed to the kernels, never
copied). Query head h reads key/value head h // (H // Hkv) (GQA/MQA), so K/V are never repeated.
Causal masks are bottom-right aligned (FlashAttention >= 2.1): query i sees key j iff
j <= i + (M - N); rows that see no key give a zero output and lse = -inf.

Equivalent PyTorch: `flash_reference.flash_attention_reference` (re-exported here).

The kernels are written against Triton 3.6 and stay runnable under TRITON_INTERPRET=1 on CPU
tensors, which is how CI covers them.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from .flash_reference import flash_attention_reference
from .triton_flash_jit import (
    _bwd_delta_kernel,
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _fwd_kernel,
)

__all__ = [
    "DEFAULT_CONFIG",
    "HEAD_SIZES",
    "SUPPORTED_DTYPES",
    "flash_attention",
    "flash_attention_reference",
]

NAME = "TRITON_FLASH_ATTN"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_SIZES = tuple(range(32, 257, 8))
LOG2E = 1.4426950408889634

# Small blocks for when the caller passes no config: about 64 KiB of shared memory at D=256 in
# 16 bits (twice that in float32), slow but safe. Measured per-arch configs live in
# attnrt.platforms.<platform>.triton_flash_configs; the backend passes them as `config=`
# (this module imports nothing else from attnrt).
DEFAULT_CONFIG: dict[str, dict[str, int]] = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    "bwd_dkdv": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    "bwd_dq": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
}
_BLOCK_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_FWD_SWITCHES = ("warp_specialize", "tma")


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here, so tests can poison it with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- host code


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}={type(t).__name__} is not supported by {NAME}; expected a "
                        "torch.Tensor")
    if t.dim() != 4:
        raise ValueError(f"{name}.ndim={t.dim()} is not supported by {NAME}; expected 4 "
                         f"({'[B, N, H, D]' if name == 'q' else '[B, M, Hkv, D]'})")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}.dtype={t.dtype} is not supported by {NAME}; supported: "
                        "float16, bfloat16, float32")
    if 0 in t.shape:
        raise ValueError(f"{name}.shape={tuple(t.shape)} is not supported by {NAME}; every "
                         "dimension must be at least 1")
    return t


def _check_device(q: torch.Tensor) -> None:
    if q.device.type == "cuda":
        return
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(f"q.device={q.device} is not supported by {NAME}; supported: cuda, or cpu "
                     "with TRITON_INTERPRET=1 set before triton is imported")


def _check_pair(q: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.dtype != q.dtype:
        raise TypeError(f"{name}.dtype={t.dtype} is not supported by {NAME}; it must equal "
                        f"q.dtype={q.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name}.device={t.device} is not supported by {NAME}; it must equal "
                         f"q.device={q.device}")
    if t.shape[0] != q.shape[0] or t.shape[3] != q.shape[3]:
        raise ValueError(f"{name}.shape={tuple(t.shape)} is not supported by {NAME}; batch and "
                         f"head size must match q.shape={tuple(q.shape)}")


def _check_inputs(q: object, k: object, v: object, softmax_scale: object) -> None:
    q, k, v = _check_tensor("q", q), _check_tensor("k", k), _check_tensor("v", v)
    _check_device(q)
    _check_pair(q, "k", k)
    _check_pair(q, "v", v)
    if v.shape != k.shape:
        raise ValueError(f"v.shape={tuple(v.shape)} is not supported by {NAME}; it must equal "
                         f"k.shape={tuple(k.shape)}")
    if q.shape[3] not in HEAD_SIZES:
        raise ValueError(f"head_size={q.shape[3]} is not supported by {NAME}; supported: "
                         "multiples of 8 from 32 to 256")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"num_kv_heads={k.shape[2]} is not supported by {NAME} with "
                         f"num_heads={q.shape[2]}; num_heads must be a multiple of num_kv_heads")
    if softmax_scale is not None and not (
        isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
        and softmax_scale > 0
    ):
        raise ValueError(f"softmax_scale={softmax_scale!r} is not supported by {NAME}; "
                         "expected None or a finite number > 0")


def _valid_entry(entry: dict) -> bool:
    # Optional 0/1 switches, read by the forward kernel only.
    if set(entry) - set(_FWD_SWITCHES) != set(_BLOCK_KEYS) or not all(
        isinstance(x, int) for x in entry.values()
    ):
        return False
    if any(entry.get(key, 0) not in (0, 1) for key in _FWD_SWITCHES):
        return False
    pow2 = [entry[key] for key in ("BLOCK_M", "BLOCK_N", "num_warps")]
    # tl.dot needs every block dimension to be at least 16.
    return all(x >= 1 and x & (x - 1) == 0 for x in pow2) and min(pow2[:2]) >= 16 and (
        entry["num_stages"] >= 1)


def _resolve_config(config: dict | None) -> dict[str, dict[str, int]]:
    """DEFAULT_CONFIG with the caller's per-kernel entries laid over it."""
    if config is None:
        return DEFAULT_CONFIG
    if not isinstance(config, dict) or not set(config) <= set(DEFAULT_CONFIG):
        raise ValueError(f"config={config!r} is not supported by {NAME}; expected a dict with "
                         f"keys among {sorted(DEFAULT_CONFIG)}")
    merged = {}
    for kernel, base in DEFAULT_CONFIG.items():
        entry = {**base, **config.get(kernel, {})}
        if not _valid_entry(entry):
            raise ValueError(f"config[{kernel!r}]={config.get(kernel)!r} is not supported by "
                             f"{NAME}; expected BLOCK_M, BLOCK_N >= 16 and num_warps as powers "
                             "of two, num_stages >= 1, and no other keys")
        merged[kernel] = entry
    return merged


def _tma_ok(t: torch.Tensor) -> bool:
    """True where [B, M, Hkv, D] can be read as a 2D [B * M, Hkv * D] TMA tensor."""
    b, m, hkv, d = t.shape
    return (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9
            and d == triton.next_power_of_2(d) and t.stride(3) == 1 and t.stride(2) == d
            and (b == 1 or t.stride(0) == m * t.stride(1)) and t.data_ptr() % 16 == 0
            and t.stride(1) * t.element_size() % 16 == 0)


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, cfg: dict[str, int]) -> tuple | None:
    if not (cfg.get("tma", 0) and _tma_ok(k) and _tma_ok(v)):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, m, hkv, d = k.shape
    return tuple(TensorDescriptor(t, [b * m, hkv * d], [t.stride(1), 1], [cfg["BLOCK_N"], d])
                 for t in (k, v))


def _launch_args(cfg: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    blocks = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
    return blocks, {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _consts(q: torch.Tensor, causal: bool) -> dict:
    d = q.shape[3]
    # float32 dots must not drop to tf32, or they miss the float32 accuracy the tests demand.
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return {"HEAD_DIM": d, "BLOCK_D": triton.next_power_of_2(d), "CAUSAL": causal, "PREC": prec}


def _forward(q, k, v, causal, scale, cfg):
    b, n, h, _ = q.shape
    m, hkv = k.shape[1], k.shape[2]
    out = _alloc(tuple(q.shape), q.dtype, q.device)
    lse = _alloc((b, h, n), torch.float32, q.device)
    blocks, launch = _launch_args(cfg["fwd"])
    grid = (triton.cdiv(n, blocks["BLOCK_M"]), b * h)
    descs = _kv_descriptors(k, v, cfg["fwd"])
    _fwd_kernel[grid](q, k, v, out, lse, *(descs or (k, v)), *q.stride(), *k.stride(), *v.stride(),
                      *out.stride(),
                      n, m, h, h // hkv, scale * LOG2E, **_consts(q, causal), **blocks, **launch,
                      WARP_SPEC=bool(cfg["fwd"].get("warp_specialize", 0)),
                      USE_TMA=descs is not None)
    return out, lse


def _backward_delta(out, dout, dlse):
    b, n, h, _ = out.shape
    delta = _alloc((b, h, n), torch.float32, out.device)
    block_m = 64
    grid = (triton.cdiv(n, block_m), b * h)
    d = out.shape[3]
    _bwd_delta_kernel[grid](out, dout, delta, *out.stride(), *dout.stride(), n, h, HEAD_DIM=d,
                            BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_m, num_warps=4)
    # d lse / d s = softmax row, so an lse gradient folds into delta: ds = p * (dp - delta + dlse).
    return delta if dlse is None else delta - dlse.float()


def _launch_dkdv(q, k, v, dout, lse, delta, causal, scale, cfg):
    b, n, h, _ = q.shape
    m, hkv = k.shape[1], k.shape[2]
    dk = _alloc(tuple(k.shape), k.dtype, k.device)
    dv = _alloc(tuple(v.shape), v.dtype, v.device)
    blocks, launch = _launch_args(cfg)
    grid = (triton.cdiv(m, blocks["BLOCK_N"]), b * hkv)
    _bwd_dkdv_kernel[grid](q, k, v, dout, lse, delta, dk, dv, *q.stride(), *k.stride(),
                           *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), n, m, h, hkv,
                           h // hkv, scale * LOG2E, scale, **_consts(q, causal), **blocks,
                           **launch)
    return dk, dv


def _launch_dq(q, k, v, dout, lse, delta, causal, scale, cfg):
    b, n, h, _ = q.shape
    m, hkv = k.shape[1], k.shape[2]
    dq = _alloc(tuple(q.shape), q.dtype, q.device)
    blocks, launch = _launch_args(cfg)
    grid = (triton.cdiv(n, blocks["BLOCK_M"]), b * h)
    _bwd_dq_kernel[grid](q, k, v, dout, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(),
                         *dout.stride(), *dq.stride(), n, m, h, h // hkv, scale * LOG2E, scale,
                         **_consts(q, causal), **blocks, **launch)
    return dq


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    delta = _backward_delta(out, dout, dlse)
    args = (q, k, v, dout, lse, delta, ctx.causal, ctx.scale)
    dk, dv = _launch_dkdv(*args, ctx.cfg["bwd_dkdv"])
    dq = _launch_dq(*args, ctx.cfg["bwd_dq"])
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, cfg):
        out, lse = _forward(q, k, v, causal, scale, cfg)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.cfg = causal, scale, cfg
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv = _backward(ctx, dout, dlse)
        return dq, dk, dv, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    config: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, N, H, D] over k, v [B, M, Hkv, D], H % Hkv == 0 (GQA/MQA).

    Returns out [B, N, H, D] in q's dtype and, with return_lse, also lse [B, H, N] float32
    (natural-log log-sum-exp of the scaled scores; -inf for a causal row that sees no key).
    Differentiable in q, k, v (and through lse); dK/dV are summed over the heads sharing them.
    softmax_scale defaults to 1/sqrt(D). Causal masks are bottom-right aligned. `config` may
    override {"fwd" | "bwd_dkdv" | "bwd_dq": {BLOCK_M, BLOCK_N, num_warps, num_stages}}; see
    attnrt.platforms.cuda.triton_flash_configs for measured per-arch values.

    Equivalent PyTorch: flash_attention_reference(q, k, v, causal, softmax_scale, return_lse).
    """
    _check_inputs(q, k, v, softmax_scale)
    cfg = _resolve_config(config)
    scale = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else float(softmax_scale)
    out, lse = _FlashAttention.apply(q, k, v, bool(causal), scale, cfg)
    return (out, lse) if return_lse else out
