"""AMD probe: a HIP build of torch (torch.version.hip). Arch is the gcnArchName, e.g. gfx942."""

from __future__ import annotations

import torch

from attnrt.device import Device, PlatformUnavailable, torch_versions


def parse_gcn_arch(gcn_arch_name: str) -> str:
    """'gfx942:sramecc+:xnack-' -> 'gfx942'."""
    return gcn_arch_name.split(":", 1)[0].strip().lower()


def probe() -> Device:
    if torch.version.hip is None:
        raise PlatformUnavailable(f"torch {torch.__version__} is not a ROCm build")
    if not torch.cuda.is_available():
        raise PlatformUnavailable("ROCm torch found no GPU (torch.cuda.is_available() is False)")
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    arch = parse_gcn_arch(getattr(props, "gcnArchName", "") or "")
    if not arch:
        raise PlatformUnavailable(f"device {props.name!r} reports no gcnArchName")
    return Device("rocm", arch, name=props.name, memory_bytes=props.total_memory,
                  versions=(*torch_versions(), ("hip", str(torch.version.hip))))
