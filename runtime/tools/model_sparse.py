"""Sparse methods in `attnrt bench --model`: VSA on a video model's self-attention.

Shapes: B batch, N = T * H' * W' video tokens of the latent grid (T, H', W'), H heads, Hkv kv
heads, D head size; q, gate [B, N, H, D], k, v [B, N, Hkv, D].

For a preset whose sparse variants use VSA (Wan 2.1: FastVideo's VSA checkpoints) and each of
its shapes with a grid: every backend of method vsa that can serve here is checked against
VSA's float64 reference (attnrt.sparse.vsa_reference) on a grid of at most --check-seq tokens
with the shape's heads and head size, then timed on the full grid as a layer runs it: tile q,
k, v and the gate, attend, untile. A backend that fails the check is not timed. Rows name the
method ("vsa s=0.875"); attnrt's VSA choice is marked, and the per-step total "attnrt + vsa"
takes it for those shapes and attnrt's dense choice for the others (model_bench.per_step).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from attnrt.errors import AttnrtError
from attnrt.selection import registry
from attnrt.selection.device import Device
from attnrt.selection.dispatch import decide, reasons_for
from attnrt.selection.request import NAME_DTYPES, AttentionRequest
from attnrt.tools import benchmark, timing
from attnrt.tools.models import AttentionShape, ModelPreset, scaled_shape

METHOD = "vsa"
Plan = list[tuple[AttentionShape, list[str], str | None]]


def method_label(sparsity: float) -> str:
    return f"{METHOD} s={sparsity:g}"


def check_sparsity(value: float) -> float:
    """--vsa-sparsity, by VSA's own rule (attnrt.sparse.vsa_metadata), named as the flag."""
    from attnrt.sparse.vsa_metadata import check_sparsity as vsa_rule

    try:
        return vsa_rule(value)
    except ValueError:
        raise ValueError(f"--vsa-sparsity={value!r} is not allowed; allowed: a number in [0, 1) "
                         "(the share of key cubes VSA drops)") from None


def vsa_plan(model: ModelPreset, dtype: str, device: Device,
             allowed: list[str] | None = None) -> Plan:
    """(shape, VSA backends that can serve it here, attnrt's VSA choice or None) per shape with
    a grid, for models whose sparse variants use VSA; `allowed` (--backends) limits the
    backends timed, not the choice marked."""
    if METHOD not in model.sparse:
        return []
    out: Plan = []
    for shape in model.attention:
        if shape.grid is None:
            continue
        request = AttentionRequest(shape.head_size, dtype, shape.heads, shape.kv_heads,
                                   shape.causal, seq_len=shape.n, method=METHOD)
        served = [n for n in registry.names() if not reasons_for(n, request, device)]
        names = [n for n in served if allowed is None or n in allowed]
        out.append((shape, names, decide(request, device).backend if served else None))
    return out


def _metadata(grid: tuple[int, int, int], sparsity: float, device: str) -> Any:
    from attnrt.sparse.vsa_metadata import VideoSparseAttentionMetadataBuilder

    return VideoSparseAttentionMetadataBuilder().build(0, grid, (1, 1, 1), sparsity,
                                                       torch.device(device))


def _tensors(shape: AttentionShape, n: int, dtype: str, device: str) -> list[torch.Tensor]:
    dt = NAME_DTYPES[dtype]
    q, gate = (torch.randn(shape.batch, n, shape.heads, shape.head_size, dtype=dt,
                           device=device) for _ in range(2))
    k, v = (torch.randn(shape.batch, n, shape.kv_heads, shape.head_size, dtype=dt,
                        device=device) for _ in range(2))
    return [q, k, v, gate]


def _run(impl: Any, tensors: list[torch.Tensor], md: Any) -> torch.Tensor:
    """What a VSA layer does per call: tile, attend with the gate, untile."""
    with torch.no_grad():
        tiled = [impl.preprocess_qkv(t, md) for t in tensors]
        return impl.postprocess_output(impl.forward(*tiled, md), md)


def check_vsa(impl: Any, shape: AttentionShape, dtype: str, device: str, check_seq: int,
              sparsity: float) -> float:
    """Relative L2 error vs VSA's float64 reference on a grid of at most check_seq tokens."""
    from attnrt.sparse.vsa_reference import vsa_reference

    small = scaled_shape(shape, max(1, -(-shape.n // check_seq)))
    grid = small.grid or (1, 1, small.n)
    tensors = _tensors(shape, small.n, dtype, device)
    out = _run(impl, tensors, _metadata(grid, sparsity, device))
    ref_dev = benchmark._reference_device(device)
    q, k, v, gate = (t.to(ref_dev, torch.float64) for t in tensors)
    ref = vsa_reference(q, k, v, gate, grid, sparsity, shape.head_size ** -0.5)
    return benchmark._rel(out.to(ref_dev), ref)


def measure_vsa(name: str, shape: AttentionShape, dtype: str, device: str, repeats: int,
                check_seq: int, sparsity: float) -> Any:
    """A model_bench.Row for backend `name` running VSA on `shape` (checked, then timed)."""
    from attnrt.tools.model_bench import Row

    label = f"{name} {method_label(sparsity)}"
    errors = (AttnrtError, RuntimeError, ValueError, TypeError)
    try:
        impl = registry.load(name).get_impl_cls()(
            num_heads=shape.heads, head_size=shape.head_size,
            softmax_scale=shape.head_size ** -0.5, causal=False, num_kv_heads=shape.kv_heads,
            prefix="bench-model-vsa")
        err = check_vsa(impl, shape, dtype, device, check_seq, sparsity)
        if not err <= benchmark.TOLERANCE[dtype]:  # also catches NaN
            return Row(label, shape.label, "WRONG", rel_error=err, error=f"rel error {err:.2e}",
                       method=METHOD)
        tensors = _tensors(shape, shape.n, dtype, device)
        md = _metadata(shape.grid or (1, 1, shape.n), sparsity, device)
        timing.run_times(lambda: _run(impl, tensors, md), lambda: None, device, 1)  # compiles
        times = timing.run_times(lambda: _run(impl, tensors, md), lambda: None, device, repeats)
    except errors as exc:
        return Row(label, shape.label, "FAILED", error=f"{type(exc).__name__}: "
                   f"{benchmark._first_line(exc)}", method=METHOD)
    return Row(label, shape.label, "ok", statistics.median(times), err, method=METHOD)


def unserved(plan: Plan, sparsity: float) -> list[str]:
    """Report lines for grid shapes no VSA backend can serve here (said, not skipped)."""
    return [f"{method_label(sparsity)} on {shape.label}: " + (
            f"not timed: --backends names none of method {METHOD}" if chosen else
            f"no backend of method {METHOD} can serve it here (`attnrt explain --method vsa` "
            "says why)") for shape, names, chosen in plan if not names]
