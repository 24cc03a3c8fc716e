"""The backend contract, compatible with FastVideo's: a FastVideo-style backend plugs in unchanged.

Shapes: B batch, N query sequence, M key sequence, H query heads, Hkv key/value heads, D head size.
Tensors are [B, N, H, D] throughout.

A backend class is a namespace of static methods plus capability data (defaults below, on
AttentionBackend; read by `attnrt.selection.capability.check`): `get_name()` is its stable
UPPER_SNAKE name, `get_impl_cls()` the class that runs attention.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from attnrt.selection.capability import Package, Reason
    from attnrt.selection.device import Device
    from attnrt.selection.request import AttentionRequest


@dataclass
class AttentionMetadata:
    """Per-forward data a backend needs beyond q, k, v (FastVideo: current_timestep and more)."""

    current_timestep: int = 0

    def asdict_zerocopy(self, skip_fields: set[str] | None = None) -> dict[str, Any]:
        """Shallow dict of the fields (tensors are not copied), minus `skip_fields`."""
        skip = skip_fields or set()
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


T = TypeVar("T", bound=AttentionMetadata)


class AttentionMetadataBuilder(ABC, Generic[T]):
    """Builds a backend's metadata once per forward step."""

    def __init__(self) -> None:  # noqa: B027 - a builder may keep no state
        pass

    @abstractmethod
    def prepare(self) -> None:
        """Reset state before a new step."""

    @abstractmethod
    def build(self, **kwargs: Any) -> T:
        """Build the metadata for this step."""


class AttentionImpl(ABC, Generic[T]):
    """Runs attention for one layer. Inputs [B, N, H, D]; output [B, N, H, D].

    `forward` is required; `forward_with_lse` is optional (see there): an impl that overrides it
    declares that it returns the log-sum-exp too.
    """

    @abstractmethod
    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "",
                 **extra_impl_args: Any) -> None:
        raise NotImplementedError

    def preprocess_qkv(self, qkv: torch.Tensor, attn_metadata: T) -> torch.Tensor:
        """Hook before sequence-parallel communication (e.g. tile reordering); identity here."""
        return qkv

    def postprocess_output(self, output: torch.Tensor, attn_metadata: T) -> torch.Tensor:
        """Hook after sequence-parallel communication; identity here."""
        return output

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: T) -> torch.Tensor:
        raise NotImplementedError

    def forward_with_lse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_metadata: T) -> tuple[torch.Tensor, torch.Tensor]:
        """Optional: (out [B, N, H, D], lse [B, H, N] float32), lse the natural-log log-sum-exp
        of each row's scaled scores.

        Partial results over disjoint key sets then merge exactly (see `merge_partials`);
        DistributedAttention uses it to attend this rank's own shard while the others are still
        in flight. Overriding it declares that, for non-causal calls, the impl's result does not
        depend on where a key sits (no position-tied masks or metadata), so calls over parts of
        the keys, in any order, merge to the whole. An impl without it (a FastVideo backend)
        still runs everywhere, only without that overlap; `lse_forward` tells which.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define forward_with_lse; "
                                  "check with attnrt.interfaces.lse_forward(impl) first")


def lse_forward(impl: Any) -> Any:
    """The impl's `forward_with_lse` where it defines one (not AttentionImpl's stub), else None."""
    method = getattr(impl, "forward_with_lse", None)
    if not callable(method):
        return None
    own = getattr(type(impl), "forward_with_lse", None)
    return None if own is AttentionImpl.forward_with_lse else method


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor, out: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys A and B from the results over A and over B alone (A, B disjoint).

    out_* [B, N, H, D], lse_* [B, H, N] float32 -> (out [B, N, H, D], lse [B, H, N]). The weight
    of A is exp(lse_a - lse) = sigmoid(lse_a - lse_b); `out` may be a strided view to write into.

    Equivalent PyTorch:
        lse = torch.logaddexp(lse_a, lse_b)
        out = out_a * exp(lse_a - lse)[..., None] + out_b * exp(lse_b - lse)[..., None]
    (with the [B, H, N] weights transposed to [B, N, H]). On CUDA with Triton installed, one
    fused pass (attnrt.kernels.triton_merge) computes the same in float32.
    """
    fused = _fused_merge(out_a, lse_a, out_b, lse_b, out)
    if fused is not None:
        if out is None:
            out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
        fused(out_a, lse_a, out_b, lse_b, out)
        return out, torch.logaddexp(lse_a, lse_b)
    # Both -inf (a row that sees no key in either part; both outputs are 0): any weight will do.
    diff = (lse_a - lse_b).nan_to_num(nan=0.0)
    weight = torch.sigmoid(diff).transpose(1, 2).unsqueeze(-1).to(out_a.dtype)
    merged = torch.lerp(out_b, out_a, weight, out=out)
    return merged, torch.logaddexp(lse_a, lse_b)


