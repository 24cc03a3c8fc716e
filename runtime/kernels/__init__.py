"""attnrt's own kernels (Triton, Gluon) with their pure-torch references; nothing here is
imported with attnrt, and importing this package itself needs no Triton."""

from __future__ import annotations

import importlib
from functools import cache

_COMPILE_ERRORS = (("triton.compiler.errors", "CompilationError"),
                   ("triton.runtime.errors", "OutOfResources"),
                   ("triton.runtime.errors", "PTXASError"))


@cache
def compile_error_types() -> tuple[type[BaseException], ...]:
    """Triton's compile-time exception classes present in the installed version (none where
    Triton is missing)."""
    found: list[type[BaseException]] = []
    for module_name, attr in _COMPILE_ERRORS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, attr, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)
