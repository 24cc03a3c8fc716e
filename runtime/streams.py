"""Side streams for the exchanges of sequence parallelism: packing and collectives beside
attention, and the short kernel that lets a collective's blocks land before a persistent
attention kernel takes every SM (bench/NOTES-distributed.md). No-ops off CUDA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_SIDE_STREAMS: dict[torch.device, Any] = {}


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
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = torch.device("cuda", index)
    stream = _SIDE_STREAMS.get(key)
    if stream is None:
        # High priority, like the NCCL twin's: packing copies must not queue behind attention.
        stream = _SIDE_STREAMS[key] = torch.cuda.Stream(key, priority=-1)
    stream.wait_stream(torch.cuda.current_stream(key))
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
