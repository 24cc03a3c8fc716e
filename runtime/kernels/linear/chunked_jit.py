"""Triton kernels of chunked linear attention (imported only when a kernel runs).

Shapes: B batch, N sequence (NP padded to NT chunks of BT), H heads, DK/DV head sizes.
q, k [B, N, H, DK]; v, o [B, N, H, DV] (contiguous); G [B, NP, H, GD] float32 holds the
cumulative log-decay *within each chunk* (GD = DK per channel, 1 per head); h [B, H, NT, DK, DV]
the state before each chunk; dh [B, H, NT, DK, DV] the gradient of the state after each chunk.

G_MODE: 0 no decay, 1 one log-decay per head and token, 2 one per head, token and key channel.
Every exponent is a difference G_i - G_j with i at or after j inside one chunk, or G itself, so
it is <= 0: no overflow at any length (the global cumulative sum is never formed). Mode 2 forms
the intra-chunk products exactly, channel by channel ([BT, BT, BK] in registers), so its
parallel kernels take 16-token blocks (SUB of them per G chunk; see chunked_expand_jit); modes
0 and 1 are plain matrix products.

Q_MOD, K_MOD, V_MOD (constexpr @triton.jit functions of a float32 tile, or None): element-wise
mods applied right after every load of q, k, v (load_mod); the backward kernels take their
derivatives Q_GRAD, K_GRAD, V_GRAD and scale dq, dk, dv by them at the raw input before the
store (store_grad). None compiles to the plain load and store.
"""

from __future__ import annotations

import triton
import triton.language as tl

# -- addressing: a scalar int64 start (huge tensors index right) plus int32 tile offsets ------


@triton.jit
def _tile_offsets(b, hd, row0, col0, N, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
                  BC: tl.constexpr):
    """Element offsets and mask of rows row0.. (< N), columns col0.. (< D) of head hd, batch b
    of [B, N, H, D]."""
    rows, cols = row0 + tl.arange(0, BR), col0 + tl.arange(0, BC)
    start = ((b.to(tl.int64) * N + row0) * H + hd) * D + col0
    offs = start + tl.arange(0, BR)[:, None] * (H * D) + tl.arange(0, BC)[None, :]
    return offs, (rows < N)[:, None] & (cols < D)[None, :]


@triton.jit
def load_tile(base, b, hd, row0, col0, N, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
              BC: tl.constexpr):
    """Rows row0.. (< N), columns col0.. (< D) of head hd, batch b of [B, N, H, D]; 0 outside."""
    offs, mask = _tile_offsets(b, hd, row0, col0, N, H, D, BR, BC)
    return tl.load(base + offs, mask=mask, other=0.0)


@triton.jit
def load_mod(base, b, hd, row0, col0, N, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
             BC: tl.constexpr, MOD: tl.constexpr):
    """load_tile, then the fused element-wise mod (a generated @triton.jit function of a
    float32 tile, or None: identity) in float32, cast back to the input dtype as the pre-pass
    casts; 0 outside, as the pre-pass's zero padding (mod(0) need not be 0)."""
    offs, mask = _tile_offsets(b, hd, row0, col0, N, H, D, BR, BC)
    x = tl.load(base + offs, mask=mask, other=0.0)
    if MOD is not None:
        x = tl.where(mask, MOD(x.to(tl.float32)), 0.0).to(x.dtype)
    return x


