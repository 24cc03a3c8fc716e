"""The library level: AttentionLibrary(attn_type, mask_type, use_types) builds an
AttentionEngine for a known variant, and the mask_mods and score_mods it is made of.

Shapes: B batch, N queries, M keys, H heads, D head size.

attn_type   "SoftmaxAttention": softmax(q k^T / sqrt(D))
            "SigmoidAttention": sigmoid(q k^T / sqrt(D) + softmax_bias), no row normalisation;
                                custom input softmax_bias [1]
            "RetentionAttention": s = q k^T / sqrt(D) * exp(log_decay[h] * (q_idx - kv_idx)),
                                p = s / max(sum |s|, 1); custom input log_decay [H]
            "AlibiAttention": softmax(q k^T / sqrt(D) + slopes[h] * (kv_idx - q_idx));
                                custom input slopes [H]
            "SoftcapAttention": softmax(cap * tanh(q k^T / sqrt(D) / cap)), cap = softcap
mask_type   "None", "Causal", "SlidingWindow" (window: q_idx - window < kv_idx <= q_idx),
            "PrefixLM" (prefix: kv_idx < prefix or kv_idx <= q_idx),
            "Document" (custom input document_ids [N]: same document, causal)
use_types   "Train" or "Inference" (both differentiable; no difference in kernels)
"""

from __future__ import annotations

from typing import Any

from attnrt.engine.errors import EngineInputError
from attnrt.engine.online import OnlineIdentity, OnlineRetention, OnlineSoftmax
from attnrt.engine.softmax import AttentionEngine
from attnrt.engine.spec import CustomIO


def causal_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return kv_idx <= q_idx


def sliding_window_mask(window: int) -> Any:
    def sliding_window(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return sliding_window


def prefix_lm_mask(prefix: int) -> Any:
    def prefix_lm(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (kv_idx < prefix) | (kv_idx <= q_idx)

    return prefix_lm


def document_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any, custom_fwd_inputs: Any) -> Any:
    doc = custom_fwd_inputs["document_ids"]
    return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)


def alibi_score(scale: float) -> Any:
    def alibi(score: Any, custom_fwd_inputs: Any, b: Any, h: Any, q_idx: Any,
              kv_idx: Any) -> Any:
        return score * scale + custom_fwd_inputs["slopes"][h] * (kv_idx - q_idx)

    return alibi


def softcap_score(scale: float, cap: float) -> Any:
    def softcap(score: Any, custom_fwd_inputs: Any, b: Any, h: Any, q_idx: Any,
                kv_idx: Any) -> Any:
        return (score * (scale / cap)).tanh() * cap

    return softcap


def scaled_score(scale: float) -> Any:
    def scaled(score: Any, custom_fwd_inputs: Any, b: Any, h: Any, q_idx: Any,
               kv_idx: Any) -> Any:
        return score * scale

    return scaled


def sigmoid_score(scale: float) -> Any:
    def sigmoid(score: Any, custom_fwd_inputs: Any, b: Any, h: Any, q_idx: Any,
                kv_idx: Any) -> Any:
        return (score * scale + custom_fwd_inputs["softmax_bias"]).sigmoid()

    return sigmoid


def retention_score(scale: float) -> Any:
    def retention(score: Any, custom_fwd_inputs: Any, b: Any, h: Any, q_idx: Any,
                  kv_idx: Any) -> Any:
        decay = (custom_fwd_inputs["log_decay"][h] * (q_idx - kv_idx)).exp()
        return score * scale * decay

    return retention


_ATTN: dict[str, tuple[Any, Any, dict]] = {
    "SoftmaxAttention": (scaled_score, OnlineSoftmax, {}),
    "SigmoidAttention": (sigmoid_score, OnlineIdentity, {"softmax_bias": (1,)}),
    "RetentionAttention": (retention_score, OnlineRetention, {"log_decay": ("heads",)}),
    "AlibiAttention": (alibi_score, OnlineSoftmax, {"slopes": ("heads",)}),
    "SoftcapAttention": (softcap_score, OnlineSoftmax, {}),
}
MASK_TYPES = ("None", "Causal", "SlidingWindow", "PrefixLM", "Document")
USE_TYPES = ("Train", "Inference")


def _mask(mask_type: str, window: int | None, prefix: int | None) -> tuple[Any, dict]:
    if mask_type == "SlidingWindow":
        if not isinstance(window, int) or window < 1:
            raise EngineInputError(f"window={window!r}; SlidingWindow needs an int >= 1")
        return sliding_window_mask(window), {}
    if mask_type == "PrefixLM":
        if not isinstance(prefix, int) or prefix < 0:
            raise EngineInputError(f"prefix={prefix!r}; PrefixLM needs an int >= 0")
        return prefix_lm_mask(prefix), {}
    if mask_type == "Document":
        return document_mask, {"document_ids": ("seq_len",)}
    return (causal_mask if mask_type == "Causal" else None), {}


def AttentionLibrary(attn_type: str = "SoftmaxAttention", mask_type: str = "Causal",  # noqa: N802
                     use_types: str = "Train", *, head_size: int = 128,
                     window: int | None = None, prefix: int | None = None,
                     softcap: float = 30.0, **engine_args: Any) -> AttentionEngine:
    """An AttentionEngine for a library variant (see the module docstring for the names).
    Custom inputs, in order: the attention type's, then the mask type's."""
    for name, value, allowed in (("attn_type", attn_type, tuple(_ATTN)),
                                 ("mask_type", mask_type, MASK_TYPES),
                                 ("use_types", use_types, USE_TYPES)):
        if value not in allowed:
            raise EngineInputError(f"{name}={value!r}; allowed: {', '.join(allowed)}")
    make_score, online, inputs = _ATTN[attn_type]
    scale = head_size ** -0.5
    score = softcap_score(scale, softcap) if attn_type == "SoftcapAttention" else \
        make_score(scale)
    mask, mask_inputs = _mask(mask_type, window, prefix)
    return AttentionEngine(None, score, CustomIO({**inputs, **mask_inputs}), online(), mask,
                           **engine_args)
