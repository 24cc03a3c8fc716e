"""Backend names -> lazy "module:Class" targets.

Sources, merged into one table: the portable backends (`attnrt.backends.BACKENDS`), each installed
platform pack's table (`Platform.backends`), the `attnrt.backends` entry-point group of installed
packages, and `register_backend(...)` calls. Nothing is imported until a backend is looked at.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from attnrt.errors import RegistryError, UnknownBackendError
from attnrt.interfaces import AttentionBackend
from attnrt.selection import packs

NAME_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]*$")
ENTRY_POINT_GROUP = "attnrt.backends"
_REQUIRED = ("get_name", "get_impl_cls")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class"
    origin: str  # "attnrt.platforms.cuda", "entry point <dist>", "register_backend"


_lock = threading.RLock()
_specs: dict[str, BackendSpec] = {}
_classes: dict[str, type] = {}
_loaded_builtins = False
_builtin_names: set[str] = set()  # added from the tables and entry points, not register_backend
# Bumped by register/unregister: decisions cached under an older generation are made again.
generation = 0


def _ensure_builtins() -> None:
    global _loaded_builtins
    if _loaded_builtins:
        return
    with _lock:
        if _loaded_builtins:
            return
        from attnrt.backends import BACKENDS

        tables: list[tuple[str, Mapping[str, str]]] = [("attnrt.backends", BACKENDS)]
        tables += [(f"attnrt.platforms.{p.name}", p.backends) for p in packs.installed()]
        for origin, table in tables:
            for name, target in table.items():
                _add(BackendSpec(name, target, origin))
                _builtin_names.add(name)
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep.dist, "name", "?") if ep.dist else "?"
            _add(BackendSpec(ep.name, ep.value, f"entry point of {dist}"))
            _builtin_names.add(ep.name)
        _loaded_builtins = True


def _add(spec: BackendSpec, cls: type | None = None) -> None:
    if not NAME_PATTERN.match(spec.name):
        raise RegistryError(f"backend name {spec.name!r} must be UPPER_SNAKE_CASE "
                            "(letters, digits, underscores; starting with a letter)")
    if ":" not in spec.target:
        raise RegistryError(f"backend {spec.name} target {spec.target!r} must be 'module:Class'")
    old = _specs.get(spec.name)
    if old is not None and old.target != spec.target:
        raise RegistryError(f"backend name {spec.name} is already registered by {old.origin} "
                            f"as {old.target}; choose another name")
    _specs[spec.name] = spec
    if cls is not None:
        _classes[spec.name] = cls


def register_backend(name: str, backend: str | type, *, origin: str = "register_backend") -> None:
    """Register a backend class (validated now) or a lazy "module:Class" (validated at load)."""
    global generation
    _ensure_builtins()
    with _lock:
        generation += 1
        if isinstance(backend, str):
            _add(BackendSpec(name, backend, origin))
            return
        target = f"{backend.__module__}:{backend.__qualname__}"
        old = _specs.get(name)
        if old is not None and old.target != target:
            _add(BackendSpec(name, target, origin))  # raises the clash error
        validate_backend_class(name, backend)
        _add(BackendSpec(name, f"{backend.__module__}:{backend.__qualname__}", origin), backend)


def unregister_backend(name: str) -> None:
    """Remove a backend added by register_backend (tests, plug-in reloads)."""
    global generation
    with _lock:
        generation += 1
        _specs.pop(name, None)
        _classes.pop(name, None)


def validate_backend_class(name: str, cls: Any) -> None:
    """Check the FastVideo contract: get_name() == name and get_impl_cls() returns a class."""
    missing = [m for m in _REQUIRED if not callable(getattr(cls, m, None))]
    if missing:
        raise RegistryError(f"backend {name}: {cls!r} lacks {', '.join(missing)}(); a backend "
                            "defines static get_name() and get_impl_cls()")
    got = cls.get_name()
    if got != name:
        raise RegistryError(f"backend {name}: get_name() returns {got!r}; it must return {name!r}")
    impl = cls.get_impl_cls()
    if not isinstance(impl, type) or not callable(getattr(impl, "forward", None)):
        raise RegistryError(f"backend {name}: get_impl_cls() returned {impl!r}; expected a class "
                            "with forward(query, key, value, attn_metadata)")


def names() -> list[str]:
    _ensure_builtins()
    return sorted(_specs)


def spec(name: str) -> BackendSpec:
    _ensure_builtins()
    try:
        return _specs[name]
    except KeyError:
        raise UnknownBackendError(f"backend {name!r} is not registered; registered: "
                                  f"{', '.join(sorted(_specs))}") from None


def is_registered(name: str) -> bool:
    _ensure_builtins()
    return name in _specs


def load(name: str) -> type[AttentionBackend]:
    """Import and validate a backend class (cached). The class may be a FastVideo backend that
    does not subclass AttentionBackend; validation has checked the contract's methods."""
    cls = _classes.get(name)
    if cls is not None:
        return cast("type[AttentionBackend]", cls)
    target = spec(name).target
    module_name, _, qualname = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise RegistryError(f"backend {name}: cannot load {target}: {exc}") from exc
    validate_backend_class(name, obj)
    with _lock:
        _classes[name] = obj
    return obj


def clear_registry_cache() -> None:
    """Re-read built-in tables (and the installed packs) on next use, loading their classes
    afresh; register_backend calls stay."""
    global _loaded_builtins
    with _lock:
        for name in _builtin_names:
            _specs.pop(name, None)
            _classes.pop(name, None)
        _builtin_names.clear()
        _loaded_builtins = False
