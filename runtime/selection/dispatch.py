"""The one selection walk: request + device -> Decision.

    ranking = forced name, or the first manifest rule that matches (REFERENCE appended last)
    for name in ranking: reasons = capability.check(backend, request, device); first with none wins

Every Decision lists each candidate with its verdict, the rule (file:line) and the device;
`attnrt explain` prints the very Decision a layer gets. Decisions are cached per (device, request,
force, manifest files); `clear_caches()` empties every cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

from attnrt.ctxvars import visible
from attnrt.errors import BackendUnavailableError, RegistryError, UnknownBackendError
from attnrt.interfaces import AttentionBackend
from attnrt.selection import capability, methods, registry
from attnrt.selection.capability import Reason
from attnrt.selection.device import Device, clear_probe_cache, probe
from attnrt.selection.manifest import Manifest, Rule, clear_manifest_cache, current_manifest
from attnrt.selection.request import AttentionRequest

logger = logging.getLogger("attnrt")
LAST_RESORT = "REFERENCE"
FORCE_ENV = ("ATTNRT_BACKEND", "FASTVIDEO_ATTENTION_BACKEND")


@dataclass(frozen=True)
class Candidate:
    name: str
    reasons: tuple[Reason, ...] = ()
    note: str = ""
    reached: bool = True

    @property
    def ok(self) -> bool:
        return self.reached and not self.reasons

    def verdict(self) -> str:
        if not self.reached:
            return "not reached"
        return "ok" if not self.reasons else "; ".join(str(r) for r in self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "reached": self.reached, "note": self.note,
                "reasons": [r.to_dict() for r in self.reasons]}


@dataclass(frozen=True)
class Decision:
    """The outcome of one selection: `backend` is None only from explain() when nothing can run."""

    backend: str | None
    request: AttentionRequest
    device: Device
    candidates: tuple[Candidate, ...]
    rule: Rule | None
    forced: str | None = None  # where the force came from, e.g. "ATTNRT_BACKEND=FLASH_ATTN"
    notes: tuple[str, ...] = field(default=())

    @property
    def backend_cls(self) -> type[AttentionBackend]:
        if self.backend is None:
            raise BackendUnavailableError(self.failure_message())
        return registry.load(self.backend)

    @property
    def rule_where(self) -> str:
        return self.rule.where if self.rule else "(no rule matched: REFERENCE fallback)"

    def summary(self) -> str:
        skipped = ", ".join(f"{c.name} ({c.verdict()})" for c in self.candidates
                            if c.reached and not c.ok)
        return (f"attention for {self.request.describe()} on {self.device.describe()}: "
                f"{self.backend or 'no backend'} (rule {self.rule_where}"
                f"{', forced by ' + self.forced if self.forced else ''})"
                + (f"; skipped {skipped}" if skipped else ""))

    def failure_message(self) -> str:
        lines = [f"no attention backend can run {self.request.describe()} on "
                 f"{self.device.describe()}"
                 + (f" (forced by {self.forced})" if self.forced else "")
                 + ":"]
        lines += [f"  {c.name}: {c.verdict()}" for c in self.candidates]
        hints = sorted({r.hint for c in self.candidates for r in c.reasons if r.hint})
        lines += [f"  hint: {h}" for h in hints]
        return "\n".join(lines)

    def explain(self) -> str:
        from attnrt.selection.report import format_decision

        return format_decision(self)

    def to_dict(self) -> dict[str, Any]:
        from attnrt.selection.report import decision_dict

        return decision_dict(self)


# ---------------------------------------------------------------- user intent: force


_FORCED: ContextVar[str | None] = ContextVar("attnrt_forced_backend", default=None)
_global_forced: str | None = None
# Bumped (under _lock) when the process-wide force changes or a backend fails at run time, so
# layers re-check their cached choice on the next forward: one int comparison on the hot path.
# force_backend() is per thread or task, so layers compare its ContextVar value directly instead.
selection_epoch = 0


def _bump_epoch() -> None:
    global selection_epoch
    with _lock:
        selection_epoch += 1


def _name_of(backend: Any) -> str:
    return str(getattr(backend, "name", backend)).upper()


@contextlib.contextmanager
def force_backend(name: Any) -> Iterator[None]:
    """Within the block (this thread or task only), every selection uses `name` or raises."""
    resolved = _name_of(name)
    registry.spec(resolved)  # unknown names fail here, listing the valid ones
    token = _FORCED.set(resolved)
    try:
        yield
    finally:
        _FORCED.reset(token)


def set_process_force(backend: Any) -> None:
    """Force `backend` (a name or an enum-like value with .name) for every selection in the
    process until cleared with None; attnrt.integrations.fastvideo gives it FastVideo's names."""
    global _global_forced
    if backend is not None:
        registry.spec(_name_of(backend))  # unknown names fail here, listing the valid ones
    _global_forced = None if backend is None else _name_of(backend)
    _bump_epoch()


