"""Generated backward kernels: dK/dV (and custom-input gradients, by atomic adds) per block of
keys, dQ per block of rows. Both recompute p = forward(s, final_rowscales) and
ds = backward(dp, p, final_rowscales, doosum), then ds_raw = ds * d score_mod / d s.

Shapes: DO [B, N, H, Dv]; DOOSUM [B*H, N] float32 (rowsum(do * o)); DK [B, M, H, D] and
DV [B, M, H, Dv] float32 per query head (the host sums GQA groups); DQ [B, N, H, D] float32.
"""

from __future__ import annotations

from attnrt.engine.codegen import (
    _LEAVES,
    KernelFlags,
    _col_side,
    _indent,
    _input_args,
    _load_kv,
    _row_side,
    _scores,
    input_grads,
    score_grad,
)
from attnrt.engine.emit import Emitter
from attnrt.engine.spec import Variant
from attnrt.engine.trace import Expr

_COMMON = '''DOCQ, POSQ, DOCK, POSK, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
        {ptrs}{grad_ptrs}sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
        sgb, sgn, sgh, s_fin, slb, slh, slq, scb, sch, {strides}N, M, H, GROUP, scale,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PREC: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    list_off = b * slb + h * slh + pid * slq
    cnt_off = b * scb + h * sch + pid
'''

_DKDV = '''@triton.jit
def engine_bwd_dkdv(Q, K, V, DO, FIN, DOOSUM, DK, DV, ''' + _COMMON + '''\
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n[:, None] < M
{kload}
{vload}
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    n_full = tl.load(FULL_CNT + cnt_off)
    for j in range(0, n_full):
        start_m = tl.load(FULL_IDX + list_off + j) * BLOCK_M
{full}
    n_part = tl.load(PART_CNT + cnt_off)
    for j in range(0, n_part):
        start_m = tl.load(PART_IDX + list_off + j) * BLOCK_M
{part}
    g_ptrs = b.to(tl.int64) * sgb + h * sgh + offs_n[:, None].to(tl.int64) * sgn
    tl.store(DK + g_ptrs + offs_d[None, :], dk, mask=col_ok & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + g_ptrs + offs_dv[None, :], dv, mask=col_ok & (offs_dv[None, :] < HEAD_DIM_V))
'''

_DQ = '''@triton.jit
def engine_bwd_dq(Q, K, V, DO, FIN, DOOSUM, DQ, ''' + _COMMON + '''\
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
{rowload}
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = tl.load(FULL_CNT + cnt_off)
    for j in range(0, n_full):
        start_n = tl.load(FULL_IDX + list_off + j) * BLOCK_N
{full}
    n_part = tl.load(PART_CNT + cnt_off)
    for j in range(0, n_part):
        start_n = tl.load(PART_IDX + list_off + j) * BLOCK_N
{part}
    tl.store(DQ + b.to(tl.int64) * sgb + h * sgh + offs_m[:, None].to(tl.int64) * sgn
             + offs_d[None, :], dq, mask=row_ok & (offs_d[None, :] < HEAD_DIM))
'''


def _row_loads(variant: Variant, flags: KernelFlags, t: bool = False) -> list[str]:
    """q, do, final row scales and doosum of the rows offs_m, and their index leaves (as
    [1, BLOCK_M] rows of a transposed block when t)."""
    lines = [
        "row_ok = offs_m[:, None] < N",
        *(["row_ok_t = offs_m[None, :] < N"] if t else []),
        "q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqn"
        " + offs_d[None, :], mask=row_ok & (offs_d[None, :] < HEAD_DIM), other=0.0)",
        "do = tl.load(DO + b.to(tl.int64) * sdob + h * sdoh + offs_m[:, None].to(tl.int64) * "
        "sdon + offs_dv[None, :], mask=row_ok & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)",
        *_row_side(flags, t=t),
        "doosum = tl.load(DOOSUM + bh.to(tl.int64) * N + q_rows)",
    ]
    for r, (name, _) in enumerate(variant.online.finals):
        lines.append(f"fin_{name} = tl.load(FIN + {r} * s_fin + bh.to(tl.int64) * N + q_rows)")
    return lines


def _names(variant: Variant) -> dict[str, str]:
    finals = {f"final.{n}": f"fin_{n}" for n, _ in variant.online.finals}
    return dict(_LEAVES, doosum="doosum", **finals)


def _grad_core(em: Emitter, variant: Variant, flags: KernelFlags, masked: bool,
               t: bool = False) -> str:
    """p and ds (raw-score gradient) of the block ([keys, rows] when t); returns ds's
    variable."""
    prog = variant.online
    s2 = _scores(em, variant, flags, masked, t)
    dsmod = em(score_grad(variant), as_float=True)
    em.rebind("score", s2)
    p = em(prog.recompute, as_float=True)
    em.line(f"p = tl.where(keep, {p}, 0.0)" if masked else f"p = {p}")
    em.line(f"dp = {'tl.dot(v, tl.trans(do)' if t else 'tl.dot(do, tl.trans(v)'}, "
            "input_precision=PREC)")
    em.rebind("p", "p")
    em.names["dp"] = "dp"
    ds2 = em(prog.dscore, as_float=True)
    em.line(f"ds2 = tl.where(keep, {ds2}, 0.0)" if masked else f"ds2 = {ds2}")
    em.line(f"ds = ds2 * {dsmod}" + (" * scale" if flags.scaled else ""))
    return "ds"


