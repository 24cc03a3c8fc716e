"""What the compiler makes of the AttentionEngine's generated kernels, next to our dense
Triton kernel at the same tiles, without a GPU: registers, spilled bytes, shared memory,
layout conversions and exp2 instructions per kernel, compiled for sm90 as a launch would.

Shapes: B=1, H=24, N=4096, D=128, bf16 (only dtypes and strides matter: nothing runs).

    python bench/engine_compile_check.py [--arch 90] [--variants plain,alibi,softcap,...]

Run it with the GPU machine's Triton (3.6: see bench/offline_compile.py) and TRITON_INTERPRET
unset. Static counts are per kernel: a loop body's exp2 count doubling means Triton
rematerialised the exponentials in a second layout (what 1-D row state and the dK/dV's
[keys, rows] blocks fixed; bench/NOTES-engine.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_compile import capture, usage  # noqa: E402

B, N, H, D = 1, 4096, 24, 128
COLUMNS = ("regs", "spill_bytes", "smem", "convert_layout", "ex2", "wgmma")


def _engines() -> dict:
    from attnrt.engine.library import AttentionLibrary
    from attnrt.engine.softmax import AttentionEngine

    return {
        "plain": (AttentionEngine(None, None, backend="triton"), None),
        "alibi": (AttentionLibrary("AlibiAttention", "None", backend="triton"),
                  {"slopes": torch.rand(H)}),
        "softcap": (AttentionLibrary("SoftcapAttention", "None", backend="triton"), None),
        "sigmoid": (AttentionLibrary("SigmoidAttention", "None", backend="triton"),
                    {"softmax_bias": torch.zeros(1)}),
        "window": (AttentionLibrary("SoftmaxAttention", "SlidingWindow", window=1024,
                                    backend="triton"), None),
    }


def engine_rows(names: list[str], arch: int) -> list[tuple]:
    from attnrt.engine import kernel
    from attnrt.engine.call import check_call

    cuda_tiles = kernel.pick_tiles
    kernel.pick_tiles = lambda dt, d, dv, bs, name: cuda_tiles("cuda", d, dv, bs, name)
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.bfloat16) for _ in range(3))
    rows = []
    try:
        engines = _engines()
        for name in names:
            engine, inputs = engines[name]
            kernel.clear_modules()
            call = check_call(engine._checked, q, k, v, inputs, None, None, None, None, None,
                              engine.block_size)
            ins = [call.inputs[n] for n in engine.variant.input_names]
            with capture(arch) as cap, torch.no_grad():
                run = kernel.EngineRun(engine.variant, engine.fns, call, engine._scale(q), ())
                out, fin = run.forward(q, k, v, ins)
                run.backward(q, k, v, out, fin, ins, torch.randn_like(out))
            for kname, compiled in cap.kernels:
                tiles = run.tiles[{"engine_fwd": "fwd", "engine_bwd_dq": "dq"}.get(
                    kname, "dkdv")]
                rows.append((f"engine {name}", kname, (tiles.bm, tiles.bn, tiles.warps,
                                                       tiles.stages), usage(compiled)))
    finally:
        kernel.pick_tiles = cuda_tiles
        kernel.clear_modules()
    return rows


def dense_rows(arch: int) -> list[tuple]:
    """Our dense kernel's Triton forward and backward at the engine's tiles."""
    import attnrt.kernels.flash.launch as launch
    from attnrt.engine.kernel import _CUDA_TILES
    from attnrt.kernels.flash.configs import make_config

    t = {name: _CUDA_TILES[name][False] for name in ("fwd", "dkdv", "dq")}
    checks = launch.check_inputs
    launch.check_inputs = lambda *args, **kwargs: None  # CPU tensors stand in for CUDA ones
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    try:
        with capture(arch) as cap:
            out = launch.flash_attention(q, k, v, config=make_config(t["fwd"], t["dkdv"],
                                                                     t["dq"]))
            out.backward(torch.randn_like(out))
    finally:
        launch.check_inputs = checks
    names = iter(("fwd", "dkdv", "dq"))
    return [("dense Triton", kname, t[next(names)] if kname != "_bwd_delta_kernel" else "-",
             usage(compiled)) for kname, compiled in cap.kernels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--variants", default="plain,alibi,softcap,sigmoid,window")
    args = parser.parse_args(argv)
    import triton

    print(f"Triton {triton.__version__}, sm{args.arch}, B={B} N={N} H={H} D={D} bf16")
    print(f"{'variant':<16} {'kernel':<18} {'tiles':<16} " + " ".join(f"{c:>14}" for c in
                                                                    COLUMNS))
    for variant, kname, tiles, u in dense_rows(args.arch) + engine_rows(
            args.variants.split(","), args.arch):
        print(f"{variant:<16} {kname:<18} {str(tiles):<16} " + " ".join(
            f"{u[c]!s:>14}" for c in COLUMNS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
