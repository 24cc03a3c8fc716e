"""Generating the engine's Gluon sm90 forward of one variant: the consumer warpgroups' per-tile
math (score_mod, mask_mod, the OnlineFunc's row updates, p and o_scale) and epilogue (out and
the final row scales), around the fixed producer and buffers of engine/gluon_parts.py.

Shapes: q [B, N, H, D], k [B, M, Hkv, D], v [B, M, Hkv, Dv] -> out [B, N, H, Dv] and final row
scales FIN [R, B*H, N] float32, the Triton forward's contract (engine/codegen.py), so the
generated Triton backward runs after either.

Each consumer warpgroup owns 64 rows; its score tile S [64, BLOCK_N] lives in the wgmma
accumulator layout `s_layout`, rows in SliceLayout(1, s_layout), keys in SliceLayout(0, ...).
Expressions are printed with `gl.` functions over index tensors made in those layouts (rows
[64, 1], keys [1, BLOCK_N]); custom inputs are read with gl.load at such indices, so every value
shares the tile's layout. Row state is carried between tiles as [64] vectors. The walk: tile 0
(with the mask code: it may come from either list), the rest of the fully kept blocks with no
mask code, then the partial blocks with mask_mod and the sequence ends checked per element.
"""

from __future__ import annotations

from attnrt.engine.codegen import KernelFlags, _input_args
from attnrt.engine.emit import Emitter, literal
from attnrt.engine.spec import Variant
from attnrt.engine.trace import FLOAT, Expr

_HEAD = '''from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from attnrt.engine.gluon_parts import (
    BLOCK_M,
    CONSUMER_REGS,
    HALF,
    PRODUCER_REGS,
    STAGES,
    Cfg,
    allocate,
    producer,
)

'''


class GluonEmitter(Emitter):
    """Prints expressions as Gluon: `gl.` functions, tensors in the score tile's layouts.
    A row reduction of a value that does not read the score is broadcast to the tile first
    (adding `blk0`, zeros [64, BLOCK_N] in s_layout)."""

    ns = "gl"

    def _code(self, e: Expr) -> str:
        if e.op == "sigmoid":  # Gluon has no sigmoid; Triton's is this formula
            return f"(1.0 / (1.0 + gl.exp(-{self(e.args[0], as_float=True)})))"
        if e.op.startswith("reduce_"):
            x = self(e.args[0], as_float=True)
            if "score" not in e.args[0].leaves():
                x = f"({x} + blk0)"
            return self._reduce(e.op[7:], x)
        return super()._code(e)

    def _reduce(self, how: str, x: str) -> str:
        full = f"gl.abs({x})" if how == "abssum" else x
        if self.keep is not None:
            fill = literal(-1e30, FLOAT) if how == "max" else "0.0"
            full = f"gl.where({self.keep}, {full}, {fill})"
        op = "gl.max" if how == "max" else "gl.sum"
        return f"{op}({full}, 1, keep_dims=True)"


_LEAVES = {"score": "s", "b": "b_idx", "h": "h_idx", "q_idx": "q_idx", "kv_idx": "kv_idx"}


def _indent(lines: list[str], n: int) -> str:
    return "\n".join(" " * n + line for line in lines)


def _unit(e: Expr) -> bool:
    return e.op == "const" and e.attr == 1.0


def _rows(variant: Variant) -> str:
    return "".join(f"row_{n}, " for n, _ in variant.online.inits)


