"""CUDNN_BSA_VSA: VSA (method "vsa") whose fine stage runs on NVIDIA cuDNN frontend's Block
Sparse Attention (`cudnn.BSA.block_sparse_attention_forward`, CuTe DSL kernels). attnrt checks,
tiles, pools, picks the kept cubes (as VIDEO_SPARSE_ATTN does) and adds coarse * gate; cuDNN
attends each query cube to its kept key cubes. An adapter: the package computes the fine stage.

Shapes: B batch, S = 64 * C tiled slots, C cubes, H heads, Hkv kv heads (H % Hkv == 0), D head
size; [B, S, H, D] throughout, handed to cuDNN as is with layout="bshd". Per (batch, head, query
cube) cuDNN gets the topk kept key cubes (q2k_block_index int32 [B, H, C, topk],
block_sparse_num=topk), each cube's valid tokens (block_sizes = variable_block_sizes int32 [C],
the first valid_c slots of a cube hold its tokens) and sparse_block_size=64; softmax_scale is
passed through. Documented call and limits: nvidia-cudnn-frontend 1.32,
https://docs.nvidia.com/cudnn/fe-oss-apis/bsa (forward: fp16/bf16, D 64/96/128 and GQA on sm90;
Blackwell's 64-token path bf16, D=128, MHA; sm120 D=128). Its backward is a separate explicit
call (bf16, D=128, MHA), not an autograd op, so this backend is forward-only.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import BackendUnavailableError
from ..selection.capability import DTYPE, GQA, HEAD_SIZE, Package, Reason, package_status
from .vsa import vsa_with_fine_stage
from .vsa_backend import (
    VideoSparseAttentionBackend,
    VideoSparseAttentionImpl,
    _sm_major,
)
from .vsa_layout import CUBE_TOKENS
from .vsa_metadata import VideoSparseAttentionMetadata, VSAInputError, VSATypeError

if TYPE_CHECKING:
    from ..selection.device import Device
    from ..selection.request import AttentionRequest

NAME = "CUDNN_BSA_VSA"
PACKAGE = Package("cudnn", dist="nvidia-cudnn-frontend", min_version="1.32",
                  hint="pip install 'nvidia-cudnn-frontend>=1.32' (with nvidia-cutlass-dsl[cu13]"
                       ">=4.8, its CuTe DSL runtime)")
CUTE_DSL = Package("cutlass", dist="nvidia-cutlass-dsl", min_version="4.8",
                   hint="pip install 'nvidia-cutlass-dsl[cu13]>=4.8' (cuDNN BSA's JIT runtime)")
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
HEAD_SIZES = (64, 96, 128)
# Where a GPU family's 64-token forward is narrower than sm90's (the class data): allowed dtype
# names, head sizes, and whether GQA runs; from the docs' "Current support" table.
NARROWER: dict[int, tuple[frozenset[str], tuple[int, ...], bool]] = {
    10: (frozenset({"bf16"}), (128,), False),
    11: (frozenset({"bf16"}), (128,), False),
    12: (frozenset({"fp16", "bf16"}), (128,), True),
}


def vendor_function() -> Any:
    """cudnn.BSA.block_sparse_attention_forward, or BackendUnavailableError with the hint."""
    for pkg in (PACKAGE, CUTE_DSL):
        status = package_status(pkg)
        if status.reason is not None:
            raise BackendUnavailableError(f"{NAME} cannot run: {status.reason}")
    return importlib.import_module(PACKAGE.module).BSA.block_sparse_attention_forward


def arch_reasons(major: int | None, dtype: str, head_size: int, gqa: bool) -> list[Reason]:
    """Reasons the 64-token forward of GPU family `major` refuses these (none on sm90)."""
    if major not in NARROWER:
        return []
    dtypes, sizes, runs_gqa = NARROWER[major]
    arch, reasons = f"sm{major}x", []
    if dtype not in dtypes:
        reasons.append(Reason(DTYPE, f"dtype={dtype} is not supported by {NAME} on {arch}; "
                                     f"supported: {', '.join(sorted(dtypes))}"))
    if head_size not in sizes:
        reasons.append(Reason(HEAD_SIZE, f"head_size={head_size} is not supported by {NAME} on "
                                         f"{arch}; supported: {', '.join(map(str, sizes))}"))
    if gqa and not runs_gqa:
        reasons.append(Reason(GQA, f"num_kv_heads < num_heads (GQA) is not supported by {NAME} "
                                   f"on {arch}; supported: num_kv_heads == num_heads"))
    return reasons


def check_bsa_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """What cuDNN's BSA forward takes: fp16/bf16 alike, k and v equal and matching q's batch and
    D in 64/96/128, H a multiple of Hkv, a contiguous last axis, no autograd; on a GPU, that
    GPU family's narrower limits."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dtype not in DTYPES or t.dtype != q.dtype:
            raise VSATypeError(f"{name}.dtype={t.dtype} is not allowed for {NAME}; allowed: "
                               f"float16, bfloat16, the same for query, key and value")
        if t.stride(-1) != 1:
            raise VSAInputError(f"{name}.stride(-1)={t.stride(-1)} is not allowed for {NAME}; "
                                "the head axis must be contiguous (stride 1)")
    if v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise VSAInputError(f"key.shape={tuple(k.shape)}, value.shape={tuple(v.shape)} are not "
                            f"allowed for {NAME} with query.shape={tuple(q.shape)}; key and value "
                            "must be equal and match query's batch and head size")
    if q.shape[3] not in HEAD_SIZES:
        raise VSAInputError(f"head_size={q.shape[3]} is not allowed for {NAME}; allowed: "
                            f"{', '.join(map(str, HEAD_SIZES))}")
    if q.shape[2] % k.shape[2] != 0:
        raise VSAInputError(f"num_kv_heads={k.shape[2]} is not allowed for {NAME} with "
                            f"num_heads={q.shape[2]}; num_heads must be a multiple of it")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise VSAInputError(f"requires_grad=True is not allowed for {NAME}: cuDNN's BSA forward "
                            "has no autograd backward; run under torch.no_grad() (inference)")
    if q.is_cuda:
        major = torch.cuda.get_device_capability(q.device)[0]
        reasons = arch_reasons(major, DTYPES[q.dtype], q.shape[3], k.shape[2] != q.shape[2])
        if reasons:
            raise VSAInputError(str(reasons[0]))


