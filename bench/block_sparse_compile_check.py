"""Compile the block-sparse Triton kernels (runtime/kernels/block_sparse/jit.py) for a GPU arch
offline (no GPU needed), for every tiling variant a launch plan can ask for, with and without
key_block_valid and row_mask, and print registers and spilled bytes per kernel.

Shapes: B=1, N=M=1000 (tails), H=Hkv=2, D head size, fp16 (only dtypes, strides, alignment and
constexprs matter: nothing runs).

    /work/tr36/bin/python bench/block_sparse_compile_check.py        # Triton 3.6 (the GPU's)
    python bench/block_sparse_compile_check.py --head-size 64 --arch 90

Each variant runs block_sparse_attention's forward and backward on CPU tensors under
bench/offline_compile.capture (the device check patched), so every kernel compiles as a GPU
launch would specialise it. Why it exists: Triton 3.6 refuses device functions whose returns
differ in type across constexpr branches, which the interpreter (and Triton 3.9) accept; the
twelfth session's row-mask and gathered-step kernels failed that way on the GPU only.
A variant that cannot compile prints FAIL with the compiler's message; the exit status counts them.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_compile import capture, usage  # noqa: E402

# (block, step, split, rows_split, row_mask, key_block_valid); warps as the default plan's
VARIANTS = [(64, 1, 1, 1, False, True), (64, 2, 1, 1, False, True), (64, 4, 1, 1, False, False),
            (64, 1, 2, 1, False, True), (64, 2, 2, 1, False, False), (128, 1, 1, 1, False, True),
            (128, 2, 1, 1, False, False), (128, 1, 2, 2, False, True),
            (128, 1, 1, 4, False, False), (64, 1, 1, 1, True, False), (64, 2, 1, 1, True, True),
            (64, 1, 2, 1, True, False), (32, 1, 1, 1, True, False), (32, 2, 1, 1, True, True)]


def compile_variant(block: int, d: int, step: int, split: int, rows_split: int,
                    row_mask: bool, valid: bool, arch: int) -> list[tuple[str, object]]:
    """(kernel name, CompiledKernel) of one forward + backward call with this plan."""
    from attnrt.kernels.block_sparse import block_sparse_attention, checks
    from attnrt.kernels.block_sparse import launch as bs_launch
    from attnrt.kernels.block_sparse import options as bs_options

    table = {bs_options.key(k, block, block, d): {
        "num_warps": bs_options.default_plan(k, block, block, d).num_warps, "num_stages": 2,
        "step": step, "split": split, "rows_split": rows_split if k == "dkdv" else 1}
        for k in bs_options.KERNELS}
    saved = bs_options.LAUNCH_OPTIONS, checks._check_device
    bs_options.LAUNCH_OPTIONS = table
    checks._check_device = lambda q: None  # CPU tensors stand in for CUDA ones
    bs_launch.clear_plans()
    try:
        n, h = 1000, 2
        q, k, v = (torch.randn(1, n, h, d, dtype=torch.float16, requires_grad=True)
                   for _ in range(3))
        nb = -(-n // block)
        index = torch.arange(nb, dtype=torch.int32).expand(1, h, nb, nb).contiguous()
        count = torch.full((1, h, nb), nb, dtype=torch.int32)
        extra = {}
        if valid:
            extra["key_block_valid"] = (n - torch.arange(nb) * block).clamp(max=block).int()
        if row_mask:
            extra["row_mask"] = torch.full((1, h, nb, nb), -1, dtype=torch.int64)
        with capture(arch) as cap:
            out = block_sparse_attention(q, k, v, index, count, block_q=block, block_k=block,
                                         **extra)
            out.backward(torch.randn_like(out))
    finally:
        bs_options.LAUNCH_OPTIONS, checks._check_device = saved
        bs_launch.clear_plans()
    return cap.kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--head-size", type=int, default=128)
    args = parser.parse_args(argv)
    import triton

    print(f"Triton {triton.__version__}, sm{args.arch}, D={args.head_size}, fp16")
    print("block step split rows_split row_mask valid | kernel: registers/spilled bytes")
    failed = 0
    for variant in VARIANTS:
        head = " ".join(f"{x!s:>5}" for x in variant)
        try:
            kernels = compile_variant(*variant[:1], args.head_size, *variant[1:], args.arch)
        except Exception as exc:  # noqa: BLE001 - report every variant, count the failures
            failed += 1
            print(f"{head} | FAIL {type(exc).__name__}: "
                  f"{' | '.join(str(exc).splitlines())[:400]}")
            continue
        cells = []
        for name, kernel in kernels:
            u = usage(kernel)
            cells.append(f"{name}: {u['regs']}/{u['spill_bytes']}")
        print(f"{head} | {', '.join(cells)}")
    print(f"{failed} variant(s) failed to compile")
    return min(failed, 1)


if __name__ == "__main__":
    sys.exit(main())
