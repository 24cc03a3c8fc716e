"""FastVideo compatibility: FastVideo's names for attnrt's own mechanisms, in one place.

Shapes: B batch, N sequence, H heads, D head size; layers take [B, N, H, D].

A FastVideo model swaps its attention imports for this module and changes nothing else: the
names FastVideo's models and backends import from fastvideo.attention (LocalAttention,
DistributedAttention, DistributedAttention_VSA, AttentionBackend, AttentionImpl, AttentionLayer,
AttentionMetadata, AttentionMetadataBuilder, get_attn_backend), fastvideo.attention.selector
(backend_name_to_enum, coerce_attn_backend, get_env_variable_attn_backend,
get_effective_attn_backend_override, global_force_attn_backend, get_global_forced_attn_backend,
global_force_attn_backend_context_manager), fastvideo.forward_context (ForwardContext,
set_forward_context, get_forward_context), fastvideo.platforms (AttentionBackendEnum),
fastvideo.utils (STR_BACKEND_ENV_VAR) and fastvideo.distributed (get_sp_world_size,
get_sp_parallel_rank), with FastVideo's signatures. One difference, on purpose: a backend that
is forced (or a layer's default_backend) but not among a layer's supported_attention_backends
is an error here (BackendUnavailableError naming both), where FastVideo logs a warning and
selects automatically; ATTNRT_FALLBACK=warn gives FastVideo's behaviour.

    AttentionBackendEnum.FLASH_ATTN                  # an open enum: any registered backend name
    backend_name_to_enum("flash_attn")               # -> the enum-like name, or None
    global_force_attn_backend(AttentionBackendEnum.TORCH_SDPA)   # process-wide force; None clears
    with global_force_attn_backend_context_manager(...): ...
    get_sp_world_size(), get_sp_parallel_rank()      # the sequence-parallel group's size and rank

Each is glue over attnrt: the registry (names), the dispatcher's process-wide force
(`attnrt.selection.dispatch.set_process_force`) and the SP group (`attnrt.parallel.groups`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from attnrt.context import ForwardContext, get_forward_context, set_forward_context
from attnrt.errors import AttnrtError, UnknownBackendError
from attnrt.interfaces import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadata,
    AttentionMetadataBuilder,
)
from attnrt.layers import LocalAttention as _LocalAttention
from attnrt.parallel.groups import get_sequence_parallel
from attnrt.selection import dispatch, registry
from attnrt.selection.request import NAME_DTYPES, AttentionRequest, dtype_name

STR_BACKEND_ENV_VAR = "FASTVIDEO_ATTENTION_BACKEND"


class EmptyBackendListError(AttnrtError, ValueError):
    """supported_attention_backends=() given to FastVideo's selector (None means every one)."""


class BackendName(str):
    """A registered backend name that also answers `.name`, like an enum member."""

    @property
    def name(self) -> str:
        return str(self)


class _BackendEnumMeta(type):
    def __getattr__(cls, item: str) -> BackendName:
        if item.startswith("_") or not registry.is_registered(item):
            raise AttributeError(f"no attention backend named {item!r}")
        return BackendName(item)

    def __iter__(cls) -> Iterator[BackendName]:
        return iter(BackendName(n) for n in registry.names())


class AttentionBackendEnum(metaclass=_BackendEnumMeta):
    """Open stand-in for FastVideo's enum: AttentionBackendEnum.X for any registered name X."""


def backend_name_to_enum(name: str) -> BackendName | None:
    """FastVideo's helper: the registered name as an enum-like value, or None if unknown."""
    upper = str(name).upper()
    return BackendName(upper) if registry.is_registered(upper) else None


def global_force_attn_backend(backend: Any) -> None:
    """FastVideo's process-wide force (a name or an AttentionBackendEnum member); None clears."""
    dispatch.set_process_force(backend)


@contextlib.contextmanager
def global_force_attn_backend_context_manager(backend: Any) -> Iterator[None]:
    """Force `backend` process-wide within the block; the previous force returns after it."""
    previous = dispatch.process_force()
    dispatch.set_process_force(backend)
    try:
        yield
    finally:
        dispatch.set_process_force(previous)


def get_global_forced_attn_backend() -> str | None:
    """The backend forced by global_force_attn_backend, or None."""
    return dispatch.process_force()


