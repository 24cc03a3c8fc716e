"""Block configs for TRITON_FLASH_ATTN (attnrt.kernels.flash.launch), as plain data.

Keyed by arch ("sm90", "sm80", "default") and head-size bucket (the head size rounded up to a
power of two: 32, 64, 128, 256, which is the padded BLOCK_D the kernel compiles for). Each entry
gives, per kernel ("fwd", "bwd_dkdv", "bwd_dq"), BLOCK_M, BLOCK_N, num_warps and num_stages; the
backend passes the entry as `flash_attention(..., config=...)`.

Nothing is keyed on the exact sequence length: N and M are runtime kernel arguments, so a new
length never recompiles. Entries are for 16-bit dtypes; float32 (tests only) gets "default".

sm90: measured on one H100 80GB HBM3 (bench/triton_flash_gpu.py, bench/NOTES-triton-flash.md).
sm80: not measured here. Taken from the Triton fused-attention tutorial and the FlashAttention-2
paper's A100 settings (BLOCK_M 128, BLOCK_N 64 for D <= 128 with 4 to 8 warps; smaller blocks
for D = 256 to stay inside 164 KiB of shared memory).
default: small blocks that fit 64 KiB of shared memory (LDS on ROCm, consumer parts); correct
everywhere, fast nowhere.
"""

from __future__ import annotations

from attnrt.kernels.flash.configs import DEFAULT_TABLE, Config, head_size_bucket, select_from
from attnrt.kernels.flash.configs import make_config as _cfg

__all__ = ["CONFIGS", "FWD_CANDIDATES", "PLATFORM", "forward_candidates", "head_size_bucket",
           "select_config"]

# The platform whose devices these arches name (Device.platform).
PLATFORM = "cuda"

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for fwd, bwd_dkdv, bwd_dq.
# "tma": K/V tiles of the forward's unmasked loop come through the Hopper bulk tensor copy;
# the kernel uses it only where D is a power of two and the K/V strides allow a 2D view, and
# takes the pointer path (same result) elsewhere.
CONFIGS: dict[str, dict[int, Config]] = {
    # sm90: measured on H100 (bench/triton_flash_gpu.py); how each entry won, sweep by sweep:
    # bench/NOTES-triton-flash.md, "How the shipped sm90 configs were chosen".
    "sm90": {
        32: _cfg((128, 64, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3)),
        64: _cfg((128, 64, 8, 3), (32, 128, 4, 3, "gluon"), (64, 64, 4, 3),
                 causal=(None, (32, 64, 4, 3, "single_launch", "gluon"), None)),
        128: _cfg((128, 128, 8, 3, "tma", "gluon"), (64, 128, 8, 3, "single_launch", "gluon"),
                  (128, 64, 8, 3),
                  causal=(None, (64, 128, 8, 3, "peel_diagonal", "gluon"), None)),
        256: _cfg((128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)),
    },
    "sm80": {
        32: _cfg((128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 3)),
        64: _cfg((128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 3)),
        128: _cfg((128, 64, 8, 3), (64, 64, 8, 2), (64, 64, 8, 2)),
        256: _cfg((64, 64, 4, 2), (32, 32, 4, 2), (32, 32, 4, 2)),
    },
    "default": DEFAULT_TABLE,
}


# Forward candidates for opt-in autotuning (ATTNRT_TRITON_AUTOTUNE=1), per arch and head-size
# bucket: the shipped entry first, then the closest runners-up of the H100 sweep at N=8192
# (bench/NOTES-triton-flash.md, "Config sweep"); which wins moves with N, causal and the padded
# head sizes (72, 80, 96 run bucket 128 without TMA), which is what tuning is for.
FWD_CANDIDATES: dict[str, dict[int, list[tuple]]] = {
    "sm90": {
        32: [(128, 64, 8, 3), (128, 64, 4, 3, "tma")],
        64: [(128, 64, 8, 3), (128, 64, 4, 3, "tma"), (128, 64, 4, 3)],
        128: [(128, 128, 8, 3, "tma", "gluon"), (128, 128, 8, 3, "tma"), (128, 64, 8, 3),
              (128, 64, 8, 4), (128, 128, 8, 3)],
        256: [(128, 64, 8, 2), (64, 64, 8, 2)],
    },
    "sm80": {
        32: [(128, 64, 4, 3), (64, 64, 4, 3)],
        64: [(128, 64, 4, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (64, 64, 4, 3)],
        256: [(64, 64, 4, 2), (64, 32, 4, 2)],
    },
}

def select_config(arch: str, head_size: int, sixteen_bit: bool = True) -> Config:
    """Config for an arch string such as "sm90"; unknown archs and float32 get "default"."""
    return select_from(CONFIGS, arch, head_size, sixteen_bit)


def forward_candidates(arch: str, head_size: int) -> list[tuple]:
    """Forward tuples to try when autotuning; empty for archs without candidates."""
    return list(FWD_CANDIDATES.get(arch, {}).get(head_size_bucket(head_size), ()))
