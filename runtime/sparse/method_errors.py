"""Typed errors of the sparse methods (SLA, SageSLA, VMoBA). Each message is one sentence: the
argument, its value, what is allowed."""

from __future__ import annotations

from attnrt.errors import AttnrtError, BackendUnavailableError


class SparseArgumentError(AttnrtError, ValueError):
    """A sparse-method setting (topk_ratio, feature_map, block or chunk size...) is not allowed."""


class SparseMetadataError(AttnrtError, ValueError):
    """The step's metadata is missing for a method that needs it, or is of the wrong kind."""


class CheckpointShapeError(AttnrtError, ValueError):
    """A checkpoint's tensor for a sparse method's parameter has the wrong shape."""


class GradientNotSupportedError(AttnrtError, RuntimeError):
    """A forward-only method was called with autograd on and inputs that need gradients."""


class SageSLAUnavailableError(BackendUnavailableError):
    """SpargeAttn's spas_sage_attn kernels cannot be imported (or the device cannot run them)."""


def check_qkv(method: str, head_size: int, query: object, key: object, value: object) -> None:
    """SparseArgumentError unless query is [B, N, H, head_size] and key, value are equal
    [B, M, Hkv, head_size] tensors with H % Hkv == 0. The head count itself is not checked:
    under sequence parallelism an impl sees a shard of the heads it was built for."""
    import torch

    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tensors):
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                  for t in tensors]
        raise SparseArgumentError(f"query, key, value = {shapes} are not supported by "
                                  f"{method}; allowed: 4-D tensors [B, N, H, D]")
    q, k, v = (t for t in tensors if isinstance(t, torch.Tensor))
    if (q.shape[3] != head_size or k.shape != v.shape or k.shape[0] != q.shape[0]
            or k.shape[3] != head_size or q.shape[2] % k.shape[2]):
        raise SparseArgumentError(
            f"query.shape={tuple(q.shape)}, key.shape={tuple(k.shape)}, value.shape="
            f"{tuple(v.shape)} are not supported by {method}; allowed: [B, N, H, "
            f"{head_size}] and equal [B, M, Hkv, {head_size}] with H % Hkv == 0")


def check_ratio(name: str, value: object) -> float:
    """`value` as a float in (0, 1], else SparseArgumentError naming `name`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0.0 < float(value) <= 1.0:  # type: ignore[arg-type]
        raise SparseArgumentError(f"{name}={value!r} is not allowed; allowed: a number in (0, 1]")
    return float(value)  # type: ignore[arg-type]


def check_choice(name: str, value: object, allowed: tuple[int, ...] | tuple[str, ...],
                 method: str) -> None:
    """SparseArgumentError unless `value` is one of `allowed` (bools are not ints here)."""
    if isinstance(value, bool) or value not in allowed:
        listed = ", ".join(repr(a) if isinstance(a, str) else str(a) for a in allowed)
        raise SparseArgumentError(f"{name}={value!r} is not supported by {method}; "
                                  f"allowed: {listed}")
