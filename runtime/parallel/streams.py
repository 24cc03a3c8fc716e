"""Streams for sequence parallelism: a side stream for packing and collectives beside attention,
a second compute stream for local-first's attention B, and the short kernel that lets waiting
work land before a persistent attention kernel takes every SM (bench/NOTES-distributed.md).
No-ops off CUDA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch

from attnrt.ctxvars import visible
from attnrt.parallel.peer_copies import recorded

_STREAMS: dict[tuple[int, str], Any] = {}  # (device index, role): one forward at a time


def _stream_of(device: torch.device, role: str, priority: int = 0) -> Any:
    """This process's stream for `role` on CUDA `device`, made on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _STREAMS.get((index, role))
    if stream is None:
        stream = _STREAMS[index, role] = torch.cuda.Stream(torch.device("cuda", index),
                                                           priority=priority)
    return stream


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[Any]:
    """Run the enclosed work (packing copies, collectives) on a second CUDA stream of `device`,
    after everything already queued on the current one; a no-op on other devices.

    Buffers allocated inside belong to that stream. It is safe to drop them after a `wait()` on
    the current stream: every entry first waits for the current stream, so the side stream never
    reuses a block before the current stream's reads of it are done.
    """
    if device.type != "cuda":
        yield None
        return
    # High priority, like the NCCL twin's: packing copies must not queue behind attention.
    stream = _stream_of(device, "side", priority=-1)
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        yield stream


_HEAD_START_CYCLES = 20_000  # ~10 us at H100 clocks


def head_start(device: torch.device) -> None:
    """Queue a ~10 us kernel on the current stream, after a collective was just started.

    A persistent attention kernel (cuDNN's on Hopper) takes every SM it finds free and keeps
    it to the end; a collective that becomes ready at the same moment then waits for the whole
    kernel. Queued between the two, this short kernel lets the collective's blocks land on
    their SMs first (measured: bench/NOTES-distributed.md). A no-op off CUDA.
    """
    if device.type != "cuda":
        return
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        sleep(_HEAD_START_CYCLES)
    else:  # a tiny kernel is a shorter head start, but still one
        torch.zeros(1, device=device)


def join_stream(device: torch.device, stream: Any) -> None:
    """Make the current stream wait for what `stream` (from side_stream; None: nothing) queued."""
    if stream is not None:
        torch.cuda.current_stream(device).wait_stream(stream)


# Local-first runs attention B on a compute stream of its own, `beside` A (serial_launches():
# B queued after A, for comparison). A persistent kernel's last wave leaves SMs idle until its
# slowest block ends; a kernel on another stream takes each SM as it frees, so B fills A's tail
# and C fills B's. B must take the SMs before C (its output still travels back; in H200 traces
# C first cost ~0.3 ms per forward at N=32760). Released by the same event, C went first even
# with B's stream at high priority; so C also waits for a ~10 us kernel queued after that
# event: by its end B's blocks hold the SMs.
_B_BESIDE: ContextVar[bool] = ContextVar("attnrt_local_first_b_beside", default=True)


@contextlib.contextmanager
def serial_launches() -> Iterator[None]:
    """Within: A, B and C queued on the current stream one after another (what the two-stream
    schedule is measured against, bench/distributed_gpu.py's /serial)."""
    token = _B_BESIDE.set(False)
    try:
        yield
    finally:
        _B_BESIDE.reset(token)


@contextlib.contextmanager
def beside(device: torch.device, after: Any, joins: list[Any]) -> Iterator[None]:
    """Run the enclosed work on a second compute stream of `device` that waits for `after`
    (a recorded work) but not for what the current stream queued since; appends to `joins`
    a work for all of it (waited for on the current stream, the stream returns to that order).
    On the current stream where devices have no streams, or within serial_launches()."""
    if device.type != "cuda" or not visible(_B_BESIDE):
        yield
        return
    with torch.cuda.stream(_stream_of(device, "beside")):
        after.wait()
        try:
            yield
        finally:
            joins.append(recorded(device))
