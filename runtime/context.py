"""The forward context: per-forward state (timestep, attention metadata) a backend may read.

ContextVar-based, so threads and asyncio tasks each see their own; a backward sees the context
of the thread that called backward() (attnrt.ctxvars). Outside any context,
`get_forward_context()` answers an empty context whose attn_metadata is None.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from threading import get_ident
from typing import Any

from attnrt.ctxvars import MAIN_THREAD, UNSET, visible


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
    """The innermost set_forward_context's context; in a backward (an autograd Function's, or a
    checkpointed forward recomputed there), the one around the backward() call, also on
    autograd's worker threads (attnrt.ctxvars)."""
    ctx = _CONTEXT.get(UNSET)  # the layer's hot path: no lookup where it is set or on main
    if ctx is UNSET:
        return _EMPTY if get_ident() == MAIN_THREAD else visible(_CONTEXT)
    return ctx
