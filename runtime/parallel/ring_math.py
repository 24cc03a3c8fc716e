"""The arithmetic of ring attention: the fp32 log-sum-exp merge and one piece's gradients.

Shapes: B batch, n query rows, m key rows, H heads, Hkv kv heads (g = H / Hkv), D head size;
out [B, n, H, D], lse [B, H, n] (natural log; -inf for a row that saw no key).
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 24  # score elements per gradient chunk (64 MiB in fp32)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_into(out: torch.Tensor, lse: torch.Tensor, rows: slice, part_out: torch.Tensor,
               part_lse: torch.Tensor) -> None:
    """Fold attention over new keys into the accumulator rows, in place (fp32 or fp64).

    out [B, Nq, H, D] and lse [B, H, Nq] (accumulation dtype); part_out [B, n, H, D] and
    part_lse [B, H, n] cover `rows`. Equivalent PyTorch:
        new = logaddexp(lse, part_lse)
        out = out * exp(lse - new) + part_out * exp(part_lse - new)    (weights [B, n, H, 1])
    A row with no key on either side (both -inf) keeps output 0 and lse -inf.
    """
    acc, old = out[:, rows], lse[:, :, rows]
    part_lse = part_lse.to(lse.dtype)
    new = torch.logaddexp(old, part_lse)
    keep = torch.exp(old - new).nan_to_num(0.0).transpose(1, 2).unsqueeze(-1)
    take = torch.exp(part_lse - new).nan_to_num(0.0).transpose(1, 2).unsqueeze(-1)
    acc.mul_(keep).add_(part_out.to(acc.dtype) * take)
    old.copy_(new)


def reference_attend(scale: float) -> object:
    """attend(q, k, v, causal) -> (out, lse) through attnrt's chunked reference (any dtype)."""
    from attnrt.backends.reference import chunked_attention

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = chunked_attention(q, k, v, causal, scale, return_lse=True)
        return out, lse.to(acc_dtype(q.dtype))

    return attend


def piece_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                lse: torch.Tensor, delta: torch.Tensor, causal: bool, scale: float,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq [B, n, H, D], dk, dv [B, m, Hkv, D] (accumulation dtype) of one piece, given the
    final lse and delta = rowsum(dout * out) [B, H, n] of its query rows (flash attention's
    backward; exact for a piece of a longer key set). Causal: n == m, aligned.

    Equivalent PyTorch (per kv-head group, K/V never repeated):
        p = exp(q k^T * scale - lse);  dv = p^T dout;  ds = p * (dout v^T - delta)
        dq = ds k * scale;  dk = ds^T q * scale
    """
    b, n, h, d = q.shape
    m, hkv = k.shape[1], k.shape[2]
    dt = acc_dtype(q.dtype)
    kt, vt = k.to(dt).transpose(1, 2).unsqueeze(2), v.to(dt).transpose(1, 2).unsqueeze(2)
    dq = torch.empty(b, n, h, d, dtype=dt, device=q.device)
    dk = torch.zeros(b, hkv, 1, m, d, dtype=dt, device=q.device)
    dv = torch.zeros_like(dk)
    rows = max(1, CHUNK_ELEMENTS // max(1, b * h * m))
    for start in range(0, n, rows):
        part = slice(start, min(n, start + rows))
        dq_c, dk_c, dv_c = _chunk_grads(q[:, part], dout[:, part], lse[:, :, part],
                                        delta[:, :, part], kt, vt,
                                        start if causal else None, scale)
        dq[:, part] = dq_c
        dk += dk_c
        dv += dv_c
    return dq, dk.squeeze(2).transpose(1, 2), dv.squeeze(2).transpose(1, 2)


def _chunk_grads(q: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                 kt: torch.Tensor, vt: torch.Tensor, causal_from: int | None, scale: float,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows causal_from.. of a piece (None: not causal); kt, vt [B, Hkv, 1, m, D]."""
    b, c, h, d = q.shape
    hkv = kt.shape[1]
    g = h // hkv
    dt = kt.dtype

    def grouped(t: torch.Tensor) -> torch.Tensor:  # [B, c, H, D] -> [B, Hkv, g, c, D]
        return t.to(dt).reshape(b, c, hkv, g, d).permute(0, 2, 3, 1, 4)

    qg, dog = grouped(q), grouped(dout)
    s = torch.matmul(qg, kt.mT) * scale  # [B, Hkv, g, c, m]
    if causal_from is not None:
        rows = torch.arange(causal_from, causal_from + c, device=q.device)[:, None]
        cols = torch.arange(kt.shape[3], device=q.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    # A row that saw no key (lse -inf) gets no gradient: its lse counts as +inf here.
    lse = lse.to(dt).masked_fill(lse == float("-inf"), float("inf"))
    p = torch.exp(s - lse.reshape(b, hkv, g, c, 1))
    dv = torch.matmul(p.mT, dog).sum(2, keepdim=True)
    ds = p * (torch.matmul(dog, vt.mT) - delta.to(dt).reshape(b, hkv, g, c, 1))
    dq = torch.matmul(ds, kt) * scale  # [B, Hkv, g, c, D]
    dk = torch.matmul(ds.mT, qg).sum(2, keepdim=True) * scale
    return dq.permute(0, 3, 1, 2, 4).reshape(b, c, h, d), dk, dv
