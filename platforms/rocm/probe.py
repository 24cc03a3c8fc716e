"""AMD probe: a HIP build of torch (torch.version.hip). Arch is the gcnArchName, e.g. gfx942.

ROCm builds answer `torch.cuda.*` too, so this probe runs before the CUDA one (see
its Platform.probe_order) and is the only place that trusts `torch.cuda` on a HIP build.
"""

from __future__ import annotations

import torch

from attnrt.platforms.rocm import PLATFORM
from attnrt.selection.device import Device, PlatformUnavailable, torch_versions


def parse_gcn_arch(gcn_arch_name: str) -> str:
    """'gfx942:sramecc+:xnack-' -> 'gfx942'; 'gfx90a' -> 'gfx90a'.

    The part after the first colon lists target features (ECC, XNACK), which change neither the
    instruction set nor which kernels run, so only the processor name is kept.
    """
    arch = gcn_arch_name.split(":", 1)[0].strip().lower()
    if not PLATFORM.is_arch(arch):
        raise PlatformUnavailable(f"gcnArchName={gcn_arch_name!r} is not an AMD GPU name such as "
                                  "gfx90a, gfx942 or gfx950 (optionally with ':sramecc+:xnack-')")
    return arch


def probe() -> Device:
    hip = getattr(torch.version, "hip", None)
    if hip is None:
        raise PlatformUnavailable(f"torch {torch.__version__} is not a ROCm build "
                                  "(torch.version.hip is None)")
    try:
        if not torch.cuda.is_available():
            raise PlatformUnavailable("ROCm torch found no GPU (torch.cuda.is_available() is "
                                      "False; check HIP_VISIBLE_DEVICES and the amdgpu driver)")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
    except RuntimeError as exc:  # a broken driver raises from inside the HIP runtime
        raise PlatformUnavailable(f"ROCm device query failed: {exc}") from None
    arch = parse_gcn_arch(str(getattr(props, "gcnArchName", "") or ""))
    return Device("rocm", arch, name=str(props.name), memory_bytes=int(props.total_memory),
                  versions=(*torch_versions(), ("hip", str(hip))))
