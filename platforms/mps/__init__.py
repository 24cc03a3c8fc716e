"""mps platform pack: its facts, probe (probe.py), the memory-bounded SDPA_CHUNKED backend.

TORCH_SDPA (attnrt.backends) also runs here; on MPS its math path materialises the [B, H, N, M]
score matrix, which SDPA_CHUNKED bounds by running SDPA over query chunks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnrt.selection.packs import Platform

if TYPE_CHECKING:
    from attnrt.selection.capability import Reason
    from attnrt.selection.device import Device
    from attnrt.selection.request import AttentionRequest

PLATFORM = Platform(
    name="mps",
    probe_order=40,
    arch_pattern=r"apple",  # one arch: the macOS version (Device.versions) tells stacks apart
    default_arch="apple",
    torch_device_types=("mps",),
    backends={"SDPA_CHUNKED": "attnrt.platforms.mps.sdpa_chunked:SdpaChunkedBackend"},
)


def platform_reasons(request: AttentionRequest, device: Device, name: str) -> list[Reason]:
    """Limits of the MPS stack itself, binding every backend on MPS (dtype_rules.py says which).

    `attnrt.selection.capability.check` calls this for each backend on an mps device, so
    TORCH_SDPA and REFERENCE refuse bf16 before macOS 14 and fp64 just as SDPA_CHUNKED does.
    """
    from attnrt.platforms.mps.dtype_rules import mps_dtype_reasons

    return mps_dtype_reasons(request.dtype, device, name)
