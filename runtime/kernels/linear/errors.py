"""Typed errors of linear attention (kernel, engine and backends share them).

Each message is one sentence: the argument, its value, what is allowed.
"""

from __future__ import annotations

from attnrt.errors import AttnrtError


class LinearAttentionError(AttnrtError, ValueError):
    """A linear-attention argument of the wrong shape, range or layout."""


class LinearAttentionTypeError(AttnrtError, TypeError):
    """A linear-attention argument of the wrong type or dtype."""


class LinearAttentionDeviceError(AttnrtError, ValueError):
    """A linear-attention tensor on another device than q."""


class ModShapeError(LinearAttentionError):
    """A q/k/v/decay mod that changes the shape of what it is given."""
