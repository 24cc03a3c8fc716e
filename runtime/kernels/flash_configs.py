"""Shared shape of TRITON_FLASH_ATTN block configs; the per-arch tables are data in the packs
(attnrt.platforms.<platform>.triton_flash_configs, each with CONFIGS and select_config).

A table maps arch -> head-size bucket (the head size rounded up to a power of two, at least 32:
the padded BLOCK_D the kernel compiles for) -> {"fwd" | "bwd_dkdv" | "bwd_dq": {BLOCK_M,
BLOCK_N, num_warps, num_stages}}. Nothing is keyed on sequence length: N and M are runtime
kernel arguments, so a new length never recompiles.
"""

from __future__ import annotations

Config = dict[str, dict[str, int]]
Table = dict[str, dict[int, Config]]
_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def make_config(fwd: tuple, dkdv: tuple[int, int, int, int],
                dq: tuple[int, int, int, int]) -> Config:
    """Tuples of (BLOCK_M, BLOCK_N, num_warps, num_stages); fwd may add switch names ("tma")."""
    entry = {name: dict(zip(_KEYS, vals[:4], strict=True))
             for name, vals in (("fwd", fwd), ("bwd_dkdv", dkdv), ("bwd_dq", dq))}
    entry["fwd"].update({switch: 1 for switch in fwd[4:]})
    return entry


# Small blocks that fit 64 KiB of shared memory (LDS on ROCm, consumer parts): correct
# everywhere, fast nowhere. Every table's "default" arch.
DEFAULT_TABLE: dict[int, Config] = {
    32: make_config((64, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1)),
    64: make_config((64, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1)),
    128: make_config((64, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1)),
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
