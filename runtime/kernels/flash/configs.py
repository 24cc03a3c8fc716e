"""Shared shape of TRITON_FLASH_ATTN block configs and the one default config; the per-arch
tables are data beside this module (configs_cuda.py, configs_rocm.py, each with PLATFORM,
CONFIGS, select_config and forward_candidates).

A table maps arch -> head-size bucket (the head size rounded up to a power of two, at least 32:
the padded BLOCK_D the kernel compiles for) -> {"fwd" | "bwd_dkdv" | "bwd_dq": {BLOCK_M,
BLOCK_N, num_warps, num_stages, optional maxnreg and switches}}, and optionally
"fwd_causal" | "bwd_dkdv_causal" | "bwd_dq_causal" entries that replace the plain ones for
causal calls. Nothing is keyed on sequence length: N and M are runtime kernel arguments, so a
new length never recompiles.
"""

from __future__ import annotations

Config = dict[str, dict[str, int]]
Table = dict[str, dict[int, Config]]
_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_NAMES = ("fwd", "bwd_dkdv", "bwd_dq")


def make_entry(vals: tuple) -> dict[str, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, *extras): an extra is a switch name (set to 1)
    or a dict such as {"maxnreg": 128}."""
    entry = dict(zip(_KEYS, vals[:4], strict=True))
    for extra in vals[4:]:
        entry.update({extra: 1} if isinstance(extra, str) else extra)
    return entry


def make_config(fwd: tuple, dkdv: tuple, dq: tuple, causal: tuple | None = None) -> Config:
    """Entries from tuples as in make_entry; `causal`, if given, is (fwd, dkdv, dq) for causal
    calls, each None where the plain entry serves both."""
    config = {name: make_entry(vals) for name, vals in zip(_NAMES, (fwd, dkdv, dq), strict=True)}
    for name, vals in zip(_NAMES, causal or (None, None, None), strict=True):
        if vals is not None:
            config[name + "_causal"] = make_entry(vals)
    return config


# Small blocks that fit 64 KiB of shared memory (LDS on ROCm, consumer parts): correct
# everywhere, fast nowhere. The kernel's config when the caller passes none (about 64 KiB at
# D=256 in 16 bits, twice that in float32), and every table's "default" arch up to D=128.
DEFAULT_CONFIG: Config = make_config((64, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1))
DEFAULT_TABLE: dict[int, Config] = {
    32: DEFAULT_CONFIG,
    64: DEFAULT_CONFIG,
    128: DEFAULT_CONFIG,
    256: make_config((32, 32, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1)),
}


def head_size_bucket(head_size: int) -> int:
    """The padded head size the kernel compiles for: the next power of two, at least 32."""
    if not 1 <= head_size <= 256:
        raise ValueError(f"head_size={head_size} has no TRITON_FLASH_ATTN config; supported: "
                         "1 to 256 (the kernel itself takes multiples of 8 from 32)")
    return max(32, 1 << (head_size - 1).bit_length())


def select_from(table: Table, arch: str, head_size: int, sixteen_bit: bool = True) -> Config:
    """A copy of table[arch][bucket]; unknown archs and float32 get the "default" arch."""
    archs = table.get(arch, table["default"]) if sixteen_bit else table["default"]
    return {name: dict(values) for name, values in archs[head_size_bucket(head_size)].items()}
