"""Generating the Triton flash-attention kernels of one variant: forward, and the backward's
dK/dV (with custom-input gradients) and dQ kernels.

Shapes: q [B, N, H, D], k [B, M, Hkv, D], v [B, M, Hkv, Dv], o [B, N, H, Dv]; final row
scales FIN [R, B*H, N] float32. Each program owns one block of rows (or keys, for dK/dV) of one
(batch, head) and walks two lists of the other side's blocks: fully kept blocks (no mask
code) and partial ones (mask_mod, sequence ends and variable-length boundaries checked per
element). Blocks nobody keeps are never visited. See engine/kernel.py for the host side.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnrt.engine.call import input_reads
from attnrt.engine.emit import Emitter, diff, literal
from attnrt.engine.spec import Variant
from attnrt.engine.trace import FLOAT, Expr, make


@dataclass(frozen=True)
class KernelFlags:
    """What changes the generated text besides the variant."""

    varlen: bool
    scaled: bool
    input_grads: tuple[str, ...]  # custom inputs whose gradient the backward computes
    fast_tanh: bool = False  # tanh as PTX tanh.approx.f32 (kernel.FAST_TANH: 16-bit on CUDA)


def _input_args(variant: Variant) -> tuple[str, str, dict[str, tuple[str, list[str]]]]:
    ptrs, strides, table = [], [], {}
    for name, spec in variant.inputs:
        ss = [f"s_{name}_{d}" for d in range(len(spec))]
        ptrs.append(f"IN_{name}")
        strides += ss
        table[name] = (f"IN_{name}", ss)
    return "".join(p + ", " for p in ptrs), "".join(s + ", " for s in strides), table


_HEAD = '''import triton
import triton.language as tl

'''

_FWD_SIG = '''@triton.jit
def engine_fwd(Q, K, V, O, FIN, DOCQ, POSQ, DOCK, POSK, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
               {ptrs}sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, s_fin,
               slb, slh, slq, scb, sch, {strides}N, M, H, GROUP, scale,
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
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m[:, None] < N
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqn
                + offs_d[None, :], mask=row_ok & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
{rowside}
{inits}
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    list_off = b * slb + h * slh + pid * slq
    cnt_off = b * scb + h * sch + pid
    n_full = tl.load(FULL_CNT + cnt_off)
    hit = tl.zeros([BLOCK_M], dtype=tl.int32) + (n_full > 0).to(tl.int32)
    for j in range(0, n_full):
        start_n = tl.load(FULL_IDX + list_off + j) * BLOCK_N
{full}
    n_part = tl.load(PART_CNT + cnt_off)
    for j in range(0, n_part):
        start_n = tl.load(PART_IDX + list_off + j) * BLOCK_N
{part}
{epilogue}
'''


# A per-row or per-key vector as a column ([X, 1], index True) or a row ([1, X], False).
_AXIS = {True: "[:, None]", False: "[None, :]"}


def _indent(lines: list[str], n: int) -> str:
    return "\n".join(" " * n + line for line in lines)


def _row_side(flags: KernelFlags, offs: str = "offs_m", t: bool = False) -> list[str]:
    """Index leaves of the rows (b, q_idx), clamped into range for loads; t: the block is
    transposed ([keys, rows]), so rows run along its second axis."""
    lines = [f"q_rows = tl.minimum({offs}, N - 1){_AXIS[not t]}", "h_idx = h"]
    if flags.varlen:
        lines += ["b_idx = tl.load(DOCQ + q_rows)", "q_idx = tl.load(POSQ + q_rows)"]
    else:
        lines += ["b_idx = b", "q_idx = q_rows"]
    return lines


def _col_side(flags: KernelFlags, masked: bool, offs: str = "offs_n",
              t: bool = False) -> list[str]:
    cols = f"tl.minimum({offs}, M - 1)" if masked else offs
    cols += _AXIS[t]
    lines = [f"kv_cols = {cols}"]
    if flags.varlen:
        lines += ["kv_idx = tl.load(POSK + kv_cols)", "kv_doc = tl.load(DOCK + kv_cols)"]
    else:
        lines += ["kv_idx = kv_cols"]
    return lines


def _keep(em: Emitter, variant: Variant, flags: KernelFlags, t: bool = False) -> None:
    terms = [f"(offs_n{_AXIS[t]} < M)", "row_ok_t" if t else "row_ok"]
    if variant.mask is not None:
        terms.append(em(variant.mask))
    if flags.varlen:
        terms.append("(b_idx == kv_doc)")
    em.line(f"keep = {' & '.join(terms)}")


def _scores(em: Emitter, variant: Variant, flags: KernelFlags, masked: bool,
            t: bool = False) -> str:
    """Lines computing the modified, masked score block ([rows, keys], or [keys, rows] when
    t); returns its variable."""
    product = "tl.dot(k, tl.trans(q)" if t else "tl.dot(q, tl.trans(k)"
    em.line(f"s = {product}, input_precision=PREC)" + (" * scale" if flags.scaled else ""))
    s2 = em(variant.score, as_float=True)
    if masked:
        _keep(em, variant, flags, t)
        em.line(f"s2 = tl.where(keep, {s2}, 0.0)")
        return "s2"
    return s2


_LEAVES = {"score": "s", "b": "b_idx", "h": "h_idx", "q_idx": "q_idx", "kv_idx": "kv_idx"}


def _load_kv(which: str, offs: str, masked: bool) -> str:
    dim = "offs_d" if which == "k" else "offs_dv"
    head = "HEAD_DIM" if which == "k" else "HEAD_DIM_V"
    base, stride = f"{which}_base", f"s{which}n"
    mask = f"(offs_n[:, None] < M) & ({dim}[None, :] < {head})" if masked else \
        f"{dim}[None, :] < {head}"
    return (f"{which} = tl.load({base} + {offs}[:, None].to(tl.int64) * {stride} + "
            f"{dim}[None, :], mask={mask}, other=0.0)")


_CARRY = "row_{n} = tl.sum({v}, 1)"


def _fwd_body(variant: Variant, flags: KernelFlags, table: dict, masked: bool) -> str:
    prog = variant.online
    names = dict(_LEAVES, **{f"row.{n}": f"row_{n}[:, None]" for n, _ in prog.inits})
    em = Emitter(names, table, "keep" if masked else None, "t", flags.fast_tanh)
    em.line("offs_n = start_n + tl.arange(0, BLOCK_N)")
    for line in _col_side(flags, masked):
        em.line(line)
    em.line(_load_kv("k", "offs_n", masked))
    s2 = _scores(em, variant, flags, masked)
    em.rebind("score", s2)
    if masked:
        em.line("hit = tl.maximum(hit, tl.max(keep.to(tl.int32), 1))")
    p = em(prog.p, as_float=True)
    if masked:
        em.line(f"p = tl.where(keep, {p}, 0.0)")
        p = "p"
    new_rows = [(n, em(e, as_float=True)) for n, e in prog.rows]
    o_scale = prog.o_scale
    em.line(_load_kv("v", "offs_n", masked))
    if o_scale.op == "const" and o_scale.attr == 1.0:
        em.line(f"acc = tl.dot({p}.to(v.dtype), v, acc, input_precision=PREC)")
    else:
        em.line(f"acc = tl.dot({p}.to(v.dtype), v, acc * {em(o_scale, as_float=True)}, "
                "input_precision=PREC)")
    for n, var in new_rows:
        em.line(_CARRY.format(n=n, v=f"{var} + tl.zeros([BLOCK_M, 1], dtype=tl.float32)"))
    return _indent(em.lines, 8)


def _fwd_epilogue(variant: Variant, table: dict, masked: bool) -> str:
    prog = variant.online
    names = dict(_LEAVES, o="acc", **{f"row.{n}": f"row_{n}[:, None]" for n, _ in prog.inits})
    em = Emitter(names, table, None, "e")
    out = em(prog.out, as_float=True)
    if masked:
        out = em.temp(f"tl.where(hit[:, None] > 0, {out}, 0.0)")
    em.line(f"tl.store(O + b.to(tl.int64) * sob + h * soh + offs_m[:, None].to(tl.int64) * son"
            f" + offs_dv[None, :], {out}.to(O.dtype.element_ty), "
            "mask=row_ok & (offs_dv[None, :] < HEAD_DIM_V))")
    for r, (_, e) in enumerate(prog.finals):
        val = em(e, as_float=True)
        em.line(f"tl.store(FIN + {r} * s_fin + bh.to(tl.int64) * N + offs_m[:, None], "
                f"{val} + tl.zeros([BLOCK_M, 1], dtype=tl.float32), mask=row_ok)")
    return _indent(em.lines, 4)


def masked_kernel(variant: Variant, flags: KernelFlags) -> bool:
    return variant.mask is not None or flags.varlen


def forward_source(variant: Variant, flags: KernelFlags) -> str:
    ptrs, strides, table = _input_args(variant)
    inits = [f"row_{n} = tl.full([BLOCK_M], {literal(v, FLOAT)}, dtype=tl.float32)"
             for n, v in variant.online.inits]
    return _FWD_SIG.format(
        ptrs=ptrs, strides=strides, rowside=_indent(_row_side(flags), 4),
        inits=_indent(inits, 4), full=_fwd_body(variant, flags, table, False),
        part=_fwd_body(variant, flags, table, True),
        epilogue=_fwd_epilogue(variant, table, True))


def score_grad(variant: Variant) -> Expr:
    """d score_mod / d score."""
    return diff(variant.score, "score")


def input_grads(variant: Variant, names: tuple[str, ...]) -> list[tuple[str, Expr, Expr]]:
    """(input name, read node, d score_mod / d read) for each read of a differentiated input."""
    out = []
    for name, node in input_reads(variant):
        if name in names:
            out.append((name, node, diff(variant.score, node.text)))
    return out


def source(variant: Variant, flags: KernelFlags) -> str:
    """The whole generated module: forward, dK/dV and dQ kernels."""
    from attnrt.engine.codegen_bwd import backward_source

    return _HEAD + forward_source(variant, flags) + "\n\n" + backward_source(variant, flags)


__all__ = ["KernelFlags", "make", "source"]
