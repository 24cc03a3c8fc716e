"""Import diffusers' model classes with tests/kernels out of sight.

pytest puts tests/ on sys.path (it has no __init__.py), so the package tests/kernels answers
`import kernels`; transformers (which diffusers imports) then takes it for Hugging Face's
`kernels` package and fails on `from kernels import CUDAProperties`. The classes the tests use
are imported once here, with that path entry and module hidden; transformers caches its answer.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

_TESTS = os.path.abspath(Path(__file__).parents[1])


@contextlib.contextmanager
def _without_tests_kernels():
    saved_path, saved_module = sys.path[:], sys.modules.pop("kernels", None)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _TESTS]
    try:
        yield
    finally:
        sys.path[:] = saved_path
        if saved_module is not None:
            sys.modules["kernels"] = saved_module


with _without_tests_kernels(), contextlib.suppress(ImportError):
    import transformers.integrations.hub_kernels  # noqa: F401
    from diffusers import (  # noqa: F401
        CogVideoXTransformer3DModel,
        FluxTransformer2DModel,
        HunyuanVideoTransformer3DModel,
        WanTransformer3DModel,
    )
