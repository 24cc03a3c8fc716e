"""Triton backward kernels of chunked linear attention: dv, and dq with dk, per chunk.

Layouts and G_MODE as in chunked_jit. Within chunk c (rows i, j; D_ij the decay from j to i,
exp(G_i - G_j) for j <= i, else 0; Glast the chunk's last G; h[c] the state before the chunk and
dh[c] the gradient of the state after it):

    dv = (D * (q k^T))^T @ do + (k * exp(Glast - G)) @ dh[c]
    dq = (D * (do v^T)) @ k + exp(G) * (do @ h[c]^T)
    dk = (D * (do v^T))^T @ q + exp(Glast - G) * (v @ dh[c]^T)

(per key channel in mode 2, where D carries a channel index and the products are exact sums).
The log-decay gradient of token t in chunk c is
reverse-cumsum within the chunk of (q * dq - k * dk), plus the carry sum_v(dh[c] * S_after_c)
(S_after_c = exp(Glast) h[c] + (k * exp(Glast - G))^T v: every g_t of the chunk scales it).
Summing only within a chunk, rather than over the whole rest of the sequence, keeps the
cancellation between the q and k terms local (float32 error stays near rounding); it is formed
from the float32 dq, dk before they are rounded to the input dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnrt.kernels.linear.chunked_jit import (
    causal_mask,
    load_g,
    load_mod,
    load_state,
    load_tile,
    store_grad,
    store_tile,
)


@triton.jit
def dv_bwd(q, k, v, do, G, dh, dv, N, NP, NT, H: tl.constexpr, DK: tl.constexpr,
           DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           G_MODE: tl.constexpr, SUB: tl.constexpr, PREC: tl.constexpr,
           Q_MOD: tl.constexpr = None, K_MOD: tl.constexpr = None,
           V_GRAD: tl.constexpr = None):
    """dv of one chunk and value block (times v_mod'(v) when v_mod is fused)."""
    i_v, c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hd = i_bh // H, i_bh % H
    v0 = i_v * BV
    causal_t = tl.trans(causal_mask(BT))  # [j, i]: i at or after j
    acc_dv = tl.zeros([BT, BV], dtype=tl.float32)
    acc_at = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(DK, BK)):
        k0 = i_k * BK
        qq = load_mod(q, b, hd, c * BT, k0, N, H, DK, BT, BK, Q_MOD)
        kk = load_mod(k, b, hd, c * BT, k0, N, H, DK, BT, BK, K_MOD)
        dhh = load_state(dh, i_bh, c, NT, k0, v0, DK, DV, BK, BV)
        if G_MODE == 2:
            g, glast = load_g(G, b, hd, c, k0, NP, H, DK, BT, BK, G_MODE, SUB)
            kt = (kk.to(tl.float32) * tl.exp(glast[None, :] - g)).to(dhh.dtype)
            acc_dv = tl.dot(kt, dhh, acc_dv, input_precision=PREC)
            diff = tl.where(causal_t[:, :, None], g[None, :, :] - g[:, None, :], float("-inf"))
            prod = kk.to(tl.float32)[:, None, :] * qq.to(tl.float32)[None, :, :]
            acc_at += tl.sum(prod * tl.exp(diff), axis=2)
        else:
            acc_dv = tl.dot(kk.to(dhh.dtype), dhh, acc_dv, input_precision=PREC)
            acc_at = tl.dot(kk, tl.trans(qq), acc_at, input_precision=PREC)
    if G_MODE == 1:
        g, glast = load_g(G, b, hd, c, 0, NP, H, DK, BT, BK, G_MODE, SUB)
        acc_dv = acc_dv * tl.exp(glast - g)[:, None]
        acc_at = acc_at * tl.exp(tl.where(causal_t, g[None, :] - g[:, None], float("-inf")))
    elif G_MODE == 0:
        acc_at = tl.where(causal_t, acc_at, 0.0)
    dd = load_tile(do, b, hd, c * BT, v0, N, H, DV, BT, BV)
    acc_dv = tl.dot(acc_at.to(dd.dtype), dd, acc_dv, input_precision=PREC)
    store_grad(dv, acc_dv, v, b, hd, c * BT, v0, N, H, DV, BT, BV, V_GRAD)


