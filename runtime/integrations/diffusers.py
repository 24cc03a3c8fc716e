"""Route every attention of a diffusers model through attnrt: `enable(pipe.transformer)`.

Shapes: B batch, N query sequence, M key sequence, H heads, Hkv kv heads, D head size; diffusers'
dispatcher hands backends [B, N, H, D] tensors.

    from attnrt.integrations import diffusers as attnrt_diffusers
    router = attnrt_diffusers.enable(pipe.transformer)   # or: with attnrt_diffusers.enabled(m):
    pipe(...)                                            # router.served counts calls per backend
    attnrt_diffusers.disable(pipe.transformer)           # restores what was there

Supported diffusers: SUPPORTED_DIFFUSERS (tested on 0.42.1, the newest on PyPI when written);
`enable` refuses other versions with DiffusersIntegrationError, since the hook below uses the
dispatcher's registry, whose layout diffusers does not promise to keep.

The hook. diffusers' processors call `dispatch_attention_fn(..., backend=processor.
_attention_backend)`, which looks the backend up in `_AttentionBackendRegistry` (the field
`model.set_attention_backend()` writes, the registry diffusers registers its own backends in).
Backend names are a closed enum, so `enable` registers one function under an
`AttentionBackendName` instance of its own (value "attnrt-<n>", not a member of the enum: the
string names diffusers accepts are unchanged) and writes it into each processor's
`_attention_backend`. The registered function receives every argument the dispatcher passes
(none is filtered out) and serves it or raises (see attnrt.integrations.sdpa_router); with
context parallelism it runs diffusers' templated ring/Ulysses attention on attnrt's per-chunk
ops (attnrt.integrations.diffusers_cp). Processors that bypass the dispatcher and call torch's
SDPA themselves (CogVideoX's, older models') are routed by a TorchFunctionMode active only while
their attention module runs (forward hooks), so the model's other SDPA calls are untouched.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from attnrt.errors import AttnrtError
from attnrt.integrations.sdpa_router import SdpaRouter, check_call
from attnrt.integrations.video_sparse import VideoSparse, VideoSparseError

__all__ = ["SUPPORTED_DIFFUSERS", "DiffusersIntegrationError", "VideoSparse", "VideoSparseError",
           "attention_modules", "check_diffusers_version", "disable", "dispatcher_backend",
           "enable", "enabled", "router_of"]

SUPPORTED_DIFFUSERS = ">=0.42,<0.43"
_REGISTRY_FIELDS = ("_backends", "_constraints", "_supported_arg_names",
                    "_supports_context_parallel")
_counter = itertools.count()


class DiffusersIntegrationError(AttnrtError, RuntimeError):
    """diffusers is missing, of an unsupported version, or the model cannot be routed."""


def check_diffusers_version(version: str | None = None) -> str:
    """The installed (or given) diffusers version; raises where it is outside
    SUPPORTED_DIFFUSERS."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        try:
            import diffusers
        except ImportError as exc:
            raise DiffusersIntegrationError(f"import diffusers failed: {exc}; install "
                                            f"diffusers{SUPPORTED_DIFFUSERS}") from None
        version = diffusers.__version__
    try:
        ok = Version(version) in SpecifierSet(SUPPORTED_DIFFUSERS)
    except InvalidVersion:
        ok = False
    if not ok:
        raise DiffusersIntegrationError(f"diffusers=={version} is not supported by attnrt's "
                                        f"integration; supported: {SUPPORTED_DIFFUSERS}")
    return version


def _dispatch_module() -> Any:
    check_diffusers_version()
    from diffusers.models import attention_dispatch

    registry = getattr(attention_dispatch, "_AttentionBackendRegistry", None)
    missing = [f for f in _REGISTRY_FIELDS if not hasattr(registry, f)]
    if not hasattr(attention_dispatch, "AttentionBackendName"):
        missing.append("AttentionBackendName")
    if missing:
        raise DiffusersIntegrationError(f"diffusers' attention dispatcher lacks {missing}; "
                                        f"supported: diffusers{SUPPORTED_DIFFUSERS}")
    return attention_dispatch


class _AllNames(frozenset):
    """The dispatcher keeps only kwargs whose names the backend declares; attnrt's function
    declares every name, so it sees (and refuses) arguments it does not know."""

    def __contains__(self, item: object) -> bool:
        return True


_KNOWN = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
          "enable_gqa", "return_lse", "_parallel_config")


def _backend_fn(router: SdpaRouter) -> Any:
    from attnrt.integrations import diffusers_cp

    forward_op = diffusers_cp.make_forward_op(router)

    def attnrt_backend(query: Any, key: Any, value: Any, attn_mask: Any = None,
                       dropout_p: float = 0.0, is_causal: bool = False, scale: Any = None,
                       enable_gqa: bool = False, return_lse: bool = False,
                       _parallel_config: Any = None, **unknown: Any) -> Any:
        if _parallel_config is None:
            return router(query, key, value, attn_mask, dropout_p, is_causal, scale,
                          enable_gqa, return_lse, **unknown)
        check_call(query, key, attn_mask, dropout_p, is_causal, enable_gqa, unknown)
        if router.video is not None:
            raise DiffusersIntegrationError(
                "_parallel_config is not supported with sparse=VideoSparse(...): context "
                "parallelism splits the video sequence, and VSA over one shard is not VSA over "
                "the video; allowed: no context parallelism, or enable() without sparse")
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        return _templated_context_parallel_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
            forward_op=forward_op, backward_op=diffusers_cp.backward_op,
            _parallel_config=_parallel_config)

    return attnrt_backend


