"""Layers models call: LocalAttention (and, from attnrt.parallel.groups, DistributedAttention).

Shapes: B batch, N query sequence, M key sequence, H heads, Hkv kv heads, D head size.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from attnrt.context import get_forward_context
from attnrt.ctxvars import visible
from attnrt.errors import BackendUnavailableError, KernelCompileError
from attnrt.interfaces import AttentionImpl, lse_forward
from attnrt.layer_args import (
    ExtraArgumentError,
    LayerInputError,
    LayerInputTypeError,
    check_extras_for,
    check_extras_known,
    check_layer_args,
    check_layer_dtype,
)
from attnrt.selection import dispatch, methods
from attnrt.selection.device import (
    Device,
    device_for_tensor,
    platform_of_tensor,
    probe,
    torch_device_of,
)
from attnrt.selection.dispatch import _FORCED as _CONTEXT_FORCE  # read directly on the hot path
from attnrt.selection.dispatch import (
    Decision,
    decide,
    forced_backend,
    record_failure,
    select,
    strict_mode,
)
from attnrt.selection.manifest import current_manifest
from attnrt.selection.request import DTYPE_NAMES, AttentionRequest, dtype_name

logger = logging.getLogger("attnrt")


def _with_lse(impl: AttentionImpl, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              metadata: Any, layer: LocalAttention) -> tuple[torch.Tensor, torch.Tensor]:
    method = lse_forward(impl)
    if method is not None:
        out, lse = method(q, k, v, metadata)
        return out, lse
    from attnrt.backends.reference import chunked_attention

    out, lse = chunked_attention(q, k, v, layer.causal, layer.softmax_scale, return_lse=True)
    return out, lse.float()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (non-neox, as FastVideo's layers apply it).

    x [B, N, H, D]; cos, sin [N, D/2]. Pairs (x[..., 2i], x[..., 2i+1]) rotate by angle i.
    """
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


class _Unselected(AttentionImpl):
    """Stands in until the first forward selects (dtype None never passes the hot-path test)."""

    def __init__(self) -> None:
        pass

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        raise RuntimeError("attnrt internal error: a layer ran before selecting a backend")


_UNSELECTED = _Unselected()


class _Selected:
    """A decision and the impl built from it, for one (dtype, device, grad mode, span of query
    lengths) a layer has seen."""

    __slots__ = ("decision", "device", "dtype", "epoch", "forced", "grad", "impl", "index",
                 "seq_high", "seq_low")

    def __init__(self, decision: Decision, impl: AttentionImpl, dtype: torch.dtype | None,
                 device: torch.device | None, epoch: int, forced: str | None,
                 seq_span: tuple[int, float] = (0, float("inf"))) -> None:
        self.decision, self.impl, self.dtype, self.device = decision, impl, dtype, device
        self.grad = decision.request.grad
        # Query lengths [low, high) the manifest's rules all treat alike (Manifest.seq_span);
        # (0, 0) for a decision made without a length where the rules tell lengths apart.
        self.seq_low, self.seq_high = seq_span
        # The selection epoch read before selecting, and this thread's force_backend() value:
        # the hot path re-selects when either differs now.
        self.epoch, self.forced = epoch, forced
        # Tensor.get_device() of inputs on `device` (-1 on CPU); None matches no tensor.
        self.index = None if device is None else (-1 if device.type == "cpu" else
                                                  device.index or 0)

    def serves(self, seq_len: int | None) -> bool:
        if seq_len is None:  # the decision made without a length, or one for every length
            return self.seq_low == 0 and self.seq_high in (0, float("inf"))
        return self.seq_low <= seq_len < self.seq_high


# nn.Module's global hook tables (dicts torch mutates in place) and the TorchScript tracing
# state, bound once for LocalAttention.__call__'s check.
_GLOBAL_FORWARD_HOOKS = _torch_module._global_forward_hooks
_GLOBAL_FORWARD_PRE_HOOKS = _torch_module._global_forward_pre_hooks
_GLOBAL_BACKWARD_HOOKS = _torch_module._global_backward_hooks
_GLOBAL_BACKWARD_PRE_HOOKS = _torch_module._global_backward_pre_hooks
_tracing_state = torch._C._get_tracing_state