@triton.jit
def _inter_grads(v, do, h, dh, b, hd, i_bh, c, k0, N, NT, H: tl.constexpr, DK: tl.constexpr,
                 DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 PREC: tl.constexpr, V_MOD: tl.constexpr):
    """(do v^T [BT, BT], do @ h[c]^T [BT, BK], v @ dh[c]^T [BT, BK], sum over values of
    h[c] * dh[c] [BK]), summed over DV."""
    acc_hdh = tl.zeros([BK], dtype=tl.float32)
    acc_da = tl.zeros([BT, BT], dtype=tl.float32)
    acc_dq = tl.zeros([BT, BK], dtype=tl.float32)
    acc_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(DV, BV)):
        v0 = i_v * BV
        dd = load_tile(do, b, hd, c * BT, v0, N, H, DV, BT, BV)
        vv = load_mod(v, b, hd, c * BT, v0, N, H, DV, BT, BV, V_MOD)
        hh = load_state(h, i_bh, c, NT, k0, v0, DK, DV, BK, BV)
        dhh = load_state(dh, i_bh, c, NT, k0, v0, DK, DV, BK, BV)
        acc_da = tl.dot(dd, tl.trans(vv), acc_da, input_precision=PREC)
        acc_dq = tl.dot(dd.to(hh.dtype), tl.trans(hh), acc_dq, input_precision=PREC)
        acc_dk = tl.dot(vv.to(dhh.dtype), tl.trans(dhh), acc_dk, input_precision=PREC)
        acc_hdh += tl.sum(hh.to(tl.float32) * dhh.to(tl.float32), axis=1)
    return acc_da, acc_dq, acc_dk, acc_hdh


@triton.jit
def dqk_bwd(q, k, v, do, G, h, dh, dq, dk, dg, N, NP, NT, DG_SPLIT, H: tl.constexpr,
            DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
            BV: tl.constexpr, G_MODE: tl.constexpr, SUB: tl.constexpr, PREC: tl.constexpr,
            Q_MOD: tl.constexpr = None, K_MOD: tl.constexpr = None, V_MOD: tl.constexpr = None,
            Q_GRAD: tl.constexpr = None, K_GRAD: tl.constexpr = None):
    """dq, dk of one chunk and key block; with decay also dL/dg (see the module docstring).
    With fused mods, dg is formed from the modded q, k and their gradients, and dq, dk are
    then multiplied by the mods' derivatives at the raw inputs."""
    i_k, c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hd = i_bh // H, i_bh % H
    k0 = i_k * BK
    causal = causal_mask(BT)
    acc_da, acc_dq, acc_dk, hdh = _inter_grads(v, do, h, dh, b, hd, i_bh, c, k0, N, NT, H, DK,
                                               DV, BT, BK, BV, PREC, V_MOD)
    qq = load_mod(q, b, hd, c * BT, k0, N, H, DK, BT, BK, Q_MOD)
    kk = load_mod(k, b, hd, c * BT, k0, N, H, DK, BT, BK, K_MOD)
    if G_MODE == 2:
        g, glast = load_g(G, b, hd, c, k0, NP, H, DK, BT, BK, G_MODE, SUB)
        acc_dq = acc_dq * tl.exp(g)
        acc_dk = acc_dk * tl.exp(glast[None, :] - g)
        carry = tl.exp(glast) * hdh + tl.sum(kk.to(tl.float32) * acc_dk, axis=0)
        e = tl.exp(tl.where(causal[:, :, None], g[:, None, :] - g[None, :, :], float("-inf")))
        de = acc_da[:, :, None] * e
        acc_dq += tl.sum(de * kk.to(tl.float32)[None, :, :], axis=1)
        acc_dk += tl.sum(de * qq.to(tl.float32)[:, None, :], axis=0)
    else:
        if G_MODE == 1:
            g, glast = load_g(G, b, hd, c, 0, NP, H, DK, BT, BK, G_MODE, SUB)
            acc_dq = acc_dq * tl.exp(g)[:, None]
            acc_dk = acc_dk * tl.exp(glast - g)[:, None]
            carry = tl.exp(glast) * hdh + tl.sum(kk.to(tl.float32) * acc_dk, axis=0)
            ds = acc_da * tl.exp(tl.where(causal, g[:, None] - g[None, :], float("-inf")))
        else:
            ds = tl.where(causal, acc_da, 0.0)
        acc_dq = tl.dot(ds.to(kk.dtype), kk, acc_dq, input_precision=PREC)
        acc_dk = tl.dot(tl.trans(ds).to(qq.dtype), qq, acc_dk, input_precision=PREC)
    store_grad(dq, acc_dq, q, b, hd, c * BT, k0, N, H, DK, BT, BK, Q_GRAD)
    store_grad(dk, acc_dk, k, b, hd, c * BT, k0, N, H, DK, BT, BK, K_GRAD)
    if G_MODE != 0:
        term = qq.to(tl.float32) * acc_dq - kk.to(tl.float32) * acc_dk
        dgc = tl.cumsum(term, axis=0, reverse=True) + carry[None, :]
        if G_MODE == 2:
            store_tile(dg, dgc, b, hd, c * BT, k0, N, H, DK, BT, BK)
        else:  # one [B, N, H] partial per key block, summed on the host
            rows = c * BT + tl.arange(0, BT)
            start = dg + i_k * DG_SPLIT + (b.to(tl.int64) * N + c * BT) * H + hd
            tl.store(start + tl.arange(0, BT) * H, tl.sum(dgc, axis=1), mask=rows < N)