def _tile_lines(variant: Variant, flags: KernelFlags, table: dict, masked: bool) -> list[str]:
    prog = variant.online
    names = dict(_LEAVES, **{f"row.{n}": f"row_{n}[:, None]" for n, _ in prog.inits})
    em = GluonEmitter(names, table, "keep" if masked else None, "t", flags.fast_tanh)
    cols = "gl.minimum(offs_n, M - 1)" if masked else "offs_n"
    for line in ("offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))",
                 "row_ok = (offs_m < N)[:, None]", "q_rows = gl.minimum(offs_m, N - 1)[:, None]",
                 "h_idx = h", "b_idx = b", "q_idx = q_rows", f"kv_idx = {cols}[None, :]",
                 "blk0 = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)",
                 "col0 = gl.zeros([HALF, 1], gl.float32, layout=s_layout)"):
        em.line(line)
    if flags.scaled:
        em.line("s = s * scale")
    s2 = em(variant.score, as_float=True)
    if masked:
        terms = ["(offs_n[None, :] < M)", "row_ok"]
        if variant.mask is not None:
            terms.append(em(variant.mask))
        em.line(f"keep = {' & '.join(terms)}")
        em.line(f"s2 = gl.where(keep, {s2}, 0.0)")
        em.line("hit = gl.maximum(hit, gl.max(keep.to(gl.int32), 1))")
        s2 = "s2"
    em.rebind("score", s2)
    p = em(prog.p, as_float=True)
    if masked:
        p = em.temp(f"gl.where(keep, {p}, 0.0)")
    outs = [p]
    if not _unit(prog.o_scale):
        outs.append(em.temp(f"gl.sum({em(prog.o_scale, as_float=True)} + col0, 1)"))
    outs.append("hit")
    for _, e in prog.rows:  # in the order of prog.inits
        outs.append(em.temp(f"gl.sum({em(e, as_float=True)} + col0, 1)"))
    em.line(f"return {', '.join(outs)}")
    return em.lines


_TILE = '''@gluon.jit
def _tile_{kind}(s, start_n, offs_m, hit, {rows}{ptrs}{strides}N, M, b, h, scale,
{pad}BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
{body}

'''


def _tile_fn(variant: Variant, flags: KernelFlags, masked: bool) -> str:
    ptrs, strides, table = _input_args(variant)
    kind = "part" if masked else "full"
    return _TILE.format(kind=kind, rows=_rows(variant), ptrs=ptrs, strides=strides,
                        pad=" " * (len(kind) + 11),
                        body=_indent(_tile_lines(variant, flags, table, masked), 4))


def _call(variant: Variant, kind: str, start: str) -> list[str]:
    ptrs, strides, _ = _input_args(variant)
    targets = ["p"] + ([] if _unit(variant.online.o_scale) else ["o_scale"]) + ["hit"] + [
        f"row_{n}" for n, _ in variant.online.inits]
    return [f"{', '.join(targets)} = _tile_{kind}(",
            f"    s, {start}, offs_m, hit, {_rows(variant)}{ptrs}{strides}N, M, b, h, scale,",
            "    BLOCK_N, s_layout)"]


def _rescale(variant: Variant) -> str:
    if _unit(variant.online.o_scale):
        return "acc = warpgroup_mma_init(acc)"
    return "acc = warpgroup_mma_init(acc * gl.convert_layout(o_scale, row_o)[:, None])"


def _step(variant: Variant, kind: str, early_wait: bool) -> list[str]:
    """One steady-state tile j: S_j and P_{j-1} V_{j-1} issued in this warpgroup's turn.
    The tile's math runs while P_{j-1} V_{j-1} does, except where early_wait: then it waits for
    that product first, freeing P_{j-1}'s registers (partial tiles of 128 keys spilled without
    it: sm90, Triton 3.6, bench/NOTES-engine.md)."""
    late = kind == "full" or not early_wait
    row = "full_row + j" if kind == "full" else "part_row + (j - n_full)"
    return [
        f"kb = gl.load({row})",
        "slot = j % STAGES",
        "prev = (j - 1) % STAGES",
        "mbarrier.wait(sm.turn.index(wg), (j & 1) ^ (1 - wg))",
        "mbarrier.wait(sm.k_full.index(slot), (j // STAGES) & 1)",
        "s = warpgroup_mma(q, sm.k.index(slot).permute((1, 0)), s_zero, use_acc=False,",
        "                  is_async=True)",
        "mbarrier.wait(sm.v_full.index(prev), ((j - 1) // STAGES) & 1)",
        "acc = warpgroup_mma(p_op, sm.v.index(prev), acc, is_async=True)",
        "mbarrier.arrive(sm.turn.index(1 - wg))",
        "s = warpgroup_mma_wait(1, deps=(s,))  # S_j done; P_{j-1} V_{j-1} may still run",
        "mbarrier.arrive(sm.k_empty.index(slot))",
        *(_call(variant, kind, "kb * BLOCK_N") if late else []),
        "acc = warpgroup_mma_wait(0, deps=(acc,))",
        "mbarrier.arrive(sm.v_empty.index(prev))",
        *(_call(variant, kind, "kb * BLOCK_N") if not late else []),
        _rescale(variant),
        "p_op = gl.convert_layout(p.to(dtype), p_layout)",
    ]


