"""Launch plans of the block-sparse kernels (fwd, dq, dkdv) as data, fitted to the device's
shared memory before any kernel runs. Pure Python: importing this needs torch alone.

Shapes: block_q / block_k the query / key block sizes of the lists, D head size (tiles padded to
BD = the next power of two, at least 16), es the element size (2 for fp16/bf16, 4 for fp32).

A plan is (num_warps, num_stages, step, split, rows_split):
- step: list entries one inner step takes, so its tile is `step` blocks gathered by id: key
  blocks for fwd and dq (a [block_q, step * block_k] score tile), query blocks for dkdv.
- split: the program's own block cut into `split` row tiles, one program each: query rows for
  fwd and dq, key rows for dkdv. Smaller tiles for the sizes whose whole block does not fit.
- rows_split (dkdv, one block a step): each visiting query block taken in `rows_split` steps
  of block_q / rows_split rows, so a program keeps its whole key block (K and V read once)
  with a small score tile.
They change only how the work is tiled, never the result beyond rounding order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

import torch

from attnrt.ctxvars import visible

from .checks import NAME, BlockSparseInputError

KERNELS = ("fwd", "dq", "dkdv")
MIN_TILE = 16
MAX_STEP_KEYS = 256  # a step's gathered tile is at most this many rows

# Measured winners, "<kernel>-<block_q>x<block_k>-d<BD>" -> options (16-bit dtypes; float32 is
# fitted down from them). `python bench/sparse_gpu.py --sweep` times the candidates on the GPU
# and prints the entries to paste here. Unlisted keys take default_plan.
# Measured on an H100 (torch 2.11, Triton 3.6, bench/NOTES-sparse.md run 3): for 64-token
# blocks one block per step and two stages beat the default (two per step, three stages) by
# 11% forward; 128-token blocks: dq only (the sweep's budget ended before the others).
LAUNCH_OPTIONS: dict[str, dict[str, int]] = {
    "fwd-64x64-d128": {"num_warps": 4, "num_stages": 2, "step": 1, "split": 1},
    "dq-64x64-d128": {"num_warps": 4, "num_stages": 2, "step": 1, "split": 1},
    "dkdv-64x64-d128": {"num_warps": 4, "num_stages": 2, "step": 1, "split": 1},
    "dq-128x128-d128": {"num_warps": 8, "num_stages": 2, "step": 1, "split": 1},
}


# (block_q, block_k) -> whether the forward / backward runs its Gluon kernel on Hopper
# (gluon_fwd_sm90.py / gluon_bwd_sm90.py, where its `usable` holds; the Triton kernels
# otherwise), from bench/sparse_gluon_gpu.py --quick (bench/NOTES-sparse.md, run 5: H100,
# H=40, D=128, bf16, 12.5% kept, N=16384/32768). Forward on: 1.20-1.38x the Triton forward.
# Backward on at 128x128 (fwd+bwd 1.45x the Triton backward's, 7.2x dense cuDNN) and 128x64
# (1.06x); off at 64x64 (1.00x: no gain for a dQ summed in a varying order). Switch per process
# with set_gluon_forward / set_gluon_backward or per call with gluon_forward / gluon_backward.
GLUON_FORWARD: dict[tuple[int, int], bool] = {(128, 64): True, (128, 128): True,
                                              (64, 64): True}
GLUON_BACKWARD: dict[tuple[int, int], bool] = {(128, 64): True, (128, 128): True,
                                               (64, 64): False}
_TABLES = {"forward": "GLUON_FORWARD", "backward": "GLUON_BACKWARD"}  # read at call time
_GLUON_SCOPED: dict[str, ContextVar[dict[tuple[int, int], bool] | None]] = {
    kind: ContextVar(f"attnrt_block_sparse_gluon_{kind}", default=None) for kind in _TABLES}


def _table(kind: str) -> dict[tuple[int, int], bool]:
    return globals()[_TABLES[kind]]


def gluon_on(kind: str, block_q: int, block_k: int) -> bool:
    """Whether the `kind` ("forward" or "backward") of these block sizes should take its
    Gluon kernel."""
    scoped = visible(_GLUON_SCOPED[kind])
    table = _table(kind) if scoped is None else scoped
    return table.get((block_q, block_k), False)


def gluon_forward_on(block_q: int, block_k: int) -> bool:
    """Whether the forward of these block sizes should take the Gluon kernel."""
    return gluon_on("forward", block_q, block_k)


def gluon_backward_on(block_q: int, block_k: int) -> bool:
    """Whether the backward of these block sizes should take the Gluon kernel."""
    return gluon_on("backward", block_q, block_k)


def _switched(kind: str, on: bool, blocks: Iterable[tuple[int, int]] | None,
              table: dict[tuple[int, int], bool]) -> dict[tuple[int, int], bool]:
    known = _table(kind)
    chosen = list(known) if blocks is None else [(bq, bk) for bq, bk in blocks]
    for pair in chosen:
        if pair not in known:
            raise BlockSparseInputError(
                f"blocks={pair} is not supported by {NAME}'s Gluon {kind}; supported: "
                f"{', '.join(map(str, known))}")
    return {**table, **dict.fromkeys(chosen, bool(on))}


def set_gluon(kind: str, on: bool, blocks: Iterable[tuple[int, int]] | None = None) -> None:
    """For this process: the Gluon `kind` ("forward" or "backward") on (or off) for `blocks`
    ((block_q, block_k) pairs; None: every pair of its table)."""
    table = _table(kind)
    table.update(_switched(kind, on, blocks, table))


def set_gluon_forward(on: bool, blocks: Iterable[tuple[int, int]] | None = None) -> None:
    """set_gluon("forward", ...): the process switch of the Gluon forward."""
    set_gluon("forward", on, blocks)


def set_gluon_backward(on: bool, blocks: Iterable[tuple[int, int]] | None = None) -> None:
    """set_gluon("backward", ...): the process switch of the Gluon backward."""
    set_gluon("backward", on, blocks)


@contextmanager
def gluon_switch(kind: str, on: bool = True,
                 blocks: Iterable[tuple[int, int]] | None = None) -> Iterator[None]:
    """Within the with block (this thread or task only): the Gluon `kind` on (or off) for
    `blocks` (None: every pair of its table); the previous choice comes back on exit."""
    scoped = _GLUON_SCOPED[kind]
    current = scoped.get()
    token = scoped.set(_switched(kind, on, blocks, _table(kind) if current is None
                                 else current))
    try:
        yield
    finally:
        scoped.reset(token)


def gluon_forward(on: bool = True,
                  blocks: Iterable[tuple[int, int]] | None = None) -> AbstractContextManager[None]:
    """gluon_switch("forward", ...): the Gluon forward on (or off) within a with block."""
    return gluon_switch("forward", on, blocks)


def gluon_backward(on: bool = True,
                   blocks: Iterable[tuple[int, int]] | None = None) -> AbstractContextManager[None]:
    """gluon_switch("backward", ...): the Gluon backward on (or off) within a with block."""
    return gluon_switch("backward", on, blocks)


@dataclass(frozen=True)
class Plan:
    num_warps: int
    num_stages: int
    step: int = 1
    split: int = 1
    rows_split: int = 1

    def launch_kwargs(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def padded_head(d: int) -> int:
    return max(MIN_TILE, 1 << (d - 1).bit_length())


def key(kernel: str, block_q: int, block_k: int, d: int) -> str:
    return f"{kernel}-{block_q}x{block_k}-d{padded_head(d)}"


def default_plan(kernel: str, block_q: int, block_k: int, d: int) -> Plan:
    """Before measurement: 64-key blocks go two per step (a 128-wide tile, half the softmax
    rescales); one warpgroup per 64 rows of the program's own block (query rows for fwd and
    dq, key rows for dkdv), so two for 128-row blocks (SLA's 128 x 64 too) or D = 256. On the
    H100 the 128-row dq ran 15% faster with 8 warps than 4, the 64-row kernels 2x faster with
    4 than 8 (bench/NOTES-sparse.md, run 3). dK/dV takes 128-row query blocks 32 rows a step:
    compiled for sm90 (Triton 3.6, D=128), whole 128-row steps spilled 576-688 bytes of
    registers, 32-row steps none (bench/NOTES-sparse.md)."""
    rows = block_k if kernel == "dkdv" else block_q
    warps = 8 if rows >= 128 or d > 128 else 4
    stages = 3 if d <= 128 else 1
    own, other = (block_q, block_k) if kernel == "dkdv" else (block_k, block_q)
    step = 2 if own <= 64 and other <= 64 and d <= 128 else 1
    if kernel != "fwd":
        stages = min(stages, 2)
    rows_split = block_q // 32 if kernel == "dkdv" and block_q >= 128 and step == 1 else 1
    return Plan(warps, stages, step, 1, rows_split)


def plan_from(options: dict[str, int]) -> Plan:
    """A Plan from a LAUNCH_OPTIONS entry (num_warps, num_stages required; step, split)."""
    return Plan(int(options["num_warps"]), int(options["num_stages"]),
                int(options.get("step", 1)), int(options.get("split", 1)),
                int(options.get("rows_split", 1)))


def smem_bytes(kernel: str, plan: Plan, block_q: int, block_k: int, d: int, es: int) -> int:
    """Shared memory Triton needs for a plan on Hopper, an upper bound fitted to what Triton 3.6
    asked for on an H100 (fwd: Q + P + max(1, stages - 1) K/V buffers, stages buffers where a
    step gathers several key blocks; dq: Q + dO + stages K/V buffers; dkdv: resident K/V +
    stages Q/dO buffers, + P and dS for float32)."""
    bd = padded_head(d)
    if kernel == "dkdv":
        keys, rows = block_k // plan.split, block_q * plan.step // plan.rows_split
        scores = 2 * keys * rows if es == 4 else 0  # tf32 dots read P and dS from shared memory
        return (2 * keys * bd + plan.num_stages * 2 * rows * bd + scores) * es
    rows, keys = block_q // plan.split, block_k * plan.step
    kv = 2 * keys * bd * es
    if kernel == "fwd":  # a gathered tile (step > 1) took a buffer per stage on the H100
        buffers = plan.num_stages if plan.step > 1 else max(1, plan.num_stages - 1)
        return rows * bd * es + rows * keys * es + buffers * kv
    return 2 * rows * bd * es + plan.num_stages * kv


def valid_plan(kernel: str, plan: Plan, block_q: int, block_k: int) -> bool:
    own, other = (block_k, block_q) if kernel == "dkdv" else (block_q, block_k)
    rows_ok = plan.rows_split == 1 or (
        kernel == "dkdv" and plan.step == 1 and plan.rows_split & (plan.rows_split - 1) == 0
        and block_q % plan.rows_split == 0 and block_q // plan.rows_split >= MIN_TILE)
    return (plan.num_warps in (1, 2, 4, 8, 16) and plan.num_stages >= 1
            and plan.step >= 1 and plan.step & (plan.step - 1) == 0
            and other * plan.step <= MAX_STEP_KEYS
            and plan.split >= 1 and own % plan.split == 0 and own // plan.split >= MIN_TILE
            and plan.rows_split >= 1 and rows_ok)


def ladder(kernel: str, wanted: Plan, block_q: int, block_k: int) -> list[Plan]:
    """The plans to try, best first: fewer stages, then smaller steps, then more splits."""
    plans: list[Plan] = []
    step, split = wanted.step, wanted.split
    while True:
        for stages in range(wanted.num_stages, 0, -1):
            plan = replace(wanted, num_stages=stages, step=step, split=split)
            if valid_plan(kernel, plan, block_q, block_k) and plan not in plans:
                plans.append(plan)
        if step > 1:
            step //= 2
        elif valid_plan(kernel, replace(wanted, step=1, split=split * 2), block_q, block_k):
            split *= 2
        else:
            return plans


def wanted_plan(kernel: str, block_q: int, block_k: int, d: int) -> Plan:
    """The LAUNCH_OPTIONS entry for this size, else default_plan; a tuned entry that cannot
    tile these blocks is an error, not skipped."""
    name = key(kernel, block_q, block_k, d)
    if name not in LAUNCH_OPTIONS:
        return default_plan(kernel, block_q, block_k, d)
    plan = plan_from(LAUNCH_OPTIONS[name])
    if not valid_plan(kernel, plan, block_q, block_k):
        raise BlockSparseInputError(
            f"LAUNCH_OPTIONS[{name!r}]={LAUNCH_OPTIONS[name]} is not supported by {NAME}; "
            f"allowed: split dividing the block into tiles of at least {MIN_TILE} rows, step a "
            f"power of two with step * block at most {MAX_STEP_KEYS}, rows_split (dkdv, step "
            f"1) a power of two leaving steps of at least {MIN_TILE} rows")
    return plan


def fitting_plans(kernel: str, block_q: int, block_k: int, d: int, dtype: torch.dtype,
                  limit: int) -> list[Plan]:
    """The ladder's plans whose estimate fits `limit` bytes of shared memory, best first."""
    es = torch.empty((), dtype=dtype).element_size()
    wanted = wanted_plan(kernel, block_q, block_k, d)
    return [p for p in ladder(kernel, wanted, block_q, block_k)
            if smem_bytes(kernel, p, block_q, block_k, d, es) <= limit]


def check_fits(kernels: tuple[str, ...], block_q: int, block_k: int, d: int,
               dtype: torch.dtype, limit: int) -> None:
    """The capability limit: a typed error when no plan of a needed kernel fits the device's
    shared memory (even one stage, one block per step, 16-row tiles)."""
    for kernel in kernels:
        if not fitting_plans(kernel, block_q, block_k, d, dtype, limit):
            what = "forward" if kernel == "fwd" else "backward"
            raise BlockSparseInputError(
                f"block_q={block_q}, block_k={block_k} with head_size={d} and "
                f"{str(dtype).removeprefix('torch.')} is not supported by the {NAME} kernel's "
                f"{what} on this device ({limit} bytes of shared memory per block); use 16-bit "
                "inputs, smaller blocks or a smaller head size")
