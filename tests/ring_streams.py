"""Ring ranks as threads of one process: a transport through queues, with CUDA streams.

Each virtual rank runs ring_forward / ring_backward on its own thread (and, on a GPU, its own
compute stream); what it sends is copied on a communication stream of its own and handed to
the next rank with an event the receiver's stream waits for, as NCCL's p2p stream would. The
transport logs each post and wait, and the attend function each piece, so tests can check
the overlap schedule (a block's rotation is posted before that block is attended).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from attnrt.parallel.ring import Ring

TIMEOUT = 60.0


class ThreadTransport:
    def __init__(self, boxes: dict[tuple[int, str], queue.Queue], ring: Ring, log: list[Any],
                 comm: Any = None) -> None:
        self.boxes, self.ring, self.log, self.comm = boxes, ring, log, comm
        self.keep: list[Any] = []

    def start(self, tensors: list[torch.Tensor], kind: str) -> _Waiting:
        dst = (self.ring.rank + 1) % self.ring.size
        event = None
        if self.comm is not None:
            self.comm.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.comm):
                copies = [t.clone() for t in tensors]
                event = torch.cuda.Event()
                event.record(self.comm)
        else:
            copies = [t.clone() for t in tensors]
        self.keep.append(tensors)  # the sources may not go while the copy reads them
        self.boxes[(dst, kind)].put((copies, event))
        self.log.append(("post", kind))
        return _Waiting(self.boxes[(self.ring.rank, kind)], self.log, kind)


class _Waiting:
    def __init__(self, box: queue.Queue, log: list[Any], kind: str) -> None:
        self.box, self.log, self.kind = box, log, kind

    def wait(self) -> list[torch.Tensor]:
        copies, event = self.box.get(timeout=TIMEOUT)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
        self.log.append(("wait", self.kind))
        return copies


def run_ranks(size: int, body: Callable[[int, ThreadTransport, list[Any]], Any],
              layout: str = "contiguous", device: str = "cpu") -> list[Any]:
    """body(rank, transport, log) on `size` threads; returns each rank's result (re-raises)."""
    boxes: dict[tuple[int, str], queue.Queue] = {
        (r, kind): queue.Queue() for r in range(size) for kind in ("kv", "dkv")}
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        ring = Ring(None, size, rank, layout)
        log: list[Any] = []
        cuda = device == "cuda"
        comm = torch.cuda.Stream() if cuda else None
        compute = torch.cuda.Stream() if cuda else None
        try:
            transport = ThreadTransport(boxes, ring, log, comm)
            if cuda:
                with torch.cuda.stream(compute):
                    results[rank] = (body(rank, transport, log), log)
                torch.cuda.synchronize()
            else:
                results[rank] = (body(rank, transport, log), log)
        except BaseException as exc:  # re-raised on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT * 2)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise TimeoutError("a virtual ring rank did not finish")
    return results
