"""Triton kernels of chunked linear attention (imported only when a kernel runs).

Shapes: B batch, N sequence (NP padded to NT chunks of BT), H heads, DK/DV head sizes.
q, k [B, N, H, DK]; v, o [B, N, H, DV] (contiguous); G [B, NP, H, GD] float32 holds the
cumulative log-decay *within each chunk* (GD = DK per channel, 1 per head); h [B, H, NT, DK, DV]
the state before each chunk; dh [B, H, NT, DK, DV] the gradient of the state after each chunk.

G_MODE: 0 no decay, 1 one log-decay per head and token, 2 one per head, token and key channel.
Every exponent is a difference G_i - G_j with i at or after j inside one chunk, or G itself, so
it is <= 0: no overflow at any length (the global cumulative sum is never formed). Mode 2 forms
the intra-chunk products exactly, channel by channel ([BT, BT, BK] in registers), so its chunks
are short; modes 0 and 1 are plain matrix products.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_ptrs(base, b, t, hd, offs, N, H: tl.constexpr, D: tl.constexpr):
    """Pointers to rows t, columns offs of head hd of a contiguous [B, N, H, D] tensor."""
    return base + ((b * N + t[:, None]) * H + hd) * D + offs[None, :]


@triton.jit
def _load_g(G, b, c, hd, offs_k, NP, H: tl.constexpr, DK: tl.constexpr, BT: tl.constexpr,
            G_MODE: tl.constexpr):
    """(G of the chunk's rows, G of its last row): [BT, BK] and [BK] in mode 2, else [BT], []."""
    rows = c * BT + tl.arange(0, BT)
    if G_MODE == 2:
        mk = offs_k < DK
        g = tl.load(_tile_ptrs(G, b, rows, hd, offs_k, NP, H, DK), mask=mk[None, :], other=0.0)
        glast = tl.load(G + ((b * NP + c * BT + BT - 1) * H + hd) * DK + offs_k, mask=mk,
                        other=0.0)
    else:
        g = tl.load(G + (b * NP + rows) * H + hd)
        glast = tl.load(G + (b * NP + c * BT + BT - 1) * H + hd)
    return g, glast


@triton.jit
def _causal(BT: tl.constexpr):
    rows = tl.arange(0, BT)
    return rows[:, None] >= rows[None, :]


@triton.jit
def states_fwd(k, v, G, h, h0, ht, N, NP, NT, H: tl.constexpr, DK: tl.constexpr,
               DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               G_MODE: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
               PREC: tl.constexpr):
    """h[c] = the state before chunk c; ht = the state after the last chunk."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hd = i_bh // H, i_bh % H
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mkv = (offs_k[:, None] < DK) & (offs_v[None, :] < DV)
    state_off = (i_bh * DK + offs_k[:, None]) * DV + offs_v[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state = tl.load(h0 + state_off, mask=mkv, other=0.0).to(tl.float32)
    for c in range(NT):
        tl.store(h + ((i_bh * NT + c) * DK + offs_k[:, None]) * DV + offs_v[None, :],
                 state.to(h.dtype.element_ty), mask=mkv)
        rows = c * BT + tl.arange(0, BT)
        mt = rows < N
        kk = tl.load(_tile_ptrs(k, b, rows, hd, offs_k, N, H, DK),
                     mask=mt[:, None] & (offs_k[None, :] < DK), other=0.0)
        vv = tl.load(_tile_ptrs(v, b, rows, hd, offs_v, N, H, DV),
                     mask=mt[:, None] & (offs_v[None, :] < DV), other=0.0)
        if G_MODE == 2:
            g, glast = _load_g(G, b, c, hd, offs_k, NP, H, DK, BT, G_MODE)
            kk = (kk.to(tl.float32) * tl.exp(glast[None, :] - g)).to(vv.dtype)
            state = state * tl.exp(glast)[:, None]
        elif G_MODE == 1:
            g, glast = _load_g(G, b, c, hd, offs_k, NP, H, DK, BT, G_MODE)
            kk = (kk.to(tl.float32) * tl.exp(glast - g)[:, None]).to(vv.dtype)
            state = state * tl.exp(glast)
        state = tl.dot(tl.trans(kk), vv, state, input_precision=PREC)
    if STORE_HT:
        tl.store(ht + state_off, state, mask=mkv)


@triton.jit
def output_fwd(q, k, v, G, h, o, N, NP, NT, H: tl.constexpr, DK: tl.constexpr,
               DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               G_MODE: tl.constexpr, PREC: tl.constexpr):
    """o of one chunk = (q * exp(G)) @ h[c] + (causal, decayed q k^T) @ v."""
    i_v, c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hd = i_bh // H, i_bh % H
    rows = c * BT + tl.arange(0, BT)
    mt = rows < N
    offs_v = i_v * BV + tl.arange(0, BV)
    causal = _causal(BT)
    acc_o = tl.zeros([BT, BV], dtype=tl.float32)
    acc_a = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(DK, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        mk = offs_k < DK
        qq = tl.load(_tile_ptrs(q, b, rows, hd, offs_k, N, H, DK), mask=mt[:, None] & mk[None, :],
                     other=0.0)
        kk = tl.load(_tile_ptrs(k, b, rows, hd, offs_k, N, H, DK), mask=mt[:, None] & mk[None, :],
                     other=0.0)
        hh = tl.load(h + ((i_bh * NT + c) * DK + offs_k[:, None]) * DV + offs_v[None, :],
                     mask=mk[:, None] & (offs_v[None, :] < DV), other=0.0)
        if G_MODE == 2:
            g, _ = _load_g(G, b, c, hd, offs_k, NP, H, DK, BT, G_MODE)
            qg = (qq.to(tl.float32) * tl.exp(g)).to(hh.dtype)
            acc_o = tl.dot(qg, hh, acc_o, input_precision=PREC)
            diff = tl.where(causal[:, :, None], g[:, None, :] - g[None, :, :], float("-inf"))
            prod = qq.to(tl.float32)[:, None, :] * kk.to(tl.float32)[None, :, :]
            acc_a += tl.sum(prod * tl.exp(diff), axis=2)
        else:
            acc_o = tl.dot(qq.to(hh.dtype), hh, acc_o, input_precision=PREC)
            acc_a = tl.dot(qq, tl.trans(kk), acc_a, input_precision=PREC)
    if G_MODE == 1:
        g, _ = _load_g(G, b, c, hd, 0, NP, H, DK, BT, G_MODE)
        acc_o = acc_o * tl.exp(g)[:, None]
        acc_a = acc_a * tl.exp(tl.where(causal, g[:, None] - g[None, :], float("-inf")))
    elif G_MODE == 0:
        acc_a = tl.where(causal, acc_a, 0.0)
    vv = tl.load(_tile_ptrs(v, b, rows, hd, offs_v, N, H, DV),
                 mask=mt[:, None] & (offs_v[None, :] < DV), other=0.0)
    acc_o = tl.dot(acc_a.to(vv.dtype), vv, acc_o, input_precision=PREC)
    tl.store(_tile_ptrs(o, b, rows, hd, offs_v, N, H, DV), acc_o.to(o.dtype.element_ty),
             mask=mt[:, None] & (offs_v[None, :] < DV))


@triton.jit
def states_bwd(q, do, G, dh, dht, dh0, N, NP, NT, H: tl.constexpr, DK: tl.constexpr,
               DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               G_MODE: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
               PREC: tl.constexpr):
    """dh[c] = dL/d(state after chunk c), walking the chunks backwards; dh0 = dL/d(h0)."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hd = i_bh // H, i_bh % H
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mkv = (offs_k[:, None] < DK) & (offs_v[None, :] < DV)
    state_off = (i_bh * DK + offs_k[:, None]) * DV + offs_v[None, :]
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dstate = tl.load(dht + state_off, mask=mkv, other=0.0).to(tl.float32)
    for i in range(NT):
        c = NT - 1 - i
        tl.store(dh + ((i_bh * NT + c) * DK + offs_k[:, None]) * DV + offs_v[None, :],
                 dstate.to(dh.dtype.element_ty), mask=mkv)
        rows = c * BT + tl.arange(0, BT)
        mt = rows < N
        qq = tl.load(_tile_ptrs(q, b, rows, hd, offs_k, N, H, DK),
                     mask=mt[:, None] & (offs_k[None, :] < DK), other=0.0)
        dd = tl.load(_tile_ptrs(do, b, rows, hd, offs_v, N, H, DV),
                     mask=mt[:, None] & (offs_v[None, :] < DV), other=0.0)
        if G_MODE == 2:
            g, glast = _load_g(G, b, c, hd, offs_k, NP, H, DK, BT, G_MODE)
            qq = (qq.to(tl.float32) * tl.exp(g)).to(dd.dtype)
            dstate = dstate * tl.exp(glast)[:, None]
        elif G_MODE == 1:
            g, glast = _load_g(G, b, c, hd, offs_k, NP, H, DK, BT, G_MODE)
            qq = (qq.to(tl.float32) * tl.exp(g)[:, None]).to(dd.dtype)
            dstate = dstate * tl.exp(glast)
        dstate = tl.dot(tl.trans(qq), dd, dstate, input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + state_off, dstate, mask=mkv)
