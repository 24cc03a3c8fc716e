"""Why the engine's generated forward is slower than our dense Triton kernel: one GPU call that
times the generated kernel with one change at a time, against the dense kernel's Triton path
and its shipped (Gluon) path at the same shape.

Shapes: B=1, H=24, N=8192, D=128, bf16, forward without grad (the engine's plain softmax
variant, no score_mod, no mask). Each experiment patches the generated source text (or the
tiles) and reports the kernel's milliseconds, TFLOP/s and its difference from the baseline's
output (the patched kernels compute the same attention, except "exp2 (timing only)", which
skips the log2(e) factor and reports how much the transcendental costs).

Experiments (issue 21, bench/NOTES-engine.md has what they showed):
    baseline        the shipped source and tiles
    no-index        walk key blocks by position instead of through the block list
    no-dmask        K/V loads without the head-size column mask (D = BLOCK_D here)
    exp2            tl.exp -> tl.math.exp2 (timing only)
    (1-D row state, once an experiment here, is the codegen's default since an offline
    compile showed [BLOCK_M, 1] state recomputing the exponentials; NOTES-engine.md)
    tiles ...       BLOCK_M, BLOCK_N, warps, stages candidates
The Triton forward is timed with the (default-on) Gluon forward switched off.

Backward (--backward, ALiBi, issue 21's bwd target: >= 1.0x compiled Flex): the backward alone
(fwd+bwd minus fwd) of the engine with each dK/dV and dQ tile candidate, against compiled
Flex's ALiBi backward and our dense Triton backward (no modification) at the same shape.

    python bench/engine_experiments_gpu.py [--n 8192] [--backward]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

B, H, D = 1, 24, 128
TILES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 4),
         (64, 64, 4, 3), (64, 128, 4, 3)]
# dK/dV tiles are (query rows per step, keys per program, warps, stages); dQ (rows, keys, ...).
# The dense kernel's best measured: dK/dV (32, 64, 4, 3), dQ (128, 64, 8, 3) (NOTES-triton-flash).
BWD_TILES = {"dkdv": [(32, 128, 8, 2), (32, 64, 4, 3), (32, 128, 8, 3),
                      (64, 128, 8, 2), (32, 64, 4, 2)],
             "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3)]}


def _time(fn: Callable[[], torch.Tensor], reps: int = 10) -> float:
    """Median ms over `reps` timed runs: engine_gpu.py's timer (this folder is on sys.path
    when the script runs as `python bench/engine_experiments_gpu.py`)."""
    from engine_gpu import bench

    return bench(fn, reps)


def _no_index(src: str) -> str:
    return src.replace("start_n = tl.load(FULL_IDX + list_off + j) * BLOCK_N",
                       "start_n = j * BLOCK_N")


def _no_dmask(src: str) -> str:
    src = src.replace(", mask=offs_d[None, :] < HEAD_DIM, other=0.0)", ")")
    return src.replace(", mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)", ")")


def _exp2(src: str) -> str:
    return src.replace("tl.exp(", "tl.math.exp2(")


PATCHES: dict[str, Callable[[str], str]] = {
    "no-index": _no_index, "no-dmask": _no_dmask, "exp2 (timing only)": _exp2,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--show-source", action="store_true", help="print the baseline source")
    parser.add_argument("--backward", action="store_true",
                        help="the ALiBi backward's tile experiments instead of the forward's")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from attnrt.engine import codegen, kernel
    from attnrt.engine.softmax import AttentionEngine
    from attnrt.kernels.flash.configs import make_config
    from attnrt.kernels.flash.configs_cuda import select_config
    from attnrt.kernels.flash.launch import flash_attention

    if args.backward:
        return backward_experiments(args.n)
    n = args.n
    flops = 4 * B * H * n * n * D
    q, k, v = (torch.randn(B, n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B={B} H={H} N={n} D={D} "
          "bf16, forward, no grad")
    print(f"{'case':<34} {'ms':>8} {'TFLOP/s':>8} {'vs base':>8} {'rel diff':>9}")
    engine = AttentionEngine(None, None, backend="triton")
    original = codegen.source
    from attnrt.engine import gluon_forward

    with torch.no_grad(), gluon_forward.gluon_forward(False):
        base_out = engine(q, k, v).float()
        base_ms = _time(lambda: engine(q, k, v))

        def row(name: str, ms: float, out: torch.Tensor | None) -> None:
            diff = ((out.float() - base_out).norm() / base_out.norm()).item() if out is not None \
                else float("nan")
            print(f"{name:<34} {ms:8.3f} {flops / ms / 1e9:8.0f} {base_ms / ms:7.2f}x "
                  f"{diff:9.1e}", flush=True)

        row("engine baseline (shipped)", base_ms, base_out)
        for name, patch in PATCHES.items():
            kernel.clear_modules()
            kernel.source = lambda variant, flags, p=patch: p(original(variant, flags))
            try:
                out = engine(q, k, v)
                row(f"engine {name}", _time(lambda: engine(q, k, v)), out)
            except Exception as exc:  # noqa: BLE001 - an experiment that fails to compile
                print(f"engine {name}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        kernel.source = original
        shipped = dict(kernel._CUDA_TILES["fwd"])
        for tiles in TILES:
            kernel.clear_modules()
            kernel._CUDA_TILES["fwd"][False] = tiles
            try:
                out = engine(q, k, v)
                row(f"engine tiles {tiles}", _time(lambda: engine(q, k, v)), out)
            except Exception as exc:  # noqa: BLE001
                print(f"engine tiles {tiles}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        kernel._CUDA_TILES["fwd"].update(shipped)
        triton_only = make_config((128, 128, 8, 3), (64, 128, 8, 3), (128, 64, 8, 3))
        for name, cfg in (("dense Triton (128,128,8,3)", triton_only),
                          ("dense shipped sm90 (Gluon)", select_config("sm90", D))):
            out = flash_attention(q, k, v, config=cfg)
            row(name, _time(lambda c=cfg: flash_attention(q, k, v, config=c)), out)
    if args.show_source:
        print(original(engine.variant, kernel.KernelFlags(False, True, ())))
    return 0


def _bwd_ms(call: Callable[..., torch.Tensor], qkv: tuple) -> float:
    """Backward alone: median fwd+bwd minus median fwd, ms (engine_gpu.py's timing)."""
    from engine_gpu import _fwd_bwd

    return _fwd_bwd(call, qkv, 10)[1]


def backward_experiments(n: int) -> int:
    """ALiBi's backward with each dK/dV and dQ tile candidate (the other kernel at its shipped
    tiles), compiled Flex's ALiBi backward and our dense Triton backward as peers."""
    from engine_gpu import _flex_fn

    from attnrt.engine import kernel
    from attnrt.engine.library import AttentionLibrary
    from attnrt.kernels.flash.configs import make_config
    from attnrt.kernels.flash.launch import flash_attention

    flops = 2.5 * 4 * B * H * n * n * D
    qkv = tuple(torch.randn(B, n, H, D, device="cuda", dtype=torch.bfloat16,
                            requires_grad=True) for _ in range(3))
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)], device="cuda")
    alibi = AttentionLibrary("AlibiAttention", "None", head_size=D, backend="triton")

    def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return alibi(q, k, v, [slopes])

    def flex_alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B={B} H={H} N={n} D={D} "
          "bf16, ALiBi backward alone (fwd+bwd minus fwd)")
    print(f"{'case':<40} {'bwd ms':>8} {'TFLOP/s':>8}")

    def row(name: str, ms: float) -> None:
        print(f"{name:<40} {ms:8.3f} {flops / ms / 1e9:8.0f}", flush=True)

    row("compiled Flex ALiBi", _bwd_ms(_flex_fn(flex_alibi), qkv))
    dense = make_config((128, 128, 8, 3), (32, 64, 4, 3), (128, 64, 8, 3))
    row("dense Triton (no modification)",
        _bwd_ms(lambda q, k, v: flash_attention(q, k, v, config=dense), qkv))
    shipped = {name: dict(table) for name, table in kernel._CUDA_TILES.items()}
    for name, candidates in BWD_TILES.items():
        for tiles in candidates:
            kernel.clear_modules()
            kernel._CUDA_TILES[name][False] = tiles
            try:
                row(f"engine ALiBi {name} {tiles}", _bwd_ms(ours, qkv))
            except Exception as exc:  # noqa: BLE001 - a candidate that fails to compile
                print(f"engine ALiBi {name} {tiles}: {type(exc).__name__}: {str(exc)[:100]}",
                      flush=True)
            kernel._CUDA_TILES[name].update(shipped[name])
    kernel.clear_modules()
    return 0


if __name__ == "__main__":
    sys.exit(main())
