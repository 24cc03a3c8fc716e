"""Dispatch overhead: LocalAttention.forward vs the chosen impl called directly, on tiny CPU
tensors, and the cost of constructing 1000 layers with one request. Prints a table; asserts nothing.

    python bench/dispatch_overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch

import attnrt
from attnrt.context import get_forward_context
from attnrt.selection import dispatch


def per_call_us(fn, calls: int = 20000, rounds: int = 7) -> float:
    for _ in range(2000):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


class NoopImpl(attnrt.AttentionImpl):
    """Returns q: isolates the dispatch cost from the attention arithmetic."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def forward(self, query, key, value, attn_metadata):
        return query


class NoopBackend(attnrt.AttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "NOOP_BENCH"

    @staticmethod
    def get_impl_cls() -> type[NoopImpl]:
        return NoopImpl


def main() -> None:
    torch.set_num_threads(1)
    attnrt.register_backend("NOOP_BENCH", NoopBackend)
    layer = attnrt.LocalAttention(2, 16, supported_attention_backends=["NOOP_BENCH"])
    q = torch.randn(1, 4, 2, 16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    layer(q, k, v)
    impl = layer._active.impl
    direct = per_call_us(lambda: impl.forward(q, k, v, get_forward_context().attn_metadata))
    through = per_call_us(lambda: layer(q, k, v))

    attnrt.clear_caches()
    walks = 0
    real = dispatch._decide

    def counting(*args, **kwargs):
        nonlocal walks
        walks += 1
        return real(*args, **kwargs)

    dispatch._decide = counting
    start = time.perf_counter()
    layers = [attnrt.LocalAttention(24, 128, causal=False) for _ in range(1000)]
    build_ms = (time.perf_counter() - start) * 1e3
    dispatch._decide = real

    print(f"backend: {layer.backend_name}   torch {torch.__version__}   1 thread")
    print(f"{'measure':<44} {'value':>12}")
    print(f"{'impl.forward direct (us/call)':<44} {direct:>12.2f}")
    print(f"{'LocalAttention.forward (us/call)':<44} {through:>12.2f}")
    print(f"{'overhead (us/call, goal < 2)':<44} {through - direct:>12.2f}")
    print(f"{'1000 layers constructed (ms)':<44} {build_ms:>12.1f}")
    print(f"{'selection walks for 1000 layers (goal 1)':<44} {walks:>12d}")
    assert len(layers) == 1000


if __name__ == "__main__":
    main()