_IMPL_OWNER: ContextVar[nn.Module | None] = ContextVar("attnrt_impl_owner", default=None)


@contextlib.contextmanager
def impls_owned_by(owner: nn.Module) -> Iterator[None]:
    """LocalAttentions built in the block register an nn.Module impl on `owner`, as `attn_impl`
    (see LocalAttention._module_owner)."""
    token = _IMPL_OWNER.set(owner)
    try:
        yield
    finally:
        _IMPL_OWNER.reset(token)


class LocalAttention(nn.Module):
    """Attention on one device through the best backend attnrt can select here.

    Shapes: B batch, N query length, M key length, H heads, Hkv kv heads, D head size.

    forward(q [B, N, H, D], k [B, M, Hkv, D], v [B, M, Hkv, D], freqs_cis=(cos, sin))
        -> [B, N, H, D]

    Args:
        num_heads: H, query heads (an int >= 1).
        head_size: D, the size of each head (an int >= 1).
        num_kv_heads: Hkv, key/value heads; None means H. Fewer than H is GQA (H % Hkv == 0).
        softmax_scale: the score scale; None means D ** -0.5, else a finite number > 0.
        causal: a causal mask, bottom-right aligned when N != M (query i sees keys
            j <= i + M - N; a row that sees no key outputs zeros).
        supported_attention_backends: names (or FastVideo enum members) the layer may use,
            in the manifest's order; None allows every backend.
        prefix: the layer's name, passed to the impl.
        dtype: the dtype q, k, v will have (torch.bfloat16 or "bf16", ...), so the decision a
            freshly built layer reports is the one its first forward uses; None: the default
            dtype (models are often built in fp32, then cast), re-selected at the first forward.
        **extra_impl_args: passed to the selected backend's impl. A name no registered impl
            reads is refused at construction (a typo such as casual=True), one the selected
            impl does not read when it is selected (ExtraArgumentError).

    The backend is selected per (dtype, device, autograd mode, query-length span) and cached;
    `decision` explains the last one (`attnrt explain` prints the same for a request).
    Bad arguments and inputs raise typed errors (subclasses of attnrt.AttnrtError).
    """

    def __init__(self, num_heads: int, head_size: int, num_kv_heads: int | None = None,
                 softmax_scale: float | None = None, causal: bool = False,
                 supported_attention_backends: Any = None, prefix: str = "", *,
                 dtype: torch.dtype | str | None = None, method: str | None = None,
                 **extra_impl_args: Any) -> None:
        super().__init__()
        kv_heads, scale = check_layer_args(num_heads, head_size, num_kv_heads, softmax_scale,
                                           causal)
        self.compute_dtype = check_layer_dtype(dtype)
        self.method = methods.method_of_arguments(method, extra_impl_args)
        check_extras_known(extra_impl_args)
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = kv_heads
        self.softmax_scale = scale
        self.causal = causal
        self.prefix = prefix
        self.extra_impl_args = extra_impl_args
        self._allowed = (None if supported_attention_backends is None
                         else tuple(supported_attention_backends))
        self._dims = (num_heads, head_size, self.num_kv_heads)
        self._q_tail = (num_heads, head_size)
        self._kv_tail = (self.num_kv_heads, head_size)
        # (dtype, device, force, grad mode) -> a selection per span of query lengths seen
        self._by_key: dict[tuple[Any, ...], list[_Selected]] = {}
        owner = _IMPL_OWNER.get()  # a weak reference: a child never holds its parent module
        self.__dict__["_owner_ref"] = weakref.ref(owner) if owner is not None else None
        self._active = self._initial_selection()

    # -- selection ---------------------------------------------------------------------------

    def request_for(self, dtype: torch.dtype, grad: bool | None = None,
                    seq_len: int | None = None) -> AttentionRequest:
        """The request for inputs of `dtype`; grad None: whether autograd is on now. Its method
        is the layer's `method=`, else the one a forced backend name stands for where this layer
        allows it (FastVideo: FASTVIDEO_ATTENTION_BACKEND=VIDEO_SPARSE_ATTN), else the one its
        allow-list names alone, else dense (attnrt.selection.methods.resolve_method)."""
        grad = torch.is_grad_enabled() if grad is None else grad
        forced = forced_backend()
        method, _ = methods.resolve_method(self.method, self._allowed,
                                           forced[0] if forced else None)
        return AttentionRequest(self.head_size, dtype_name(dtype), self.num_heads,
                                self.num_kv_heads, self.causal, self._allowed, grad, seq_len,
                                method)

    def _device_for(self, tensor_device: torch.device | None) -> Device:
        device = probe()
        if tensor_device is None or device.platform in platform_of_tensor(tensor_device):
            return device
        return device_for_tensor(tensor_device)

    def _initial_selection(self) -> _Selected:
        # Where tensors for the probed device live, so the first forward needs no re-selection.
        dtype = self.compute_dtype or torch.get_default_dtype()
        device = torch_device_of(probe())
        try:
            return self._select(dtype, device)
        except (BackendUnavailableError, ExtraArgumentError):
            # A forced or allowed 16-bit backend need not serve the default dtype (models are
            # built in fp32, then cast): the first forward selects for its real dtype, and
            # raises then if nothing can run it (or the backend it selects would not read an
            # extra argument the layer was given).
            request = self.request_for(dtype)
            return _Selected(decide(request, self._device_for(device)), _UNSELECTED, None, None,
                             dispatch.selection_epoch, visible(_CONTEXT_FORCE))

    def _select(self, dtype: torch.dtype, tensor_device: torch.device | None,
                seq_len: int | None = None) -> _Selected:
        """seq_len: the query length, where known. The request carries it only where a rule
        that can match it has a seq_len key; the selection then serves the span of lengths
        that every rule treats alike, and a length outside it selects again."""
        epoch, forced = dispatch.selection_epoch, visible(_CONTEXT_FORCE)  # read before selecting
        grad = torch.is_grad_enabled()
        key = (dtype, str(tensor_device), forced_backend(), grad)
        seen = self._by_key.get(key, [])
        for found in seen:
            if found.epoch == epoch and found.serves(seq_len):
                return found
        manifest, device = current_manifest(), self._device_for(tensor_device)
        request = self.request_for(dtype, grad, seq_len)
        span = manifest.seq_span(request, device)
        if seq_len is not None and span == (0, float("inf")):
            request = self.request_for(dtype, grad)  # no rule for it tells lengths apart
        decision = select(request, device, manifest)
        same = next((s for s in seen if s.decision.backend == decision.backend), None)
        # One impl per backend, its state kept across spans and changes.
        impl = same.impl if same is not None else self._build_impl(decision)
        found = _Selected(decision, impl, dtype, tensor_device, epoch, forced, span)
        # A new list, not an edit: another thread may be walking the old one.
        self._by_key[key] = [s for s in seen if s.epoch == epoch
                             and (s.seq_low, s.seq_high) != span] + [found]
        return found

    def _module_owner(self) -> nn.Module:
        """Where an nn.Module impl is registered as `attn_impl`: this layer, or the layer that
        built it (DistributedAttention, whose LocalAttentions per SP size share one impl, so its
        state_dict has FastVideo's keys once)."""
        ref = self.__dict__.get("_owner_ref")
        owner = ref() if ref is not None else None
        return owner if owner is not None else self

    def _build_impl(self, decision: Decision) -> AttentionImpl:
        """The chosen backend's impl, by keyword as FastVideo's layers build it. An impl that is
        an nn.Module (SLA's, with its learnable proj_l) becomes this layer's `attn_impl`, so
        state_dict() saves and loads it under FastVideo's key names; a later impl of the same
        shape (another backend of the method) takes over its state."""
        impl_cls = decision.backend_cls.get_impl_cls()
        check_extras_for(impl_cls, decision.backend or "?", self.extra_impl_args)
        impl = impl_cls(
            num_heads=self.num_heads, head_size=self.head_size,
            softmax_scale=self.softmax_scale, causal=self.causal,
            num_kv_heads=self.num_kv_heads, prefix=self.prefix, **self.extra_impl_args)
        if isinstance(impl, nn.Module):
            owner = self._module_owner()
            previous = owner._modules.get("attn_impl")
            if owner is not self and type(previous) is type(impl):
                return previous  # type: ignore[return-value]  # one impl across the owner's layers
            if previous is not None and previous is not impl:
                state = previous.state_dict()
                if state.keys() == impl.state_dict().keys():
                    impl.load_state_dict(state)
            # Registered directly: `attn_impl` is also the property naming the active impl.
            owner._modules["attn_impl"] = impl
        return impl

    @property
    def attn_impl(self) -> AttentionImpl:
        """The impl serving the last forward (or the construction-time one), as FastVideo's
        layers name it."""
        return self._active.impl

    def impl_for(self, dtype: torch.dtype, device: torch.device | None = None,
                 seq_len: int | None = None) -> AttentionImpl:
        """The impl this layer runs for inputs of `dtype` on `device` (and query length
        `seq_len`, where rules tell lengths apart) in the current autograd mode (selected once,
        cached)."""
        return self._select(dtype, device, seq_len).impl

    def decision_for(self, dtype: torch.dtype, device: torch.device | None = None,
                     seq_len: int | None = None) -> Decision:
        return self._select(dtype, device, seq_len).decision

    @property
    def decision(self) -> Decision:
        """The decision behind the last forward (or the construction-time one)."""
        return self._active.decision

    @property
    def backend_name(self) -> str:
        return self._active.decision.backend or ""

    # -- forward -----------------------------------------------------------------------------

    def _current(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> _Selected:
        """The selection serving q, k, v: one flat test on the hot path (goal: < 2 us per call,
        of which nn.Module's own call takes ~1 us); anything unusual goes to _slow_path, which
        validates in full and re-selects. get_device() is -1 on CPU and the index elsewhere:
        cheaper than .device. Autograd on or off (training or inference) may select another
        backend: the mode is part of the request; so may a query length outside the span the
        selection serves."""
        active = self._active
        dt, qs, ks = active.dtype, q.shape, k.shape
        heads, size, kv_heads = self._dims
        if not (len(qs) == 4 and len(ks) == 4 and qs[2] == heads and qs[3] == size
                and ks[2] == kv_heads and ks[3] == size and ks == v.shape and qs[0] == ks[0]
                and q.dtype is dt and k.dtype is dt and v.dtype is dt
                and q.get_device() == active.index == k.get_device() == v.get_device()
                and active.epoch == dispatch.selection_epoch
                and _CONTEXT_FORCE.get() is active.forced
                and torch.is_grad_enabled() is active.grad
                and active.seq_low <= qs[1] < active.seq_high):
            active = self._slow_path(q, k, v)
        return active

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """nn.Module's call, minus two Python frames where no hook can run (the fields torch's
        own fast path reads): 0.6 us of the layer's ~2.4 us per call (bench/NOTES-core.md).
        Hooks, module.compile() and TorchScript tracing take nn.Module's full path."""
        if (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                or self._backward_pre_hooks or _GLOBAL_FORWARD_HOOKS or _GLOBAL_FORWARD_PRE_HOOKS
                or _GLOBAL_BACKWARD_HOOKS or _GLOBAL_BACKWARD_PRE_HOOKS
                or self._compiled_call_impl is not None or _tracing_state()):
            return super().__call__(*args, **kwargs)
        return self.forward(*args, **kwargs)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                freqs_cis: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        active = self._current(q, k, v)
        if freqs_cis is not None:
            q, k = self._rotate(q, k, freqs_cis)
        try:
            return active.impl.forward(q, k, v, get_forward_context().attn_metadata)
        except KernelCompileError as exc:
            return self._fall_back(active, exc, q, k, v)

    def forward_with_lse(self, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse [B, H, N] float32) through the selected impl's forward_with_lse, with
        forward's fallback: a compile failure moves to the next ranked backend (an error under
        ATTNRT_STRICT=1). Where the serving impl has no forward_with_lse, the reference computes
        both (the same attention; slow, and only for that call's pieces)."""
        active = self._current(q, k, v)
        metadata = get_forward_context().attn_metadata
        try:
            return _with_lse(active.impl, q, k, v, metadata, self)
        except KernelCompileError as exc:
            self._fall_back_decision(active, exc, q)
            return _with_lse(self._active.impl, q, k, v, metadata, self)

    def _rotate(self, q: torch.Tensor, k: torch.Tensor,
                freqs_cis: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(freqs_cis, (tuple, list)) and len(freqs_cis) == 2
                and all(isinstance(f, torch.Tensor) for f in freqs_cis)):
            got = (type(freqs_cis).__name__ if not isinstance(freqs_cis, (tuple, list)) else
                   f"{type(freqs_cis).__name__} of {len(freqs_cis)}")
            raise LayerInputTypeError(f"freqs_cis is a {got}; allowed: None or a pair (cos, sin) "
                                      f"of tensors, each [N, head_size / 2]")
        cos, sin = freqs_cis
        want = (q.shape[1], self.head_size // 2)
        if tuple(cos.shape) != want or tuple(sin.shape) != want or k.shape[1] != q.shape[1]:
            raise LayerInputError(f"freqs_cis cos/sin have shape {tuple(cos.shape)}, "
                             f"{tuple(sin.shape)}; allowed: {want} ([seq, head_size / 2]) with "
                             "q and k of one sequence length")
        return apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)

    def _slow_path(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> _Selected:
        qs, ks = q.shape, k.shape
        if not (len(qs) == 4 and len(ks) == 4 and ks == v.shape and qs[0] == ks[0]
                and qs[2:] == self._q_tail and ks[2:] == self._kv_tail
                and q.dtype is k.dtype is v.dtype and q.dtype in DTYPE_NAMES
                and q.device == k.device == v.device):
            self._raise_bad_input(q, k, v)
        self._active = self._select(q.dtype, q.device, qs[1])
        return self._active

    def _fall_back(self, active: _Selected, exc: KernelCompileError, q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._fall_back_decision(active, exc, q)
        return self._active.impl.forward(q, k, v, get_forward_context().attn_metadata)

    def _fall_back_decision(self, active: _Selected, exc: KernelCompileError,
                            q: torch.Tensor) -> None:
        name = active.decision.backend or "?"
        if strict_mode():
            raise exc
        if record_failure(active.decision.request, active.decision.device, name, str(exc)):
            logger.warning("%s failed for %s (%s); using the next ranked backend "
                           "(set ATTNRT_STRICT=1 to make this an error)",
                           name, active.decision.request.describe(), exc)
        self._active = self._select(q.dtype, q.device, q.shape[1])  # the epoch moved

    def _raise_bad_input(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise LayerInputError(f"{name} has shape {got}; expected 4-D [batch, seq, "
                                      "heads, head_size]")
        _check_heads(self, q, k, v)
        if k.shape != v.shape:
            raise LayerInputError(f"k.shape={tuple(k.shape)} and v.shape={tuple(v.shape)} "
                                  "must match")
        if q.shape[0] != k.shape[0]:
            raise LayerInputError(f"batch of q ({q.shape[0]}) and k/v ({k.shape[0]}) must match")
        if not (q.dtype == k.dtype == v.dtype):
            raise LayerInputTypeError(f"q, k, v dtypes must match; got {q.dtype}, {k.dtype}, "
                                      f"{v.dtype}")
        if q.dtype not in DTYPE_NAMES:
            raise LayerInputTypeError(f"q.dtype={q.dtype} is not a floating dtype attnrt runs; "
                                      "allowed: float16, bfloat16, float32, float64")
        raise LayerInputError(f"q, k, v must be on one device; got {q.device}, {k.device}, "
                              f"{v.device}")


def _check_heads(layer: LocalAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.shape[2] != layer.num_heads:
        raise LayerInputError(f"q has {q.shape[2]} heads; the layer was built for "
                         f"num_heads={layer.num_heads}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[3] != layer.head_size:
            raise LayerInputError(f"{name} has head size {t.shape[3]}; the layer was built for "
                             f"head_size={layer.head_size}")
    for name, t in (("k", k), ("v", v)):
        if t.shape[2] != layer.num_kv_heads:
            raise LayerInputError(f"{name} has {t.shape[2]} heads; the layer was built for "
                             f"num_kv_heads={layer.num_kv_heads}")


def __getattr__(name: str) -> Any:
    # DistributedAttention lives in attnrt.parallel.layers, which imports this module.
    if name in ("DistributedAttention", "DistributedAttention_VSA"):
        from attnrt.parallel import layers as parallel_layers

        return getattr(parallel_layers, name)
    raise AttributeError(f"module 'attnrt.layers' has no attribute {name!r}")
