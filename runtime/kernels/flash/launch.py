"""FlashAttention-2-style attention in Triton: forward, and backward without atomics.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size.
Inputs are q [B, N, H, D] and k, v [B, M, Hkv, D]; any strides (passed to the kernels, never
copied). Query head h reads key/value head h // (H // Hkv) (GQA/MQA), so K/V are never repeated.
Causal masks are bottom-right aligned (FlashAttention >= 2.1): query i sees key j iff
j <= i + (M - N); rows that see no key give a zero output and lse = -inf.

Equivalent PyTorch: `reference.flash_attention_reference` (re-exported here).

The kernels are written against Triton 3.6 and stay runnable under TRITON_INTERPRET=1 on CPU
tensors, which is how CI covers them.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from attnrt.kernels import (
    capability,
    cdiv,
    cuda_properties,
    fast_launch,
    next_power_of_2,
    reads_as_2d,
)
from attnrt.kernels.flash import gluon_paths
from attnrt.kernels.flash.checks import HEAD_SIZES, NAME, SUPPORTED_DTYPES, check_inputs
from attnrt.kernels.flash.configs import DEFAULT_CONFIG
from attnrt.kernels.flash.jit import _bwd_delta_kernel, _bwd_kernel, _fwd_kernel
from attnrt.kernels.flash.reference import flash_attention_reference

__all__ = [
    "DEFAULT_CONFIG",
    "HEAD_SIZES",
    "SUPPORTED_DTYPES",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_reference",
]

LOG2E = 1.4426950408889634

# DEFAULT_CONFIG (configs.py) serves calls without a config. Measured per-arch configs live in
# configs_cuda.py and configs_rocm.py beside this module; the backend passes them as `config=`.
# A config may also hold "<kernel>_causal" entries, which replace "<kernel>" for causal calls.
CAUSAL_SUFFIX = "_causal"
_BLOCK_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
# Optional 0/1 switches per kernel. fwd: warp-specialized loop, TMA loads of K/V, gluon = the
# Gluon ping-pong forward on Hopper (attnrt.kernels.flash.gluon_fwd_sm90, BLOCK_N 64 or 128; where
# it cannot serve a call, the Triton kernel with the entry's blocks does). bwd_dkdv:
# single_launch = the dQ programs (with bwd_dq's blocks) run in the dK/dV launch; atomic_dq =
# the dK/dV programs also add dQ with float32 atomics and no dQ programs run (5 matrix products
# instead of 7, but the summation order, and so the last bits of dQ, vary from run to run);
# peel_diagonal = causal dK/dV runs its diagonal query blocks as unrolled masked steps before
# an unmasked loop (no effect when not causal); gluon = the Gluon warp-specialized backward on
# Hopper (attnrt.kernels.flash.gluon_bwd_sm90, D=64 or 128; dQ by TMA reduce-add, so its last bits
# vary from run to run as with atomic_dq; where it cannot serve, the entry's Triton kernels do).
_SWITCHES = {"fwd": ("warp_specialize", "tma", "gluon"),
             "bwd_dkdv": ("single_launch", "atomic_dq", "peel_diagonal", "gluon"), "bwd_dq": ()}
# Any kernel may cap registers per thread (Triton's `maxnreg` launch option, PTX .maxnreg),
# e.g. to fit two 8-warp programs on an SM (at most 128 each).
_MAXNREG = range(32, 256)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here, so tests can poison it with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- host code


def _entry_problem(kernel: str, entry: dict) -> str | None:
    """Why config[kernel] cannot run, or None."""
    allowed = (*_BLOCK_KEYS, *_SWITCHES[kernel], "maxnreg")
    extra = sorted(set(entry) - set(allowed))
    if extra:
        return f"unknown key {extra[0]!r}; allowed: {', '.join(allowed)}"
    bad = [key for key, x in entry.items() if not isinstance(x, int)]
    if bad:
        return f"{bad[0]}={entry[bad[0]]!r} is not an int"
    if any(entry.get(key, 0) not in (0, 1) for key in _SWITCHES[kernel]):
        return f"switches {', '.join(_SWITCHES[kernel])} take 0 or 1"
    if "maxnreg" in entry and entry["maxnreg"] not in _MAXNREG:
        return f"maxnreg={entry['maxnreg']} is out of range; allowed: 32 to 255"
    if kernel == "fwd" and entry.get("gluon", 0) and entry["BLOCK_N"] not in (64, 128):
        return f"gluon takes BLOCK_N 64 or 128, got {entry['BLOCK_N']}"
    pow2 = [entry[key] for key in ("BLOCK_M", "BLOCK_N", "num_warps")]
    # tl.dot needs every block dimension to be at least 16.
    if not all(x >= 1 and x & (x - 1) == 0 for x in pow2) or min(pow2[:2]) < 16:
        return "BLOCK_M, BLOCK_N >= 16 and num_warps must be powers of two"
    return None if entry["num_stages"] >= 1 else "num_stages must be at least 1"


def _backward_problem(cfg: dict[str, dict[str, int]]) -> str | None:
    dkdv, dq = cfg["bwd_dkdv"], cfg["bwd_dq"]
    if dkdv.get("single_launch", 0) and dkdv.get("atomic_dq", 0):
        return "single_launch and atomic_dq exclude each other"
    if dkdv.get("single_launch", 0):
        # One launch has one warp count, pipeline depth and register cap.
        for key in ("num_warps", "num_stages", "maxnreg"):
            if dkdv.get(key) != dq.get(key):
                return (f"single_launch needs bwd_dq {key}={dq.get(key)} to equal bwd_dkdv "
                        f"{key}={dkdv.get(key)}")
    return None


def _merge(config: dict, causal: bool) -> dict[str, dict[str, int]]:
    merged = {}
    for kernel, base in DEFAULT_CONFIG.items():
        name = kernel + CAUSAL_SUFFIX if causal and kernel + CAUSAL_SUFFIX in config else kernel
        given = config.get(name, {})
        problem = (_entry_problem(kernel, {**base, **given}) if isinstance(given, dict)
                   else "expected a dict")
        if problem:
            raise ValueError(f"config[{name!r}]={given!r} is not supported by {NAME}: {problem}")
        merged[kernel] = {**base, **given}
    problem = _backward_problem(merged)
    if problem:
        raise ValueError(f"config={config!r} is not supported by {NAME}: {problem}")
    return merged


def _resolve_config(config: dict | None, causal: bool = False) -> dict[str, dict[str, int]]:
    """DEFAULT_CONFIG with the caller's per-kernel entries (the causal ones if causal) laid over
    it. Both the causal and the plain reading are checked, so a bad entry fails every call.
    Remembered per config object while its contents stay equal (a layer passes the same one
    each call: checking it again cost ~18 us of host time per call)."""
    if config is None:
        return DEFAULT_CONFIG
    seen = _RESOLVED.get(id(config))
    if seen is not None and seen[0] == config:
        return seen[2] if causal else seen[1]
    keys = {*DEFAULT_CONFIG, *(kernel + CAUSAL_SUFFIX for kernel in DEFAULT_CONFIG)}
    if not isinstance(config, dict) or not set(config) <= keys:
        raise ValueError(f"config={config!r} is not supported by {NAME}; expected a dict with "
                         f"keys among {sorted(keys)}")
    plain, with_causal = _merge(config, False), _merge(config, True)
    if len(_RESOLVED) >= 64:
        _RESOLVED.clear()
    snapshot = {name: dict(entry) for name, entry in config.items()}
    _RESOLVED[id(config)] = (snapshot, plain, with_causal)
    return with_causal if causal else plain


# id(config) -> (a copy of config, its plain and causal resolutions); the copy is compared on
# every hit, so a config changed in place (or a new one at a reused id) is resolved again.
_RESOLVED: dict[int, tuple[dict, dict, dict]] = {}


def _tma_ok(t: torch.Tensor) -> bool:
    """True where [B, M, Hkv, D] can be read as a 2D [B * M, Hkv * D] TMA tensor."""
    d = t.shape[3]
    return (t.is_cuda and capability(t.device)[0] >= 9
            and d == next_power_of_2(d) and reads_as_2d(t))


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, cfg: dict[str, int]) -> tuple:
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, m, hkv, d = k.shape
    return tuple(TensorDescriptor(t, [b * m, hkv * d], [t.stride(1), 1], [cfg["BLOCK_N"], d])
                 for t in (k, v))


def _launch_args(cfg: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    blocks = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if "maxnreg" in cfg:
        launch["maxnreg"] = cfg["maxnreg"]
    return blocks, launch


def _consts(q: torch.Tensor, causal: bool) -> dict:
    d = q.shape[3]
    # float32 dots must not drop to tf32, or they miss the float32 accuracy the tests demand.
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return {"HEAD_DIM": d, "BLOCK_D": next_power_of_2(d), "CAUSAL": causal, "PREC": prec}


def _stride_unit(*tensors: torch.Tensor) -> int:
    """The UNIT the kernels take their batch, row and head strides divided by: 16 bytes' worth
    of elements where every such stride divides by it, so the product in the kernel tells
    Triton so. By itself Triton notes only divisibility by 16 elements; a head size like 72
    leaves the head stride at 8 mod 16, and every tile then loaded element by element (15-18
    TFLOP/s at D=72 on an H100, bench/NOTES-cuda.md). 1 (kernels as before) where all strides
    divide by 16 anyway, where one does not divide by the unit, or where one passes int32."""
    unit = 16 // tensors[0].element_size()
    strides = [s for t in tensors for s in t.stride()[:3]]
    if all(s % 16 == 0 for s in strides) or any(s % unit or s >= 2**31 for s in strides):
        return 1
    return unit


def _strides(t: torch.Tensor, unit: int) -> tuple[int, int, int, int]:
    sb, sn, sh, sd = t.stride()
    return sb // unit, sn // unit, sh // unit, sd


# Causal kernels interleave heads (see _group_size). H100, bf16, B=1 H=24, causal forward,
# TFLOP/s over cuDNN by heads per group (bench/NOTES-triton-flash.md, sixth session): D=64 at
# N=4096 0.84 one head at a time, 0.88 in groups of 8, 1.05 in groups of 12 or 24; at N=32768
# 0.97 one at a time, 0.92 for all 24. The rule below picked the best or near it in each of
# the 8 cells.
WAVES_PER_HEAD = 1.5


def _group_size(causal: bool, heads: int, per_head: int, bytes_per_head: float,
                device: torch.device) -> int:
    """How many heads a causal launch interleaves, heaviest programs first (_grouped_program in
    the kernels). One where not causal (every program costs the same) or where one head's
    `per_head` programs already fill WAVES_PER_HEAD waves of the SMs (the tail is short
    anyway, and each head's tensors stay hot in L2); otherwise as many heads as keep the
    tensors they read within the L2 cache, so the heaviest programs of many heads start first
    and the light ones fill the tail."""
    if not causal:
        return 1
    sms, l2_bytes = _sms_and_l2(device)
    if per_head >= WAVES_PER_HEAD * sms:
        return 1
    return int(max(1, min(heads, l2_bytes // max(bytes_per_head, 1))))


def head_group(q: torch.Tensor, k: torch.Tensor, causal: bool) -> int:
    """Query heads the forward interleaves: per head, 128-row blocks that read its K/V."""
    if not causal:
        return 1
    b, n, h, d = q.shape
    kv_bytes = 2 * k.shape[1] * d * k.element_size() * k.shape[2] / h  # per query head
    return _group_size(True, b * h, cdiv(n, 128), kv_bytes, q.device)


def bwd_head_group(q: torch.Tensor, k: torch.Tensor, causal: bool) -> int:
    """KV heads a backward launch interleaves: as many as keep their K/V and the Q/dO of the
    query heads sharing them within L2, with no wave cut-off (H100, bf16, causal, backward
    over cuDNN: D=128 N=4096 0.76 one head at a time, 0.88 in groups of 4 to 24; D=64 N=8192
    0.86 vs 0.93-0.94 in groups of 4 to 24; at N=32768 one head at a time is best or within
    1%, and this rule picks 1 there for D=128, 3 for D=64)."""
    if not causal:
        return 1
    b, n, h, d = q.shape
    m, hkv = k.shape[1], k.shape[2]
    head_bytes = 2 * (n * (h // hkv) + m) * d * k.element_size()
    return _group_size(True, b * hkv, 0, head_bytes, q.device)


def _sms_and_l2(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return 1 << 30, 1 << 62  # the interpreter: every head at once
    props = cuda_properties(device)
    return props.multi_processor_count, int(getattr(props, "L2_cache_size", 50 << 20))


class _ForwardPlan(NamedTuple):
    """What a forward launch derives from its key alone (shapes, strides, dtype, device,
    alignment, causal, the config's entry): worked out on a key's first call, then reused, as
    ~25 us of host time per call went into it (bench/NOTES-triton-flash.md, eighth session)."""

    group: int  # heads interleaved (head_group)
    grid: tuple[int]
    sizes: tuple[int, ...]  # the Triton kernel's stride and size arguments
    kwargs: dict[str, Any]  # its constexprs and launch options
    tma: bool  # K/V read through TMA descriptors (made per call: they hold the pointers)


_PLANS: dict[tuple[Any, ...], _ForwardPlan] = {}


def clear_plans() -> None:
    _PLANS.clear()


def _plan(q, k, v, out, causal, entry) -> _ForwardPlan:
    b, n, h, _ = q.shape
    m, hkv = k.shape[1], k.shape[2]
    blocks, launch = _launch_args(entry)
    unit = _stride_unit(q, k, v, out)
    tma = bool(entry.get("tma", 0) and _tma_ok(k) and _tma_ok(v))
    return _ForwardPlan(
        head_group(q, k, causal), (cdiv(n, blocks["BLOCK_M"]) * b * h,),
        (*(x for t in (q, k, v, out) for x in _strides(t, unit)), n, m, h, h // hkv),
        {**_consts(q, causal), **blocks, **launch,
         "WARP_SPEC": bool(entry.get("warp_specialize", 0)), "USE_TMA": tma, "UNIT": unit},
        tma)


def _forward(q, k, v, causal, scale, cfg):
    b, n, h, _ = q.shape
    out = _alloc(tuple(q.shape), q.dtype, q.device)
    lse = _alloc((b, h, n), torch.float32, q.device)
    entry = cfg["fwd"]
    key = (q.shape, k.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, causal,
           tuple(entry.items()), *(t.data_ptr() % 16 == 0 for t in (q, k, v, out, lse)))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(q, k, v, out, causal, entry)
    if gluon_paths.forward(q, k, v, causal, scale, entry, out, lse, plan.group, key):
        return out, lse
    descs = _kv_descriptors(k, v, entry) if plan.tma else (k, v)
    fast_launch.launch(_fwd_kernel, plan.grid,
                       (q, k, v, out, lse, *descs, *plan.sizes, plan.group, scale * LOG2E),
                       plan.kwargs, key=key)
    return out, lse


def _backward_delta(out, dout, lse, dlse, pad):
    """delta and lse in log2 units (lse2), float32 [B, H, NP], NP = N rounded up to `pad`:
    the padding rows hold delta = 0 and lse2 = +inf, so the kernels read whole blocks."""
    b, n, h, _ = out.shape
    n_pad = cdiv(n, pad) * pad
    delta = _alloc((b, h, n_pad), torch.float32, out.device)
    lse2 = _alloc((b, h, n_pad), torch.float32, out.device)
    block_m = 64
    grid = (cdiv(n_pad, block_m), b * h)
    d = out.shape[3]
    unit = _stride_unit(out, dout)
    fast_launch.launch(_bwd_delta_kernel, grid,
                       (out, dout, lse, delta, lse2, *_strides(out, unit),
                        *_strides(dout, unit), n, n_pad, h),
                       {"HEAD_DIM": d, "BLOCK_D": next_power_of_2(d), "BLOCK_M": block_m,
                        "num_warps": 4, "UNIT": unit})
    if dlse is not None:
        # d lse / d s = softmax row, so an lse gradient folds into delta: ds = p * (dp - delta
        # + dlse).
        delta[:, :, :n] -= dlse.float()
    return delta, lse2


def _stats_pad(cfg: dict[str, dict[str, int]]) -> int:
    """Row multiple of the lse2/delta padding: every query block the backward reads is whole
    (the Gluon backward's, where its switch is on, are 64 rows)."""
    gluon_rows = 64 if cfg["bwd_dkdv"].get("gluon", 0) else 1
    return max(cfg["bwd_dkdv"]["BLOCK_M"], cfg["bwd_dq"]["BLOCK_M"], gluon_rows)


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether a row offset within one (batch, head) of any [B, rows, H, D] tensor passes
    int32; the kernels then compute their row offsets in int64."""
    return any((t.shape[1] - 1) * t.stride(1) + (t.shape[3] - 1) * t.stride(3) >= 2**31
               for t in tensors)


def _bwd_blocks(cfg: dict[str, dict[str, int]], dkdv: bool, dq: bool) -> dict[str, int]:
    # Blocks of a kind that is not launched are pinned to 16, so they never cause a recompile.
    m1, n1 = (cfg["bwd_dkdv"]["BLOCK_M"], cfg["bwd_dkdv"]["BLOCK_N"]) if dkdv else (16, 16)
    m2, n2 = (cfg["bwd_dq"]["BLOCK_M"], cfg["bwd_dq"]["BLOCK_N"]) if dq else (16, 16)
    return {"BLOCK_M1": m1, "BLOCK_N1": n1, "BLOCK_M2": m2, "BLOCK_N2": n2,
            "DKDV": dkdv, "DQ_PROGRAMS": dq}


def _launch_bwd(args: tuple, grads: tuple, cfg: dict, kinds: tuple[bool, bool],
                atomic: bool, group: int | None = None) -> object:
    """One launch of _bwd_kernel running the dK/dV programs, the dQ programs, or both; returns
    Triton's compiled-kernel handle (n_regs, n_spills on a GPU), which the bench reports.
    group: kv heads interleaved (bwd_head_group's, worked out here when None)."""
    q, k, v, dout, lse2, delta, causal, scale = args
    b, n, h, _ = q.shape
    m, hkv = k.shape[1], k.shape[2]
    blocks = _bwd_blocks(cfg, *kinds)
    programs = ((cdiv(m, blocks["BLOCK_N1"]) if kinds[0] else 0)
                + (cdiv(n, blocks["BLOCK_M2"]) * (h // hkv) if kinds[1] else 0))
    _, launch = _launch_args(cfg["bwd_dkdv" if kinds[0] else "bwd_dq"])
    unit = _stride_unit(q, k, v, dout, *grads)
    return fast_launch.launch(
        _bwd_kernel, (programs * b * hkv,),
        (q, k, v, dout, lse2, delta, *grads,
         *(_strides(t, unit) for t in (q, k, v, dout, *grads)),
         n, lse2.shape[2], m, h, hkv, h // hkv,
         bwd_head_group(q, k, causal) if group is None else group, scale * LOG2E, scale),
        {**_consts(q, causal), **blocks, **launch, "ATOMIC_DQ": atomic,
         "INT64": _needs_int64(q, k, v, dout, *grads), "UNIT": unit,
         "PEEL": bool(causal and kinds[0] and cfg["bwd_dkdv"].get("peel_diagonal", 0))})


def _backward_kernels(q, k, v, dout, lse2, delta, causal, scale, cfg):
    """dQ, dK, dV from the saved tensors, lse2 and delta; the launches the config asks for."""
    args = (q, k, v, dout, lse2, delta, causal, scale)
    dk = _alloc(tuple(k.shape), k.dtype, k.device)
    dv = _alloc(tuple(v.shape), v.dtype, v.device)
    dq = _alloc(tuple(q.shape), q.dtype, q.device)
    group = bwd_head_group(q, k, causal)
    if gluon_paths.backward(q, k, v, dout, lse2, delta, causal, scale, cfg["bwd_dkdv"],
                            (dq, dk, dv), group):
        return dq, dk, dv
    if cfg["bwd_dkdv"].get("atomic_dq", 0) and not torch.are_deterministic_algorithms_enabled():
        acc = torch.zeros(tuple(q.shape), dtype=torch.float32, device=q.device)
        _launch_bwd(args, (acc, dk, dv), cfg, (True, False), True, group)
        dq.copy_(acc)
    elif cfg["bwd_dkdv"].get("single_launch", 0):
        _launch_bwd(args, (dq, dk, dv), cfg, (True, True), False, group)
    else:
        _launch_bwd(args, (dq, dk, dv), cfg, (True, False), False, group)
        _launch_bwd(args, (dq, dk, dv), cfg, (False, True), False, group)
    return dq, dk, dv


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    delta, lse2 = _backward_delta(out, dout, lse, dlse, _stats_pad(ctx.cfg))
    return _backward_kernels(q, k, v, dout, lse2, delta, ctx.causal, ctx.scale, ctx.cfg)


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
    override {"fwd" | "bwd_dkdv" | "bwd_dq": {BLOCK_M, BLOCK_N, num_warps, num_stages}}, plus
    optional "maxnreg" and switches (fwd: "tma", "warp_specialize", "gluon"; bwd_dkdv:
    "single_launch", "atomic_dq" and "gluon" (not deterministic; off under
    torch.use_deterministic_algorithms), "peel_diagonal"); "<kernel>_causal" entries replace
    "<kernel>" when causal. See attnrt.kernels.flash.configs_cuda for measured
    per-arch values.

    Equivalent PyTorch: flash_attention_reference(q, k, v, causal, softmax_scale, return_lse).
    """
    check_inputs(q, k, v, softmax_scale)
    cfg = _resolve_config(config, bool(causal))
    scale = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else float(softmax_scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _FlashAttention.apply(q, k, v, bool(causal), scale, cfg)
    else:  # the same kernels without autograd's bookkeeping (host time per call)
        out, lse = _forward(q, k, v, bool(causal), scale, cfg)
    return (out, lse) if return_lse else out


def flash_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                             causal: bool = False, softmax_scale: float | None = None,
                             config: dict | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [B, N, H, D], dk, dv [B, M, Hkv, D]) in the inputs' dtype, given the out and lse
    [B, H, N] float32 the query rows were normalised by: flash_attention's own (its backward),
    or those of a longer key set of which k, v are one piece (ring attention's merged out and
    lse; the result is then exactly that piece's share of the gradients). out, dout: q's
    shape and dtype, any strides. Arguments as flash_attention's.

    Equivalent PyTorch: p = exp(q k^T * scale - lse); dv = p^T dout;
    ds = p * (dout v^T - rowsum(dout * out)); dq = ds k * scale; dk = ds^T q * scale.
    """
    check_inputs(q, k, v, softmax_scale)
    for name, t in (("out", out), ("dout", dout)):
        if not isinstance(t, torch.Tensor) or t.shape != q.shape or t.dtype != q.dtype:
            what = (f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor)
                    else type(t).__name__)
            raise ValueError(f"{name}={what} is not supported by {NAME}; expected q's shape "
                             f"{tuple(q.shape)} and dtype {q.dtype}")
    want = (q.shape[0], q.shape[2], q.shape[1])
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != want:
        shape = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse.shape={shape} is not supported by {NAME}; expected [B, H, N] = "
                         f"{want}")
    cfg = _resolve_config(config, bool(causal))
    scale = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else float(softmax_scale)
    lse = lse.to(torch.float32).contiguous()
    delta, lse2 = _backward_delta(out, dout, lse, None, _stats_pad(cfg))
    return _backward_kernels(q, k, v, dout, lse2, delta, bool(causal), scale, cfg)