def process_force() -> str | None:
    """The name set by set_process_force, or None."""
    return _global_forced


def forced_backend() -> tuple[str, str] | None:
    """(name, where it came from), in precedence order: context, global, environment."""
    if (name := visible(_FORCED)) is not None:
        return name, "force_backend()"
    if _global_forced is not None:
        return _global_forced, "global_force_attn_backend()"
    for var in FORCE_ENV:
        value = os.environ.get(var, "").strip()
        if value:
            return value.upper(), f"{var}={value}"
    return None


def _fallback_mode() -> str:
    mode = os.environ.get("ATTNRT_FALLBACK", "error").strip().lower() or "error"
    if mode not in ("error", "warn"):
        raise ValueError(f"ATTNRT_FALLBACK={mode!r} is not allowed; allowed: error, warn")
    return mode


def strict_mode() -> bool:
    value = os.environ.get("ATTNRT_STRICT", "0").strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"ATTNRT_STRICT={value!r} is not allowed; allowed: 0, 1, true, false")
    return value in ("1", "true", "yes")


# ---------------------------------------------------------------- the walk


_lock = threading.Lock()
_decisions: dict[tuple[Any, ...], Decision] = {}
_failures: dict[tuple[Device, AttentionRequest], dict[str, Reason]] = {}


def _failure_key(request: AttentionRequest, device: Device) -> tuple[Device, AttentionRequest]:
    # A kernel that failed to build for a shape fails with autograd on or off alike, and at
    # every sequence length (lengths are runtime arguments, never compiled in).
    if request.grad or request.seq_len is not None:
        request = replace(request, grad=False, seq_len=None)
    return device, request


def record_failure(request: AttentionRequest, device: Device, name: str, message: str) -> bool:
    """Remember that `name` failed at run time (e.g. a compile error) for this request; every
    layer re-selects at its next forward. True the first time, so the caller warns once."""
    global selection_epoch
    with _lock:
        failed = _failures.setdefault(_failure_key(request, device), {})
        new = name not in failed
        failed[name] = Reason(capability.COMPILE_FAILED, f"{name} failed at run time: {message}")
        _decisions.clear()
        selection_epoch += 1  # also in decide()'s key: a walk that raced this is never reused
    return new


def reasons_for(name: str, request: AttentionRequest, device: Device) -> list[Reason]:
    """Why `name` cannot serve `request` on `device` (empty: it can)."""
    if request.allowed is not None and not _allowed(name, request):
        return [Reason(capability.NOT_ALLOWED, f"{name} is not in the layer's "
                       f"supported_attention_backends ({', '.join(request.allowed)})")]
    try:
        cls = registry.load(name)
    except (RegistryError, UnknownBackendError) as exc:
        return [Reason(capability.NOT_REGISTERED, str(exc))]
    reasons = capability.check(cls, request, device)
    failed = _failures.get(_failure_key(request, device), {}).get(name)
    return reasons + [failed] if failed else reasons


