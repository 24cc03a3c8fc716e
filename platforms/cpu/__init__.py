"""cpu platform pack: its facts and probe (probe.py); the portable backends serve it."""

import platform as _host

from attnrt.selection.packs import Platform


def host_arch() -> str:
    """The machine name as attnrt spells CPU arches: x86_64, aarch64, ..."""
    machine = _host.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


PLATFORM = Platform(
    name="cpu",
    probe_order=90,  # last: the CPU always answers
    arch_pattern=r"x86_64|aarch64|ppc64le|s390x|riscv64",  # no order: arch ranges cannot name them
    default_arch=host_arch(),
    torch_device_types=("cpu",),
    dist_backend="gloo",  # sequence parallelism on CPU tensors
)
