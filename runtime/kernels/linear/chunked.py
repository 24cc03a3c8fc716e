"""attnrt's chunked linear-attention kernel (Triton), forward and backward, with element-wise
q/k/v mods optionally fused in (KernelMods; otherwise the inputs arrive modded).

Shapes: B batch, N sequence, H heads, Dk query/key head size, Dv value head size.
q, k [B, N, H, Dk]; v [B, N, H, Dv]; g None | [B, N, H] | [B, N, H, Dk] natural-log decay (<= 0);
states [B, H, Dk, Dv] float32. The meaning is `linear_attention_reference` (reference.py):

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,    o_t = q_t S_t

Algorithm (Triton kernels, two passes each way): the sequence is cut into chunks of BT
tokens; log-decays are summed within each chunk only (so every exponent is <= 0 and nothing
overflows at any N); one sequential pass per (head, key block, value block) writes the state
before each chunk; one parallel pass per chunk computes o = (q * exp(G)) @ S_chunk + (decayed,
causal q k^T) @ v as dense products. With per-channel decay the parallel passes take 16-token
sub-blocks (exact per-channel intra products) while the sequential ones walk 64-token chunks,
and a parallel kernel refines chunk states to sub-block states (chunked_expand_jit).
Backward walks the chunks in reverse for the state gradients (refined the same way), then
forms dq, dk, dv and the log-decay gradient per chunk in parallel (see chunked_bwd_jit).

States are stored in bfloat16 for bfloat16 inputs (as flash-linear-attention does) and in
float32 otherwise (fp16 would overflow on long undecayed sequences). Dots are IEEE float32 for
float32 inputs, TF32 for float32 states under 16-bit inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnrt.kernels import cdiv, next_power_of_2

# Launch shapes: "plain" for no or per-head decay (dense matrix products on 64-token chunks),
# "per_channel" for per-key-channel decay: the parallel kernels take sub-blocks of BT tokens
# (exact [BT, BT, BK] products), the sequential passes chunks of BT_STATES.
# From offline sm90 compiles (Triton 3.9, ptxas): 8 warps keep the plain kernels free of
# register spills (4 warps spill 32-296 bytes); the per-channel kernels need no more than 4.
# float32 states (fp16 and fp32 inputs: TF32 / IEEE dots on float32 operands) take narrower
# blocks: the 64-wide ones spill 200-6000 bytes there. BK, BV are
# upper bounds (narrower heads get the next power of two, at least 16). bench/
# linear_compile_check.py prints registers and spills; bench/linear_gpu.py --sweep times these.
CONFIGS: dict[str, dict[str, int]] = {
    "plain": {"BT": 64, "BK": 64, "BV": 64, "num_warps": 8, "num_stages": 2},
    "per_channel": {"BT": 16, "BT_STATES": 64, "BK": 32, "BV": 64, "num_warps": 4,
                    "num_stages": 2},
    "plain_f32_states": {"BT": 64, "BK": 32, "BV": 32, "num_warps": 8, "num_stages": 2},
    "per_channel_f32_states": {"BT": 16, "BT_STATES": 64, "BK": 32, "BV": 32, "num_warps": 4,
                               "num_stages": 2},
}


@dataclass(frozen=True)
class KernelMods:
    """Element-wise mods fused into the kernels: @triton.jit functions of a float32 tile (Q_MOD:
    q' = q_mod(q); Q_GRAD: q_mod'(q), the derivative, for the backward), None for identity.
    Every kernel that loads q, k or v applies the mod right after the load; the backward
    kernels multiply dq, dk, dv by the derivative at the raw input before storing them."""

    Q_MOD: Any = None
    K_MOD: Any = None
    V_MOD: Any = None
    Q_GRAD: Any = None
    K_GRAD: Any = None
    V_GRAD: Any = None

    def args(self, *names: str) -> dict[str, Any]:
        """The constexpr arguments `names` of one kernel."""
        return {name: getattr(self, name) for name in names}


NO_MODS = KernelMods()


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here, so tests can poison it with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


def g_mode(g: torch.Tensor | None) -> int:
    """0 no decay, 1 one log-decay per head and token [B, N, H], 2 per key channel."""
    return 0 if g is None else (1 if g.dim() == 3 else 2)


def config(mode: int, dtype: torch.dtype) -> dict[str, int]:
    key = "per_channel" if mode == 2 else "plain"
    return CONFIGS[key if state_dtype(dtype) == torch.bfloat16 else key + "_f32_states"]


def blocks(dk: int, dv: int, mode: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BT, BK, BV): chunk length and the key / value block widths (tl.dot needs >= 16)."""
    cfg = config(mode, dtype)
    bk = min(cfg["BK"], max(16, next_power_of_2(dk)))
    return cfg["BT"], bk, min(cfg["BV"], max(16, next_power_of_2(dv)))


