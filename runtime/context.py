"""The forward context: per-forward state (timestep, attention metadata) a backend may read.

ContextVar-based, so threads and asyncio tasks each see their own. Outside any context,
`get_forward_context()` answers an empty context whose attn_metadata is None.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ForwardContext:
    current_timestep: int = 0
    attn_metadata: Any = None
    forward_batch: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


_EMPTY = ForwardContext()
_CONTEXT: ContextVar[ForwardContext] = ContextVar("attnrt_forward_context", default=_EMPTY)


@contextlib.contextmanager
def set_forward_context(current_timestep: int = 0, attn_metadata: Any = None,
                        forward_batch: Any = None, **extra: Any) -> Iterator[ForwardContext]:
    """Within the block, layers hand `attn_metadata` to their backend's forward."""
    ctx = ForwardContext(current_timestep, attn_metadata, forward_batch, dict(extra))
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def get_forward_context() -> ForwardContext:
    return _CONTEXT.get()
