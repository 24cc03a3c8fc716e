"""Sparse attention on one GPU: VSA and the block-sparse kernel against dense cuDNN SDPA, our
dense TRITON_FLASH_ATTN kernel and compiled FlexAttention, in one table (issue 19's speed list).

Shapes: B batch (1), N tokens, S = 64 * C tiled slots (C cubes), H heads (40), D head size (128);
bf16. Dense TFLOP/s = 4 * B * H * N^2 * D / time (backward 2.5x that); sparse TFLOP/s count only
the blocks visited. "ideal" = the speed-up over dense if time followed the attended pairs alone
(1 / density, times (N / S)^2 where cube padding adds slots). Timed with
triton.testing.do_bench (median) on torch.randn inputs.

    python bench/sparse_gpu.py            # the full table (a few minutes on an H100)
    python bench/sparse_gpu.py --quick    # fewer rows and repeats (about a minute)
    python bench/sparse_gpu.py --sweep    # first time launch plans (warps, stages, blocks per
                                          # step, row split), then the table with the winners
    python bench/sparse_gpu.py --sweep --only fine,flex   # the plan sweep and kernel rows only
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, H, D = 1, 40, 128
DTYPE = torch.bfloat16
GRID_76K = (20, 48, 80)
WAN = {"wan480p": (21, 30, 52), "wan720p": (21, 45, 80)}
FLEX_N = 32768
SWEEP = (0.5, 0.75, 0.875, 0.9375)
ROWS: list[dict] = []


def bench_ms(fn: Callable[[], object], quick: bool) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25 if quick else 100, rep=50 if quick else 300,
                          return_mode="median"))


def dense_flops(n: int, backward: bool = False) -> float:
    return 4.0 * B * H * n * n * D * (3.5 if backward else 1.0)


def row(name: str, ms: float, flops: float, base_ms: float | None = None,
        ideal: float | None = None, note: str = "") -> None:
    r = {"case": name, "ms": ms, "tflops": flops / ms / 1e9, "speedup": None, "ideal": ideal,
         "note": note}
    if base_ms is not None:
        r["speedup"] = base_ms / ms
    ROWS.append(r)
    print(_fmt(r), flush=True)


def _fmt(r: dict) -> str:
    sp = f"{r['speedup']:6.2f}x" if r["speedup"] is not None else "      -"
    ideal = f"{r['ideal']:6.2f}x" if r["ideal"] is not None else "      -"
    pct = (f"{100 * r['speedup'] / r['ideal']:5.0f}%" if r["speedup"] and r["ideal"]
           else "     -")
    return (f"{r['case']:<46} {r['ms']:9.3f} {r['tflops']:8.1f} {sp} {ideal} {pct}  "
            f"{r['note']}")


def leaves(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    return [torch.randn(*s, device="cuda", dtype=DTYPE, requires_grad=True) for s in shapes]


def fwd_bwd(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for t in inputs:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))
    return run


def cudnn_dense(n: int, quick: bool, backward: bool) -> float:
    q, k, v = leaves(*[(B, n, H, D)] * 3)

    def fn() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2))
        return o.transpose(1, 2)

    if not backward:
        with torch.no_grad():
            return bench_ms(fn, quick)
    return bench_ms(fwd_bwd(fn, [q, k, v]), quick)


def vsa_ms(shape: tuple[int, int, int], sparsity: float, quick: bool,
           backward: bool) -> tuple[float, object]:
    """VSA forward (coarse + fine + gate) on the tiled layout, or forward + backward."""
    from attnrt.sparse.vsa_backend import VideoSparseAttentionImpl
    from attnrt.sparse.vsa_metadata import VideoSparseAttentionMetadataBuilder

    md = VideoSparseAttentionMetadataBuilder().build(0, shape, (1, 1, 1), sparsity,
                                                     torch.device("cuda"))
    inputs = leaves(*[(B, md.padded_seq_length, H, D)] * 4)
    impl = VideoSparseAttentionImpl(H, D, D ** -0.5)

    def fn() -> torch.Tensor:
        return impl.forward(*inputs, md)

    if not backward:
        with torch.no_grad():
            return bench_ms(fn, quick), md
    return bench_ms(fwd_bwd(fn, inputs), quick), md


def vsa_ideal(md, sparsity: float) -> float:
    from attnrt.sparse.vsa_metadata import cur_topk

    c = md.variable_block_sizes.numel()
    n, s = md.total_seq_length, md.padded_seq_length
    return (n / s) ** 2 * c / cur_topk(sparsity, c)


def vsa_rows(quick: bool) -> None:
    n = math.prod(GRID_76K)
    for backward in (False, True):
        what = "fwd+bwd" if backward else "fwd"
        dense = cudnn_dense(n, quick, backward)
        row(f"dense cuDNN N={n} {what}", dense, dense_flops(n, backward))
        ms, md = vsa_ms(GRID_76K, 0.875, quick, backward)
        row(f"VSA 20x48x80 s=0.875 {what}", ms, dense_flops(n, backward) / vsa_ideal(md, 0.875),
            dense, vsa_ideal(md, 0.875), "target >= 6.5x fwd, 5.5x fwd+bwd")
    for name, shape in WAN.items():
        n = math.prod(shape)
        for backward in (False,) if quick else (False, True):
            what = "fwd+bwd" if backward else "fwd"
            dense = cudnn_dense(n, quick, backward)
            row(f"dense cuDNN N={n} {what}", dense, dense_flops(n, backward))
            ms, md = vsa_ms(shape, 0.875, quick, backward)
            ideal = vsa_ideal(md, 0.875)
            row(f"VSA {name} {'x'.join(map(str, shape))} {what}", ms,
                dense_flops(n, backward) / ideal, dense, ideal, "target >= 80% of ideal")


def parts_rows(quick: bool) -> None:
    """Where VSA's forward time goes at 20x48x80, s=0.875: each pool, the whole coarse stage
    (pool, scores, top-k, coarse attention), the fine stage on VSA's own lists, the gate. The
    faster pool is kept for the rows after this one (vsa_pool.POOL)."""
    from attnrt.sparse import vsa, vsa_pool
    from attnrt.sparse.vsa_metadata import VideoSparseAttentionMetadataBuilder, cur_topk

    md = VideoSparseAttentionMetadataBuilder().build(0, GRID_76K, (1, 1, 1), 0.875,
                                                     torch.device("cuda"))
    q, k, v, gate = leaves(*[(B, md.padded_seq_length, H, D)] * 4)
    sizes = md.variable_block_sizes
    topk = cur_topk(0.875, sizes.numel())
    pools = {}
    with torch.no_grad():
        for pool in vsa_pool.POOLS:
            pools[pool] = bench_ms(lambda p=pool: vsa_pool.pool_qkv(q, k, v, sizes, p), quick)
            row(f"VSA part: pool q,k,v ({pool})", pools[pool], 0.0)
        vsa_pool.POOL = min(pools, key=pools.__getitem__)
        print(f"  # runtime/sparse/vsa_pool.py: POOL = {vsa_pool.POOL!r} (faster here)")
        coarse, index = vsa.coarse_stage(q, k, v, sizes, topk, D ** -0.5)
        row(f"VSA part: coarse stage (pool={vsa_pool.POOL})",
            bench_ms(lambda: vsa.coarse_stage(q, k, v, sizes, topk, D ** -0.5), quick), 0.0)
        count = torch.full(index.shape[:3], topk, dtype=torch.int32, device="cuda")
        fine = _sparse_fn([q, k, v], index, count, 64)
        row("VSA part: fine stage (VSA's lists)", bench_ms(fine, quick),
            4.0 * B * H * D * 64 * 64 * float(count.sum()))
        out = fine()
        c = sizes.numel()
        row("VSA part: gate (addcmul)", bench_ms(lambda: torch.addcmul(
            out.view(B, c, 64, H, D), gate.view(B, c, 64, H, D), coarse[:, :, None]), quick), 0.0)


def sweep_rows(quick: bool) -> None:
    n = math.prod(GRID_76K)
    dense = cudnn_dense(n, quick, False)
    points = SWEEP[2:] if quick else SWEEP
    for sparsity in points:
        ms, md = vsa_ms(GRID_76K, sparsity, quick, False)
        ideal = vsa_ideal(md, sparsity)
        row(f"VSA sweep s={sparsity} fwd", ms, dense_flops(n) / ideal, dense, ideal,
            "vs dense cuDNN fwd")


def _fine_inputs(block: int, n: int, keep: float, block_k: int | None = None
                 ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """q, k, v [B, n, H, D] and random top-k key blocks (fraction `keep`) per query block;
    query blocks of `block` rows, key blocks of `block_k` (default: `block`)."""
    from attnrt.kernels.block_sparse import block_mask_to_index

    nqb, nb = n // block, n // (block_k or block)
    topk = max(1, round(keep * nb))
    scores = torch.rand(B, H, nqb, nb, device="cuda")
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, scores.topk(topk, dim=-1).indices, True)
    index, count = block_mask_to_index(mask)
    return leaves(*[(B, n, H, D)] * 3), index, count


def _sparse_fn(inputs, index, count, block: int, block_k: int | None = None
               ) -> Callable[[], torch.Tensor]:
    from attnrt.kernels.block_sparse import block_sparse_attention

    def fn() -> torch.Tensor:
        return block_sparse_attention(*inputs, index, count, block_q=block,
                                      block_k=block_k or block)
    return fn


def _time(fn: Callable[[], torch.Tensor], inputs, quick: bool, backward: bool) -> float:
    if not backward:
        with torch.no_grad():
            return bench_ms(fn, quick)
    return bench_ms(fwd_bwd(fn, inputs), quick)


def fine_rows(quick: bool) -> None:
    """The fine stage alone at 64-token cubes (12.5% kept) vs our dense kernel, per TFLOP/s."""
    from attnrt.backends.triton_flash import triton_flash

    n = math.prod(GRID_76K)
    inputs, index, count = _fine_inputs(64, n, 0.125)
    visited = 4.0 * D * 64 * 64 * float(count.sum())
    for backward in (False, True):
        what = "fwd+bwd" if backward else "fwd"
        mult = 3.5 if backward else 1.0
        dense = _time(lambda: triton_flash(*inputs, False, None), inputs, quick, backward)
        row(f"TRITON_FLASH_ATTN dense N={n} {what}", dense, dense_flops(n, backward))
        ms = _time(_sparse_fn(inputs, index, count, 64), inputs, quick, backward)
        ratio = (visited * mult / ms) / (dense_flops(n, backward) / dense)
        row(f"fine stage 64x64 blocks 12.5% {what}", ms, visited * mult, dense, None,
            f"{100 * ratio:.0f}% of dense kernel TFLOP/s (target {85 if not backward else 80}%)")


def flex_rows(quick: bool) -> None:
    """128-token blocks, the same random top-k mask for both, vs compiled FlexAttention."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    inputs, index, count = _fine_inputs(128, FLEX_N, 0.125)
    zeros = torch.zeros_like(count)
    block_mask = BlockMask.from_kv_blocks(zeros, torch.zeros_like(index), count, index,
                                          BLOCK_SIZE=128)
    flex = torch.compile(flex_attention)
    visited = 4.0 * D * 128 * 128 * float(count.sum())

    def flex_fn() -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in inputs)
        return flex(q, k, v, block_mask=block_mask).transpose(1, 2)

    with torch.no_grad():  # same mask, same answer: else the comparison means nothing
        diff = (flex_fn() - _sparse_fn(inputs, index, count, 128)()).abs().max().item()
    print(f"  FlexAttention vs block-sparse kernel, same mask: max |diff| = {diff:.3g}")
    for backward in (False,) if quick else (False, True):
        what = "fwd+bwd" if backward else "fwd"
        mult = 3.5 if backward else 1.0
        dense = cudnn_dense(FLEX_N, quick, backward)
        row(f"dense cuDNN N={FLEX_N} {what}", dense, dense_flops(FLEX_N, backward))
        f_ms = _time(flex_fn, inputs, quick, backward)
        row(f"FlexAttention 128-blocks 12.5% {what}", f_ms, visited * mult, dense, 8.0,
            "vs dense cuDNN")
        ms = _time(_sparse_fn(inputs, index, count, 128), inputs, quick, backward)
        row(f"block-sparse 128x128 12.5% {what}", ms, visited * mult, dense, 8.0,
            f"{f_ms / ms:.2f}x FlexAttention (target {1.3 if not backward else 1.2}x)")


