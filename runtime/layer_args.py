"""Construction arguments of LocalAttention and DistributedAttention, checked before any kernel.

Shapes: B batch, N sequence, H heads, Hkv kv heads, D head size.

Extra keyword arguments (`**extra_impl_args`) go to the backend's impl. An impl states the ones
it takes as `EXTRA_IMPL_ARGS = frozenset({...})`, or as named parameters of its `__init__`; an
impl whose own `__init__` takes `**kwargs` (a FastVideo-style backend) is trusted to read them.
A name no registered impl takes is refused at construction (a typo such as `casual=True` would
otherwise run non-causal); a name the selected impl does not take is refused when it is selected.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from typing import Any

import torch

from attnrt.errors import AttnrtError

# Parameters every impl takes (AttentionImpl.__init__), and the layer's own ones.
_IMPL_STANDARD = frozenset({"self", "num_heads", "head_size", "softmax_scale", "causal",
                            "num_kv_heads", "prefix"})
LAYER_PARAMETERS = ("num_heads", "head_size", "num_kv_heads", "softmax_scale", "causal",
                    "supported_attention_backends", "prefix", "dtype", "method")


class LayerArgumentError(AttnrtError, ValueError):
    """A layer argument outside its allowed values; the message names it, its value, the rule."""


class ExtraArgumentError(AttnrtError, TypeError):
    """An extra keyword argument that the implementation would not read (e.g. a typo)."""


class LayerInputError(AttnrtError, ValueError):
    """q, k, v or freqs_cis of a shape or device the layer cannot take; the message names it."""


class LayerInputTypeError(AttnrtError, TypeError):
    """q, k, v or freqs_cis of a type or dtype the layer cannot take; the message names it."""


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise LayerArgumentError(f"{name}={value!r} is not allowed; allowed: an int >= 1")
    return int(value)


def check_layer_args(num_heads: Any, head_size: Any, num_kv_heads: Any, softmax_scale: Any,
                     causal: Any) -> tuple[int, float]:
    """(num_kv_heads, softmax_scale) as the layer keeps them; LayerArgumentError names a bad one.

    softmax_scale None means head_size ** -0.5; otherwise a finite real > 0 (NaN, inf, 0 and
    negatives would turn every output into zeros or NaN)."""
    heads = _positive_int("num_heads", num_heads)
    size = _positive_int("head_size", head_size)
    kv = heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
    if heads % kv:
        raise LayerArgumentError(f"num_kv_heads={kv} does not divide num_heads={heads}; allowed: "
                                 f"a divisor of {heads}")
    if not isinstance(causal, bool):
        raise LayerArgumentError(f"causal={causal!r} is not allowed; allowed: True or False")
    if softmax_scale is None:
        return kv, size ** -0.5
    if (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)
            or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise LayerArgumentError(f"softmax_scale={softmax_scale!r} is not allowed; allowed: None "
                                 f"(head_size ** -0.5) or a finite number > 0")
    return kv, float(softmax_scale)


def check_layer_dtype(dtype: Any) -> torch.dtype | None:
    """The layer's compute dtype: None, a torch dtype attnrt runs, or its name ("bf16")."""
    from attnrt.selection.request import DTYPE_NAMES, NAME_DTYPES

    if dtype is None or dtype in DTYPE_NAMES:
        return dtype
    if isinstance(dtype, str) and dtype in NAME_DTYPES:
        return NAME_DTYPES[dtype]
    raise LayerArgumentError(f"dtype={dtype!r} is not allowed; allowed: None, "
                             f"{', '.join(str(d) for d in DTYPE_NAMES)} or "
                             f"{', '.join(NAME_DTYPES)}")


def accepted_extras(impl_cls: type) -> frozenset[str] | None:
    """The extra argument names `impl_cls` reads; None where it takes any (its own **kwargs)."""
    declared = getattr(impl_cls, "EXTRA_IMPL_ARGS", None)
    if declared is not None:
        return frozenset(declared)
    try:
        params = inspect.signature(impl_cls.__init__).parameters.values()  # type: ignore[misc]
    except (TypeError, ValueError):
        return None
    named = frozenset(p.name for p in params if p.kind in (
        p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) - _IMPL_STANDARD
    owner = next((c for c in impl_cls.__mro__ if "__init__" in c.__dict__), object)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    # attnrt's own bases keep **extra_impl_args only to pass them on: they read none.
    if takes_any and not owner.__module__.startswith("attnrt."):
        return None
    return named


def _suggest(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_extras_known(extra: dict[str, Any]) -> None:
    """Refuse a name that no registered backend's impl takes (a typo), suggesting the closest.
    FastVideo's layers pass `dropout_rate=0` (its impls read it); attnrt runs no attention
    dropout, so 0 is taken off the extras here and any other value refused."""
    if "dropout_rate" in extra:
        rate = extra.pop("dropout_rate")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate != 0:
            raise LayerArgumentError(f"dropout_rate={rate!r} is not allowed; allowed: 0 (attnrt "
                                     "backends run no attention dropout)")
    if not extra:
        return
    known: set[str] = set(LAYER_PARAMETERS)
    for impl_cls in _registered_impls():
        taken = accepted_extras(impl_cls)
        if taken is None:
            return  # some impl takes any name
        known |= taken
    for name in extra:
        if name not in known:
            raise ExtraArgumentError(
                f"{name}={extra[name]!r} is not an argument of the layer or of any registered "
                f"backend{_suggest(name, known)}; allowed: {', '.join(LAYER_PARAMETERS)}"
                + (f", or a backend's extra: {', '.join(sorted(known - set(LAYER_PARAMETERS)))}"
                   if known - set(LAYER_PARAMETERS) else ""))


def check_extras_for(impl_cls: type, backend: str, extra: dict[str, Any]) -> None:
    """Refuse an extra argument the selected backend's impl would not read."""
    taken = accepted_extras(impl_cls)
    if not extra or taken is None:
        return
    for name in extra:
        if name not in taken:
            raise ExtraArgumentError(
                f"{name}={extra[name]!r} is not read by backend {backend}, the one selected; "
                f"allowed there: {', '.join(sorted(taken)) or 'no extra arguments'} (pass it "
                "only with a backend that reads it, e.g. through supported_attention_backends)")


def _registered_impls() -> list[type]:
    from attnrt.selection import registry

    out = []
    for name in registry.names():
        try:
            out.append(registry.load(name).get_impl_cls())
        except (ImportError, AttnrtError, AttributeError):
            continue  # a backend that cannot load reads nothing
    return out