_CONSUMER = '''@gluon.jit
def _consumer(wg: gl.constexpr, sm, O, FIN, full_row, part_row, {ptrs}sob, son, soh, s_fin,
              {strides}N, M, scale, b, h, bh, m0, n_full, n_tiles, cfg):
    HEAD_DIM_V: gl.constexpr = cfg.HEAD_DIM_V
    BLOCK_N: gl.constexpr = cfg.BLOCK_N
    dtype: gl.constexpr = sm.q.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM_V, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    offs_m = m0 + wg * HALF + gl.arange(0, HALF, layout=row_s)
{inits}
    hit = gl.zeros([HALF], gl.int32, layout=row_s) + (n_full > 0).to(gl.int32)
    acc = gl.zeros([HALF, HEAD_DIM_V], gl.float32, layout=o_layout)
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)
    q = sm.q.index(wg)
    mbarrier.wait(sm.q_bar, 0)
    if n_tiles > 0:
        kb = gl.where(n_full > 0, gl.load(full_row), gl.load(part_row))
        mbarrier.wait(sm.turn.index(wg), 1 - wg)  # warpgroup 0 goes first, then they alternate
        mbarrier.wait(sm.k_full.index(0), 0)
        s = warpgroup_mma(q, sm.k.index(0).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        mbarrier.arrive(sm.turn.index(1 - wg))
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(sm.k_empty.index(0))
{first}
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma_init(acc)
        for j in range(1, n_full):
{full}
        for j in range(gl.maximum(n_full, 1), n_tiles):
{part}
        last = (n_tiles - 1) % STAGES
        mbarrier.wait(sm.turn.index(wg), (n_tiles & 1) ^ (1 - wg))
        mbarrier.wait(sm.v_full.index(last), ((n_tiles - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, sm.v.index(last), acc, is_async=True)
        mbarrier.arrive(sm.turn.index(1 - wg))
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(sm.v_empty.index(last))
{epilogue}


@gluon.jit
def _consumer0(sm, O, FIN, full_row, part_row, {ptrs}sob, son, soh, s_fin, {strides}N, M, scale,
               b, h, bh, m0, n_full, n_tiles, cfg):
    _consumer(0, sm, O, FIN, full_row, part_row, {ptrs}sob, son, soh, s_fin, {strides}N, M,
              scale, b, h, bh, m0, n_full, n_tiles, cfg)


@gluon.jit
def _consumer1(sm, O, FIN, full_row, part_row, {ptrs}sob, son, soh, s_fin, {strides}N, M, scale,
               b, h, bh, m0, n_full, n_tiles, cfg):
    _consumer(1, sm, O, FIN, full_row, part_row, {ptrs}sob, son, soh, s_fin, {strides}N, M,
              scale, b, h, bh, m0, n_full, n_tiles, cfg)

'''


