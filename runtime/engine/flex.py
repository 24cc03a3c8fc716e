"""Running a variant through torch's FlexAttention (score_mod / mask_mod with online softmax).

Shapes: q [B, N, H, D], k [B, M, Hkv, D], v [B, M, Hkv, Dv] -> out [B, N, H, Dv].
The traced expressions are evaluated on FlexAttention's index tensors; custom inputs are
captured (FlexAttention differentiates captured tensors). Variable-length batches become a
same-sequence mask with b, q_idx, kv_idx remapped to sequence and position; block-sparse
inputs become a block-granular mask. On CUDA the call is compiled (torch.compile), elsewhere
FlexAttention runs eagerly (unfused, for correctness only).
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

import torch

from attnrt.engine.call import Call
from attnrt.engine.errors import EngineError
from attnrt.engine.online import OnlineSoftmax, trace_online
from attnrt.engine.spec import Variant
from attnrt.engine.torch_code import torch_function


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


class FlexRunner:
    """One variant's score_mod / mask_mod for FlexAttention as plain torch functions, made once
    per layout kind so compiled FlexAttention sees the same functions each call; the call's
    tensors reach them through `self.state` (Dynamo guards their shapes, not identity)."""

    def __init__(self, variant: Variant) -> None:
        if not is_softmax(variant):
            raise EngineError("backend='flex' runs online softmax only; this variant's "
                              "OnlineFunc is another row reduction")
        self.variant = variant
        self.state: dict[str, Any] = {}
        self.masks: dict[tuple, Any] = {}
        self.fns: dict[tuple, tuple[Any, Any]] = {}
        self.kernel_options: dict[str, int] | None = None  # set once the defaults overflow

    def functions(self, call: Call) -> tuple[Any, Any]:
        """(score_mod or None, mask_mod) for the call's layout kind."""
        kind = (call.varlen is not None, call.block_mask is not None)
        if kind not in self.fns:
            score = None if self.variant.score.op == "leaf" else torch_function(
                self.variant.score, "score", kind[0], False, self.state)
            mask = torch_function(self.variant.mask, "mask", kind[0], kind[1], self.state)
            self.fns[kind] = (score, mask)
        return self.fns[kind]

    def _fill(self, call: Call) -> None:
        self.state.clear()
        self.state["in"] = dict(call.inputs)
        if call.varlen is not None:
            self.state.update(zip(("docq", "posq", "dock", "posk"), call.varlen, strict=True))
        if call.block_mask is not None:
            self.state.update(blocks=call.block_mask, bq=call.block_size[0],
                              bk=call.block_size[1])

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
        mask = create_block_mask(self.functions(call)[1], B=b if per_b else None,
                                 H=h if per_h else None, Q_LEN=n, KV_LEN=call.k.shape[1],
                                 device=str(call.q.device))
        if static:
            self.masks[key] = mask
        return mask

    def __call__(self, call: Call, scale: float | None) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        self._fill(call)
        q, k, v = (t.transpose(1, 2) for t in (call.q, call.k, call.v))
        run = _compiled() if q.device.type == "cuda" else flex_attention
        args = {"score_mod": self.functions(call)[0], "block_mask": self.block_mask(call),
                "scale": 1.0 if scale is None else scale, "enable_gqa": q.shape[1] != k.shape[1]}
        if self.kernel_options is not None:
            args["kernel_options"] = self.kernel_options
        try:
            out = run(q, k, v, **args)
        except Exception as exc:
            if self.kernel_options is not None or not out_of_shared_memory(exc):
                raise
            # Inductor's default tiles for a variant whose captured tensors take gradients
            # can ask for more shared memory than the GPU has (torch 2.11, H100/H200, D=64):
            # compile this variant once more with smaller tiles and one stage.
            logging.getLogger("attnrt").warning(
                "FlexAttention: %s; this variant compiles with kernel_options=%s instead",
                str(exc).splitlines()[0][:200], SMALL_TILES)
            self.kernel_options = args["kernel_options"] = dict(SMALL_TILES)
            out = run(q, k, v, **args)
        return out.transpose(1, 2)


# Tiles FlexAttention's Triton templates accept on every supported GPU (forward: BLOCK_M,
# BLOCK_N; backward: BLOCK_M1/N1 for dK/dV, BLOCK_M2/N2 for dQ), with one pipeline stage.
SMALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64,
               "BLOCK_N2": 32, "num_stages": 1}


def out_of_shared_memory(exc: BaseException) -> bool:
    """Whether a compile error is Triton's shared-memory limit (Inductor wraps it)."""
    text = str(exc)
    return "out of resource" in text and "Hardware limit" in text


def run_flex(engine: Any, call: Call, scale: float | None) -> torch.Tensor:
    """Out [B, N, H, Dv] from FlexAttention; EngineError for non-softmax variants."""
    runner = engine._flex_runner
    if runner is None:
        runner = engine._flex_runner = FlexRunner(engine.variant)
    return runner(call, scale)
