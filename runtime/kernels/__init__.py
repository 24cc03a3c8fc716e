"""attnrt's own kernels (Triton, Gluon) with their pure-torch references; nothing here is
imported with attnrt, and importing this package itself needs no Triton."""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

import torch

_COMPILE_ERRORS = (("triton.compiler.errors", "CompilationError"),
                   ("triton.runtime.errors", "OutOfResources"),
                   ("triton.runtime.errors", "PTXASError"))
# torch.compile's failures to build a kernel (Inductor's, and Dynamo's wrapper of them)
TORCH_COMPILE_ERRORS = (("torch._inductor.exc", "InductorError"),
                        ("torch._dynamo.exc", "BackendCompilerFailed"))


@cache
def compile_error_types(names: tuple[tuple[str, str], ...] = _COMPILE_ERRORS,
                        ) -> tuple[type[BaseException], ...]:
    """The exception classes `names` ((module, class) pairs; default: Triton's compile-time
    errors) that the installed packages have (none where a module is missing)."""
    found: list[type[BaseException]] = []
    for module_name, attr in names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, attr, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


@cache
def cuda_properties(device: torch.device) -> Any:
    """torch.cuda.get_device_properties, remembered per device (kernels ask on every call)."""
    return torch.cuda.get_device_properties(device)


def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    props = cuda_properties(device)
    return props.major, props.minor


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host: triton.cdiv is a jit function there, ~1.5 us a call."""
    return -(-a // b)


def next_power_of_2(x: int) -> int:
    """The least power of two >= x (x >= 1), on the host (see cdiv)."""
    return 1 << (x - 1).bit_length()


def reads_as_2d(t: torch.Tensor) -> bool:
    """Whether [B, L, Hx, D] `t` can be read as the 2D TMA tensor [B * L, Hx * D] (rows L*B
    evenly spaced, a head's D elements contiguous, 16-byte aligned base and row stride)."""
    b, rows, _, d = t.shape
    return (t.stride(3) == 1 and t.stride(2) == d and (b == 1 or t.stride(0) == rows * t.stride(1))
            and t.data_ptr() % 16 == 0 and t.stride(1) * t.element_size() % 16 == 0)
