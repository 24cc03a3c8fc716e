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
from dataclasses import replace
from typing import Any

import torch

from attnrt.parallel.ring import Ring, ring_backward, ring_forward, ring_spec
from attnrt.parallel.ring_grads import PieceBackward, choose_piece_backward
from attnrt.parallel.ring_math import reference_attend
from attnrt.parallel.zigzag import shard_sequence, unshard_sequence
from tests.helpers import dense_reference

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


# ---------------------------------------------------------------- the ring on threads


def ring_on_threads(size: int, layout: str, causal: bool, device: str, dtype: torch.dtype,
                    valid: int = 13, rep: int = 3, backward: str = "torch", d: int = 8,
                    ) -> list[float]:
    """ring_forward / ring_backward on `size` threads vs dense attention; relative L2 errors,
    and every thread's log checked for the overlap schedule. backward: each piece's
    (attnrt.parallel.ring_grads; the name it resolved to is checked against `backward` unless
    "auto")."""
    b, h, hkv = 2, 4, 2
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, valid + rep, x, d, generator=gen, dtype=torch.float64)
               for x in (h, hkv, hkv))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = dense_reference(*leaves, causal)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (ref * g).sum().backward()
    scale = d ** -0.5

    def body(rank: int, transport: object, log: list[object]) -> object:
        def shard(t: torch.Tensor) -> torch.Tensor:
            return shard_sequence(t[:, :valid], rank, ring=size, layout=layout).to(device, dtype)

        base = reference_attend(scale)

        def attend(*args: object) -> object:
            log.append(("attend", None))
            return base(*args)  # type: ignore[arg-type]

        qs = torch.cat([shard(q), q[:, valid:].to(device, dtype)], 1)
        kv = [shard(k), shard(v)]
        extra = [t[:, valid:].to(device, dtype) for t in (k, v)]
        grads = _one_at_a_time(choose_piece_backward(backward, qs, kv[0], causal, scale))
        assert backward == "auto" or grads.name == backward, grads
        log.append(("backward", grads.name))
        spec = ring_spec(transport.ring, kv[0].shape[1], causal, scale, attend, valid, rep,  # type: ignore[attr-defined]
                         grads)
        out, lse = ring_forward(qs, kv, extra, spec, transport)
        dout = torch.cat([shard(g), g[:, valid:].to(device, dtype)], 1)
        return out, ring_backward(dout, qs, kv, extra, out, lse, spec, transport)

    results = run_ranks(size, body, layout, device)
    for _, log in results:
        _check_schedule(log, size)
    outs = [r[0][0].double().cpu() for r in results]
    block = outs[0].shape[1] - rep
    errs = [_rel(unshard_sequence([o[:, :block] for o in outs], ring=size, layout=layout,
                                  length=valid), ref[:, :valid])]
    errs += [_rel(o[:, block:], ref[:, valid:]) for o in outs]
    grads = [r[0][1] for r in results]
    for i, full in enumerate((leaves[1], leaves[2])):
        got = unshard_sequence([gr[1][i].double().cpu() for gr in grads], ring=size,
                               layout=layout, length=valid)
        errs.append(_rel(got, full.grad[:, :valid]))
    dq = unshard_sequence([gr[0][:, :block].double().cpu() for gr in grads], ring=size,
                          layout=layout, length=valid)
    errs.append(_rel(dq, leaves[0].grad[:, :valid]))
    rep_dq = sum(gr[0][:, block:].double().cpu() for gr in grads)  # shares of the ranks
    errs.append(_rel(rep_dq, leaves[0].grad[:, valid:]))
    return errs


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


_KERNELS = threading.Lock()


def _one_at_a_time(backward: PieceBackward) -> PieceBackward:
    """Kernel pieces run under a lock: Triton's interpreter (and its compile caches) are not
    made for several threads at once; on a GPU this orders host launches only."""
    if backward.name == "torch":
        return backward

    def grads(*args: Any) -> Any:
        with _KERNELS:
            return backward.grads(*args)

    return replace(backward, grads=grads)


def _check_schedule(log: list[tuple[str, object]], size: int) -> None:
    """Forward: each of the R - 1 K/V rotations is posted before the block in hand is
    attended and waited for only after it (the transfer overlaps the attention). Backward:
    R - 1 rotations again, and R dK/dV hand-overs (the last one brings each block's home)."""
    posts = [i for i, e in enumerate(log) if e == ("post", "kv")]
    waits = [i for i, e in enumerate(log) if e == ("wait", "kv")]
    assert len(posts) == len(waits) == 2 * (size - 1), log
    for post, wait in zip(posts[:size - 1], waits[:size - 1], strict=True):
        assert post < wait, log
        assert any(kind == "attend" for kind, _ in log[post:wait]), log
    assert log.count(("post", "dkv")) == (size if size > 1 else 0), log