@triton.jit
def store_tile(base, value, b, hd, row0, col0, N, H: tl.constexpr, D: tl.constexpr,
               BR: tl.constexpr, BC: tl.constexpr):
    offs, mask = _tile_offsets(b, hd, row0, col0, N, H, D, BR, BC)
    tl.store(base + offs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def store_grad(base, value, raw, b, hd, row0, col0, N, H: tl.constexpr, D: tl.constexpr,
               BR: tl.constexpr, BC: tl.constexpr, MOD_GRAD: tl.constexpr):
    """Store the gradient of a raw input: value (the gradient of the modded tile, float32)
    times the mod's derivative at the raw input `raw` (loaded here; None: identity)."""
    offs, mask = _tile_offsets(b, hd, row0, col0, N, H, D, BR, BC)
    if MOD_GRAD is not None:
        value = value * MOD_GRAD(tl.load(raw + offs, mask=mask, other=0.0).to(tl.float32))
    tl.store(base + offs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _state_ptrs(base, i_bh, c, NT, k0, v0, DK: tl.constexpr, DV: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr):
    """Pointers and mask of block (k0, v0) of state c in a [B * H, NT, DK, DV] tensor."""
    rows, cols = k0 + tl.arange(0, BK), v0 + tl.arange(0, BV)
    start = base + (i_bh.to(tl.int64) * NT + c) * (DK * DV) + k0 * DV + v0
    ptrs = start + tl.arange(0, BK)[:, None] * DV + tl.arange(0, BV)[None, :]
    return ptrs, (rows < DK)[:, None] & (cols < DV)[None, :]


@triton.jit
def load_state(base, i_bh, c, NT, k0, v0, DK: tl.constexpr, DV: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr):
    ptrs, mask = _state_ptrs(base, i_bh, c, NT, k0, v0, DK, DV, BK, BV)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_state(base, value, i_bh, c, NT, k0, v0, DK: tl.constexpr, DV: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr):
    ptrs, mask = _state_ptrs(base, i_bh, c, NT, k0, v0, DK, DV, BK, BV)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _g_row(G, b, hd, row, k0, NP, H: tl.constexpr, DK: tl.constexpr, BK: tl.constexpr):
    return tl.reshape(load_tile(G, b, hd, row, k0, NP, H, DK, 1, BK), (BK,))


@triton.jit
def load_g(G, b, hd, c, k0, NP, H: tl.constexpr, DK: tl.constexpr, BT: tl.constexpr,
           BK: tl.constexpr, G_MODE: tl.constexpr, SUB: tl.constexpr):
    """(G of the chunk's rows, G of its last row): [BT, BK] and [BK] in mode 2, else [BT], [].
    SUB > 1 (mode 2): G holds sums within chunks of SUB * BT rows; rebase them on the row
    before this block, so they are sums within the block."""
    if G_MODE == 2:
        g = load_tile(G, b, hd, c * BT, k0, NP, H, DK, BT, BK)
        glast = _g_row(G, b, hd, c * BT + BT - 1, k0, NP, H, DK, BK)
        if SUB > 1:
            base = _g_row(G, b, hd, tl.maximum(c * BT - 1, 0), k0, NP, H, DK, BK)
            base = tl.where(c % SUB == 0, 0.0, base)
            g = g - base[None, :]
            glast = glast - base
    else:
        start = G + (b.to(tl.int64) * NP + c * BT) * H + hd
        g = tl.load(start + tl.arange(0, BT) * H)
        glast = tl.load(start + (BT - 1) * H)
    return g, glast


@triton.jit
def causal_mask(BT: tl.constexpr):
    rows = tl.arange(0, BT)
    return rows[:, None] >= rows[None, :]


# -- kernels -------------------------------------------------------------------------------


@triton.jit
def states_fwd(k, v, G, h, h0, ht, N, NP, NT, H: tl.constexpr, DK: tl.constexpr,
               DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               G_MODE: tl.constexpr, SUB: tl.constexpr, HAS_H0: tl.constexpr,
               STORE_HT: tl.constexpr, PREC: tl.constexpr, K_MOD: tl.constexpr = None,
               V_MOD: tl.constexpr = None):
    """h[c] = the state before chunk c; ht = the state after the last chunk."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hd = i_bh // H, i_bh % H
    k0, v0 = i_k * BK, i_v * BV
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state = load_state(h0, i_bh, 0, 1, k0, v0, DK, DV, BK, BV).to(tl.float32)
    for c in range(NT):
        store_state(h, state, i_bh, c, NT, k0, v0, DK, DV, BK, BV)
        kk = load_mod(k, b, hd, c * BT, k0, N, H, DK, BT, BK, K_MOD)
        vv = load_mod(v, b, hd, c * BT, v0, N, H, DV, BT, BV, V_MOD)
        if G_MODE == 2:
            g, glast = load_g(G, b, hd, c, k0, NP, H, DK, BT, BK, G_MODE, SUB)
            kk = (kk.to(tl.float32) * tl.exp(glast[None, :] - g)).to(vv.dtype)
            state = state * tl.exp(glast)[:, None]
        elif G_MODE == 1:
            g, glast = load_g(G, b, hd, c, k0, NP, H, DK, BT, BK, G_MODE, SUB)
            kk = (kk.to(tl.float32) * tl.exp(glast - g)[:, None]).to(vv.dtype)
            state = state * tl.exp(glast)
        state = tl.dot(tl.trans(kk), vv, state, input_precision=PREC)
    if STORE_HT:
        store_state(ht, state, i_bh, 0, 1, k0, v0, DK, DV, BK, BV)


@triton.jit
def output_fwd(q, k, v, G, h, o, N, NP, NT, H: tl.constexpr, DK: tl.constexpr,
               DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               G_MODE: tl.constexpr, SUB: tl.constexpr, PREC: tl.constexpr,
               Q_MOD: tl.constexpr = None, K_MOD: tl.constexpr = None,
               V_MOD: tl.constexpr = None):
    """o of one chunk = (q * exp(G)) @ h[c] + (causal, decayed q k^T) @ v."""
    i_v, c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hd = i_bh // H, i_bh % H
    v0 = i_v * BV
    causal = causal_mask(BT)
    acc_o = tl.zeros([BT, BV], dtype=tl.float32)
    acc_a = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(DK, BK)):
        k0 = i_k * BK
        qq = load_mod(q, b, hd, c * BT, k0, N, H, DK, BT, BK, Q_MOD)
        kk = load_mod(k, b, hd, c * BT, k0, N, H, DK, BT, BK, K_MOD)
        hh = load_state(h, i_bh, c, NT, k0, v0, DK, DV, BK, BV)
        if G_MODE == 2:
            g, _ = load_g(G, b, hd, c, k0, NP, H, DK, BT, BK, G_MODE, SUB)
            qg = (qq.to(tl.float32) * tl.exp(g)).to(hh.dtype)
            acc_o = tl.dot(qg, hh, acc_o, input_precision=PREC)
            diff = tl.where(causal[:, :, None], g[:, None, :] - g[None, :, :], float("-inf"))
            prod = qq.to(tl.float32)[:, None, :] * kk.to(tl.float32)[None, :, :]
            acc_a += tl.sum(prod * tl.exp(diff), axis=2)
        else:
            acc_o = tl.dot(qq.to(hh.dtype), hh, acc_o, input_precision=PREC)
            acc_a = tl.dot(qq, tl.trans(kk), acc_a, input_precision=PREC)
    if G_MODE == 1:
        g, _ = load_g(G, b, hd, c, 0, NP, H, DK, BT, BK, G_MODE, SUB)
        acc_o = acc_o * tl.exp(g)[:, None]
        acc_a = acc_a * tl.exp(tl.where(causal, g[:, None] - g[None, :], float("-inf")))
    elif G_MODE == 0:
        acc_a = tl.where(causal, acc_a, 0.0)
    vv = load_mod(v, b, hd, c * BT, v0, N, H, DV, BT, BV, V_MOD)
    acc_o = tl.dot(acc_a.to(vv.dtype), vv, acc_o, input_precision=PREC)
    store_tile(o, acc_o, b, hd, c * BT, v0, N, H, DV, BT, BV)


@triton.jit
def states_bwd(q, do, G, dh, dht, dh0, N, NP, NT, H: tl.constexpr, DK: tl.constexpr,
               DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               G_MODE: tl.constexpr, SUB: tl.constexpr, HAS_DHT: tl.constexpr,
               STORE_DH0: tl.constexpr, PREC: tl.constexpr, Q_MOD: tl.constexpr = None):
    """dh[c] = dL/d(state after chunk c), walking the chunks backwards; dh0 = dL/d(h0)."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hd = i_bh // H, i_bh % H
    k0, v0 = i_k * BK, i_v * BV
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dstate = load_state(dht, i_bh, 0, 1, k0, v0, DK, DV, BK, BV).to(tl.float32)
    for i in range(NT):
        c = NT - 1 - i
        store_state(dh, dstate, i_bh, c, NT, k0, v0, DK, DV, BK, BV)
        qq = load_mod(q, b, hd, c * BT, k0, N, H, DK, BT, BK, Q_MOD)
        dd = load_tile(do, b, hd, c * BT, v0, N, H, DV, BT, BV)
        if G_MODE == 2:
            g, glast = load_g(G, b, hd, c, k0, NP, H, DK, BT, BK, G_MODE, SUB)
            qq = (qq.to(tl.float32) * tl.exp(g)).to(dd.dtype)
            dstate = dstate * tl.exp(glast)[:, None]
        elif G_MODE == 1:
            g, glast = load_g(G, b, hd, c, k0, NP, H, DK, BT, BK, G_MODE, SUB)
            qq = (qq.to(tl.float32) * tl.exp(g)[:, None]).to(dd.dtype)
            dstate = dstate * tl.exp(glast)
        dstate = tl.dot(tl.trans(qq), dd, dstate, input_precision=PREC)
    if STORE_DH0:
        store_state(dh0, dstate, i_bh, 0, 1, k0, v0, DK, DV, BK, BV)