class LocalAttention(_LocalAttention):
    """attnrt's LocalAttention, with the attributes FastVideo's layer also has: `backend` (the
    enum-like name), `attn_impl` and `dtype` (of the current selection).

    forward(q [B, N, H, D], k [B, M, Hkv, D], v [B, M, Hkv, D], freqs_cis=(cos, sin))
        -> [B, N, H, D]
    """

    @property
    def backend(self) -> BackendName | None:
        return backend_name_to_enum(self.backend_name)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or NAME_DTYPES[self.decision.request.dtype]

    @property
    def attn_impl(self) -> AttentionImpl:
        return self.impl_for(self.dtype)


def coerce_attn_backend(attn_backend: Any) -> BackendName | None:
    """FastVideo's strict normaliser: None, an enum member or a registered name (any case,
    surrounding blanks ignored) -> the name; anything else raises (typos fail fast)."""
    if attn_backend is None:
        return None
    name = getattr(attn_backend, "name", attn_backend)
    if not isinstance(name, str) or not name.strip():
        raise UnknownBackendError(f"attn_backend={attn_backend!r} is not allowed; allowed: a "
                                  "non-empty backend name, an AttentionBackendEnum member, or "
                                  "None")
    found = backend_name_to_enum(name.strip())
    if found is None:
        raise UnknownBackendError(f"attn_backend={attn_backend!r} is not a registered backend; "
                                  f"allowed: {', '.join(registry.names())}")
    return found


def get_env_variable_attn_backend() -> BackendName | None:
    """The backend named by FASTVIDEO_ATTENTION_BACKEND, or None (also for an unknown name, as
    FastVideo's permissive env-var parsing; attnrt's selection then refuses it by name)."""
    value = os.environ.get(STR_BACKEND_ENV_VAR)
    return None if value is None else backend_name_to_enum(value)


def get_effective_attn_backend_override() -> BackendName | None:
    """The user's forced backend, if any: force_backend(), then global_force_attn_backend(),
    then ATTNRT_BACKEND / FASTVIDEO_ATTENTION_BACKEND (attnrt's precedence, a superset of
    FastVideo's global-then-env-var)."""
    forced = dispatch.forced_backend()
    return None if forced is None else backend_name_to_enum(forced[0])


def get_attn_backend(head_size: int, dtype: torch.dtype,
                     supported_attention_backends: tuple[Any, ...] | None = None,
                     default_backend: Any = None) -> type[AttentionBackend]:
    """FastVideo's selector: the backend class attnrt selects for `head_size` and `dtype`
    among `supported_attention_backends` (None: every backend). `default_backend` is the
    layer's own preference, below a forced backend (force_backend, global force, env var), as
    in FastVideo; forced or default, a backend that cannot run here raises with the reasons."""
    if supported_attention_backends is not None and not tuple(supported_attention_backends):
        raise EmptyBackendListError("supported_attention_backends=() is empty; allowed: None "
                                    "(every backend) or a non-empty tuple of backends")
    request = AttentionRequest(head_size, dtype_name(dtype), allowed=supported_attention_backends)
    default = coerce_attn_backend(default_backend)
    if default is None or dispatch.forced_backend() is not None:
        return dispatch.select(request).backend_cls
    with dispatch.force_backend(default):
        return dispatch.select(request).backend_cls


def get_sp_world_size() -> int:
    """FastVideo's name for the sequence-parallel (SP) group's size."""
    return get_sequence_parallel().size


def get_sp_parallel_rank() -> int:
    """FastVideo's name for this rank's index in the SP group."""
    return get_sequence_parallel().rank


# attnrt.parallel.layers imports backend_name_to_enum from this module, so its layers are
# imported here, at the end, once that name exists (attnrt's package init imports this first).
from attnrt.parallel.layers import DistributedAttention, DistributedAttention_VSA  # noqa: E402

__all__ = [
    "STR_BACKEND_ENV_VAR", "AttentionBackend", "AttentionBackendEnum", "AttentionImpl",
    "AttentionLayer", "AttentionMetadata", "AttentionMetadataBuilder", "BackendName",
    "DistributedAttention", "DistributedAttention_VSA", "EmptyBackendListError",
    "ForwardContext", "LocalAttention", "backend_name_to_enum", "coerce_attn_backend",
    "get_attn_backend", "get_effective_attn_backend_override", "get_env_variable_attn_backend",
    "get_forward_context", "get_global_forced_attn_backend", "get_sp_parallel_rank",
    "get_sp_world_size", "global_force_attn_backend", "global_force_attn_backend_context_manager",
    "set_forward_context",
]
