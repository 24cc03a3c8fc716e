"""CPU probe: always answers. Arch is the machine name (x86_64, aarch64)."""

from __future__ import annotations

import os
import platform as host

import torch

from attnrt.platforms.cpu import host_arch
from attnrt.selection.device import Device, torch_versions


def probe() -> Device:
    arch = host_arch()
    return Device("cpu", arch, name=_cpu_name() or arch, memory_bytes=_memory_bytes(),
                  versions=(*torch_versions(), ("threads", str(torch.get_num_threads()))))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return host.processor()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
