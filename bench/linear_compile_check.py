"""Compile attnrt's linear-attention kernels for a GPU arch offline (no GPU needed) and print
registers and spilled bytes per kernel, for the shipped launch configs (chunked.CONFIGS).

Shapes: B=1, N=1024, H heads, Dk = Dv = D head size (only dtypes, strides and alignment
matter: nothing runs).

    python bench/linear_compile_check.py                 # sm90, D=128, bf16 and fp32
    python bench/linear_compile_check.py --arch 80 --head-size 64
    python bench/linear_compile_check.py --mod elu1      # elu+1 on q and k, fused in the
                                                         # kernels (fuse_mods="kernel")

The kernels compile through the engine's own launches (forward and backward, decay modes 0,
1, 2) with bench/offline_compile.py, so each is specialised as on the GPU (argument alignment
and divisibility, the fused mods' constexpr functions). Run it with the GPU machine's Triton
(3.6) and TRITON_INTERPRET unset. A kernel that cannot compile raises here as on a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_compile import capture, usage  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODS = {"none": None,
        "elu1": lambda x, io: torch.nn.functional.elu(x) + 1,
        "relu": lambda x, io: torch.relu(x)}


def compile_mode(dtype: torch.dtype, mode: int, d: int, heads: int, mod_name: str,
                 arch: int) -> list[str]:
    """One line per kernel of a forward + backward call with decay mode `mode` (0 none, 1 per
    head and token, 2 per key channel)."""
    import attnrt.engine.linear_backends as backends
    from attnrt.engine.linear import LinearAttentionEngine, meta_tensor

    runs_here = backends.unavailable_reason
    backends.unavailable_reason = lambda name, q: None  # CPU tensors stand in for CUDA ones
    try:
        mod = MODS[mod_name]
        meta = [meta_tensor(1, 1024, heads, d, dtype=dtype)] * 3
        engine = LinearAttentionEngine(meta, q_mod=mod, k_mod=mod, backend="triton")
        q, k, v = (torch.randn(1, 1024, heads, d, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        g = None if mode == 0 else -torch.rand((1, 1024, heads) + ((d,) if mode == 2 else ()))
        with capture(arch) as cap:
            out = engine(q, k, v, None if g is None else g.requires_grad_())
            out.backward(torch.randn_like(out))
    finally:
        backends.unavailable_reason = runs_here
    dname = str(dtype).removeprefix("torch.")
    lines = []
    for name, kernel in cap.kernels:
        u = usage(kernel)
        lines.append(f"{name:14s} {dname:8s} G_MODE={mode} mod={mod_name:5s} "
                     f"warps={kernel.metadata.num_warps}: {u['regs']} registers, "
                     f"{u['spill_bytes']} bytes spilled")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--mod", default="none", choices=tuple(MODS),
                        help="a q/k mod fused in the kernels (none: no mod)")
    args = parser.parse_args(argv)
    import triton

    print(f"Triton {triton.__version__}, sm{args.arch}, D={args.head_size}, H={args.heads}")
    for name in args.dtypes.split(","):
        for mode in (0, 1, 2):
            for line in compile_mode(DTYPES[name], mode, args.head_size, args.heads, args.mod,
                                     args.arch):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
