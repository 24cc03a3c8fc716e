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
    # H100, bf16, B=1 H=24, N=8192, lowest geometric mean of causal and full time; 2026-11-25,
    # Triton 3.6 (bench/NOTES-triton-flash.md). Bucket 32 was not swept: it copies bucket 64.
    # Re-swept 2026-11-25 17:32/17:38 UTC, per mask, against the new switches: these entries
    # still win both full and causal (D=128 bwd at N=8192: split 5.84 / 3.69 ms full / causal;
    # best one-launch 5.97 / 3.76; best atomic_dq 6.58 / 3.97; fwd maxnreg=128 at 2 CTAs/SM
    # 419 vs 474 TFLOP/s at N=4096), so no "_causal" entries and no switches are shipped.
    # Re-swept 2026-11-25 (third session) after the backward loops stopped making ptxas
    # serialize their wgmmas: D=128 full now runs FlexAttention's blocks in one launch (424 /
    # 418 TFLOP/s bwd at N=8192 / 16384, vs 392 / 405 for the split (32,64,4,3) entry and 421 /
    # 430 for compiled flex in the same run); causal keeps the split entry (372 / 382; one
    # launch 358 / 361, flex 384 / 400). D=64 keeps its entry (369 full, 340 causal at 16384).
    # Fourth session, same script (causal bwd at N=8192, TFLOP/s): D=128 causal now peels the
    # diagonal steps with FlexAttention's blocks, 370 vs 341 for the split (32,64,4,3) entry;
    # D=64 causal runs (32,64,4,3) in one launch, 306 vs 293 for (32,128,4,3).
    # Fifth session: D=128 forwards go through the Gluon ping-pong kernel ("gluon", sm90 and
    # D=128 exactly; 128-row tiles, BLOCK_N 128, 2 K/V slots): 599-651 TFLOP/s full, 466-604
    # causal at N=4096-32768 vs 477-510 / 379-500 for the Triton forward (H100, same run). At
    # D=64 the Gluon kernel did not beat the Triton one (413-431 vs 422-433 full, 295-413 vs
    # 302-431 causal), so bucket 64 keeps it off.
    # Seventh session: the D=128 backward and the non-causal D=64 one go through the Gluon
    # warp-specialized backward ("gluon" on bwd_dkdv; dQ by TMA reduce-add; D=64 or 128
    # exactly, else the entry's Triton kernels). H100, B=1 H=24, N=4096-32768, over cuDNN,
    # Gluon vs Triton: D=128 full 0.88-0.93 vs 0.74-0.80, causal 0.84-0.89 vs 0.78-0.87 (0.86
    # vs 0.89 at N=4096, the one cell it trails); D=64 full 0.78-0.90 vs 0.78-0.80. D=64
    # causal keeps the Triton kernels: Gluon ahead only from N=16384 (0.80-0.84 vs 0.78-0.80;
    # 0.85-0.90 vs 1.00 at N=4096).
    # Ninth session: D=64 causal goes through the Gluon backward too, with one loop masking the
    # steps that need it (PEELED_HEAD_SIZES leaves D=64 out). Same run, over cuDNN, Triton /
    # Gluon one loop / Gluon peeled: N=4096 1.01 / 0.94 / 0.89, 8192 0.89 / 0.87 / 0.86,
    # 16384 0.78 / 0.84 / 0.81, 32768 0.81 / 0.90 / 0.85: the floor moves from 0.78 to 0.84.
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
