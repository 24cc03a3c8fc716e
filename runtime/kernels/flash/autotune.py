"""Opt-in autotuning of TRITON_FLASH_ATTN's forward block config, keyed on shape buckets.

configs_cuda.py and configs_rocm.py ship one config per (arch, head-size bucket); a model whose
shapes differ from the ones measured can ask for a one-time search instead
(`ATTNRT_TRITON_AUTOTUNE=1`, or `triton_autotune=True` among a layer's extra_impl_args). The
first forward of each key times every candidate of the arch's FWD_CANDIDATES on the real inputs
and keeps the fastest; later calls with the same key reuse it. The key is (platform, arch,
head-size bucket, dtype, causal, GQA, sequence bucket), the sequence bucket being max(N, M)
rounded up to a power of two: N and M are runtime kernel arguments, so shapes inside one bucket
never recompile and never re-tune.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from attnrt.kernels.flash.configs import Config, make_config

Timer = Callable[[Callable[[], Any]], float]
_lock = threading.Lock()
_chosen: dict[tuple[Any, ...], Config] = {}


def sequence_bucket(n: int, m: int) -> int:
    """max(N, M) rounded up to a power of two, at least 128."""
    return max(128, 1 << (max(n, m) - 1).bit_length())


def tuning_key(platform: str, arch: str, q: torch.Tensor, k: torch.Tensor,
               causal: bool) -> tuple[Any, ...]:
    d_bucket = max(32, 1 << (q.shape[3] - 1).bit_length())
    return (platform, arch, d_bucket, q.dtype, causal, q.shape[2] != k.shape[2],
            sequence_bucket(q.shape[1], k.shape[1]))


def default_timer(fn: Callable[[], Any]) -> float:
    """Median milliseconds: Triton's event timer on a GPU, one wall-clock call elsewhere."""
    if torch.cuda.is_available():
        import triton

        fn()
        return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def tuned_config(key: tuple[Any, ...], base: Config, candidates: Sequence[tuple],
                 run: Callable[[Config], Any], skip: tuple[type[BaseException], ...] = (),
                 timer: Timer = default_timer) -> Config:
    """The fastest of `candidates` (forward tuples as in make_config) over `base`, cached by key.

    `run(config)` runs the forward once; candidates raising one of `skip` (compile failures)
    are dropped. If every candidate fails, `base` is kept.
    """
    with _lock:
        found = _chosen.get(key)
    if found is not None:
        return found
    # A causal forward entry in base would shadow the candidate, so it is dropped.
    plain = {name: entry for name, entry in base.items() if name != "fwd_causal"}
    configs = [{**plain, "fwd": make_config(fwd, (0, 0, 0, 0), (0, 0, 0, 0))["fwd"]}
               for fwd in candidates]
    times: dict[int, float] = {}
    # Two rounds, best of each: the first candidate must not lose for running while the GPU's
    # clocks were still ramping up (seen on the H100: a 10% swing on the first timed config).
    for _ in range(2):
        for i, config in enumerate(configs):
            if i in times and times[i] == float("inf"):
                continue
            try:
                with torch.no_grad():
                    ms = timer(partial(run, config))
            except skip:
                ms = float("inf")  # failed to compile: never chosen, never tried again
            times[i] = min(times.get(i, ms), ms)
    finite = [i for i, ms in times.items() if ms != float("inf")]
    best = configs[min(finite, key=times.__getitem__)] if finite else base
    with _lock:
        _chosen[key] = best
    return best


def tuned_keys() -> dict[tuple[Any, ...], Config]:
    with _lock:
        return dict(_chosen)


def clear_tuning_cache() -> None:
    with _lock:
        _chosen.clear()