_INT32_SPAN = 2**31 - 1


def _fused_merge(*tensors: torch.Tensor | None) -> Any:
    """triton_merge.merge_into where it applies to these tensors (CUDA, no autograd, Triton
    imports, head dim and lse rows unit-strided, every offset within int32), else None."""
    present = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return None  # the kernel is not differentiable; the PyTorch lines are
    if present[0].device.type != "cuda" or any(
            t.stride(-1) != 1 or sum((n - 1) * st for n, st in zip(t.shape, t.stride(),
                                                                  strict=True)) > _INT32_SPAN
            for t in present) or any(t.dtype != torch.float32 for t in present[1:4:2]):
        return None
    try:
        from attnrt.kernels.triton_merge import merge_into
    except ImportError:  # Triton is optional
        return None
    return merge_into


class ScaledImpl(AttentionImpl[T]):
    """An impl that keeps the constructor's arguments; subclasses only write forward()."""

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "",
                 **extra_impl_args: Any) -> None:
        self.num_heads, self.head_size = num_heads, head_size
        self.num_kv_heads = num_kv_heads or num_heads
        self.softmax_scale, self.causal = softmax_scale, causal
        self.prefix, self.extra_impl_args = prefix, extra_impl_args


class AttentionBackend(ABC):
    """A named attention implementation. Subclasses declare what they can run as class data.

    The capability attributes below are read by `attnrt.selection.capability.check`; their
    defaults here mean "any", so a FastVideo-style backend that declares nothing runs wherever
    the manifest ranks it (a class that does not subclass AttentionBackend gets the same
    defaults). Limits that are not data go in the optional `extra_reasons`.
    """

    # Attention methods it implements (attnrt.selection.methods): what it computes. A request
    # of another method never reaches it, so a sparse backend never serves dense and back.
    METHODS: ClassVar[Collection[str]] = frozenset({"dense"})
    # Platforms it runs on (Device.platform names, e.g. {"cuda", "rocm"}); None: any.
    PLATFORMS: ClassVar[Collection[str] | None] = None
    # Archs: names and ranges such as ">=sm80" or (">=sm80", ">=gfx90a"); None: any.
    ARCHS: ClassVar[str | Collection[str] | None] = None
    # Dtype names (attnrt.selection.request.DTYPE_NAMES values).
    DTYPES: ClassVar[Collection[str]] = frozenset({"fp16", "bf16", "fp32", "fp64"})
    # Head sizes D, e.g. (64, 128) or range(32, 257, 8); None: any, or what FastVideo's
    # get_supported_head_sizes() returns where the class defines it.
    HEAD_SIZES: ClassVar[Collection[int] | None] = None
    SUPPORTS_CAUSAL: ClassVar[bool] = True
    SUPPORTS_GQA: ClassVar[bool] = True  # num_kv_heads < num_heads
    # Optional vendor packages it imports, each checked (import and version window) when ranked.
    PACKAGES: ClassVar[tuple[Package, ...]] = ()
    # Platforms where it also runs a backward (grad=True requests); None: wherever it runs.
    BACKWARD_PLATFORMS: ClassVar[Collection[str] | None] = None
    # Whether DistributedAttention may append replicated (e.g. text) tokens to the sequence.
    SUPPORTS_REPLICATED_TOKENS: ClassVar[bool] = True
    # Whether the impl's forward takes (q, k, v, gate_compress, attn_metadata), as VSA's does;
    # None: read it off the forward's signature (FastVideo VSA backends declare nothing).
    ACCEPTS_GATE_COMPRESS: ClassVar[bool | None] = None

    accept_output_buffer: ClassVar[bool] = False

    @classmethod
    def extra_reasons(cls, request: AttentionRequest, device: Device) -> list[Reason]:
        """Optional: reasons this backend refuses `request` on `device` beyond the data above
        (asked only when the data and packages admit it); none by default."""
        return []

    @staticmethod
    @abstractmethod
    def get_name() -> str:
        raise NotImplementedError

    @staticmethod
    @abstractmethod
    def get_impl_cls() -> type[AttentionImpl]:
        raise NotImplementedError

    @staticmethod
    def get_metadata_cls() -> type[AttentionMetadata]:
        return AttentionMetadata

    @staticmethod
    def get_builder_cls() -> type[AttentionMetadataBuilder] | None:
        return None


class AttentionLayer(Protocol):
    """What models call: forward(q, k, v) -> output, all [B, N, H, D]."""

    def forward(self, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor) -> torch.Tensor: ...

