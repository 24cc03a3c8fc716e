"""Running a variant through torch's FlexAttention (score_mod / mask_mod with online softmax).

Shapes: q [B, N, H, D], k [B, M, Hkv, D], v [B, M, Hkv, Dv] -> out [B, N, H, Dv].
The traced expressions are evaluated on FlexAttention's index tensors; custom inputs are
captured (FlexAttention differentiates captured tensors). Variable-length batches become a
same-sequence mask with b, q_idx, kv_idx remapped to sequence and position; block-sparse
inputs become a block-granular mask. On CUDA the call is compiled (torch.compile), elsewhere
FlexAttention runs eagerly (unfused, for correctness only).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from attnrt.engine.call import Call
from attnrt.engine.errors import EngineError
from attnrt.engine.evaluate import TorchEval
from attnrt.engine.online import OnlineSoftmax, trace_online
from attnrt.engine.spec import Variant


@cache
def _softmax_text() -> str:
    prog = trace_online(OnlineSoftmax())
    return repr(prog)


def is_softmax(variant: Variant) -> bool:
    """Whether the variant's OnlineFunc is online softmax (FlexAttention's only reduction)."""
    return repr(variant.online) == _softmax_text()


@cache
def _compiled() -> Any:
    from attnrt.backends.flex import _compiled as compiled_flex

    return compiled_flex()


def _leaves(call: Call, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> dict[str, Any]:
    if call.varlen is None:
        return {"b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx}
    doc_q, pos_q, _, pos_k = call.varlen
    return {"b": doc_q[q_idx], "h": h, "q_idx": pos_q[q_idx], "kv_idx": pos_k[kv_idx]}


class FlexRunner:
    """One variant's score_mod / mask_mod for FlexAttention, made once so that compiled
    FlexAttention sees the same functions each call; the call's tensors are read through
    `self.call` (Dynamo guards their shapes, not their identity)."""

    def __init__(self, variant: Variant) -> None:
        if not is_softmax(variant):
            raise EngineError("backend='flex' runs online softmax only; this variant's "
                              "OnlineFunc is another row reduction")
        self.variant = variant
        self.call: Call = None  # type: ignore[assignment]  # set by each __call__
        self.masks: dict[tuple, Any] = {}
        runner = self  # FlexAttention takes plain functions, not bound methods

        def score_mod(s: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return runner.score(s, b, h, q_idx, kv_idx)

        def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return runner.keep(b, h, q_idx, kv_idx)

        self.score_mod, self.mask_mod = score_mod, mask_mod

    def score(self, s: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        call = self.call
        leaves = {"score": s, **_leaves(call, b, h, q_idx, kv_idx)}
        out = TorchEval(leaves, call.inputs, torch.float32)(self.variant.score)
        return torch.as_tensor(out).to(s.dtype)

    def keep(self, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        call, mask = self.call, self.variant.mask
        keep = torch.ones((), dtype=torch.bool, device=q_idx.device)
        if mask is not None:
            keep = keep & TorchEval(_leaves(call, b, h, q_idx, kv_idx), call.inputs,
                                    torch.float32)(mask)
        if call.varlen is not None:
            keep = keep & (call.varlen[0][q_idx] == call.varlen[2][kv_idx])
        if call.block_mask is not None:
            bq, bk = call.block_size
            keep = keep & call.block_mask[b, h, q_idx // bq, kv_idx // bk]
        return keep

    def block_mask(self, call: Call) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        if self.variant.mask is None and call.varlen is None and call.block_mask is None:
            return None
        b, n, h, _ = call.q.shape
        static = call.varlen is None and call.block_mask is None and \
            not self.variant.mask_uses_inputs
        key = (b, h, n, call.k.shape[1], str(call.q.device))
        if static and key in self.masks:
            return self.masks[key]
        uses = self.variant.mask.leaves() if self.variant.mask is not None else set()
        per_b = call.block_mask is not None or "b" in uses
        per_h = call.block_mask is not None or "h" in uses
        mask = create_block_mask(self.mask_mod, B=b if per_b else None,
                                 H=h if per_h else None, Q_LEN=n, KV_LEN=call.k.shape[1],
                                 device=str(call.q.device))
        if static:
            self.masks[key] = mask
        return mask

    def __call__(self, call: Call, scale: float | None) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        self.call = call
        q, k, v = (t.transpose(1, 2) for t in (call.q, call.k, call.v))
        run = _compiled() if q.device.type == "cuda" else flex_attention
        score_mod = None if self.variant.score.op == "leaf" else self.score_mod
        out = run(q, k, v, score_mod=score_mod, block_mask=self.block_mask(call),
                  scale=1.0 if scale is None else scale, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)


def run_flex(engine: Any, call: Call, scale: float | None) -> torch.Tensor:
    """Out [B, N, H, Dv] from FlexAttention; EngineError for non-softmax variants."""
    runner = getattr(engine, "_flex_runner", None)
    if runner is None:
        runner = engine._flex_runner = FlexRunner(engine.variant)
    return runner(call, scale)