def _candidates(kernel: str, bq: int, bk: int, quick: bool) -> list[dict[str, int]]:
    """Plans to time for one kernel: warps x stages x step x split (x rows_split for dK/dV
    of 128-row query blocks, whose whole-block steps spill registers on sm90)."""
    from itertools import product

    from attnrt.kernels.block_sparse import options

    stages = (2, 3) if quick else ((2, 3, 4) if kernel == "fwd" else (1, 2, 3))
    steps = (1, 2) if quick or max(bq, bk) >= 128 else (1, 2, 4)
    splits = (1,) if quick or max(bq, bk) < 128 else (1, 2)
    rows_splits = (1, 2, 4) if kernel == "dkdv" and bq >= 128 else (1,)
    out = []
    for w, st, step, split, rows in product((4, 8), stages, steps, splits, rows_splits):
        plan = options.Plan(w, st, step, split, rows)
        if options.valid_plan(kernel, plan, bq, bk):
            out.append({"num_warps": w, "num_stages": st, "step": step, "split": split,
                        "rows_split": rows})
    return out


def _sweep_kernel(kernel: str, bq: int, bk: int, inputs, index, count, quick: bool,
                  deadline: float) -> dict[str, int] | None:
    """Times every candidate of one kernel (the others at their current plans); returns the
    fastest plan that ran as asked (not fitted down) and matched the default plan's output."""
    from attnrt.kernels.block_sparse import launch, options

    key = options.key(kernel, bq, bk, D)
    fn = _sparse_fn(inputs, index, count, bq, bk)
    options.LAUNCH_OPTIONS.pop(key, None)
    launch.clear_plans()
    with torch.no_grad():
        expect = fn().float()
    timings = []
    for opt in _candidates(kernel, bq, bk, quick):
        if time.monotonic() > deadline:
            print(f"  {key}: sweep budget spent, keeping the best so far", flush=True)
            break
        options.LAUNCH_OPTIONS[key] = opt
        launch.clear_plans()
        try:
            ms = _time(fn, inputs, quick, kernel != "fwd")
            with torch.no_grad():
                err = ((fn().float() - expect).norm() / expect.norm()).item()
        except Exception as exc:  # noqa: BLE001 - a plan that cannot compile is reported, skipped
            print(f"  {key} {opt}: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
            continue
        ran = {p for (k, *_), p in launch.chosen_plans().items() if k == kernel}
        if ran != {options.plan_from(opt)}:
            print(f"  {key} {opt}: ran as {ran} (did not fit), skipped", flush=True)
            continue
        if not err < 1e-2:
            print(f"  {key} {opt}: WRONG (rel. diff {err:.2e} vs the default plan)", flush=True)
            continue
        timings.append((ms, opt))
        print(f"  {key} {opt}: {ms:.3f} ms", flush=True)
    if not timings:
        options.LAUNCH_OPTIONS.pop(key, None)
        return None
    best = min(timings, key=lambda t: t[0])[1]
    options.LAUNCH_OPTIONS[key] = best
    launch.clear_plans()
    return best


# Block sizes the sweep times: VSA's 64-token cubes, FlexAttention's 128, SLA's (128, 64).
SWEEP_BLOCKS = {"64": (64, 64), "128": (128, 128), "128x64": (128, 64)}


def sweep_launch(quick: bool, budget_s: float, blocks: list[str]) -> None:
    """Times plans of the three block-sparse kernels (D=128, bf16, 12.5% kept, N=16384) at
    each block size in `blocks`, keeps each winner for the rest of this run (so the table
    below measures them), and prints the LAUNCH_OPTIONS entries to paste into
    runtime/kernels/block_sparse/options.py."""
    from attnrt.kernels.block_sparse import options

    best: dict[str, dict[str, int]] = {}
    for name in blocks:
        bq, bk = SWEEP_BLOCKS[name]
        inputs, index, count = _fine_inputs(bq, 16384, 0.125, bk)
        for kernel in ("fwd", "dq", "dkdv"):  # each kernel gets its share of the budget
            deadline = time.monotonic() + budget_s / (3 * len(blocks))
            # The plans are the Triton kernels': the Gluon ones (on by default) stay out.
            with options.gluon_forward(False), options.gluon_backward(False):
                won = _sweep_kernel(kernel, bq, bk, inputs, index, count, quick, deadline)
            if won is not None:
                best[f"{kernel}-{bq}x{bk}-d{D}"] = won
    print("# paste into runtime/kernels/block_sparse/options.py (measured: "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}):")
    print("LAUNCH_OPTIONS: dict[str, dict[str, int]] = {")
    for key, opt in best.items():
        print(f"    {key!r}: {opt},")
    print("}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and repeats")
    parser.add_argument("--sweep", action="store_true",
                        help="first time launch plans of the block-sparse kernels, keep the "
                             "winners for the table and print them as LAUNCH_OPTIONS")
    parser.add_argument("--sweep-budget", type=float, default=300.0,
                        help="seconds the plan sweep may take, a share per kernel and block "
                             "size (default 300)")
    parser.add_argument("--sweep-blocks", default="64,128",
                        help=f"comma-separated block sizes to sweep: {', '.join(SWEEP_BLOCKS)}")
    parser.add_argument("--only", default="parts,vsa,fine,flex,sweep",
                        help="comma-separated subset of: parts, vsa, fine, flex, sweep")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B={B} H={H} D={D} bf16")
    if args.sweep:
        sweep_launch(args.quick, args.sweep_budget, args.sweep_blocks.split(","))
    print(f"{'case':<46} {'ms':>9} {'TFLOP/s':>8} {'speedup':>7} {'ideal':>7} {'%ideal':>6}")
    parts = {"parts": parts_rows, "vsa": vsa_rows, "fine": fine_rows, "flex": flex_rows,
             "sweep": sweep_rows}
    for name in args.only.split(","):
        torch.cuda.empty_cache()
        parts[name.strip()](args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
