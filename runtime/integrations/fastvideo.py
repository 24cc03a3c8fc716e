"""FastVideo compatibility: FastVideo's names for attnrt's own mechanisms, in one place.

A FastVideo model or script imports these names and keeps working on attnrt:

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
from collections.abc import Iterator
from typing import Any

from attnrt.parallel.groups import get_sequence_parallel
from attnrt.selection import dispatch, registry


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


def get_sp_world_size() -> int:
    """FastVideo's name for the sequence-parallel (SP) group's size."""
    return get_sequence_parallel().size


def get_sp_parallel_rank() -> int:
    """FastVideo's name for this rank's index in the SP group."""
    return get_sequence_parallel().rank


__all__ = [
    "AttentionBackendEnum", "BackendName", "backend_name_to_enum", "get_global_forced_attn_backend",
    "get_sp_parallel_rank", "get_sp_world_size", "global_force_attn_backend",
    "global_force_attn_backend_context_manager",
]
