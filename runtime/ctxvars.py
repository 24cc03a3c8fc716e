"""Context variables a CUDA backward can read: the value set on the thread that ran the forward
and called backward(), also where autograd runs the backward on its own worker thread.

Python context variables belong to a thread's context, and autograd runs a backward with a
CUDA graph on a device worker thread that starts with an empty one, so on torch 2.11 a
`with set_forward_context(...)` or `with force_backend(...)` block was invisible to the
backward's Python code: an autograd Function's backward, and the forward that activation
checkpointing recomputes there. (Seen on the H200: a scoped switch set around forward and
backward was not seen by the backward, bench/NOTES-sparse.md run 5.) torch stashes the context
of the thread that launched backward() for its worker threads (torch.autograd.graph's
`_engine_run_backward`); `visible` reads a variable from it where the current thread has no
value, as FastVideo's module-global forward context is seen by its checkpointed recomputes.
"""

from __future__ import annotations

import contextvars
import threading
from contextvars import ContextVar
from typing import Any, TypeVar

import torch

T = TypeVar("T")
UNSET: Any = object()  # var.get(UNSET) is UNSET: the current context holds no value
_IS_KEY = getattr(torch._C, "_is_key_in_tls", None)
_GET_OBJ = getattr(torch._C, "_get_obj_in_tls", None)
MAIN_THREAD = threading.main_thread().ident  # never an autograd worker thread


def launch_context() -> contextvars.Context | None:
    """The context of the thread that called the running backward(), as torch stashed it for
    autograd's worker threads; None outside a backward or where torch has no such stash."""
    if _IS_KEY is None or _GET_OBJ is None or not _IS_KEY("context"):
        return None
    found = _GET_OBJ("context")
    return found if isinstance(found, contextvars.Context) else None


def visible(var: ContextVar[T]) -> T:
    """var's value in this thread's context; where it has none, its value in the context that
    launched the running backward (see the module docstring); else its default. On the main
    thread (~40 ns more than var.get()) the stash is not looked up."""
    value = var.get(UNSET)
    if value is UNSET:
        if threading.get_ident() != MAIN_THREAD and (launched := launch_context()) is not None:
            value = launched.get(var, UNSET)
        if value is UNSET:
            return var.get()
    return value
