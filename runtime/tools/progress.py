"""How long `attnrt bench` / `attnrt tune` will take, said before a long run, and its progress.

Shapes: B batch, N sequence, H heads, D head size.

The estimate counts the runs a grid makes (each backend's check against the float64 reference
at min(N, --check-seq), its untimed and timed runs, and, with --rounds R > 1, R more rounds
for two contenders per case) and prices each by its FLOPs at the rate torch's SDPA reaches
here, measured first at min(N, 1024) (one rate per dtype, and fp64 for the reference). It is
an order of magnitude, not a promise: backends are slower or faster than SDPA (on a 2-core
CPU the README's full bench line is estimated at about 8 min; it took 9 in issue 18, and its
first case, estimated at 33 s, took 53 s). A run estimated
over LONG_RUN_S seconds is announced with its estimate (the README's full bench line took 9
minutes on a 2-core CPU); the progress line then shows time elapsed and left.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from attnrt.selection.request import NAME_DTYPES
from attnrt.tools.timing import sync

if TYPE_CHECKING:
    from attnrt.tools.benchmark import Case

LONG_RUN_S = 60.0  # runs estimated longer than this are announced before they start
_STEP_OVERHEAD_S = 0.02  # building an impl, fresh inputs, the decision


CALIBRATION_SEQ = 1024  # long enough for SDPA's rate on a long case (N=256 read 8x too slow)


def calibrate(device: str, dtypes: list[str], heads: int, head_size: int,
              seq_len: int = CALIBRATION_SEQ) -> dict[str, float]:
    """FLOP/s of torch SDPA on `device` per dtype name (plus "fp64"), at B1
    N=min(seq_len, CALIBRATION_SEQ), min(H, 8) heads of `head_size`: the best of three runs
    after one untimed."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    h, n = min(heads, 8), max(1, min(seq_len, CALIBRATION_SEQ))
    flops = 4.0 * h * n * n * head_size
    rates = {}
    for name in dict.fromkeys([*dtypes, "fp64"]):
        q, k, v = (torch.randn(1, h, n, head_size, dtype=NAME_DTYPES[name], device=device)
                   for _ in range(3))
        best = float("inf")
        for i in range(4):
            sync(device)
            t0 = time.perf_counter()
            sdpa(q, k, v)
            sync(device)
            best = best if i == 0 else min(best, time.perf_counter() - t0)
        rates[name] = flops / max(best, 1e-9)
    return rates


def _fwd_flops(case: Case, seq: int) -> float:
    flops = 4.0 * case.batch * case.heads * seq * seq * case.head_size
    return flops / 2 if case.causal else flops


def step_seconds(case: Case, rates: dict[str, float], repeats: int, rounds: int,
                 check_seq: int, contender: bool = True) -> float:
    """Estimated seconds to check and time one backend on `case`, and to time it again in
    `rounds` rounds if it is a `contender` (see the module's doc)."""
    bwd = case.pass_ == "bwd"
    check_n = min(case.seq_len, check_seq)
    per_check = _fwd_flops(case, check_n) * (3.5 if bwd else 1.0)  # forward (+ backward 2.5x)
    check = per_check / rates[case.dtype] + per_check / rates["fp64"]
    runs = 2 + repeats + (rounds * (1 + repeats) if rounds > 1 and contender else 0)
    timed = runs * case.flops() / rates[case.dtype] + (
        _fwd_flops(case, case.seq_len) / rates[case.dtype] if bwd else 0.0)
    return _STEP_OVERHEAD_S + check + timed


def describe_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def announce(total_s: float, steps: int, cases: int, stream: Any = None) -> bool:
    """Say on stderr, before the run, that it is long (over LONG_RUN_S); whether it said so."""
    if total_s <= LONG_RUN_S:
        return False
    (stream or sys.stderr).write(
        f"attnrt: this run checks and times {steps} (case, backend) pairs over {cases} "
        f"case(s), estimated at about {describe_seconds(total_s)} here; narrow it with "
        "--head-sizes, --seq-lens, --dtypes, --causal, --pass, --backends, --repeats or "
        "--rounds, or press Ctrl-C to stop\n")
    return True


class Progress:
    """A one-line progress bar on stderr, with time elapsed and left (by estimated weight)."""

    def __init__(self, weights: list[float], stream: Any = None) -> None:
        self.weights = weights or [1.0]
        self.total, self.done, self.stream = len(weights), 0, stream or sys.stderr
        self.start = time.perf_counter()

    def step(self, text: str) -> None:
        """Announce the next step (`text`), the ones before it done."""
        elapsed = time.perf_counter() - self.start
        done_w, all_w = sum(self.weights[:self.done]), sum(self.weights)
        left = elapsed * (all_w - done_w) / done_w if done_w > 0 and elapsed > 0 else all_w
        self.done += 1
        filled = 30 * self.done // max(self.total, 1)
        self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                          f"{describe_seconds(elapsed)} elapsed, ~{describe_seconds(left)} left "
                          f"{text[:50]:<50}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
