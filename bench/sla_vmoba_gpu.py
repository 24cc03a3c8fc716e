"""SLA, SLA (fused linear branch), VMoBA and SageSLA against dense cuDNN SDPA, on one GPU.

Shapes: B batch (1), N tokens of a Wan 2.1 latent grid (480p: 21 x 30 x 52 = 32,760; 720p:
21 x 45 x 80 = 75,600), H heads (40), D head size (128); bf16 throughout.

    python bench/sla_vmoba_gpu.py            # both lengths, every row
    python bench/sla_vmoba_gpu.py --quick    # 480p only, fewer rows and repeats (< 60 s)
    python bench/sla_vmoba_gpu.py --only sla --lengths 75600
    python bench/sla_vmoba_gpu.py --only parts    # where SLA's forward goes, part by part

Needs the repo installed as attnrt (pip install --no-deps --no-build-isolation -e .).

Every row is timed (CUDA events, median after warm-up) in the same process as the dense
cuDNN SDPA row it is compared with. "TFLOP/s" is dense-equivalent: 4 B H N^2 D / time
(x 3.5 for forward + backward), so speedups read directly as ratios of times.
"ideal" is the dense/sparse ratio of exact-attention work: 1 / topk_ratio for SLA (before
the linear branch and the block selection), 1 / (kept share of key chunks) for VMoBA.

VMoBA runs FastVideo's settings (wan_1.3B_77_480_832.json: temporal 2 frames top-3,
spatial (3, 4) top-20, st (4, 6, 4) top-15, threshold 0.25 per query and head). Where a
chunk shape does not divide the grid (st (4, 6, 4) on 21 frames) the nearest shape that does
is used and printed. Each of the three layer kinds is timed; the row is their mean.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

GRIDS = {32760: (21, 30, 52), 75600: (21, 45, 80)}
ST_FIT = {32760: (3, 6, 4), 75600: (3, 5, 4)}  # FastVideo's (4, 6, 4) needs T % 4 == 0


def timed(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() over `iters` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def inputs(n: int, h: int, d: int, grad: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(n)
    return tuple(torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                 .requires_grad_(grad) for _ in range(3))


def fwd_bwd(run: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor) -> Callable[[], None]:
    dout = torch.randn_like(q)

    def step() -> None:
        q.grad = k.grad = v.grad = None
        run(q, k, v).backward(dout)
    return step


def dense_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class Table:
    def __init__(self, n: int, h: int, d: int) -> None:
        self.flops = 4.0 * n * n * h * d
        self.dense: dict[str, float] = {}
        print(f"\nN={n} (grid {GRIDS.get(n)}), H={h}, D={d}, bf16, B=1")
        print(f"{'method':<34}{'pass':<9}{'ms':>9}{'TFLOP/s':>9}{'x cuDNN':>9}{'ideal':>8}")

    def row(self, name: str, kind: str, ms: float | None, ideal: str = "") -> None:
        if ms is None:
            print(f"{name:<34}{kind:<9}{'OOM':>9}")
            return
        work = self.flops * (3.5 if kind == "fwd+bwd" else 1.0)
        ratio = self.dense[kind] / ms if kind in self.dense else 1.0
        print(f"{name:<34}{kind:<9}{ms:>9.2f}{work / ms / 1e9:>9.0f}{ratio:>8.2f}x{ideal:>8}")


def measure(fn: Callable[[], object], iters: int) -> float | None:
    try:
        return timed(fn, iters)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def sla_rows(table: Table, n: int, h: int, d: int, args: argparse.Namespace) -> None:
    from attnrt.sparse.sla import SLAAttentionImpl

    q, k, v = inputs(n, h, d)
    ratios = (0.1,) if args.quick else (0.05, 0.1, 0.2)
    for ratio in ratios:
        for fused in (False, True):
            impl = SLAAttentionImpl(num_heads=h, head_size=d, topk_ratio=ratio,
                                    fused_linear=fused).cuda()
            with torch.no_grad():
                impl.proj_l.weight.normal_(0, 0.02)  # a trained-looking projection
            name = f"SLA topk={ratio}{' fused' if fused else ''}"
            with torch.no_grad():
                ms = measure(lambda impl=impl: impl.forward(q, k, v, None), args.iters)
            table.row(name, "fwd", ms, f"{1 / ratio:.0f}x")
            if ratio == 0.1 and not (args.quick and fused):
                g = inputs(n, h, d, grad=True)
                step = fwd_bwd(lambda a, b, c, impl=impl: impl.forward(a, b, c, None), *g)
                table.row(name, "fwd+bwd", measure(step, args.iters), f"{1 / ratio:.0f}x")
            del impl


def sla_parts(table: Table, n: int, h: int, d: int, args: argparse.Namespace) -> None:
    """Where SLA's forward goes (topk 0.1, 128 x 64 blocks): the block selection, the sparse
    kernel (Triton, and the Gluon forward where it runs), the linear branch, proj_l and the
    sum. Each part is timed alone on the same inputs."""
    from attnrt.kernels.block_sparse import block_sparse_attention, options
    from attnrt.sparse.block_select import select_blocks
    from attnrt.sparse.sla import SLAAttentionImpl

    q, k, v = inputs(n, h, d)
    impl = SLAAttentionImpl(num_heads=h, head_size=d, topk_ratio=0.1).cuda()
    with torch.no_grad():
        index, count, _ = select_blocks(q, k, 0.1, 128, 64)
        parts = {
            "SLA part: select blocks": lambda: select_blocks(q, k, 0.1, 128, 64),
            "SLA part: sparse kernel (Triton)": lambda: block_sparse_attention(
                q, k, v, index, count, block_q=128, block_k=64),
            "SLA part: linear branch": lambda: impl.linear_branch(q, k, v),
        }
        o_l = impl.linear_branch(q, k, v)
        parts["SLA part: proj_l + sum"] = lambda: q + impl.project(o_l).to(q.dtype)
        for name, fn in parts.items():
            with options.gluon_forward(False):  # the "(Triton)" row; Gluon has its own
                table.row(name, "fwd", measure(fn, args.iters))
        with options.gluon_forward(True, [(128, 64)]):
            table.row("SLA part: sparse kernel (Gluon on)", "fwd", measure(
                lambda: block_sparse_attention(q, k, v, index, count, block_q=128, block_k=64),
                args.iters))


def vmoba_kept(n: int, meta: object, layer: int, q: torch.Tensor, k: torch.Tensor,
               block_q: int = 64) -> tuple[float, float]:
    """(share of (query, head, key chunk) entries the layer's selection keeps, share of
    (query block of block_q rows, head, chunk) entries the kernel visits: the union over the
    block's rows, what the row-masked kernel pays for)."""
    from attnrt.sparse.vmoba import layer_chunk
    from attnrt.sparse.vmoba_layout import check_chunk, to_chunk_order
    from attnrt.sparse.vmoba_pack import row_words
    from attnrt.sparse.vmoba_select import select_chunks

    chunk, topk = layer_chunk(layer, meta)  # type: ignore[arg-type]
    grid = GRIDS[n]
    tokens = check_chunk("chunk", chunk, grid)
    with torch.no_grad():
        sel = select_chunks(to_chunk_order(q, grid, chunk), to_chunk_order(k, grid, chunk),
                            tokens, meta.moba_select_mode, meta.moba_threshold_type,  # type: ignore[attr-defined]
                            meta.moba_threshold, topk)  # type: ignore[attr-defined]
    return float(sel.float().mean()), float((row_words(sel, block_q) != 0).float().mean())


def vmoba_rows(table: Table, n: int, h: int, d: int, args: argparse.Namespace) -> None:
    from attnrt.sparse.vmoba import VideoMobaAttentionMetadataBuilder, VMOBAAttentionImpl

    t, hp, wp = GRIDS[n]
    meta = VideoMobaAttentionMetadataBuilder().build(
        current_timestep=0, raw_latent_shape=(t, hp * 2, wp * 2), patch_size=(1, 2, 2),
        temporal_chunk_size=2, temporal_topk=3, spatial_chunk_size=(3, 4), spatial_topk=20,
        st_chunk_size=ST_FIT[n], st_topk=15, moba_select_mode="threshold",
        moba_threshold=0.25, moba_threshold_type="query_head")
    print(f"  VMoBA: st_chunk_size {ST_FIT[n]} (FastVideo's (4, 6, 4) does not divide {GRIDS[n]})")
    q, k, v = inputs(n, h, d)
    fwd, both, kept = [], [], []
    for layer, kind in enumerate(("temporal", "spatial", "st")):
        for bq in args.vmoba_block_q[1:]:  # other query blocks first: forward only
            impl = VMOBAAttentionImpl(num_heads=h, head_size=d, softmax_scale=d ** -0.5,
                                      prefix=f"blocks.{layer}", block_q=bq)
            share, union = vmoba_kept(n, meta, layer, q, k, bq)
            with torch.no_grad():
                ms = measure(lambda impl=impl: impl.forward(q, k, v, meta), args.iters)
            table.row(f"VMoBA {kind} block_q={bq} (visits {union:.0%})", "fwd", ms,
                      f"{1 / share:.1f}x")
        bq = args.vmoba_block_q[0]
        impl = VMOBAAttentionImpl(num_heads=h, head_size=d, softmax_scale=d ** -0.5,
                                  prefix=f"blocks.{layer}", block_q=bq)
        share, union = vmoba_kept(n, meta, layer, q, k, bq)
        kept.append(share)
        with torch.no_grad():
            ms = measure(lambda impl=impl: impl.forward(q, k, v, meta), args.iters)
        table.row(f"VMoBA {kind} (kept {share:.1%}, block_q={bq} visits {union:.0%})", "fwd",
                  ms, f"{1 / share:.1f}x")
        fwd.append(ms)
        if not args.quick:
            g = inputs(n, h, d, grad=True)
            step = fwd_bwd(lambda a, b, c, impl=impl: impl.forward(a, b, c, meta), *g)
            ms_b = measure(step, max(2, args.iters // 2))
            table.row(f"VMoBA {kind}", "fwd+bwd", ms_b, f"{1 / share:.1f}x")
            both.append(ms_b)
    ideal = f"{1 / statistics.mean(kept):.1f}x"
    if all(m is not None for m in fwd):
        table.row("VMoBA mean of 3 layer kinds", "fwd", statistics.mean(fwd), ideal)
    if both and all(m is not None for m in both):
        table.row("VMoBA mean of 3 layer kinds", "fwd+bwd", statistics.mean(both), ideal)


def sage_rows(table: Table, n: int, h: int, d: int, args: argparse.Namespace) -> None:
    from attnrt.sparse.method_errors import SageSLAUnavailableError
    from attnrt.sparse.sage_sla import SageSLAAttentionImpl

    try:
        impl = SageSLAAttentionImpl(num_heads=h, head_size=d, topk_ratio=0.1).cuda()
    except SageSLAUnavailableError as exc:
        print(f"  SageSLA not measured: {exc}")
        return
    q, k, v = inputs(n, h, d)
    with torch.no_grad():
        table.row("SageSLA topk=0.1", "fwd", measure(lambda: impl.forward(q, k, v, None),
                                                     args.iters), "10x")


def dense_rows(table: Table, n: int, h: int, d: int, iters: int) -> None:
    q, k, v = inputs(n, h, d)
    with torch.no_grad():
        table.dense["fwd"] = timed(lambda: dense_cudnn(q, k, v), iters)
    table.row("dense cuDNN SDPA", "fwd", table.dense["fwd"])
    table.dense["fwd+bwd"] = timed(fwd_bwd(dense_cudnn, *inputs(n, h, d, grad=True)), iters)
    table.row("dense cuDNN SDPA", "fwd+bwd", table.dense["fwd+bwd"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="480p only, fewer rows (< 60 s)")
    parser.add_argument("--lengths", type=int, nargs="*", choices=sorted(GRIDS))
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--only", choices=("sla", "parts", "vmoba", "sage"), nargs="*")
    parser.add_argument("--vmoba-block-q", type=int, nargs="+", default=[64],
                        choices=(16, 32, 64), help="VMoBA query blocks: the first gets every "
                        "row, the others a forward row each (default: 64)")
    args = parser.parse_args()
    args.iters = args.iters or (3 if args.quick else 10)
    lengths = args.lengths or ([32760] if args.quick else [32760, 75600])
    only = set(args.only or ("sla", "parts", "vmoba", "sage"))
    h, d = 40, 128
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for n in lengths:
        table = Table(n, h, d)
        dense_rows(table, n, h, d, args.iters)
        for name, rows in (("sla", sla_rows), ("parts", sla_parts), ("vmoba", vmoba_rows),
                           ("sage", sage_rows)):
            if name in only:
                rows(table, n, h, d, args)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