def chunk_cumsum(g: torch.Tensor, bt: int) -> torch.Tensor:
    """Within-chunk cumulative sums of g [B, N, H(, Dk)], float32, padded to whole chunks with
    zero log-decay (factor 1): [B, NT * BT, H(, Dk)], contiguous."""
    b, n = g.shape[:2]
    nt = cdiv(n, bt)
    padded = torch.zeros((b, nt * bt, *g.shape[2:]), dtype=torch.float32, device=g.device)
    padded[:, :n] = g
    return padded.view(b, nt, bt, *g.shape[2:]).cumsum(2).view(padded.shape).contiguous()


def _metas(q: torch.Tensor, v: torch.Tensor, mode: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Launch arguments of the parallel kernels and of the sequential (states) kernels: the
    same except with per-channel decay, whose states walk chunks of BT_STATES tokens."""
    b, n, h, dk = q.shape
    bt, bk, bv = blocks(dk, v.shape[-1], mode, q.dtype)
    cfg = config(mode, q.dtype)
    bts = cfg.get("BT_STATES", bt)
    meta = {"N": n, "NP": cdiv(n, bts) * bts, "NT": cdiv(n, bt), "H": h, "DK": dk,
            "DV": v.shape[-1], "BT": bt, "BK": bk, "BV": bv, "G_MODE": mode, "SUB": bts // bt,
            "PREC": "ieee" if q.dtype == torch.float32 else "tf32",
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return meta, {**meta, "NT": cdiv(n, bts), "BT": bts, "SUB": 1}


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _forward(q, k, v, gcum, h0, mode, keep_states, mods):
    from attnrt.kernels.linear import chunked_jit as jit

    b, n, h, dk = q.shape
    dv = v.shape[-1]
    meta, smeta = _metas(q, v, mode)
    nk, nv = cdiv(dk, meta["BK"]), cdiv(dv, meta["BV"])
    states = _alloc((b, h, smeta["NT"], dk, dv), state_dtype(q.dtype), q.device)
    ht = _alloc((b, h, dk, dv), torch.float32, q.device)
    g_arg = gcum if gcum is not None else ht  # never read in mode 0
    jit.states_fwd[(nk, nv, b * h)](k, v, g_arg, states, h0 if h0 is not None else ht, ht,
                                    HAS_H0=h0 is not None, STORE_HT=True, **smeta,
                                    **mods.args("K_MOD", "V_MOD"))
    if meta["SUB"] > 1:
        states = _expand("states_expand", (k, v, g_arg, states), meta, (b, h, dk, dv),
                         mods.args("K_MOD", "V_MOD"))
    o = _alloc((b, n, h, dv), q.dtype, q.device)
    jit.output_fwd[(nv, meta["NT"], b * h)](q, k, v, g_arg, states, o, **meta,
                                            **mods.args("Q_MOD", "K_MOD", "V_MOD"))
    return o, ht, (states if keep_states else None)


def _expand(name, args, meta, shape, mod_args):  # type: ignore[no-untyped-def]
    """Sub-block states (or state gradients) from chunk ones (chunked_expand_jit)."""
    from attnrt.kernels.linear import chunked_expand_jit as ejit

    b, h, dk, dv = shape
    out = _alloc((b, h, meta["NT"], dk, dv), args[3].dtype, args[3].device)
    grid = (cdiv(dk, meta["BK"]) * cdiv(dv, meta["BV"]), meta["NT"], b * h)
    nt_states = cdiv(meta["N"], meta["BT"] * meta["SUB"])
    getattr(ejit, name)[grid](*args, out, meta["N"], meta["NP"], nt_states, meta["NT"],
                              H=h, DK=dk, DV=dv, BT=meta["BT"] * meta["SUB"], BC=meta["BT"],
                              BK=meta["BK"], BV=meta["BV"], PREC=meta["PREC"],
                              num_warps=meta["num_warps"], **mod_args)
    return out


def _backward(ctx, do, dht):
    from attnrt.kernels.linear import chunked_bwd_jit as bjit
    from attnrt.kernels.linear import chunked_jit as jit

    q, k, v, gcum, h0, states, ht = ctx.saved_tensors
    mode, has_h0, mods = ctx.mode, ctx.has_h0, ctx.mods
    b, n, h, dk = q.shape
    dv_size = v.shape[-1]
    meta, smeta = _metas(q, v, mode)
    nk, nv, nt = cdiv(dk, meta["BK"]), cdiv(dv_size, meta["BV"]), meta["NT"]
    do = do.contiguous()
    dh = _alloc((b, h, smeta["NT"], dk, dv_size), states.dtype, q.device)
    dh0 = _alloc((b, h, dk, dv_size), torch.float32, q.device) if has_h0 else ht
    g_arg = gcum if mode else ht
    jit.states_bwd[(nk, nv, b * h)](q, do, g_arg, dh, dht if dht is not None else ht, dh0,
                                    HAS_DHT=dht is not None, STORE_DH0=has_h0, **smeta,
                                    **mods.args("Q_MOD"))
    if meta["SUB"] > 1:
        dh = _expand("grads_expand", (q, do, g_arg, dh), meta, (b, h, dk, dv_size),
                     mods.args("Q_MOD"))
    dv = _alloc(v.shape, v.dtype, q.device)
    bjit.dv_bwd[(nv, nt, b * h)](q, k, v, do, g_arg, dh, dv, **meta,
                                 **mods.args("Q_MOD", "K_MOD", "V_GRAD"))
    dq = _alloc(q.shape, q.dtype, q.device)
    dk_ = _alloc(k.shape, k.dtype, q.device)
    dg = _alloc((nk, b, n, h) if mode == 1 else (b, n, h, dk), torch.float32, q.device)
    bjit.dqk_bwd[(nk, nt, b * h)](q, k, v, do, g_arg, states, dh, dq, dk_, dg, DG_SPLIT=b * n * h,
                                  **meta, **mods.args("Q_MOD", "K_MOD", "V_MOD", "Q_GRAD",
                                                      "K_GRAD"))
    dg = (dg.sum(0) if mode == 1 else dg) if mode else None
    return dq, dk_, dv, dg, (dh0 if has_h0 else None)


class _ChunkedLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, g, h0, mods):
        mode = g_mode(g)
        _, smeta = _metas(q, v, mode)
        gcum = chunk_cumsum(g, smeta["BT"]) if g is not None else None
        keep = any(ctx.needs_input_grad)
        o, ht, states = _forward(q, k, v, gcum, h0, mode, keep, mods)
        if keep:
            ctx.mode, ctx.has_h0, ctx.mods = mode, h0 is not None, mods
            ctx.save_for_backward(q, k, v, gcum, h0, states, ht)
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx: Any, do, dht):
        if do is None:
            do = torch.zeros(ctx.saved_tensors[0].shape[:3] + ctx.saved_tensors[2].shape[-1:],
                             dtype=ctx.saved_tensors[2].dtype, device=ctx.saved_tensors[0].device)
        return (*_backward(ctx, do, dht), None)


def chunked_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             g: torch.Tensor | None = None,
                             initial_state: torch.Tensor | None = None,
                             output_final_state: bool = False, mods: KernelMods = NO_MODS,
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with the Triton chunked kernel, differentiable in every input.

    q, k [B, N, H, Dk], v [B, N, H, Dv] (one dtype: fp16, bf16 or fp32, one CUDA device, or CPU
    under TRITON_INTERPRET=1), g None | [B, N, H] | [B, N, H, Dk] natural-log decay,
    initial_state [B, H, Dk, Dv] float32 -> (o [B, N, H, Dv], final state [B, H, Dk, Dv]
    float32 or None). Inputs are assumed checked (the engine does it). `mods` fuses element-wise
    q/k/v mods into the kernels (attnrt.engine.linear_codegen builds them); the gradients are
    then those of the raw q, k, v.

    Equivalent PyTorch: linear_attention_reference(q_mod(q), k_mod(k), v_mod(v), g,
    causal=True, initial_state=initial_state, output_final_state=output_final_state), each mod
    computed in float32 and cast to q's dtype.
    """
    b, n, h, _ = q.shape
    if n == 0:
        state = (initial_state.float() if initial_state is not None
                 else q.new_zeros(b, h, q.shape[-1], v.shape[-1], dtype=torch.float32))
        return q.new_zeros(b, 0, h, v.shape[-1]), (state if output_final_state else None)
    q, k, v = (t.contiguous() for t in (q, k, v))
    g = g.float().contiguous() if g is not None else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    o, ht = _ChunkedLinearAttention.apply(q, k, v, g, h0, mods)
    return o, (ht if output_final_state else None)
