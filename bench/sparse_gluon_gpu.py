"""The block-sparse forward and backward in Gluon (runtime/kernels/block_sparse/
gluon_fwd_sm90.py, gluon_bwd_sm90.py) against the Triton block-sparse kernels, dense cuDNN
SDPA, our dense kernel and compiled FlexAttention, one table.

Shapes: B batch (1), N tokens, H heads (40), D head size (128); bf16. Lists keep a random 12.5%
of key blocks per query block. Block sizes: shared 128x128 and 128x64 (one 128-row query block
a program), split 64x64 (two 64-row query blocks a program, VSA's cubes). Sparse TFLOP/s count
only the visited blocks (4 * D * block_q * block_k per listed entry; backward 2.5x that more);
"x cuDNN" is dense cuDNN's time over the row's time (ideal 8x), "% cuDNN" the row's TFLOP/s over
dense cuDNN's (how close the visited blocks run to the dense rate). In the forward+backward
sections the Gluon forward rows run the Triton backward; the "Gluon fwd + Gluon bwd" rows add
the Gluon backward (its gradients are checked against the Triton backward's first: WRONG marks
a mismatch), with the ratio to the Triton-backward row and to our dense kernel's fwd+bwd
TFLOP/s. Timed with triton.testing.do_bench (median), all in one process.

    python bench/sparse_gluon_gpu.py --quick    # fwd at N=16384, 32768; fwd+bwd at 32768 (< 75 s)
    python bench/sparse_gluon_gpu.py            # fwd and fwd+bwd at both lengths, longer repeats
    python bench/sparse_gluon_gpu.py --stages 2 3   # also the Gluon kernel with 3-slot rings
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from sparse_gpu import B, D, H, bench_ms, cudnn_dense, dense_flops, fwd_bwd, leaves

BLOCKS = [(128, 128), (128, 64), (64, 64)]
KEEP = 0.125
LENGTHS = (16384, 32768)


def _lists(n: int, bq: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k lists keeping KEEP of the key blocks of each query block."""
    from attnrt.kernels.block_sparse import block_mask_to_index

    nqb, nkb = n // bq, n // bk
    scores = torch.rand(B, H, nqb, nkb, device="cuda")
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, scores.topk(max(1, round(KEEP * nkb)), dim=-1).indices, True)
    return block_mask_to_index(mask)


def _row(case: str, ms: float, flops: float, dense: tuple[float, float], note: str = "") -> None:
    """One table row; dense = (ms, flops) of dense cuDNN in the same section."""
    tflops = flops / ms / 1e9
    dense_tflops = dense[1] / dense[0] / 1e9
    print(f"| {case} | {ms:.3f} | {tflops:.0f} | {dense[0] / ms:.2f}x | "
          f"{100 * tflops / dense_tflops:.0f}% | {note} |", flush=True)


def _time(fn: Callable[[], torch.Tensor], inputs, quick: bool, backward: bool,
          gluon_bwd: tuple[int, int] | None = None) -> float:
    """Median ms of fn (with backward: forward and backward); gluon_bwd: the block sizes whose
    Gluon backward is on for the timed calls (the switch must hold while backward runs)."""
    if not backward:
        with torch.no_grad():
            return bench_ms(fn, quick)
    step = fwd_bwd(fn, inputs)
    from attnrt.kernels.block_sparse import options

    def switched() -> None:  # the Gluon backward off unless asked (it ships on for some sizes)
        with options.gluon_backward(gluon_bwd is not None,
                                    blocks=None if gluon_bwd is None else [gluon_bwd]):
            step()
    return bench_ms(switched, quick)


def _grads(fn: Callable[[], torch.Tensor], inputs, blocks: tuple[int, int] | None):
    """(dq, dk, dv) of fn's output against ones, the Gluon backward on for `blocks` (or
    off), and whether the Gluon backward ran."""
    from attnrt.kernels.block_sparse import gluon_path, options

    gluon = gluon_path.module("backward")
    calls: list[int] = []
    real = gluon.backward if gluon is not None else None
    if gluon is not None:
        gluon.backward = lambda *a: calls.append(1) or real(*a)
    try:
        with options.gluon_backward(blocks is not None, blocks=None if blocks is None
                                    else [blocks]):
            fwd_bwd(fn, inputs)()
    finally:
        if gluon is not None:
            gluon.backward = real
    return [t.grad.clone() for t in inputs], bool(calls)


def _gluon_backward_row(inputs, index, count, bq: int, bk: int, quick: bool, visited: float,
                        dense: tuple[float, float], triton_bwd_ms: float,
                        ours_tflops: float) -> None:
    """The Gluon forward with the Gluon backward, checked against the Triton backward."""
    fn = _sparse(inputs, index, count, bq, bk, True)
    ref, _ = _grads(fn, inputs, None)
    got, ran = _grads(fn, inputs, (bq, bk))
    if not ran:
        print(f"| Gluon fwd + Gluon bwd {bq}x{bk} | - | - | - | - | did not run (off or not "
              "usable; see the log) |", flush=True)
        return
    err = max(_rel(g, r) for g, r in zip(got, ref, strict=True))
    g_ms = _time(fn, inputs, quick, True, (bq, bk))
    flag = "" if err < 2e-2 else " WRONG"
    tflops = visited / g_ms / 1e9
    _row(f"Gluon fwd + Gluon bwd {bq}x{bk} fwd+bwd", g_ms, visited, dense,
         f"{triton_bwd_ms / g_ms:.2f}x the Triton-backward row; {100 * tflops / ours_tflops:.0f}%"
         f" of our dense kernel; max rel. grad diff to Triton {err:.1e}{flag}")


