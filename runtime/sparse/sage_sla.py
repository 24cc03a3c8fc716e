"""SageSLA: SLA with SpargeAttn's quantized block-sparse kernels (`spas_sage_attn`), as
FastVideo's SageSLAAttentionImpl calls them. Forward only.

Shapes: B batch, N sequence, H heads, D head size (64 or 128); the impl takes [B, N, H, D] and
hands the kernels FastVideo's [B, H, N, D] layout.

Documented calls (FastVideo fastvideo/attention/backends/sla.py, SpargeAttn spas_sage_attn):
    selection: get_block_map(q, k, topk_ratio, BLKQ, BLKK) with (64, 128) on sm90, else (128, 64)
    q, k -> int8: utils.get_vanilla_qk_quant(q, k, km, BLKQ, BLKK), km = k.mean(seq)
    lists:        utils.block_map_lut_triton(sparse_map) -> (lut, valid_block_num)
    v -> fp8:     _fused.transpose_pad_permute_cuda(v, v_t [B, H, D, pad128(N)], 1)
                  _fused.scale_fuse_quant_cuda(v_t, v_fp8, v_scale [B, H, D], N, 2.25, 1)
    sm90:   _qattn.qk_int8_sv_f8_accum_f32_block_sparse_attn_inst_buf_fuse_v_scale_sm90(
                q8, k8, v8, o, lut, valid, q_scale, k_scale, v_scale, 1, False, 1, scale)
    others: _qattn.qk_int8_sv_f8_accum_f16_..._with_pv_threshold (Sage2++ build) or
            _qattn.qk_int8_sv_f8_accum_f32_..._with_pv_threshold(q8, k8, v8, o, lut, valid,
                pv_threshold [H] = 1e6, q_scale, k_scale, v_scale, 1, False, 1, scale, 0)
then the linear branch and proj_l as SLA. `scale` is the layer's softmax_scale (upstream always
uses D**-0.5). The package is not on PyPI; without it the backend is refused with a reason and
a build-from-source hint.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import SimpleNamespace
from typing import Any

import torch

from attnrt.interfaces import AttentionMetadata

from .block_select import get_block_map
from .method_errors import (
    GradientNotSupportedError,
    SageSLAUnavailableError,
    SparseArgumentError,
    check_choice,
    check_qkv,
)
from .sla import SLAAttentionImpl, step_ratio

METHOD = "SAGE_SLA_ATTN"
HEAD_SIZES = (64, 128)
HINT = ("SpargeAttn is not on PyPI; build it from source: pip install --no-build-isolation "
        "git+https://github.com/thu-ml/SpargeAttn.git (needs nvcc matching torch's CUDA)")
_SM90 = "qk_int8_sv_f8_accum_f32_block_sparse_attn_inst_buf_fuse_v_scale_sm90"
_PV = "qk_int8_sv_f8_accum_f32_block_sparse_attn_inst_buf_fuse_v_scale_with_pv_threshold"
_PV_SAGE2PP = "qk_int8_sv_f8_accum_f16_block_sparse_attn_inst_buf_fuse_v_scale_with_pv_threshold"


@cache
def load_sparge() -> SimpleNamespace:
    """The spas_sage_attn modules (cached), or SageSLAUnavailableError with the import error."""
    try:
        qattn = importlib.import_module("spas_sage_attn._qattn")
        fused = importlib.import_module("spas_sage_attn._fused")
        utils = importlib.import_module("spas_sage_attn.utils")
    except (ImportError, OSError, RuntimeError) as exc:  # broken CUDA extensions raise OSError
        raise SageSLAUnavailableError(f"{METHOD} needs spas_sage_attn; import failed: {exc} "
                                      f"(hint: {HINT})") from exc
    return SimpleNamespace(qattn=qattn, fused=fused, utils=utils)


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


class SageSLAAttentionImpl(SLAAttentionImpl):
    """SageSLA for one layer: forward(query, key, value [B, N, H, D], metadata) -> [B, N, H, D].
    FastVideo's signature (keyword arguments); inference only: a call with autograd on and
    inputs that need gradients raises GradientNotSupportedError."""

    def __init__(self, num_heads: int, head_size: int, causal: bool = False,
                 softmax_scale: float | None = None, num_kv_heads: int | None = None,
                 prefix: str = "", topk_ratio: float = 0.5, feature_map: str = "softmax",
                 use_bf16: bool = True, **extra_impl_args: Any) -> None:
        check_choice("head_size", head_size, HEAD_SIZES, METHOD)
        if extra_impl_args:  # block sizes follow the arch; the kernels take fp16/bf16 only
            raise SparseArgumentError(f"extra_impl_args={sorted(extra_impl_args)} are not "
                                      f"supported by {METHOD}; allowed: none")
        if num_kv_heads not in (None, num_heads):
            raise SparseArgumentError(f"num_kv_heads={num_kv_heads} is not supported by "
                                      f"{METHOD}; allowed: num_heads ({num_heads}), no GQA")
        super().__init__(num_heads=num_heads, head_size=head_size, causal=causal,
                         softmax_scale=softmax_scale, num_kv_heads=num_kv_heads, prefix=prefix,
                         topk_ratio=topk_ratio, feature_map=feature_map, use_bf16=use_bf16)
        load_sparge()  # refuse now, with the reason, rather than at the first forward

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            raise GradientNotSupportedError(
                f"{METHOD} is forward-only (SpargeAttn's kernels have no backward); inputs "
                "that require grad are not allowed: run it under torch.no_grad() or use "
                "SLA_ATTN for training")
        check_qkv(METHOD, self.head_size, query, key, value)
        if key.shape[2] != query.shape[2]:
            raise SparseArgumentError(f"key heads {key.shape[2]} != query heads "
                                      f"{query.shape[2]} are not supported by {METHOD}; "
                                      "allowed: equal (no GQA)")
        ratio = step_ratio(self.topk_ratio, attn_metadata)
        q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))  # [B, H, N, D]
        blkq, blkk = (64, 128) if device_arch(q.device) == "sm90" else (128, 64)
        sparse_map, _, _ = get_block_map(q, k, ratio, BLKQ=blkq, BLKK=blkk)
        q, k, v = (t.to(self.dtype) for t in (q, k, v))
        o_s = self.quantized_sparse(q, k, v, sparse_map, blkq, blkk)
        o_l = self.linear_branch(query, key, value)  # [B, N, H, D]
        out = o_s.transpose(1, 2).to(o_l.dtype) + self.project(o_l).to(o_l.dtype)
        return out.to(query.dtype)

    def quantized_sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         sparse_map: torch.Tensor, blkq: int, blkk: int) -> torch.Tensor:
        """q, k, v [B, H, N, D] in the compute dtype -> the sparse branch [B, H, N, D]."""
        lib = load_sparge()
        q8, q_scale, k8, k_scale = lib.utils.get_vanilla_qk_quant(
            q, k, k.mean(dim=-2, keepdim=True), blkq, blkk)
        lut, valid = lib.utils.block_map_lut_triton(sparse_map)
        b, h, n, d = v.shape
        v_t = torch.empty((b, h, d, (n + 127) // 128 * 128), dtype=v.dtype, device=v.device)
        lib.fused.transpose_pad_permute_cuda(v, v_t, 1)
        v8 = torch.empty(v_t.shape, dtype=torch.float8_e4m3fn, device=v.device)
        v_scale = torch.empty((b, h, d), dtype=torch.float32, device=v.device)
        lib.fused.scale_fuse_quant_cuda(v_t, v8, v_scale, n, 2.25, 1)
        o_s = torch.full_like(q, float("nan"))
        scale = self.softmax_scale
        if device_arch(q.device) == "sm90":
            getattr(lib.qattn, _SM90)(q8, k8, v8, o_s, lut, valid, q_scale, k_scale, v_scale,
                                      1, False, 1, scale)
            return o_s
        pv_threshold = torch.full((h,), 1e6, dtype=torch.float32, device=q.device)
        kernel = getattr(lib.qattn, _PV_SAGE2PP, None) or getattr(lib.qattn, _PV)
        kernel(q8, k8, v8, o_s, lut, valid, pv_threshold, q_scale, k_scale, v_scale, 1, False,
               1, scale, 0)
        return o_s
