"""What the compiler makes of the AttentionEngine's generated kernels, next to our dense
Triton kernel at the same tiles, without a GPU: registers, spilled bytes, shared memory,
layout conversions and exp2 instructions per kernel, compiled for sm90 as a launch would.

Shapes: B=1, H=24, N=4096, D=128, bf16 (only dtypes and strides matter: nothing runs).

    python bench/engine_compile_check.py [--arch 90] [--variants plain,alibi,softcap,...]
                                         [--gluon plain,alibi,...] [--gluon-only]

Run it with the GPU machine's Triton (3.6: see bench/offline_compile.py) and TRITON_INTERPRET
unset. Static counts are per kernel: a loop body's exp2 count doubling means Triton
rematerialised the exponentials in a second layout (what 1-D row state and the dK/dV's
[keys, rows] blocks fixed; bench/NOTES-engine.md).

The Gluon rows compile the engine's generated Gluon sm90 forward (engine/gluon_forward.py)
through the same launch path, its device check patched here (CPU tensors stand in); the
compile takes a few seconds per variant. Its registers are the kernel's; the consumer
warpgroups run with 240 per thread (setmaxnreg), the producer warp with 24.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_compile import capture, usage  # noqa: E402

B, N, H, D = 1, 4096, 24, 128
COLUMNS = ("regs", "spill_bytes", "smem", "convert_layout", "ex2", "wgmma", "wgmma_serialized")


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
        "causal": (AttentionLibrary("SoftmaxAttention", "Causal", backend="triton"), None),
        "retention": (AttentionLibrary("RetentionAttention", "Causal", backend="triton"),
                      {"log_decay": -torch.rand(H)}),
        "relpos_bias": (_relpos(), {"bias": torch.randn(H, 2 * N - 1)}),
        "document": (AttentionLibrary("SoftmaxAttention", "Document", backend="triton"),
                     {"document_ids": (torch.arange(N) * 3 // N).to(torch.int32)}),
        "prefix": (AttentionLibrary("SoftmaxAttention", "PrefixLM", prefix=100,
                                    backend="triton"), None),
    }


def _relpos():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.engine.cases import relpos_case

    return relpos_case(N).make("triton")


def _checked(engine, inputs, q, k, v) -> tuple:
    """(the engine's checked call, its custom inputs in kernel order) for q, k, v."""
    from attnrt.engine.call import check_call

    call = check_call(engine._checked, q, k, v, inputs, None, None, None, None, None,
                      engine.block_size)
    return call, [call.inputs[n] for n in engine.variant.input_names]


def engine_rows(names: list[str], arch: int) -> list[tuple]:
    from attnrt.engine import kernel

    cuda_tiles = kernel.pick_tiles
    kernel.pick_tiles = lambda dt, d, dv, bs, name: cuda_tiles("cuda", d, dv, bs, name)
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.bfloat16) for _ in range(3))
    rows = []
    try:
        engines = _engines()
        for name in names:
            engine, inputs = engines[name]
            kernel.clear_modules()
            call, ins = _checked(engine, inputs, q, k, v)
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


def gluon_rows(names: list[str], arch: int) -> list[tuple]:
    """The generated Gluon forward of each variant, as EngineRun.forward launches it."""
    from attnrt.engine import gluon_forward, kernel

    device_reason = gluon_forward._device_reason
    gluon_forward._device_reason = lambda q: None  # CPU tensors stand in for CUDA ones
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.bfloat16) for _ in range(3))
    rows = []
    try:
        engines = _engines()
        for name in names:
            engine, inputs = engines[name]
            call, ins = _checked(engine, inputs, q, k, v)
            with capture(arch) as cap, torch.no_grad(), gluon_forward.gluon_forward(True):
                run = kernel.EngineRun(engine.variant, engine.fns, call, engine._scale(q), ())
                served = gluon_forward.forward(run, q, k, v, ins)
            if served is None:
                raise RuntimeError(f"{name}: {gluon_forward.last_served()}")
            block_n = gluon_forward.block_n_of(run)
            for kname, compiled in cap.kernels:
                rows.append((f"gluon {name}", kname, (gluon_forward.BLOCK_M, block_n, "4+4+1",
                                                      2), usage(compiled)))
    finally:
        gluon_forward._device_reason = device_reason
        gluon_forward.reset()
    return rows


def dense_gluon_rows(arch: int) -> list[tuple]:
    """Our dense Gluon forward (TRITON_FLASH_ATTN's sm90 path) at the same tiles."""
    from attnrt.kernels.flash import gluon_fwd_sm90

    q, k, v = (torch.randn(B, N, H, D, dtype=torch.bfloat16) for _ in range(3))
    with capture(arch) as cap:
        gluon_fwd_sm90.forward(q, k, v, False, D ** -0.5, 128, torch.empty_like(q),
                               torch.empty(B, H, N))
    return [("dense Gluon", kname, (128, 128, "4+4+1", 2), usage(compiled))
            for kname, compiled in cap.kernels]


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
    parser.add_argument("--gluon", default="plain,alibi,softcap,sigmoid,window,causal,"
                        "retention,relpos_bias,document,prefix",
                        help="variants of the Gluon forward")
    parser.add_argument("--gluon-only", action="store_true",
                        help="only the Gluon forward rows (and the dense Gluon forward's)")
    args = parser.parse_args(argv)
    import triton

    print(f"Triton {triton.__version__}, sm{args.arch}, B={B} N={N} H={H} D={D} bf16")
    print(f"{'variant':<16} {'kernel':<18} {'tiles':<16} " + " ".join(f"{c:>14}" for c in
                                                                    COLUMNS))
    rows = dense_gluon_rows(args.arch) + gluon_rows(
        [g for g in args.gluon.split(",") if g], args.arch)
    if not args.gluon_only:
        rows = dense_rows(args.arch) + engine_rows(args.variants.split(","), args.arch) + rows
    for variant, kname, tiles, u in rows:
        print(f"{variant:<16} {kname:<18} {str(tiles):<16} " + " ".join(
            f"{u[c]!s:>14}" for c in COLUMNS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
