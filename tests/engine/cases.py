"""The issue's examples as (engine, inputs, explicit dense float64 formula) cases.

Shapes: q [B, N, H, D], k / v [B, M, Hkv, D]. Each dense formula is written out with torch
directly (not through the engine), so the engine's reference is checked against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from attnrt.engine.library import AttentionLibrary
from attnrt.engine.softmax import AttentionEngine
from attnrt.engine.spec import CustomIO


@dataclass
class Case:
    """make(backend) -> engine; inputs(b, n, h, d, dtype, device) -> (q, k, v, custom, layout);
    dense(q, k, v, custom, layout) -> float64 out [B, N, H, D]."""

    make: Callable[[str], AttentionEngine]
    inputs: Callable[..., tuple]
    dense: Callable[..., torch.Tensor]
    grads: tuple[int, ...] = field(default=())  # custom inputs whose gradient is checked


def qkv(b: int, n: int, h: int, d: int, dtype: torch.dtype, device: str, hkv: int = 0) -> tuple:
    hkv = hkv or h
    gen = torch.Generator().manual_seed(1234 + n)
    return tuple(torch.randn(b, n, x, d, generator=gen).to(device, dtype)
                 for x in (h, hkv, hkv))


def grid(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n).view(n, 1), torch.arange(m).view(1, m)


def attend(s: torch.Tensor, keep: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """softmax over kept keys of s [B, H, N, M] (rows without keys -> 0), times v."""
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhnm,bmhd->bnhd", p, v.double().repeat_interleave(
        s.shape[1] // v.shape[2], 2))


def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    k = k.double().repeat_interleave(q.shape[2] // k.shape[2], 2)
    return torch.einsum("bnhd,bmhd->bhnm", q.double(), k)


def _plain(q, k, v, custom, layout, keep=None):
    return attend(scores(q, k) * q.shape[-1] ** -0.5, keep, v)


def _causal(n, m):
    i, j = grid(n, m)
    return j <= i


def alibi_case() -> Case:
    def inputs(b, n, h, d, dtype, device):
        slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(h)], device=device)
        return (*qkv(b, n, h, d, dtype, device), [slopes.requires_grad_()], {})

    def dense(q, k, v, custom, layout):
        n, m = q.shape[1], k.shape[1]
        i, j = grid(n, m)
        bias = custom[0].double().view(-1, 1, 1) * (j - i)
        return attend(scores(q, k) * q.shape[-1] ** -0.5 + bias, _causal(n, m), v)

    return Case(lambda be: AttentionLibrary("AlibiAttention", "Causal", head_size=16,
                                            backend=be), inputs, dense, grads=(0,))


def softcap_case() -> Case:
    def dense(q, k, v, custom, layout):
        s = scores(q, k) * q.shape[-1] ** -0.5
        return attend(5.0 * torch.tanh(s / 5.0), None, v)

    return Case(lambda be: AttentionLibrary("SoftcapAttention", "None", head_size=16,
                                            softcap=5.0, backend=be),
                lambda b, n, h, d, dt, dev: (*qkv(b, n, h, d, dt, dev), [], {}), dense)


def relpos_case(n_max: int = 400) -> Case:
    """bias[h, q_idx - kv_idx + n_max - 1], a learned relative position bias."""
    def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        rel = custom_fwd_inputs["bias"][h, q_idx - kv_idx + (n_max - 1)]
        return score * 0.25 + rel

    def make(be):
        return AttentionEngine(None, score_mod, CustomIO({"bias": ("heads", 2 * n_max - 1)}),
                               backend=be)

    def inputs(b, n, h, d, dtype, device):
        gen = torch.Generator().manual_seed(7)
        bias = torch.randn(h, 2 * n_max - 1, generator=gen).to(device).requires_grad_()
        return (*qkv(b, n, h, d, dtype, device), [bias], {})

    def dense(q, k, v, custom, layout):
        n, m = q.shape[1], k.shape[1]
        i, j = grid(n, m)
        rel = custom[0].double()[:, (i - j + n_max - 1)]  # [H, N, M]
        return attend(scores(q, k) * 0.25 + rel, None, v)

    return Case(make, inputs, dense, grads=(0,))


def window_case(window: int = 8) -> Case:
    def dense(q, k, v, custom, layout):
        i, j = grid(q.shape[1], k.shape[1])
        return _plain(q, k, v, custom, layout, (j <= i) & (i - j < window))

    return Case(lambda be: AttentionLibrary("SoftmaxAttention", "SlidingWindow", head_size=16,
                                            window=window, backend=be),
                lambda b, n, h, d, dt, dev: (*qkv(b, n, h, d, dt, dev), [], {}), dense)


def prefix_case(prefix: int = 5) -> Case:
    def dense(q, k, v, custom, layout):
        i, j = grid(q.shape[1], k.shape[1])
        return _plain(q, k, v, custom, layout, (j < prefix) | (j <= i))

    return Case(lambda be: AttentionLibrary("SoftmaxAttention", "PrefixLM", head_size=16,
                                            prefix=prefix, backend=be),
                lambda b, n, h, d, dt, dev: (*qkv(b, n, h, d, dt, dev), [], {}), dense)


def varlen_case() -> Case:
    """Packed sequences (cu_len_q = cu_len_kv), causal inside each: the document mask."""
    def inputs(b, n, h, d, dtype, device):
        q, k, v = qkv(1, n, h, d, dtype, device)
        cuts = sorted({0, n, n // 5, n // 2, n // 2 + 3})
        cu = torch.tensor(cuts, dtype=torch.int32, device=device)
        return q, k, v, [], {"cu_len_q": cu, "cu_len_kv": cu}

    def dense(q, k, v, custom, layout):
        cu = layout["cu_len_q"].tolist()
        outs = []
        for a, z in zip(cu[:-1], cu[1:], strict=True):
            qs, ks, vs = q[:, a:z], k[:, a:z], v[:, a:z]
            outs.append(_plain(qs, ks, vs, custom, layout, _causal(z - a, z - a)))
        return torch.cat(outs, 1)

    def make(be):
        return AttentionEngine(None, None, None, None, lambda b, h, q_idx, kv_idx:
                               kv_idx <= q_idx, backend=be)

    return Case(make, inputs, dense)


def document_case() -> Case:
    """Document ids as a custom input read by mask_mod (library mask_type "Document")."""
    def inputs(b, n, h, d, dtype, device):
        ids = (torch.arange(n, device=device) * 3 // n).to(torch.int32)
        return (*qkv(b, n, h, d, dtype, device), [ids], {})

    def dense(q, k, v, custom, layout):
        ids = custom[0].cpu()
        i, j = grid(q.shape[1], k.shape[1])
        keep = (ids.view(-1, 1) == ids.view(1, -1)) & (j <= i)
        return _plain(q, k, v, custom, layout, keep)

    return Case(lambda be: AttentionLibrary("SoftmaxAttention", "Document", head_size=16,
                                            backend=be), inputs, dense)


def sigmoid_case() -> Case:
    def inputs(b, n, h, d, dtype, device):
        bias = torch.tensor([-1.5], device=device).requires_grad_()
        return (*qkv(b, n, h, d, dtype, device), [bias], {})

    def dense(q, k, v, custom, layout):
        s = torch.sigmoid(scores(q, k) * q.shape[-1] ** -0.5 + custom[0].double())
        p = s * _causal(q.shape[1], k.shape[1])
        return torch.einsum("bhnm,bmhd->bnhd", p, v.double())

    return Case(lambda be: AttentionLibrary("SigmoidAttention", "Causal", head_size=16,
                                            backend=be), inputs, dense, grads=(0,))


def retention_case() -> Case:
    def inputs(b, n, h, d, dtype, device):
        decay = torch.log(1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float32)))
        return (*qkv(b, n, h, d, dtype, device), [decay.to(device).requires_grad_()], {})

    def dense(q, k, v, custom, layout):
        i, j = grid(q.shape[1], k.shape[1])
        decay = torch.exp(custom[0].double().view(-1, 1, 1) * (i - j))
        s = scores(q, k) * q.shape[-1] ** -0.5 * decay * (j <= i)
        p = s / s.abs().sum(-1, keepdim=True).clamp_min(1.0)
        return torch.einsum("bhnm,bmhd->bnhd", p, v.double())

    return Case(lambda be: AttentionLibrary("RetentionAttention", "Causal", head_size=16,
                                            backend=be), inputs, dense, grads=(0,))


CASES: dict[str, Callable[[], Case]] = {
    "alibi": alibi_case, "softcap": softcap_case, "relpos_bias": relpos_case,
    "sliding_window": window_case, "prefix_lm": prefix_case, "varlen_document": varlen_case,
    "document_ids": document_case, "sigmoid": sigmoid_case, "retention": retention_case,
}


def run(engine: AttentionEngine, q, k, v, custom, layout, grads: tuple[int, ...],
        dout: torch.Tensor | None = None, reference: bool = False) -> tuple:
    """(out, dout, [dq, dk, dv, d custom...]) with fresh leaf tensors."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    custom = [c.detach().requires_grad_() if i in grads else c.detach()
              for i, c in enumerate(custom)]
    out = engine.reference(q, k, v, custom, **layout)[0] if reference else \
        engine(q, k, v, custom, **layout)
    dout = torch.randn_like(out) if dout is None else dout.to(out.dtype)
    wrt = [q, k, v] + [custom[i] for i in grads]
    return out, dout, torch.autograd.grad(out, wrt, dout)


def run_dense(case: Case, q, k, v, custom, layout, dout: torch.Tensor) -> tuple:
    q, k, v = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    custom = [c.detach().cpu().double().requires_grad_() if i in case.grads else c.detach().cpu()
              for i, c in enumerate(custom)]
    layout = {key: val.cpu() for key, val in layout.items()}
    out = case.dense(q, k, v, custom, layout)
    wrt = [q, k, v] + [custom[i] for i in case.grads]
    return out, torch.autograd.grad(out, wrt, dout.detach().double().cpu())
