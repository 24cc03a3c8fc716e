"""AttentionEngine on the GPU: generated Triton kernels against compiled FlexAttention with the
same modification, sliding window against dense over the visited blocks, sigmoid attention
against our dense TRITON_FLASH_ATTN kernel, the generated Gluon sm90 forward
(engine/gluon_forward.py, switched on here) next to the Triton forward and those peers, and
first-call (trace + compile) time.

Shapes: B=1, H=24, D=128, bf16, N in (8192, 16384) (--quick: N=8192, fewer repeats).
Prints tables; asserts nothing about speed (targets: issue 21, Speed). Run:
    python bench/engine_gpu.py [--quick] [--n 8192 16384]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable

import torch

from attnrt.engine import blocks, gluon_forward
from attnrt.engine.call import check_call
from attnrt.engine.library import AttentionLibrary, sliding_window_mask
from attnrt.engine.reference import traced_fns
from attnrt.engine.softmax import AttentionEngine

B, H, D = 1, 24, 128
DTYPE = torch.bfloat16
CAP, WINDOW = 30.0, 1024


def bench(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of fn() over reps timed runs (after warm-up)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def tflops(ms: float, n: int, backward: bool, fraction: float = 1.0) -> float:
    flops = 4 * B * H * n * n * D * fraction * (2.5 if backward else 1.0)
    return flops / ms / 1e9


def _qkv(n: int, grad: bool) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(B, n, H, D, device="cuda", dtype=DTYPE, requires_grad=grad)
                 for _ in range(3))


def _fwd_bwd(call: Callable[..., torch.Tensor], qkv: tuple, reps: int) -> tuple[float, float]:
    fwd = bench(lambda: call(*qkv), reps)
    out = call(*qkv)
    do = torch.randn_like(out)
    both = bench(lambda: torch.autograd.grad(call(*qkv), qkv, do), reps)
    return fwd, max(both - fwd, 1e-6)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance: the two sides must compute the same attention."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def _flex_fn(score_mod: Callable | None, block_mask: object = None) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        score_mod=score_mod, block_mask=block_mask,
                        scale=D ** -0.5).transpose(1, 2)

    return run


def score_mod_rows(n: int, reps: int, quick: bool = False) -> list[tuple]:
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)], device="cuda")

    def flex_alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def flex_softcap(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / CAP) * CAP

    alibi = AttentionLibrary("AlibiAttention", "None", head_size=D, backend="triton")
    softcap = AttentionLibrary("SoftcapAttention", "None", head_size=D, softcap=CAP,
                               backend="triton")
    rows = []
    cases = (("alibi", lambda q, k, v: alibi(q, k, v, [slopes]), flex_alibi),
             ("softcap", softcap, flex_softcap))
    for name, ours, flex in cases[:1] if quick else cases:  # quick: one compile of each side
        qkv = _qkv(n, True)
        flex_fn = _flex_fn(flex)
        of, ob = _fwd_bwd(ours, qkv, reps)
        ff, fb = _fwd_bwd(flex_fn, qkv, reps)
        with torch.no_grad():
            err = _rel(ours(*qkv), flex_fn(*qkv))
        rows.append((f"{name} N={n}", of, ob, ff, fb, ff / of, fb / ob, err))
    return rows


def window_row(n: int, reps: int) -> tuple:
    from torch.nn.attention.flex_attention import create_block_mask

    window = sliding_window_mask(WINDOW)
    sw = AttentionEngine(None, None, mask_mod=window, backend="triton")
    dense = AttentionEngine(None, None, backend="triton")
    qkv = _qkv(n, False)
    t_sw = bench(lambda: sw(*qkv), reps)
    t_dense = bench(lambda: dense(*qkv), reps)
    checked = check_call(sw.variant, *qkv)
    classes = blocks.block_classes(traced_fns(sw.variant), checked, 128, 64)
    visited = float((classes != blocks.EMPTY).float().mean())
    # The same visited blocks without a mask: every query block against as many key blocks
    # as a window row block visits (its program does the same loop, minus the mask).
    keys = 64 * round(float((classes != blocks.EMPTY).sum(-1).float().mean()))
    short = (qkv[0], qkv[1][:, :keys], qkv[2][:, :keys])
    t_same = bench(lambda: dense(*short), reps)
    mask = create_block_mask(lambda b, h, q, kv: (kv <= q) & (q - kv < WINDOW), None, None,
                             n, n, device="cuda")
    flex = _flex_fn(None, mask)
    t_flex = bench(lambda: flex(*qkv), reps)
    with torch.no_grad():
        err = _rel(sw(*qkv), flex(*qkv))
    return (f"window {WINDOW} N={n}", t_sw, t_same, keys, t_dense * visited, visited, t_flex,
            t_sw / t_same, t_sw / (t_dense * visited), t_flex / t_sw, err)


def sigmoid_row(n: int, reps: int) -> tuple:
    from attnrt.kernels.flash.configs_cuda import select_config
    from attnrt.kernels.flash.launch import flash_attention

    sig = AttentionLibrary("SigmoidAttention", "None", head_size=D, backend="triton")
    bias = torch.tensor([-9.0], device="cuda")
    qkv = _qkv(n, False)
    t_sig = bench(lambda: sig(*qkv, [bias]), reps)
    # The peer as TRITON_FLASH_ATTN runs it here: the arch's shipped config (flash_attention
    # without one takes the small portable blocks, 289 TFLOP/s on the H100 instead of ~620).
    major, minor = torch.cuda.get_device_capability()
    config = select_config(f"sm{major}{minor}", D)
    t_dense = bench(lambda: flash_attention(*qkv, config=config), reps)
    with torch.no_grad():
        s = torch.einsum("bnhd,bmhd->bhnm", qkv[0][:, :256].float(), qkv[1].float()) * D ** -0.5
        want = torch.einsum("bhnm,bmhd->bnhd", torch.sigmoid(s - 9.0), qkv[2].float())
        err = _rel(sig(*qkv, [bias])[:, :256], want)
    return (f"sigmoid N={n}", t_sig, tflops(t_sig, n, False), t_dense,
            tflops(t_dense, n, False), t_dense / t_sig, err)


def gluon_rows(n: int, reps: int, peers: dict) -> list[tuple]:
    """Forward ms with the Gluon forward on and off (same engine, same inputs), and the peer's
    ms measured in this run (peers[(name, n)] = (label, ms)): Flex for ALiBi, softcap and the
    window (targets >= 1.15x, 1.15x, 1x), the dense TRITON_FLASH_ATTN kernel for sigmoid
    (target >= 0.9x its TFLOP/s, the same FLOPs)."""

    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)], device="cuda")
    bias = torch.tensor([-9.0], device="cuda")
    engines = {
        "alibi": (AttentionLibrary("AlibiAttention", "None", head_size=D, backend="triton"),
                  [slopes]),
        "softcap": (AttentionLibrary("SoftcapAttention", "None", head_size=D, softcap=CAP,
                                     backend="triton"), None),
        "sigmoid": (AttentionLibrary("SigmoidAttention", "None", head_size=D, backend="triton"),
                    [bias]),
        "window": (AttentionEngine(None, None, mask_mod=sliding_window_mask(WINDOW),
                                   backend="triton"), None),
    }
    rows = []
    qkv = _qkv(n, False)
    for name, (engine, inputs) in engines.items():
        if name == "window" and (name, n) not in peers:
            continue  # the window is measured at the largest N only

        def call(engine=engine, inputs=inputs) -> torch.Tensor:
            return engine(*qkv, inputs)

        with torch.no_grad(), gluon_forward.gluon_forward(True):
            t_gluon = bench(call, reps)
            served, out_gluon = gluon_forward.last_served(), call()
        with torch.no_grad(), gluon_forward.gluon_forward(False):
            t_triton = bench(call, reps)
            out_triton = call()
        label, t_peer = peers.get((name, n), ("-", float("nan")))
        rows.append((f"{name} N={n}", t_gluon, t_triton, t_triton / t_gluon,
                     tflops(t_gluon, n, False), label, t_peer, t_peer / t_gluon,
                     _rel(out_gluon, out_triton), str(served)[:20]))
    return rows


_FIRST_CALL = textwrap.dedent("""
    import time, torch
    t0 = time.perf_counter()
    from attnrt.engine.softmax import AttentionEngine
    def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        return score * 0.0883883 - 0.0{tag} * (q_idx - kv_idx).abs()
    mod = AttentionEngine(None, score_mod, backend="triton")
    q, k, v = (torch.randn(1, 4096, 24, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    mod(q, k, v)
    torch.cuda.synchronize()
    print(time.perf_counter() - t0)
""")


def first_call_rows() -> list[tuple]:
    """First call of a never-seen variant in a fresh process, then the same in a second one."""
    tag = str(time.time_ns())[-9:]
    env = dict(os.environ, ATTNRT_CACHE_DIR=tempfile.mkdtemp(prefix="attnrt-engine-bench-"))
    rows = []
    for label in ("new variant (trace + compile)", "second process (cached)"):
        done = subprocess.run([sys.executable, "-c", _FIRST_CALL.format(tag=tag)], env=env,
                              capture_output=True, text=True, check=True)
        rows.append((label, float(done.stdout.strip().splitlines()[-1])))
    return rows


def show(title: str, header: tuple, rows: list[tuple]) -> None:
    print(f"\n{title}")
    print(" | ".join(f"{h:>14}" for h in header))
    for row in rows:
        print(" | ".join(f"{c:>14.3g}" if isinstance(c, float) and c < 1e-2 else
                         f"{c:>14.3f}" if isinstance(c, float) else f"{c!s:>14}" for c in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=8192 only, fewer repeats")
    parser.add_argument("--n", type=int, nargs="+", default=None)
    args = parser.parse_args()
    sizes = args.n or ([8192] if args.quick else [8192, 16384])
    reps = 5 if args.quick else 20
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, B={B} H={H} D={D}"
          f" {DTYPE}")
    n_window = max(sizes)
    with gluon_forward.gluon_forward(False):  # the Triton rows; Gluon's have their own table
        mods = [r for n in sizes for r in score_mod_rows(n, reps, args.quick)]
        window = window_row(n_window, reps)
        sigmoids = [sigmoid_row(n, reps) for n in sizes]
    show("score_mod variants, Triton: ours vs compiled FlexAttention (ms; target fwd >= 1.15x, "
         "bwd >= 1x)", ("variant", "ours fwd", "ours bwd", "flex fwd", "flex bwd",
                        "fwd speedup", "bwd speedup", "rel err"), mods)
    show("sliding window, Triton, vs dense over the same visited blocks: q [N] against "
         "`keys` keys, no mask (target ours/same <= 1.2, flex/ours >= 1); dense*frac: the "
         "N x N dense time scaled by the visited share",
         ("case", "ours ms", "same ms", "keys", "dense*frac ms", "visited frac", "flex ms",
          "ours/same", "ours/dense*frac", "flex/ours", "rel err"), [window])
    show("sigmoid attention, Triton, vs TRITON_FLASH_ATTN dense softmax (target >= 0.9)",
         ("case", "sigmoid ms", "TFLOP/s", "dense ms", "TFLOP/s", "ratio", "rel err"),
         sigmoids)
    peers = {(r[0].split()[0], int(r[0].split("N=")[1])): ("flex", r[3]) for r in mods}
    peers[("window", n_window)] = ("flex", window[6])
    peers.update({("sigmoid", n): ("dense", r[3]) for n, r in zip(sizes, sigmoids, strict=True)})
    show("Gluon sm90 forward (switch on) vs the Triton forward, and the peers above (fwd ms; "
         "targets: peer/gluon >= 1.15 alibi, softcap; >= 1 window; >= 0.9 sigmoid)",
         ("case", "gluon ms", "triton ms", "triton/gluon", "gluon TFLOP/s", "peer", "peer ms",
          "peer/gluon", "rel err g-t", "served"),
         [r for n in sizes for r in gluon_rows(n, reps, peers)])
    show("soft-capping with tanh as PTX tanh.approx.f32 (engine.kernel.FAST_TANH, shipped off) "
         "vs the exact form, the shipped forward (Gluon) and the Triton backward (ms)",
         ("case", "exact fwd", "exact bwd", "approx fwd", "approx bwd", "fwd gain", "bwd gain",
          "rel err a-e"), [fast_tanh_row(n, reps) for n in sizes])
    show("first call, N=4096 (target < 10 s; second process reuses the cache)",
         ("case", "seconds"), first_call_rows())


def fast_tanh_row(n: int, reps: int) -> tuple:
    """Soft-capping timed with FAST_TANH off, then on (each compiles its own kernels)."""
    from attnrt.engine import kernel

    softcap = AttentionLibrary("SoftcapAttention", "None", head_size=D, softcap=CAP,
                               backend="triton")
    qkv = _qkv(n, True)
    times, outs = [], []
    for fast in (False, True):
        kernel.FAST_TANH = fast
        kernel.clear_modules()
        times.append(_fwd_bwd(softcap, qkv, reps))
        with torch.no_grad():
            outs.append(softcap(*qkv))
    kernel.FAST_TANH = False
    kernel.clear_modules()
    (ef, eb), (af, ab) = times
    return (f"softcap N={n}", ef, eb, af, ab, ef / af, eb / ab, _rel(outs[1], outs[0]))


if __name__ == "__main__":
    main()
