"""NVIDIA probe: torch.cuda on a build without HIP. Arch is the compute capability, e.g. sm90."""

from __future__ import annotations

import torch

from attnrt.selection.device import Device, PlatformUnavailable, torch_versions


def probe() -> Device:
    if torch.version.hip is not None:
        raise PlatformUnavailable(f"this torch is a ROCm build (HIP {torch.version.hip})")
    if torch.version.cuda is None:
        raise PlatformUnavailable(f"torch {torch.__version__} is built without CUDA")
    if not torch.cuda.is_available():
        raise PlatformUnavailable("torch.cuda.is_available() is False (no GPU or no driver)")
    try:
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        props = torch.cuda.get_device_properties(index)
    except (RuntimeError, AssertionError) as exc:  # e.g. CUDA re-initialised in a forked child
        raise PlatformUnavailable(f"CUDA device query failed: {exc}") from None
    return Device("cuda", f"sm{major}{minor}", name=props.name, memory_bytes=props.total_memory,
                  versions=(*torch_versions(), *_stack_versions()))


def _stack_versions() -> tuple[tuple[str, str], ...]:
    versions = [("cuda", str(torch.version.cuda))]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if cudnn:
        versions.append(("cudnn", str(cudnn)))
    driver = getattr(torch._C, "_cuda_getDriverVersion", None)
    if callable(driver):
        code = int(driver())
        versions.append(("driver_api", f"{code // 1000}.{code % 1000 // 10}"))
    return tuple(versions)
