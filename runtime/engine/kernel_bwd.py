"""Launching the generated backward kernels (dK/dV with custom-input gradients, then dQ).

Shapes: dout [B, N, H, Dv]; returns dq [B, N, H, D], dk [B, M, Hkv, D], dv [B, M, Hkv, Dv]
in the inputs' dtypes and one gradient (or None) per custom input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from attnrt.engine.kernel import EngineRun


def run_backward(run: EngineRun, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, fin: torch.Tensor, inputs: list[torch.Tensor],
                 dout: torch.Tensor) -> tuple:
    from attnrt.engine.kernel import _list_strides, _lists

    b, n, h, d = q.shape
    m, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    tq, tkv = run.tiles["dq"], run.tiles["dkdv"]
    rows = _lists(run._fns, run.variant, run.call, tq)[0]
    cols = _lists(run._fns, run.variant, run.call, tkv)[1]
    doosum = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, N]
    dkv = torch.full((b, m, h, d + dv), float("nan"), dtype=torch.float32, device=q.device)
    dq = torch.full((b, n, h, d), float("nan"), dtype=torch.float32, device=q.device)
    names = run.variant.input_names
    grads = {name: torch.zeros(x.shape, dtype=torch.float32, device=x.device)
             for name, x in zip(names, inputs, strict=True) if name in run.flags.input_grads}
    common = run._common(q, k, v)
    shared = [*run.maps]
    scalars = [n, m, h, h // hkv, run.scale if run.scale is not None else 1.0]
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3]]
    in_strides = run._input_strides(inputs)
    dk, dv_ = dkv[..., :d], dkv[..., d:]
    run.module.engine_bwd_dkdv[(-(-m // tkv.bn), b * h)](
        q, k, v, dout, fin, doosum, dk, dv_, *shared, *cols, *inputs,
        *(grads[name] for name in run.flags.input_grads), *strides, *dkv.stride()[:3],
        fin.stride(0), *_list_strides(cols[0], cols[1]), *in_strides, *scalars,
        BLOCK_M=tkv.bm, BLOCK_N=tkv.bn, num_warps=tkv.warps, num_stages=tkv.stages, **common)
    run.module.engine_bwd_dq[(-(-n // tq.bm), b * h)](
        q, k, v, dout, fin, doosum, dq, *shared, *rows, *inputs, *strides, *dq.stride()[:3],
        fin.stride(0), *_list_strides(rows[0], rows[1]), *in_strides, *scalars,
        BLOCK_M=tq.bm, BLOCK_N=tq.bn, num_warps=tq.warps, num_stages=tq.stages, **common)
    group = h // hkv
    dk = dk.reshape(b, m, hkv, group, d).sum(3).to(k.dtype)
    dv_ = dv_.reshape(b, m, hkv, group, dv).sum(3).to(v.dtype)
    din = [grads[name].to(x.dtype) if name in grads else None
           for name, x in zip(names, inputs, strict=True)]
    return dq.to(q.dtype), dk, dv_, din