def bsa_fine_stage(forward: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   index: torch.Tensor, sizes: torch.Tensor, scale: float) -> torch.Tensor:
    """VSA's fine stage through cuDNN: q [B, S, H, D], k, v [B, S, Hkv, D] (bshd), kept cubes
    int32 [B, H, C, topk], valid tokens per cube int32 [C] -> [B, S, H, D]."""
    result = forward(q, k, v, index, block_sparse_num=index.shape[-1], block_sizes=sizes,
                     sparse_block_size=CUBE_TOKENS, softmax_scale=scale, layout="bshd")
    return result["o_tensor"]


class CudnnBsaVSAImpl(VideoSparseAttentionImpl):
    """VSA for one layer with cuDNN's BSA as the fine stage; softmax_scale scales both stages."""

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "",
                 **extra_impl_args: Any) -> None:
        super().__init__(num_heads, head_size, softmax_scale, causal, num_kv_heads, prefix,
                         **extra_impl_args)
        if head_size not in HEAD_SIZES:
            raise VSAInputError(f"head_size={head_size} is not allowed for {NAME}; allowed: "
                                f"{', '.join(map(str, HEAD_SIZES))}")

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        gate_compress: torch.Tensor,
        attn_metadata: VideoSparseAttentionMetadata,
    ) -> torch.Tensor:
        """Tiled query, gate_compress [B, S, H, D], key, value [B, S, Hkv, D] -> [B, S, H, D]."""
        sizes, topk = self.cubes(query, key, gate_compress, attn_metadata)
        check_bsa_tensors(query, key, value)
        fine = functools.partial(bsa_fine_stage, vendor_function())
        return vsa_with_fine_stage(query, key, value, gate_compress, sizes, topk,
                                   self.softmax_scale, fine)


class CudnnBsaVSABackend(VideoSparseAttentionBackend):
    """cuDNN BSA's VSA fine stage: Hopper and Blackwell, fp16/bf16, D 64/96/128, GQA (sm90),
    forward only; refused with the install hint when the package is absent."""

    PLATFORMS: ClassVar[frozenset[str]] = frozenset({"cuda"})
    ARCHS: ClassVar[str | None] = ">=sm90,<sm130"  # type: ignore[misc]
    DTYPES: ClassVar[frozenset[str]] = frozenset(DTYPES.values())
    HEAD_SIZES: ClassVar[tuple[int, ...]] = HEAD_SIZES  # type: ignore[assignment]
    SUPPORTS_GQA: ClassVar[bool] = True  # sm90 and sm120; Blackwell blk64 in extra_reasons
    BACKWARD_PLATFORMS: ClassVar[frozenset[str]] = frozenset()  # no autograd backward
    PACKAGES = (PACKAGE, CUTE_DSL)  # type: ignore[assignment]  # the base declares one

    @classmethod
    def extra_reasons(cls, request: AttentionRequest, device: Device) -> list[Reason]:
        return arch_reasons(_sm_major(device.arch), request.dtype, request.head_size,
                            request.is_gqa)

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[CudnnBsaVSAImpl]:
        return CudnnBsaVSAImpl
