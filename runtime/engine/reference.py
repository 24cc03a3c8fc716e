"""The engine's ground truth: a chunked pure-torch evaluation of any variant, differentiable
by autograd (custom inputs included). It serves every variant anywhere, including score_mod /
mask_mod functions that cannot be traced (they are then called on torch tensors).

Shapes: q [B, N, H, D], k [B, M, Hkv, D], v [B, M, Hkv, Dv] -> out [B, N, H, Dv]; final row
scales [B, H, N]. Queries go in chunks so one chunk's scores stay under `chunk_bytes`; each
chunk sees every key at once (one block of the online function, which by its contract gives
the same result as any split into blocks).

Equivalent PyTorch, for one chunk (see engine/spec.py for the meaning of each step):
    s = q @ k^T (* softmax_scale); s = score_mod(s, ...); keep = mask_mod(...)
    p, rows, _ = online_fwd(where(keep, s, 0), inits, ...); p = where(keep, p, 0)
    out, finals = online_fwd_epilogue(p @ v, rows, ...); out = 0 where a row keeps no key
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attnrt.engine.call import Call
from attnrt.engine.evaluate import TorchEval
from attnrt.engine.spec import OnlineProgram, Variant

CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class RefFns:
    """How the reference gets scores and masks: from a traced Variant or from Python."""

    score: Callable[[TorchEval], torch.Tensor]
    mask: Callable[[TorchEval], Any] | None
    online: OnlineProgram
    mask_leaves: frozenset[str] | None = None  # what the mask reads; None: unknown (Python)


def traced_fns(variant: Variant) -> RefFns:
    mask = variant.mask
    return RefFns(lambda ev: ev(variant.score),
                  None if mask is None else (lambda ev: ev(mask)), variant.online,
                  frozenset(mask.leaves()) if mask is not None else frozenset())


class BoundIO:
    """CustomIO with real tensors, for Python score_mod / mask_mod run on torch tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.input_tensors = dict(tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.input_tensors[name]


def python_fns(score_mod: Any, mask_mod: Any, online: OnlineProgram, mask_arity: int) -> RefFns:
    """RefFns that call the user's Python functions on broadcast torch tensors."""

    def score(ev: TorchEval) -> torch.Tensor:
        s = ev.leaves["score"]
        if score_mod is None:
            return s
        return score_mod(s, BoundIO(ev.inputs), *(ev.leaves[n] for n in _IDX))

    def mask(ev: TorchEval) -> Any:
        extra = (BoundIO(ev.inputs),) if mask_arity == 5 else ()
        return mask_mod(*(ev.leaves[n] for n in _IDX), *extra)

    return RefFns(score, None if mask_mod is None else mask, online)


_IDX = ("b", "h", "q_idx", "kv_idx")


def _index_leaves(call: Call, start: int, rows: int) -> tuple[dict[str, Any], Any]:
    """b, h, q_idx, kv_idx broadcast as [B, H, rows, M], and the varlen same-sequence mask."""
    b, _, h, _ = call.q.shape
    m, dev = call.k.shape[1], call.q.device
    r = torch.arange(start, start + rows, device=dev)
    leaves: dict[str, Any] = {"h": torch.arange(h, device=dev).view(1, h, 1, 1)}
    if call.varlen is None:
        leaves.update(b=torch.arange(b, device=dev).view(b, 1, 1, 1), q_idx=r.view(1, 1, -1, 1),
                      kv_idx=torch.arange(m, device=dev).view(1, 1, 1, m))
        return leaves, None
    doc_q, pos_q, doc_k, pos_k = (t.long() for t in call.varlen)
    leaves.update(b=doc_q[r].view(1, 1, -1, 1), q_idx=pos_q[r].view(1, 1, -1, 1),
                  kv_idx=pos_k.view(1, 1, 1, m))
    return leaves, doc_q[r].view(1, 1, -1, 1) == doc_k.view(1, 1, 1, m)


def _keep(fns: RefFns, ev: TorchEval, same_doc: Any, call: Call, start: int,
          rows: int) -> torch.Tensor | None:
    keep = None if fns.mask is None else torch.as_tensor(fns.mask(ev), device=call.q.device)
    for extra in (same_doc, _block_keep(call, start, rows)):
        if extra is not None:
            keep = extra if keep is None else keep & extra
    return keep


def _block_keep(call: Call, start: int, rows: int) -> torch.Tensor | None:
    if call.block_mask is None:
        return None
    bq, bk = call.block_size
    dev = call.q.device
    qb = torch.arange(start, start + rows, device=dev) // bq
    kb = torch.arange(call.k.shape[1], device=dev) // bk
    return call.block_mask[:, :, qb][..., kb]


def _chunk(fns: RefFns, call: Call, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor,
           start: int, scale: float | None, acc: torch.dtype) -> tuple:
    rows = qh.shape[2]
    leaves, same_doc = _index_leaves(call, start, rows)
    s = torch.einsum("bhnd,bhmd->bhnm", qh, kh)
    leaves["score"] = s * scale if scale is not None else s
    ev = TorchEval(leaves, call.inputs, acc)
    s = torch.broadcast_to(torch.as_tensor(fns.score(ev), device=qh.device).to(acc),
                           leaves["score"].shape)
    keep = _keep(fns, ev, same_doc, call, start, rows)
    empty = None
    if keep is not None:
        keep = torch.broadcast_to(keep, s.shape)
        empty = ~keep.any(-1, keepdim=True)
        keep = keep | empty  # rows that keep no key compute on every key, then output 0
        s = torch.where(keep, s, 0.0)
    prog = fns.online
    ones = torch.ones(s.shape[:-1] + (1,), dtype=acc, device=s.device)
    row_leaves = {**leaves, "score": s, **{f"row.{n}": ones * v for n, v in prog.inits}}
    ev = TorchEval(row_leaves, call.inputs, acc,
                   keep if keep is not None else torch.ones_like(s, dtype=torch.bool))
    p = torch.broadcast_to(torch.as_tensor(ev(prog.p)), s.shape)
    if keep is not None:
        p = torch.where(keep, p, 0.0)
    end = {**leaves, "o": p @ vh, **{f"row.{n}": ev(e) for n, e in prog.rows}}
    ev_end = TorchEval(end, call.inputs, acc)
    out = ev_end(prog.out)
    finals = {n: torch.broadcast_to(torch.as_tensor(ev_end(e)), ones.shape)[..., 0]
              for n, e in prog.finals}
    if empty is not None:
        out = torch.where(empty, 0.0, out)
    return out, finals


def engine_reference(fns: RefFns, call: Call, softmax_scale: float | None = None,
                     chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, dict]:
    """Out [B, N, H, Dv] (q's dtype) and final row scales {name: [B, H, N]} (float)."""
    q, k, v = call.q, call.k, call.v
    b, n, h, _ = q.shape
    m, group = k.shape[1], h // k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.to(acc).transpose(1, 2)
    kh = k.to(acc).repeat_interleave(group, 2).transpose(1, 2)
    vh = v.to(acc).repeat_interleave(group, 2).transpose(1, 2)
    rows = max(1, chunk_bytes // max(1, 8 * b * h * m * torch.finfo(acc).bits // 8))
    outs, finals = [], []
    for start in range(0, n, rows):
        o, f = _chunk(fns, call, qh[:, :, start:start + rows], kh, vh, start, softmax_scale,
                      acc)
        outs.append(o)
        finals.append(f)
    out = torch.cat(outs, 2).transpose(1, 2).to(q.dtype)
    names = [name for name, _ in fns.online.finals]
    return out, {name: torch.cat([f[name] for f in finals], 2) for name in names}