@dataclass
class _Enabled:
    """What enable() changed on one model, to undo it."""

    router: SdpaRouter
    name: Any  # the AttentionBackendName instance registered for this model
    processors: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # id -> (proc, was)
    hooks: list[Any] = field(default_factory=list)


_ENABLED: weakref.WeakKeyDictionary[nn.Module, _Enabled] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _register(dispatch: Any, router: SdpaRouter) -> Any:
    names, registry = dispatch.AttentionBackendName, dispatch._AttentionBackendRegistry
    value = f"attnrt-{next(_counter)}"
    name = str.__new__(names, value)  # an instance, not a member: the enum stays closed
    name._name_, name._value_ = value.upper().replace("-", "_"), value
    registry._backends[name] = _backend_fn(router)
    registry._constraints[name] = []
    registry._supported_arg_names[name] = _AllNames(_KNOWN)
    registry._supports_context_parallel.add(value)
    return name


def _unregister(dispatch: Any, name: Any) -> None:
    registry = dispatch._AttentionBackendRegistry
    for table in (registry._backends, registry._constraints, registry._supported_arg_names):
        table.pop(name, None)
    registry._supports_context_parallel.discard(name.value)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's diffusers attention modules (those `set_attention_backend` walks)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    kinds = (Attention, MochiAttention, AttentionModuleMixin)
    return [m for m in model.modules()
            if isinstance(m, kinds) and getattr(m, "processor", None) is not None]


def enable(model: nn.Module, *,
           supported_attention_backends: tuple[str, ...] | None = None,
           sparse: VideoSparse | None = None) -> SdpaRouter:
    """Route every attention call of `model` through attnrt; returns the router (its `served`
    counts calls per backend). `sparse=VideoSparse(...)` runs the video's self-attention with
    VSA (attnrt.integrations.video_sparse). Raises DiffusersIntegrationError if already
    enabled or if the model has no diffusers attention module."""
    if sparse is not None and not isinstance(sparse, VideoSparse):
        raise DiffusersIntegrationError(f"sparse={type(sparse).__name__} is not allowed; "
                                        "allowed: None or attnrt.integrations.diffusers."
                                        "VideoSparse(...)")
    dispatch = _dispatch_module()
    modules = attention_modules(model)
    if not modules:
        raise DiffusersIntegrationError(f"model={type(model).__name__} has no diffusers "
                                        "attention module; allowed: a diffusers ModelMixin")
    with _lock:
        if model in _ENABLED:
            raise DiffusersIntegrationError(f"model={type(model).__name__} is already routed "
                                            "through attnrt; call disable(model) first")
        router = SdpaRouter(supported_attention_backends, sparse)
        state = _Enabled(router, _register(dispatch, router))
        for module in modules:
            _route(module, state)
        _ENABLED[model] = state
    # A model dropped without disable() takes its registry entry with it.
    weakref.finalize(model, _unregister, dispatch, state.name)
    return router


def _route(module: nn.Module, state: _Enabled) -> None:
    proc = module.processor
    if hasattr(proc, "_attention_backend"):  # on diffusers' dispatcher
        state.processors.setdefault(id(proc), (proc, proc._attention_backend))
        proc._attention_backend = state.name
        return
    from attnrt.integrations.sdpa_mode import install_sdpa_hooks

    state.hooks += install_sdpa_hooks(module, state.router)


def disable(model: nn.Module) -> None:
    """Undo enable(model): processors get their previous backend back, hooks are removed."""
    with _lock:
        state = _ENABLED.pop(model, None)
    if state is None:
        raise DiffusersIntegrationError(f"model={type(model).__name__} is not routed through "
                                        "attnrt; allowed: a model passed to enable()")
    for proc, was in state.processors.values():
        proc._attention_backend = was
    for hook in state.hooks:
        hook.remove()
    _unregister(_dispatch_module(), state.name)


def dispatcher_backend(model: nn.Module) -> Any:
    """The AttentionBackendName instance enable(model) registered (what its processors pass to
    dispatch_attention_fn as `backend`), or None where the model is not enabled."""
    state = _ENABLED.get(model)
    return state.name if state else None


def router_of(model: nn.Module) -> SdpaRouter | None:
    """The router serving `model`, or None where it is not enabled."""
    state = _ENABLED.get(model)
    return state.router if state else None


@contextlib.contextmanager
def enabled(model: nn.Module, *,
            supported_attention_backends: tuple[str, ...] | None = None,
            sparse: VideoSparse | None = None) -> Iterator[SdpaRouter]:
    """enable(model) for the block; disable(model) on exit, also on error."""
    router = enable(model, supported_attention_backends=supported_attention_backends,
                    sparse=sparse)
    try:
        yield router
    finally:
        disable(model)
