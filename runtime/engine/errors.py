"""Typed errors of the engine: each names the user's function and what is wrong with it."""

from __future__ import annotations

from attnrt.errors import AttnrtError


class EngineError(AttnrtError):
    """Base class of the engine's errors."""


class TraceError(EngineError, TypeError):
    """A user function cannot be traced (data-dependent control flow, an unsupported operation,
    the wrong arity or return type); the message names the function and the user's line."""


class EngineInputError(EngineError, ValueError):
    """A call's tensors do not fit the variant: custom inputs of the wrong count, shape, device
    or dtype, an index out of range, bad variable-length or block-sparse arguments."""