def _epilogue(variant: Variant, table: dict) -> list[str]:
    """out (0 for a row that kept no key) and the final row scales, as the Triton forward."""
    prog = variant.online
    lines = ["rows_o = m0 + wg * HALF + gl.arange(0, HALF, layout=row_o)",
             "q_rows = gl.minimum(offs_m, N - 1)[:, None]",
             "col0 = gl.zeros([HALF, 1], gl.float32, layout=s_layout)"]
    o_names = dict(b="b", h="h", q_idx="gl.minimum(rows_o, N - 1)[:, None]", o="acc",
                   **{f"row.{n}": f"gl.convert_layout(row_{n}, row_o)[:, None]"
                      for n, _ in prog.inits})
    em = GluonEmitter(o_names, table, None, "e")
    em.lines = lines
    out = em(prog.out, as_float=True)
    out = em.temp(f"gl.where(gl.convert_layout(hit, row_o)[:, None] > 0, {out}, 0.0)")
    em.line("cols_o = gl.arange(0, HEAD_DIM_V, layout=gl.SliceLayout(0, o_layout))")
    em.line(f"gl.store(O + b * sob + h * soh + rows_o[:, None] * son + cols_o[None, :], "
            f"{out}.to(dtype), mask=(rows_o < N)[:, None])")
    f_names = dict(b="b", h="h", q_idx="q_rows",
                   **{f"row.{n}": f"row_{n}[:, None]" for n, _ in prog.inits})
    fem = GluonEmitter(f_names, table, None, "f")
    fem.lines = em.lines
    for r, (_, e) in enumerate(prog.finals):
        val = fem(e, as_float=True)
        fem.line(f"gl.store(FIN + {r} * s_fin + bh * N + offs_m, gl.sum({val} + col0, 1), "
                 "mask=offs_m < N)")
    return fem.lines


_ENTRY = '''@gluon.jit
def engine_gluon_fwd(q_desc, k_desc, v_desc, O, FIN, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
                     {ptrs}sob, son, soh, s_fin, slb, slh, slq, scb, sch, {strides}N, M, H,
                     GROUP, scale, HEAD_DIM: gl.constexpr, HEAD_DIM_V: gl.constexpr,
                     BLOCK_N: gl.constexpr):
    pid = gl.num_programs(0) - 1 - gl.program_id(0)  # the last row block first: heaviest when
    bh = gl.program_id(1)                            # causal
    b = bh // H
    h = bh % H
    m0 = pid * BLOCK_M
    full_row = FULL_IDX + b * slb + h * slh + pid * slq
    part_row = PART_IDX + b * slb + h * slh + pid * slq
    n_full = gl.load(FULL_CNT + b * scb + h * sch + pid)
    n_part = gl.load(PART_CNT + b * scb + h * sch + pid)
    cfg = Cfg(HEAD_DIM, HEAD_DIM_V, BLOCK_N)
    sm = allocate(q_desc.dtype, q_desc, k_desc, v_desc, cfg)
    hk = h // GROUP
    consumer_args = (sm, O, FIN, full_row, part_row, {ptrs}sob, son, soh, s_fin, {strides}N, M,
                     scale, b, h, bh, m0, n_full, n_full + n_part, cfg)
    producer_args = (q_desc, k_desc, v_desc, sm, b * N + m0, h * HEAD_DIM, b * M, hk * HEAD_DIM,
                     hk * HEAD_DIM_V, full_row, part_row, n_full, n_part, cfg)
    gl.warp_specialize([(_consumer0, consumer_args), (_consumer1, consumer_args),
                        (producer, producer_args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
'''


def gluon_source(variant: Variant, flags: KernelFlags, block_n: int) -> str:
    """The Gluon forward module of a variant for key tiles of block_n (TraceError where an
    expression has no Gluon form). Variable-length calls are not generated
    (engine/gluon_forward.py refuses them)."""
    early_wait = block_n > 64
    ptrs, strides, table = _input_args(variant)
    inits = [f"row_{n} = gl.full([HALF], {literal(v, FLOAT)}, gl.float32, layout=row_s)"
             for n, v in variant.online.inits]
    consumer = _CONSUMER.format(
        ptrs=ptrs, strides=strides, inits=_indent(inits, 4),
        first=_indent(_call(variant, "part", "kb * BLOCK_N"), 8),
        full=_indent(_step(variant, "full", early_wait), 12),
        part=_indent(_step(variant, "part", early_wait), 12),
        epilogue=_indent(_epilogue(variant, table), 4))
    return (_HEAD + _tile_fn(variant, flags, False) + _tile_fn(variant, flags, True) + consumer
            + "\n" + _ENTRY.format(ptrs=ptrs, strides=strides))


__all__ = ["GluonEmitter", "gluon_source"]
