"""NPU_FUSION_ATTN: Ascend's fused attention, torch_npu.npu_fusion_attention (FlashAttentionScore).

Shapes: B batch, N query sequence, M key sequence, H query heads, Hkv key/value heads, D head size.
Inputs q [B, N, H, D], k/v [B, M, Hkv, D]; output [B, N, H, D].

Documented signature (Ascend Extension for PyTorch, torch_npu.npu_fusion_attention)::

    npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647,
                         next_tockens=2147483647, inner_precise=0, prefix=None,
                         actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False)
        -> (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)

(actual_seq_qlen/actual_seq_kvlen came with 6.0, later releases add more keywords; the adapter
passes only arguments every release has.)

How attnrt's request maps onto it:
- layout: "BSND" is attnrt's [B, N, H, D]; `head_num` is H (query heads). GQA is native when
  H / Hkv is an integer.
- scale: passed explicitly; the op's default is 1.0, not 1/sqrt(D).
- causal: sparse_mode=3 ("rightDownCausal", the bottom-right alignment attnrt uses everywhere)
  with the compressed mask the docs require for sparse modes 2, 3 and 4: a 2048 x 2048 bool upper
  triangle (True = masked), `torch.triu(ones(2048, 2048, dtype=bool), diagonal=1)`. Rows that
  see no key (N > M) output zeros; they are never sent to the op (its "invalid rows").
- non-causal: no mask and sparse_mode=0 (the docs: with atten_mask None the op computes everything).
- output: the first element of the 7-tuple.
Limits from the current docs' constraints: D (Dq = Dk >= Dv) 1..768, Nq 1..256, Atlas A2 (910B).

Equivalent PyTorch: `attnrt.backends.reference.chunked_attention(q, k, v, causal, softmax_scale)`.
"""

from __future__ import annotations

import importlib
import math
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from attnrt.interfaces import AttentionBackend, AttentionMetadata, ScaledImpl
from attnrt.selection.capability import NUM_HEADS, Package, Reason

if TYPE_CHECKING:
    from attnrt.selection.device import Device
    from attnrt.selection.request import AttentionRequest

LAYOUT = "BSND"
SPARSE_NONE = 0  # defaultMask; with atten_mask=None the op attends to every key
SPARSE_RIGHT_DOWN_CAUSAL = 3
COMPRESSED_MASK_SIZE = 2048
MAX_HEADS = 256
INSTALL_HINT = ("pip install torch-npu matching your torch version, on a machine with the CANN "
                "toolkit (Ascend Extension for PyTorch)")


@lru_cache(maxsize=8)
def causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed rightDownCausal mask sparse_mode=3 requires, one per device (4 MiB)."""
    ones = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)


def fusion_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                          softmax_scale: float | None) -> torch.Tensor:
    """One `torch_npu.npu_fusion_attention` call on [B, N, H, D] tensors -> [B, N, H, D]."""
    batch, n, heads, _ = q.shape
    m = k.shape[1]
    if causal and n > m:
        # Rows i < N - M see no key. The docs leave them to the op's "invalid row" mode; attnrt
        # defines them as zeros, so only the rows that see keys go to the op (a square problem).
        seen = fusion_attention_call(q[:, n - m:], k, v, causal, softmax_scale)
        return torch.cat([seen.new_zeros(batch, n - m, heads, seen.shape[-1]), seen], dim=1)
    torch_npu = importlib.import_module("torch_npu")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    outputs = torch_npu.npu_fusion_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), head_num=q.shape[2],
        input_layout=LAYOUT, atten_mask=causal_mask(q.device) if causal else None, scale=scale,
        sparse_mode=SPARSE_RIGHT_DOWN_CAUSAL if causal else SPARSE_NONE)
    return outputs[0]


class NpuFusionAttnImpl(ScaledImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        return fusion_attention_call(query, key, value, self.causal, self.softmax_scale)


class NpuFusionAttnBackend(AttentionBackend):
    """torch_npu's fused attention on Atlas A2 (Ascend 910B), the one product its docs list.

    fp32 is documented from Ascend Extension for PyTorch 6.0.0 on; earlier releases take fp16 and
    bf16 only, which is why the proposed rules rank this backend for those two.
    """

    PLATFORMS = frozenset({"npu"})
    ARCHS = ("ascend910b",)
    DTYPES = frozenset({"fp16", "bf16", "fp32"})
    HEAD_SIZES = range(1, 769)
    SUPPORTS_CAUSAL = True
    SUPPORTS_GQA = True
    PACKAGES = (Package("torch_npu", dist="torch-npu", hint=INSTALL_HINT),)

    @staticmethod
    def get_name() -> str:
        return "NPU_FUSION_ATTN"

    @staticmethod
    def get_impl_cls() -> type[NpuFusionAttnImpl]:
        return NpuFusionAttnImpl

    @classmethod
    def extra_reasons(cls, request: AttentionRequest, device: Device) -> list[Reason]:
        if request.num_heads <= MAX_HEADS:
            return []
        return [Reason(NUM_HEADS, f"num_heads={request.num_heads} is not supported by "
                                  f"{cls.get_name()}; supported: 1..{MAX_HEADS}",
                       "shard heads across devices (sequence parallel) to get under 256")]
