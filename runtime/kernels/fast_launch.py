"""Repeat launches of a Triton or Gluon kernel without Triton's per-call argument binding.

`kernel[grid](*args, **kwargs)` binds and specializes every argument in Python on each call: for
the 30-40 arguments of the attention kernels that is ~25-35 us of host time per launch on the
H100 host (bench/NOTES-triton-flash.md, eighth session), as long as a causal forward at N=4096
runs on the GPU, and that host's speed varies 2x from minute to minute. `launch` keys a call by
what Triton specializes on (each tensor's dtype and 16-byte alignment; each integer's being 1,
its divisibility by 16 and its width, also inside tuples; each descriptor's dtype, shape, strides
and block; the constexprs and launch options; the current device): the first call of a key goes
through Triton and keeps the compiled kernel, later ones hand the same argument list straight to
it. Under TRITON_INTERPRET=1, for an argument of a kind not listed, or with ATTNRT_FAST_LAUNCH=0
(the way out should a Triton release change what this relies on: CompiledKernel[grid](*args)
taking every parameter in order), every call goes through Triton.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# (kernel, grid, per-argument keys, kwargs, device) -> (compiled kernel, its 3D grid, the
# arguments after the positional ones: constexprs and defaults, in the kernel's parameter order).
_COMPILED: dict[tuple[Any, ...], tuple[Any, tuple[int, ...], tuple[Any, ...]]] = {}
_MAX_ENTRIES = 1024
_I32 = range(-2**31, 2**31)


def launch(kernel: Any, grid: tuple[int, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
           key: tuple[Any, ...] | None = None) -> Any:
    """kernel[grid](*args, **kwargs), through the compiled kernel where this key ran before.
    Returns what Triton's launch returns (the compiled kernel on a GPU).

    key: the caller's own key, where it knows one that decides grid, kwargs and everything
    Triton specializes on (a forward plan's: shapes, strides, dtype, device, alignment and
    config); otherwise the arguments are keyed here (~6-7 us of host time on the H100 host)."""
    if not enabled():
        return kernel[grid](*args, **kwargs)
    key = _key(kernel, grid, args, kwargs) if key is None else (kernel, key)
    try:
        found = _COMPILED.get(key) if key is not None else None
    except TypeError:  # an unhashable constexpr or layout: no fast path for this call
        key, found = None, None
    if found is not None:
        compiled, grid3, tail = found
        compiled[grid3](*args, *tail)
        return compiled
    compiled = kernel[grid](*args, **kwargs)
    if key is not None and hasattr(compiled, "packed_metadata"):
        if len(_COMPILED) >= _MAX_ENTRIES:
            _COMPILED.clear()
        grid3 = (*grid, 1, 1)[:3]
        _COMPILED[key] = (compiled, grid3, _tail(kernel, len(args), kwargs))
    return compiled


def enabled() -> bool:
    """False under ATTNRT_FAST_LAUNCH=0 (read on every call: one dict lookup)."""
    value = os.environ.get("ATTNRT_FAST_LAUNCH", "1")
    if value not in ("0", "1"):
        raise ValueError(f"ATTNRT_FAST_LAUNCH={value!r} is not allowed; allowed: 0, 1")
    return value == "1"


def clear() -> None:
    _COMPILED.clear()


def _key(kernel: Any, grid: tuple[int, ...], args: tuple[Any, ...],
         kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    parts: list[Any] = []
    for a in args:
        kind = type(a)
        if kind is int:
            parts.append(_int_key(a))
        elif kind is tuple and all(type(x) is int for x in a):  # e.g. a tensor's strides
            parts.append(tuple(_int_key(x) for x in a))
        elif kind is float:
            parts.append(float)
        elif isinstance(a, torch.Tensor):
            parts.append((a.dtype, a.data_ptr() % 16 == 0))
        elif kind is bool or a is None:
            parts.append((kind, a))
        elif hasattr(a, "block_shape") and hasattr(a, "base"):  # a host TensorDescriptor
            parts.append((kind, a.base.dtype, a.base.data_ptr() % 16 == 0, tuple(a.shape),
                          tuple(a.strides), tuple(a.block_shape), getattr(a, "layout", None),
                          getattr(a, "padding", None)))
        else:
            return None
    device = torch.cuda.current_device() if torch.cuda.is_available() else -1
    return kernel, grid, tuple(parts), tuple(kwargs.items()), device


def _int_key(x: int) -> tuple[bool, bool, bool]:
    return x == 1, x % 16 == 0, x in _I32


def _tail(kernel: Any, n_args: int, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Values of the parameters after the first n_args, as Triton binds them: from kwargs,
    else the parameter's default."""
    params = kernel.signature.parameters
    return tuple(kwargs[name] if name in kwargs else params[name].default
                 for name in kernel.arg_names[n_args:])
