"""TRITON_FLASH_ATTN's input checks: every refusal names the argument and what is allowed."""

from __future__ import annotations

import math
import os

import torch

NAME = "TRITON_FLASH_ATTN"  # the one place the name is written
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_SIZES = range(32, 257, 8)  # TRITON_FLASH_ATTN declares these; the backend reads them


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}={type(t).__name__} is not supported by {NAME}; expected a "
                        "torch.Tensor")
    if t.dim() != 4:
        raise ValueError(f"{name}.ndim={t.dim()} is not supported by {NAME}; expected 4 "
                         f"({'[B, N, H, D]' if name == 'q' else '[B, M, Hkv, D]'})")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}.dtype={t.dtype} is not supported by {NAME}; supported: "
                        "float16, bfloat16, float32")
    if 0 in t.shape:
        raise ValueError(f"{name}.shape={tuple(t.shape)} is not supported by {NAME}; every "
                         "dimension must be at least 1")
    return t


def _check_device(q: torch.Tensor) -> None:
    if q.device.type == "cuda":
        return
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(f"q.device={q.device} is not supported by {NAME}; supported: cuda, or cpu "
                     "with TRITON_INTERPRET=1 set before triton is imported")


def _check_pair(q: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.dtype != q.dtype:
        raise TypeError(f"{name}.dtype={t.dtype} is not supported by {NAME}; it must equal "
                        f"q.dtype={q.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name}.device={t.device} is not supported by {NAME}; it must equal "
                         f"q.device={q.device}")
    if t.shape[0] != q.shape[0] or t.shape[3] != q.shape[3]:
        raise ValueError(f"{name}.shape={tuple(t.shape)} is not supported by {NAME}; batch and "
                         f"head size must match q.shape={tuple(q.shape)}")


def check_inputs(q: object, k: object, v: object, softmax_scale: object) -> None:
    q, k, v = _check_tensor("q", q), _check_tensor("k", k), _check_tensor("v", v)
    _check_device(q)
    _check_pair(q, "k", k)
    _check_pair(q, "v", v)
    if v.shape != k.shape:
        raise ValueError(f"v.shape={tuple(v.shape)} is not supported by {NAME}; it must equal "
                         f"k.shape={tuple(k.shape)}")
    if q.shape[3] not in HEAD_SIZES:
        raise ValueError(f"head_size={q.shape[3]} is not supported by {NAME}; supported: "
                         "multiples of 8 from 32 to 256")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"num_kv_heads={k.shape[2]} is not supported by {NAME} with "
                         f"num_heads={q.shape[2]}; num_heads must be a multiple of num_kv_heads")
    if softmax_scale is not None and not (
        isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
        and softmax_scale > 0
    ):
        raise ValueError(f"softmax_scale={softmax_scale!r} is not supported by {NAME}; "
                         "expected None or a finite number > 0")
