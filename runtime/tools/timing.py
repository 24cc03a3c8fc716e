"""How `attnrt bench` times a backend: runs, their median and spread, interleaved rounds.

Shapes: B batch, N sequence (queries and keys), H heads, Hkv kv heads, D head size.

A measure is the median of its runs, and its spread the interquartile range of those runs
(`ms_lo`, `ms_hi`: the 25th and 75th percentiles). Two measures whose spreads overlap do not
order their backends: on a busy CPU single SDPA calls are bimodal (0.45 ms or 8 ms, issue 18),
and a ranking read off such medians is noise. Bench flags such pairs; tune refuses to rank them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from attnrt.selection import registry
from attnrt.selection.request import NAME_DTYPES

if TYPE_CHECKING:
    from attnrt.tools.benchmark import Case, Result


def spread(runs: list[float]) -> tuple[float, float]:
    """(25th, 75th percentile) of `runs` in ms; both the one run where there is one."""
    if len(runs) < 2:
        return runs[0], runs[0]
    quartiles = statistics.quantiles(runs, n=4, method="inclusive")
    return quartiles[0], quartiles[2]


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two (lo, hi) spreads share a value: the measures do not order their backends."""
    return a[0] <= b[1] and b[0] <= a[1]


def set_measure(r: Result, runs: list[float]) -> None:
    """Give `r` the median of `runs`, their spread and the TFLOP/s of the median."""
    ms = statistics.median(runs)
    r.ms, (r.ms_lo, r.ms_hi) = ms, spread(runs)
    r.tflops = r.case.flops() / (ms * 1e-3) / 1e12


def inputs(case: Case, seq: int, device: str, grad: bool) -> tuple[torch.Tensor, ...]:
    """Fresh random q [B, seq, H, D], k and v [B, seq, Hkv, D] of the case's dtype."""
    dtype = NAME_DTYPES[case.dtype]
    shapes = ((case.batch, seq, case.heads, case.head_size),
              (case.batch, seq, case.kv_heads, case.head_size),
              (case.batch, seq, case.kv_heads, case.head_size))
    return tuple(torch.randn(s, dtype=dtype, device=device).requires_grad_(grad) for s in shapes)


def make_impl(name: str, case: Case) -> Any:
    """Backend `name`'s impl for the case (scale D ** -0.5)."""
    return registry.load(name).get_impl_cls()(
        num_heads=case.heads, head_size=case.head_size, softmax_scale=case.head_size ** -0.5,
        causal=case.causal, num_kv_heads=case.kv_heads, prefix="bench")


def sync(device: str) -> None:
    module = getattr(torch, device, None)
    fn = getattr(module, "synchronize", None)
    if device != "cpu" and callable(fn):
        fn()


def runner(impl: Any, case: Case, device: str) -> tuple[Callable[[], Any], Callable[[], None]]:
    """One run of `impl` on fresh inputs of `case` (for "bwd", the backward of one forward kept
    alive), and what to reset before each run."""
    q, k, v = inputs(case, case.seq_len, device, case.pass_ == "bwd")
    if case.pass_ == "fwd":
        def forward() -> Any:
            with torch.no_grad():
                return impl.forward(q, k, v, None)

        return forward, lambda: None
    out = impl.forward(q, k, v, None)
    g = torch.randn_like(out)

    def reset() -> None:
        q.grad = k.grad = v.grad = None

    return lambda: out.backward(g, retain_graph=True), reset


def run_times(fn: Callable[[], Any], reset: Callable[[], None], device: str,
              repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` runs of fn, after one untimed run.

    CUDA: events around each run, synchronized once at the end (as triton.testing.do_bench):
    the GPU time of each run, with the host's launch overhead overlapped as in a real model.
    The untimed run is still on the GPU while the first timed one is queued, so that one's
    launch latency is overlapped too. Elsewhere: time.perf_counter with a device sync around
    each run."""
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(repeats)] if device == "cuda" else []
    reset()
    fn()
    if pairs:
        for start, end in pairs:
            reset()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in pairs]
    times = []
    for _ in range(repeats):
        reset()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_runs(impl: Any, case: Case, device: str, repeats: int) -> list[float]:
    """Milliseconds of `repeats` runs, after two untimed ones (compiles, autotuning)."""
    fn, reset = runner(impl, case, device)
    run_times(fn, reset, device, 1)
    return run_times(fn, reset, device, repeats)


# A backend whose first measure is below this fraction of the fastest one's is not a contender:
# it keeps that measure, and its (often low-power) runs do not sit between the contenders'. Low
# enough that one disturbed first measure (0.67x once, bench/NOTES-cuda.md) is timed again.
CONTENDER_SHARE = 0.5


def retime(cell: list[Result], device: str, repeats: int, rounds: int) -> None:
    """Time the contenders of one case again in `rounds` interleaved rounds (rounds > 1) and give
    each the median and spread of all its runs.

    Each round runs every contender once untimed, then `repeats` times; each pair of rounds
    runs one rotation of the contenders forwards, then backwards, so clock and
    power state (which moved one kernel's median by up to 12% against the same kernel timed
    later in the case, bench/NOTES-cuda.md) favour none of them."""
    ok = [r for r in cell if r.status == "ok" and r.ms]
    if rounds < 2 or len(ok) < 2:
        return
    fastest = min(r.ms or 0.0 for r in ok)
    contenders = [r for r in ok if fastest >= CONTENDER_SHARE * (r.ms or 0.0)]
    if len(contenders) < 2:
        return
    runners = [runner(make_impl(r.backend, r.case), r.case, device) for r in contenders]
    times: list[list[float]] = [[] for _ in contenders]
    count = len(contenders)
    for i in range(rounds):
        order = [(i // 2 + j) % count for j in range(count)]  # rounds 2i, 2i+1: one order
        for j in order[::-1] if i % 2 else order:                # forwards, then backwards
            times[j] += run_times(*runners[j], device, repeats)
    for r, runs in zip(contenders, times, strict=True):
        set_measure(r, runs)
