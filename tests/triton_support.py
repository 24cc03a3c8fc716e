"""Which Triton versions the CPU interpreter path (TRITON_INTERPRET=1) of our kernels supports.

Triton 3.6's interpreter fails on `tl.range(..., warp_specialize=...)` ("only 0-dimensional
arrays can be converted to Python scalars"); 3.9 runs every interpret test. Compiled kernels on a
GPU are not affected (Triton 3.6 there is fine).
"""

from __future__ import annotations

import importlib.metadata
import os

from packaging.version import InvalidVersion, Version

MIN_INTERPRETER_TRITON = "3.9"


def interpreter_skip_reason(triton_version: str | None, interpreting: bool) -> str | None:
    """Why interpret-marked tests cannot run here, or None where they can."""
    if not interpreting or triton_version is None:
        return None  # compiled on a GPU, or no Triton (the tests skip themselves then)
    try:
        too_old = Version(triton_version).release[:2] < Version(MIN_INTERPRETER_TRITON).release
    except InvalidVersion:
        return None
    if too_old:
        return (f"Triton {triton_version}'s interpreter cannot run these kernels; the "
                f"TRITON_INTERPRET=1 path needs triton >= {MIN_INTERPRETER_TRITON}")
    return None


def installed_triton() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