def _atomics(em: Emitter, variant: Variant, flags: KernelFlags, score_em: Emitter,
             t: bool = False) -> None:
    """Custom-input gradients of the block, summed over the axes the read does not index;
    the block is [BLOCK_M, BLOCK_N], or [BLOCK_N, BLOCK_M] when t."""
    rows, keys = (1, 0) if t else (0, 1)  # the block's axis of rows and of keys
    shape = ["BLOCK_M", "BLOCK_N"][::-1 if t else 1]
    for name, node, grad in input_grads(variant, flags.input_grads):
        _, strides = em.inputs[name]
        index = [score_em(a) for a in node.args]
        em.line(f"g = ds2 * {score_em(grad, as_float=True)}")
        addr = f"DIN_{name} + " + " + ".join(f"({i}) * {s}" for i, s in
                                              zip(index, strides, strict=True))
        leaves = set().union(*(a.leaves() for a in node.args)) if node.args else set()
        q_dep = bool(leaves & {"q_idx"}) or (flags.varlen and "b" in leaves) or any(
            x.startswith("in.") for x in leaves)
        kv_dep = "kv_idx" in leaves or any(x.startswith("in.") for x in leaves)
        if q_dep and kv_dep:
            em.line(f"tl.atomic_add({addr} + tl.zeros([{', '.join(shape)}], dtype=tl.int32), "
                    "g)")
        elif q_dep or kv_dep:  # sum over the other axis
            axis = keys if q_dep else rows
            kept = ["1", "1"]
            kept[1 - axis] = shape[1 - axis]
            em.line(f"tl.atomic_add({addr} + tl.zeros([{', '.join(kept)}], dtype=tl.int32), "
                    f"tl.sum(g, {axis}, keep_dims=True))")
        else:
            em.line(f"tl.atomic_add({addr}, tl.sum(tl.sum(g, 1), 0))")


def _dkdv_body(variant: Variant, flags: KernelFlags, table: dict, masked: bool,
               t: bool) -> str:
    """One step of dK/dV over a block of rows; t: the block is computed as [keys, rows] (see
    transposed)."""
    em = Emitter(_names(variant), table, "keep" if masked else None, "t", flags.fast_tanh)
    em.line("offs_m = start_m + tl.arange(0, BLOCK_M)")
    for line in _row_loads(variant, flags, t):
        em.line(line)
    # Index and input reads for the atomics see the raw score (score_mod's argument).
    score_em = Emitter(dict(_names(variant), score="s"), table, None, "u", flags.fast_tanh)
    score_em.lines = em.lines
    _grad_core(em, variant, flags, masked, t)
    if t:
        em.line("dv += tl.dot(p.to(do.dtype), do, input_precision=PREC)")
        em.line("dk += tl.dot(ds.to(q.dtype), q, input_precision=PREC)")
    else:
        em.line("dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)")
        em.line("dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)")
    _atomics(em, variant, flags, score_em, t)
    return _indent(em.lines, 8)


def _reduces(expr: Expr | None) -> bool:
    """Whether the expression reduces over the keys of a row anywhere."""
    stack = [expr] if expr is not None else []
    while stack:
        node = stack.pop()
        if node.op.startswith("reduce_"):
            return True
        stack.extend(node.args)
    return False


def transposed(variant: Variant) -> bool:
    """Whether dK/dV computes its blocks as [keys, rows]: p and ds then feed the dK/dV
    products without a transpose. Computed as [rows, keys], Triton 3.6 rematerialised p's
    exponentials in the transposed layout (4x the exp2 of our dense kernel's dK/dV at
    (64, 128, 8 warps), and 672-912 bytes of register spills on sm90: bench/
    engine_compile_check.py). Every element-wise expression reads the same in either
    orientation; a row reduction (over keys) keeps the [rows, keys] block."""
    prog = variant.online
    return not any(_reduces(e) for e in (variant.score, variant.mask, prog.recompute,
                                          prog.dscore))


def _dq_body(variant: Variant, flags: KernelFlags, table: dict, masked: bool) -> str:
    em = Emitter(_names(variant), table, "keep" if masked else None, "t", flags.fast_tanh)
    em.line("offs_n = start_n + tl.arange(0, BLOCK_N)")
    for line in _col_side(flags, masked):
        em.line(line)
    em.line(_load_kv("k", "offs_n", masked))
    em.line(_load_kv("v", "offs_n", masked))
    _grad_core(em, variant, flags, masked)
    em.line("dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)")
    return _indent(em.lines, 8)


def backward_source(variant: Variant, flags: KernelFlags) -> str:
    ptrs, strides, table = _input_args(variant)
    grad_ptrs = "".join(f"DIN_{n}, " for n in flags.input_grads)
    fmt = {"ptrs": ptrs, "grad_ptrs": grad_ptrs, "strides": strides}
    t = transposed(variant)
    kv_cols = _col_side(flags, True, "offs_n", t)
    dkdv = _DKDV.format(
        **fmt, kload=_indent([*kv_cols, _load_kv("k", "offs_n", True)], 4),
        vload=_indent([_load_kv("v", "offs_n", True)], 4),
        full=_dkdv_body(variant, flags, table, False, t),
        part=_dkdv_body(variant, flags, table, True, t))
    dq = _DQ.format(**{**fmt, "grad_ptrs": ""}, rowload=_indent(_row_loads(variant, flags), 4),
                    full=_dq_body(variant, flags, table, False),
                    part=_dq_body(variant, flags, table, True))
    return dkdv + "\n\n" + dq
