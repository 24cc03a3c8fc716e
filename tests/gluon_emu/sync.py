"""mbarriers and partitions of the Gluon emulator: barriers whose waits block (with a timeout
that reports a deadlock) and warp_specialize's partitions as threads of one launch."""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable

TIMEOUT_S = float(os.environ.get("GLUON_EMU_TIMEOUT", "8"))
_POLL_S = 0.05
_HERE = os.path.dirname(os.path.abspath(__file__))
_MACHINERY = tuple(os.path.join(_HERE, f) for f in ("sync.py", "fake.py", "memory.py"))


class EmulationError(RuntimeError):
    """The kernel did something the hardware would not allow (too many arrivals, bad dtypes)."""


class Deadlock(RuntimeError):  # noqa: N818 (the name says what was found)
    """A partition's mbarrier wait did not complete within TIMEOUT_S."""


class Aborted(RuntimeError):  # noqa: N818
    """A partition stopped because another one of its program failed."""


class Launch:
    """The barriers of the running program, so that a failing partition wakes the others."""

    abort = threading.Event()
    barriers: list[Barrier] = []

    @classmethod
    def reset(cls) -> None:
        cls.abort.clear()
        cls.barriers = []

    @classmethod
    def fail(cls) -> None:
        cls.abort.set()
        for bar in cls.barriers:
            with bar.cv:
                bar.cv.notify_all()


def kernel_line() -> str:
    """The innermost stack line outside the emulator's machinery (the kernel's source line)."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename not in _MACHINERY and "threading" not in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.lineno}: {frame.line}"
    return "?"


class Barrier:
    """An mbarrier: a phase completes when `count` arrivals and the expected bytes are in."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cv = threading.Condition()
        self.count = 1
        self.pending = 1
        self.tx = 0
        self.phase = 0
        Launch.barriers.append(self)

    def init(self, count: int) -> None:
        self.count = self.pending = int(count)

    def _complete_if_done(self) -> None:
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count
            self.cv.notify_all()

    def arrive(self) -> None:
        with self.cv:
            if self.pending <= 0:
                raise EmulationError(f"{self.name}: more arrivals than its count {self.count}")
            self.pending -= 1
            self._complete_if_done()

    def expect(self, nbytes: int) -> None:
        """mbarrier.expect: arrives once and adds nbytes of transactions to the phase."""
        with self.cv:
            self.tx += nbytes
            self.pending -= 1

    def complete_tx(self, nbytes: int) -> None:
        with self.cv:
            self.tx -= nbytes
            if self.tx < 0:
                raise EmulationError(f"{self.name}: {-self.tx} bytes arrived beyond expect")
            self._complete_if_done()

    def wait(self, parity: int) -> None:
        """Blocks until the phase of this parity has completed (current parity differs)."""
        deadline = time.monotonic() + TIMEOUT_S
        with self.cv:
            while (self.phase & 1) == int(parity):
                if Launch.abort.is_set():
                    raise Aborted(threading.current_thread().name)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Deadlock(f"{threading.current_thread().name} waits on {self.name} "
                                   f"for parity {int(parity)} (phase {self.phase}, "
                                   f"{self.pending} arrivals and {self.tx} bytes missing) at "
                                   f"{kernel_line()}")
                self.cv.wait(min(left, _POLL_S))


class BarrierArray:
    """allocate_shared_memory(int64, [n, 1], MBarrierLayout()): n barriers; .index(i) -> one."""

    def __init__(self, bars: list[Barrier]) -> None:
        self.bars = bars

    def index(self, i: int) -> BarrierArray:
        return BarrierArray([self.bars[int(i)]])

    @property
    def one(self) -> Barrier:
        if len(self.bars) != 1:
            raise EmulationError(f"a barrier op on {len(self.bars)} barriers (index one first)")
        return self.bars[0]


def _run_partition(fn: Callable, args: tuple, errors: list[BaseException]) -> None:
    import torch

    try:
        with torch.no_grad():
            fn(*args)
    except BaseException as exc:  # noqa: BLE001 (reported by warp_specialize)
        errors.append(exc)
        if not isinstance(exc, (Aborted, Deadlock)):  # a deadlock: every waiter times out
            Launch.fail()


def warp_specialize(partitions, warps=None, regs=None, program: str = "") -> None:
    """Runs each (fn, args) partition in its own thread; raises the first failure (a Deadlock
    names every partition that timed out)."""
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_run_partition, args=(fn, args, errors),
                                name=f"{fn.__name__}{program}") for fn, args in partitions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stuck = [str(e) for e in errors if isinstance(e, Deadlock)]
    if stuck:
        raise Deadlock("; ".join(stuck))
    real = [e for e in errors if not isinstance(e, Aborted)]
    if real:
        raise real[0]
