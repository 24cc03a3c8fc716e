"""Context variables a backward can read (attnrt.ctxvars): the forward context, a forced
backend and the Gluon switches set around backward() reach code that autograd runs on its
worker thread (a CUDA backward; a checkpointed forward recomputed there).

On CPU, autograd runs the backward on the calling thread, so the worker thread is simulated:
a new Python thread starts with an empty context, and the launching context is stashed where
torch's `_engine_run_backward` stashes it. The gpu test runs a real CUDA backward.
"""

from __future__ import annotations

import contextvars
import threading

import pytest
import torch

import attnrt
from attnrt import ctxvars
from attnrt.context import get_forward_context, set_forward_context
from attnrt.kernels.block_sparse import options
from attnrt.selection.dispatch import forced_backend


def _on_worker(fn, launched: contextvars.Context | None):
    """fn() on a fresh thread (an empty context, like autograd's device threads), with
    `launched` stashed as torch stashes the backward-launching context (None: nothing)."""
    result: list = []

    def run() -> None:
        if launched is not None:
            torch._C._stash_obj_in_tls("context", launched)
        try:
            result.append(fn())
        finally:
            if launched is not None:
                torch._C._remove_obj_from_tls("context")

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return result[0]


def test_a_worker_thread_sees_the_context_that_launched_the_backward():
    meta = object()
    with set_forward_context(current_timestep=7, attn_metadata=meta), \
            attnrt.force_backend("REFERENCE"), options.gluon_backward(blocks=[(64, 64)]):
        launched = contextvars.copy_context()
    seen = _on_worker(lambda: (get_forward_context().attn_metadata,
                               get_forward_context().current_timestep, forced_backend(),
                               options.gluon_backward_on(64, 64)), launched)
    assert seen[0] is meta
    assert seen[1] == 7
    assert seen[2] is not None
    assert seen[2][0] == "REFERENCE"
    assert seen[3] is True


def test_without_a_stashed_context_a_worker_thread_sees_the_defaults():
    with set_forward_context(attn_metadata=object()), attnrt.force_backend("REFERENCE"):
        seen = _on_worker(lambda: (get_forward_context().attn_metadata, forced_backend()), None)
    assert seen[0] is None
    assert seen[1] is None or seen[1][0] != "REFERENCE"


def test_the_current_thread_s_own_value_wins_over_the_launching_one():
    outer, inner = object(), object()
    with set_forward_context(attn_metadata=outer):
        launched = contextvars.copy_context()

    def worker_sets_its_own():
        with set_forward_context(attn_metadata=inner):
            return get_forward_context().attn_metadata

    assert _on_worker(worker_sets_its_own, launched) is inner
    assert ctxvars.launch_context() is None  # nothing stashed on this thread


@pytest.mark.gpu
def test_gpu_a_cuda_backward_sees_the_forward_context_around_backward():
    """A real CUDA backward (autograd's device thread) reads the metadata of the
    set_forward_context around the backward() call, as FastVideo's training step does."""
    seen: list = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            seen.append((threading.current_thread() is threading.main_thread(),
                         get_forward_context().attn_metadata))
            return grad * 2

    meta = object()
    x = torch.randn(8, device="cuda", requires_grad=True)
    with set_forward_context(attn_metadata=meta):
        Probe.apply(x).sum().backward()
    assert len(seen) == 1
    assert seen[0][0] is False  # it ran on autograd's device thread, not this one
    assert seen[0][1] is meta
