"""Triton kernels that refine chunk states to sub-block states (per-channel decay only).

Shapes as in chunked_jit. With per-channel decay the intra products are exact [BC, BC, BK]
sums, so the parallel kernels work on sub-blocks of BC = 16 tokens; the sequential passes still
walk chunks of BT = 64 (four times fewer steps) and these kernels derive, in parallel, what
the sub-blocks need. G holds log-decay sums within each BT chunk (every exponent below is a
difference of two of them, at most 0):

    h16[s]  = exp(G_a) * h64[c] + sum_{j < start(s)} (k_j * exp(G_a - G_j))^T v_j
    dh16[s] = exp(G_last - G_e) * dh64[c] + sum_{t > end(s)} (q_t * exp(G_t - G_e))^T do_t

for sub-block s of chunk c, G_a = G of the row before s (0 for the chunk's first sub-block),
G_e = G of s's last row, G_last = G of the chunk's last row; j and t run within chunk c.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnrt.kernels.linear.chunked_jit import (
    _g_row,
    load_mod,
    load_state,
    load_tile,
    store_state,
)


@triton.jit
def states_expand(k, v, G, h64, h16, N, NP, NT, NS, H: tl.constexpr, DK: tl.constexpr,
                  DV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, PREC: tl.constexpr, K_MOD: tl.constexpr = None,
                  V_MOD: tl.constexpr = None):
    """h16[s] = the state before sub-block s, from h64[c] and the chunk's earlier rows."""
    i_kv, s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hd = i_bh // H, i_bh % H
    k0, v0 = (i_kv // tl.cdiv(DV, BV)) * BK, (i_kv % tl.cdiv(DV, BV)) * BV
    c = s // (BT // BC)
    start = s * BC
    first = start == c * BT
    g_a = tl.where(first, 0.0, _g_row(G, b, hd, tl.maximum(start - 1, 0), k0, NP, H, DK, BK))
    acc = load_state(h64, i_bh, c, NT, k0, v0, DK, DV, BK, BV).to(tl.float32)
    acc = acc * tl.exp(g_a)[:, None]
    rows = c * BT + tl.arange(0, BT)
    kk = load_mod(k, b, hd, c * BT, k0, N, H, DK, BT, BK, K_MOD)
    gj = load_tile(G, b, hd, c * BT, k0, NP, H, DK, BT, BK)
    vv = load_mod(v, b, hd, c * BT, v0, N, H, DV, BT, BV, V_MOD)
    kt = tl.where((rows < start)[:, None], kk.to(tl.float32) * tl.exp(g_a[None, :] - gj), 0.0)
    acc = tl.dot(tl.trans(kt.to(vv.dtype)), vv, acc, input_precision=PREC)
    store_state(h16, acc, i_bh, s, NS, k0, v0, DK, DV, BK, BV)


@triton.jit
def grads_expand(q, do, G, dh64, dh16, N, NP, NT, NS, H: tl.constexpr, DK: tl.constexpr,
                 DV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, PREC: tl.constexpr, Q_MOD: tl.constexpr = None):
    """dh16[s] = dL/d(state after sub-block s), from dh64[c] and the chunk's later rows."""
    i_kv, s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hd = i_bh // H, i_bh % H
    k0, v0 = (i_kv // tl.cdiv(DV, BV)) * BK, (i_kv % tl.cdiv(DV, BV)) * BV
    c = s // (BT // BC)
    end = s * BC + BC - 1
    g_e = _g_row(G, b, hd, end, k0, NP, H, DK, BK)
    g_last = _g_row(G, b, hd, c * BT + BT - 1, k0, NP, H, DK, BK)
    acc = load_state(dh64, i_bh, c, NT, k0, v0, DK, DV, BK, BV).to(tl.float32)
    acc = acc * tl.exp(g_last - g_e)[:, None]
    rows = c * BT + tl.arange(0, BT)
    qq = load_mod(q, b, hd, c * BT, k0, N, H, DK, BT, BK, Q_MOD)
    gt = load_tile(G, b, hd, c * BT, k0, NP, H, DK, BT, BK)
    dd = load_tile(do, b, hd, c * BT, v0, N, H, DV, BT, BV)
    qt = tl.where((rows > end)[:, None], qq.to(tl.float32) * tl.exp(gt - g_e[None, :]), 0.0)
    acc = tl.dot(tl.trans(qt.to(dd.dtype)), dd, acc, input_precision=PREC)
    store_state(dh16, acc, i_bh, s, NS, k0, v0, DK, DV, BK, BV)
