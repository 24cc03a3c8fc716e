"""Block configs for TRITON_FLASH_ATTN (attnrt.kernels.flash.launch) on AMD GPUs, as plain data.

Same shape as configs_cuda.py: keyed by arch ("gfx942", "gfx90a",
"gfx950", "default") and head-size bucket (the head size rounded up to a power of two: 32, 64, 128,
256, the padded BLOCK_D the kernel compiles for). Each entry gives, per kernel ("fwd", "bwd_dkdv",
"bwd_dq"), BLOCK_M, BLOCK_N, num_warps and num_stages; the backend passes the entry as
`flash_attention(..., config=...)`. N and M are runtime arguments, so no entry is keyed on them.

None of these is measured: we have no AMD GPU. They are conservative, from published guidance:
- ROCm docs, "Optimizing Triton kernels" (MI300X workload tuning): num_stages=1 for kernels that
  fuse two GEMMs such as flash attention; num_warps 4 or 8 (a warp is a 64-lane wavefront).
- Triton's fused-attention tutorial (06-fused-attention.py), AMD configs: BLOCK_M 128, BLOCK_N 64,
  num_warps 4, num_stages 1 for D <= 128 on MI200/MI300.
- LDS per CU: 64 KiB on gfx90a (MI200) and gfx942 (MI300), 160 KiB on gfx950 (MI350). Blocks are
  sized so the K and V tiles of the widest D in a bucket, in 16 bits, fit 64 KiB on the first two.
`waves_per_eu` and `matrix_instr_nonkdim`, the AMD-only tuning knobs, are left at Triton's defaults
because the kernel's config accepts only the four keys above.
Replace an entry only with one measured by `attnrt tune` on that arch (record it in the docstring).
"""

from __future__ import annotations

from attnrt.kernels.flash.configs import DEFAULT_TABLE, Config, head_size_bucket, select_from
from attnrt.kernels.flash.configs import make_config as _cfg

__all__ = ["CONFIGS", "FWD_CANDIDATES", "PLATFORM", "forward_candidates", "head_size_bucket",
           "select_config"]

# The platform whose devices these arches name (Device.platform).
PLATFORM = "rocm"

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for fwd, bwd_dkdv, bwd_dq.
_CDNA3: dict[int, Config] = {
    32: _cfg((128, 64, 4, 1), (64, 64, 4, 1), (64, 64, 4, 1)),
    64: _cfg((128, 64, 4, 1), (64, 64, 4, 1), (64, 64, 4, 1)),
    128: _cfg((128, 64, 4, 1), (32, 64, 4, 1), (64, 32, 4, 1)),
    256: _cfg((64, 32, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1)),
}

CONFIGS: dict[str, dict[int, Config]] = {
    "gfx942": _CDNA3,
    # MI200: same LDS as MI300 but fewer, slower matrix cores; a smaller forward M tile at D=128
    # keeps register pressure (and spills) down.
    "gfx90a": {**_CDNA3, 128: _cfg((64, 64, 4, 1), (32, 64, 4, 1), (64, 32, 4, 1))},
    # MI350: 160 KiB of LDS leaves room for a wider N tile at D=256; otherwise as MI300.
    "gfx950": {**_CDNA3, 256: _cfg((64, 64, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1))},
    # RDNA and unknown parts: the kernel's own small defaults, correct everywhere, fast nowhere.
    "default": DEFAULT_TABLE,
}


# Forward candidates for opt-in autotuning (ATTNRT_TRITON_AUTOTUNE=1): the shipped entry and the
# tile shapes AMD's Triton guidance suggests for CDNA (num_stages 1 or 2; 64-lane wavefronts).
_CDNA_CANDIDATES: dict[int, list[tuple]] = {
    32: [(128, 64, 4, 1), (64, 64, 4, 1), (128, 32, 4, 1)],
    64: [(128, 64, 4, 1), (64, 64, 4, 1), (128, 32, 4, 1), (128, 64, 8, 1)],
    128: [(128, 64, 4, 1), (64, 64, 4, 1), (128, 32, 4, 2), (64, 32, 4, 1)],
    256: [(64, 32, 4, 1), (32, 32, 4, 1), (64, 16, 4, 1)],
}
FWD_CANDIDATES: dict[str, dict[int, list[tuple]]] = {
    "gfx942": _CDNA_CANDIDATES, "gfx90a": _CDNA_CANDIDATES, "gfx950": _CDNA_CANDIDATES,
}


def select_config(arch: str, head_size: int, sixteen_bit: bool = True) -> Config:
    """Config for an arch string such as "gfx942"; unknown archs and float32 get "default"."""
    return select_from(CONFIGS, arch, head_size, sixteen_bit)


def forward_candidates(arch: str, head_size: int) -> list[tuple]:
    """Forward tuples to try when autotuning; empty for archs without candidates."""
    return list(FWD_CANDIDATES.get(arch, {}).get(head_size_bucket(head_size), ()))