def _allowed(name: str, request: AttentionRequest) -> bool:
    """In the layer's allow-list, by name or through the FastVideo name of its method
    (allowing VIDEO_SPARSE_ATTN allows every implementation of vsa)."""
    allowed = request.allowed or ()
    return name in allowed or (request.method != methods.DENSE and any(
        methods.alias_method(a) == request.method for a in allowed))


def _ranking(request: AttentionRequest, device: Device,
             manifest: Manifest) -> tuple[list[tuple[str, str]], Rule | None]:
    rule = manifest.match(request, device)
    last = methods.last_resort(request.method)
    ranked = [(n, "") for n in (rule.rank if rule else ()) if n != last]
    for name in request.allowed or ():
        if name not in {n for n, _ in ranked} and name != last and _walks(name):
            ranked.append((name, "allowed by the layer, not ranked by the manifest"))
    # REFERENCE always runs and is always slowest: it closes every dense walk, whatever the
    # rule says (and a method's own last resort, where one is registered, closes its walks).
    if last is not None and registry.is_registered(last):
        in_rule = rule is not None and last in rule.rank
        ranked.append((last, "" if in_rule else "last resort"))
    return ranked, rule


def _walks(name: str) -> bool:
    """Whether an allowed name joins the walk: every registered backend does (one of another
    method shows with its METHOD reason); a FastVideo method name with no backend of its own
    only names the method."""
    if methods.alias_method(name) is not None and not registry.is_registered(name):
        return False
    registry.spec(name)  # an unknown name fails here, listing the valid ones
    return True


def _walk(ranked: list[tuple[str, str]], request: AttentionRequest,
          device: Device) -> tuple[str | None, list[Candidate]]:
    chosen, candidates = None, []
    for name, note in ranked:
        if chosen is not None:
            candidates.append(Candidate(name, note=note, reached=False))
            continue
        reasons = tuple(reasons_for(name, request, device))
        candidates.append(Candidate(name, reasons, note))
        if not reasons:
            chosen = name
    return chosen, candidates


def decide(request: AttentionRequest, device: Device | None = None,
           manifest: Manifest | None = None) -> Decision:
    """The Decision, even when nothing can run (backend None). select() raises instead."""
    device = device or probe()
    manifest = manifest or current_manifest()
    forced = forced_backend()
    key = (device, request, forced, _fallback_mode(), strict_mode(),
           manifest.signature or manifest.files, registry.generation, selection_epoch)
    with _lock:
        cached = _decisions.get(key)
    if cached is not None:
        return cached
    decision = _decide(request, device, manifest, forced)
    with _lock:
        _decisions[key] = decision
    if decision.backend is not None:
        logger.info("%s", decision.summary())
    return decision


def _decide(request: AttentionRequest, device: Device, manifest: Manifest,
            forced: tuple[str, str] | None) -> Decision:
    ranked, rule = _ranking(request, device, manifest)
    if forced is None:
        chosen, candidates = _walk(ranked, request, device)
        return Decision(chosen, request, device, tuple(candidates), rule,
                        notes=(*_length_note(request, device, manifest), *_mods_note(request)))
    name, source = forced
    force_note = _method_force_note(name, source, request)
    if force_note:  # the force names a method, or one this request does not compute
        chosen, candidates = _walk(ranked, request, device)
        return Decision(chosen, request, device, tuple(candidates), rule,
                        notes=(force_note, *_length_note(request, device, manifest)))
    registry.spec(name)
    reasons = tuple(reasons_for(name, request, device))
    head = Candidate(name, reasons, f"forced by {source}")
    if not reasons or _fallback_mode() != "warn" or strict_mode():
        return Decision(None if reasons else name, request, device, (head,), rule, source)
    warnings.warn(f"forced backend {name} ({source}) cannot run: {head.verdict()}; "
                  "ATTNRT_FALLBACK=warn, so the manifest ranking is used", stacklevel=4)
    chosen, candidates = _walk([(n, note) for n, note in ranked if n != name], request, device)
    note = f"forced {name} could not run; fell back to the ranking (ATTNRT_FALLBACK=warn)"
    return Decision(chosen, request, device, (head, *candidates), rule, source, (note,))


