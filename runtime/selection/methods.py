"""Attention methods: what is computed, apart from how.

A request names a method (`dense` by default); a backend declares the methods it implements
(`AttentionBackend.METHODS`); manifest rules rank the implementations of one method (`method:`
key, default dense). The dispatcher never serves one method with another: a dense request is never
served sparse, and a sparse one never silently dense.

FastVideo's backend names for sparse methods name the method where FastVideo users use them:
forcing or allowing VIDEO_SPARSE_ATTN means method vsa, served by the best ranked implementation of
vsa (`METHOD_ALIASES`).
"""

from __future__ import annotations

import re
import threading

from attnrt.errors import MethodError

DENSE = "dense"

_lock = threading.Lock()
_METHODS: dict[str, str] = {
    "dense": "softmax attention over every key",
    "vsa": "Video Sparse Attention: coarse cube selection, fine block-sparse attention, gate",
    "sla": "sparse-linear attention: top-k blocks exact, the rest through a linear branch",
    "sage_sla": "SLA with INT8 q/k and FP8 v block-sparse kernels (SpargeAttn)",
    "vmoba": "VMoBA: mixture of block attention over 1-D/2-D/3-D video chunks",
    "custom": "user-defined attention (AttentionEngine: score_mod, mask_mod, online_func)",
    "linear": "user-defined linear attention (LinearAttentionEngine)",
}
# The backend that always serves a method where it is registered: it closes every walk of that
# method, as REFERENCE closes every dense walk.
_LAST_RESORTS: dict[str, str] = {"dense": "REFERENCE"}
# FastVideo backend names that name a method (forcing or allowing one selects the method).
METHOD_ALIASES: dict[str, str] = {
    "VIDEO_SPARSE_ATTN": "vsa",
    "SLA_ATTN": "sla",
    "SAGE_SLA_ATTN": "sage_sla",
    "VMOBA_ATTN": "vmoba",
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def methods() -> dict[str, str]:
    """Every known method and what it computes."""
    return dict(_METHODS)


def check_method(method: object, where: str = "method") -> str:
    """`method` as a known method name; a typed error naming the known ones otherwise."""
    if isinstance(method, str) and method.lower() in _METHODS:
        return method.lower()
    raise MethodError(f"{where}={method!r} is not a known attention method; allowed: "
                      f"{', '.join(_METHODS)}")


def register_method(name: str, description: str, last_resort: str | None = None) -> None:
    """Make a new method known (backends from other packages may implement their own).
    `last_resort`: a registered backend that always serves it, closing every walk."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise MethodError(f"method name {name!r} is not allowed; allowed: lower_snake_case")
    with _lock:
        _METHODS[name] = description
        if last_resort is not None:
            _LAST_RESORTS[name] = last_resort.upper()


def last_resort(method: str) -> str | None:
    """The backend that closes every walk of `method` (REFERENCE for dense), if any."""
    return _LAST_RESORTS.get(method)


def set_last_resort(method: str, name: str) -> None:
    """Name the always-serving backend of a built-in method (its pack registers it)."""
    check_method(method)
    with _lock:
        _LAST_RESORTS[method] = name.upper()


def alias_method(name: str) -> str | None:
    """The method a FastVideo method name selects (VIDEO_SPARSE_ATTN -> vsa), else None."""
    return METHOD_ALIASES.get(str(getattr(name, "name", name)).upper())


def backend_method(name: str) -> str:
    """The method a backend name stands for: FastVideo's method names by the alias table, others
    by their declared METHODS (dense where a backend implements dense; else its one method)."""
    from attnrt.selection import registry
    from attnrt.selection.capability import declared

    alias = alias_method(name)
    if alias is not None:
        return alias
    declared_methods = declared(registry.load(str(getattr(name, "name", name)).upper()), "METHODS")
    if DENSE in declared_methods or len(declared_methods) != 1:
        return DENSE
    return next(iter(declared_methods))


def resolve_method(explicit: str | None, allowed: tuple[str, ...] | None,
                   forced: str | None) -> tuple[str, str]:
    """(method, why) for a layer: its explicit `method=`; else the method a forced backend name
    stands for, where the layer allows that name; else the one method its allow-list names
    when it names no dense backend; else dense. FastVideo's layers list sparse and dense names
    together and run sparse only when a sparse backend is forced."""
    if explicit is not None:
        return check_method(explicit), "method= of the layer"
    if forced is not None:
        method = backend_method(forced)
        if method != DENSE and _allows(allowed, forced, method):
            return method, f"forced backend {forced} implements method {method}"
    if allowed:
        found = {backend_method(n) for n in allowed}
        if len(found) == 1 and DENSE not in found:
            method = found.pop()
            return method, f"supported_attention_backends names only method {method}"
    return DENSE, ""


def _allows(allowed: tuple[str, ...] | None, name: str, method: str) -> bool:
    if allowed is None or name in allowed:
        return True
    return any(alias_method(a) == method for a in allowed)