def _sparse(inputs, index, count, bq: int, bk: int, gluon: bool,
            stages: int | None = None) -> Callable[[], torch.Tensor]:
    """Our block-sparse attention with the Gluon forward on (or off) for this call; stages:
    the Gluon kernel's ring slots (None: its default)."""
    from attnrt.kernels.block_sparse import block_sparse_attention, gluon_path, options

    def fn() -> torch.Tensor:
        with options.gluon_forward(gluon, blocks=[(bq, bk)]):
            return block_sparse_attention(*inputs, index, count, block_q=bq, block_k=bk)

    gluon_mod = gluon_path.module()
    if stages is None or gluon_mod is None:
        return fn

    def with_stages() -> torch.Tensor:
        real = gluon_mod.forward
        gluon_mod.forward = lambda *a: real(*a, stages=stages)
        try:
            return fn()
        finally:
            gluon_mod.forward = real
    return with_stages


def _gluon_ran(fn: Callable[[], torch.Tensor]) -> tuple[bool, torch.Tensor]:
    """Runs fn once; whether the Gluon kernel served it (the module's forward was called)."""
    from attnrt.kernels.block_sparse import gluon_path

    gluon = gluon_path.module()
    if gluon is None:
        return False, fn()
    calls: list[int] = []
    real = gluon.forward
    gluon.forward = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        with torch.no_grad():
            out = fn()
    finally:
        gluon.forward = real
    return bool(calls), out


def _flex(inputs, index, count) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    mask = BlockMask.from_kv_blocks(torch.zeros_like(count), torch.zeros_like(index), count,
                                    index, BLOCK_SIZE=128)
    flex = torch.compile(flex_attention)

    def fn() -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in inputs)
        return flex(q, k, v, block_mask=mask).transpose(1, 2)
    return fn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def section(n: int, backward: bool, quick: bool, stages: list[int]) -> None:
    """Dense peers, then per block size: Triton, Gluon (per ring size; checked against Triton
    first), FlexAttention at 128x128."""
    from attnrt.backends.triton_flash import triton_flash

    what = "fwd+bwd" if backward else "fwd"
    mult = 3.5 if backward else 1.0
    dense = (cudnn_dense(n, quick, backward), dense_flops(n, backward))
    _row(f"dense cuDNN SDPA N={n} {what}", dense[0], dense[1], dense)
    inputs = leaves(*[(B, n, H, D)] * 3)
    ours = _time(lambda: triton_flash(*inputs, False, None), inputs, quick, backward)
    _row(f"our dense TRITON_FLASH_ATTN N={n} {what}", ours, dense[1], dense,
         "issue 19: the fine stage's target is 85% (fwd) / 80% of this row's TFLOP/s")
    ours_tflops = dense[1] / ours / 1e9
    for bq, bk in BLOCKS:
        index, count = _lists(n, bq, bk)
        visited = 4.0 * D * bq * bk * float(count.sum()) * mult
        triton_fn = _sparse(inputs, index, count, bq, bk, False)
        ms = _time(triton_fn, inputs, quick, backward)
        _row(f"Triton block-sparse {bq}x{bk} {what}", ms, visited, dense)
        g2_ms = None
        for st in stages:
            gluon_fn = _sparse(inputs, index, count, bq, bk, True, None if st == 2 else st)
            ran, out = _gluon_ran(gluon_fn)
            if not ran:
                print(f"| Gluon {bq}x{bk} stages={st} | - | - | - | - | did not run (off or "
                      "not usable; see the log) |", flush=True)
                continue
            with torch.no_grad():
                err = _rel(out, triton_fn())
            g_ms = _time(gluon_fn, inputs, quick, backward)
            flag = "" if err < 1e-2 else " WRONG"
            _row(f"Gluon block-sparse {bq}x{bk} stages={st} {what}", g_ms, visited, dense,
                 f"{ms / g_ms:.2f}x Triton; rel. diff to Triton {err:.1e}{flag}")
            g2_ms = g_ms if st == 2 else g2_ms
        if backward:
            _gluon_backward_row(inputs, index, count, bq, bk, quick, visited, dense,
                                ms if g2_ms is None else g2_ms, ours_tflops)
        if (bq, bk) == (128, 128):
            flex_fn = _flex(inputs, index, count)
            f_ms = _time(flex_fn, inputs, quick, backward)
            _row(f"FlexAttention 128x128 {what}", f_ms, visited, dense, "same block mask")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stages", type=int, nargs="+", default=[2],
                        help="ring slots of the Gluon kernel to time (2 is its default)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton "
          f"{triton.__version__}; B={B} H={H} D={D} bf16, {100 * KEEP:g}% of key blocks kept")
    print("| case | ms | TFLOP/s (visited) | x cuDNN | % cuDNN TFLOP/s | note |")
    print("|---|---|---|---|---|---|")
    for n in LENGTHS:
        for backward in (False, True):
            if backward and args.quick and n != LENGTHS[-1]:
                continue
            section(n, backward, args.quick, args.stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