def _method_force_note(name: str, source: str, request: AttentionRequest) -> str:
    """Why a force does not pin a backend for this request ("" where it does): a FastVideo
    method name (VIDEO_SPARSE_ATTN) selects its method's best ranked implementation, and a
    sparse force leaves layers of another method alone, as FastVideo's does."""
    if methods.alias_method(name) == request.method:
        return (f"forced {name} ({source}) names method {request.method}: its best ranked "
                "implementation serves")
    if methods.alias_method(name) is None and not registry.is_registered(name):
        return ""  # unknown: the pinned path raises, listing the valid names
    forced_method = methods.backend_method(name)
    if forced_method not in (methods.DENSE, request.method):
        return (f"forced {name} ({source}) implements method {forced_method}; this request "
                f"computes {request.method}, so the force does not apply to it")
    return ""


def _mods_note(request: AttentionRequest) -> tuple[str, ...]:
    """Where method linear's mods run (the request knows no mods: the engine says per mod)."""
    if request.method != "linear":
        return ()
    return ("method linear: TRITON_LINEAR_ATTN runs element-wise q/k/v mods inside its kernels "
            "(fuse_mods='kernel', the default); other mods, decay_mod and the other backends "
            "use a PyTorch pre-pass (LinearAttentionEngine.explain() says which, per mod)",)


def _length_note(request: AttentionRequest, device: Device,
                 manifest: Manifest) -> tuple[str, ...]:
    """Where the request carries no length but rules keyed on one could match it."""
    if request.seq_len is not None or not manifest.seq_cuts(request, device):
        return ()
    return ("rules keyed on seq_len could match this request; they apply only with a query "
            "length (attnrt explain --seq-len N; a layer passes its N)",)


def select(request: AttentionRequest, device: Device | None = None,
           manifest: Manifest | None = None) -> Decision:
    """The Decision for this request; raises BackendUnavailableError when nothing can run."""
    decision = decide(request, device, manifest)
    if decision.backend is None:
        raise BackendUnavailableError(decision.failure_message())
    return decision


def explain(request: AttentionRequest | None = None, device: Device | str | None = None,
            **request_fields: Any) -> Decision:
    """The same Decision a layer gets: explain(head_size=128, dtype="bf16", device="cuda:sm90")."""
    from attnrt.selection.device import parse_device_spec

    if request is None:
        request = AttentionRequest(**request_fields)
    if isinstance(device, str):
        device = parse_device_spec(device)
    return decide(request, device)


def clear_caches() -> None:
    """Forget decisions, failures, probes, manifests, package checks, Triton configs, tunings,
    launch plans and compiled-kernel handles."""
    with _lock:
        _decisions.clear()
        _failures.clear()
    clear_probe_cache()
    clear_manifest_cache()
    capability.package_status.cache_clear()
    registry.clear_registry_cache()
    # Kernel-side caches, only where those modules were loaded (clearing imports nothing).
    for module_name, clear in (("attnrt.kernels.flash.autotune", "clear_tuning_cache"),
                               ("attnrt.backends.triton_flash", "clear_config_caches"),
                               ("attnrt.kernels.flash.launch", "clear_plans"),
                               ("attnrt.kernels.fast_launch", "clear"),
                               ("attnrt.engine.kernel", "clear_modules"),
                               ("attnrt.engine.blocks", "clear_cache"),
                               ("attnrt.engine.linear_backends", "clear_fla_cache")):
        module = sys.modules.get(module_name)
        if module is not None:
            getattr(module, clear)()
