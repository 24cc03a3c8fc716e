"""dtype limits of Apple's MPS stack that depend on the device, not on the kernel.

- float64: the MPS framework has no float64 (PyTorch: "MPS framework doesn't support float64").
- bfloat16: MPSDataTypeBFloat16 exists from macOS 14 (Sonoma) on (Apple MPSDataType docs; PyTorch
  enabled it in pytorch/pytorch#119641 and raises "MPS BFloat16 is only supported on MacOS 14 or
  newer" before that).

`mps_dtype_reasons` is shared by every backend that runs on MPS: it reads the macOS version the
probe stored in Device.versions. A simulated device that names no macOS version is taken to be a
current Mac; a real one whose version could not be read gets bf16 refused, since nothing proves it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from packaging.version import Version

from attnrt.platforms.mps.probe import macos_version
from attnrt.selection.capability import DTYPE, Reason

if TYPE_CHECKING:
    from attnrt.selection.device import Device

MIN_MACOS_BF16 = Version("14.0")
MPS_DTYPES = ("bf16", "fp16", "fp32")


def mps_dtype_reasons(dtype: str, device: Device, name: str) -> list[Reason]:
    """Why `name` cannot take `dtype` on this MPS device (empty: it can, or not an MPS device)."""
    if device.platform != "mps":
        return []
    if dtype not in MPS_DTYPES:
        return [Reason(DTYPE, f"dtype={dtype} is not supported by {name} on mps; supported: "
                              f"{', '.join(MPS_DTYPES)} (the MPS framework has no float64)")]
    if dtype != "bf16":
        return []
    version = macos_version(device)
    if version is None and device.simulated:
        return []
    if version is None:
        return [Reason(DTYPE, f"dtype=bf16 is not supported by {name} on mps with an unknown "
                              f"macOS version; supported: macOS {MIN_MACOS_BF16} or newer",
                       "check platform.mac_ver(); bf16 on MPS needs macOS 14 (Sonoma)")]
    if version < MIN_MACOS_BF16:
        return [Reason(DTYPE, f"dtype=bf16 is not supported by {name} on macOS {version}; "
                              f"supported: macOS {MIN_MACOS_BF16} or newer",
                       "upgrade to macOS 14 (Sonoma) or newer, or run in fp16")]
    return []
