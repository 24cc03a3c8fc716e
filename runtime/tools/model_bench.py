"""Time every available backend on a model preset's attention shapes (`attnrt bench --model`).

Shapes: B batch, N query tokens, M key tokens, H heads, Hkv kv heads, D head size; inputs are
[B, N, H, D] / [B, M, Hkv, D] of the chosen dtype.

For each shape of the preset and each backend that can serve it here: a check against the
float64 reference on fresh inputs of at most --check-seq tokens (a wrong backend is not timed),
then the median of --repeats forward runs (attnrt.benchmark's timer: CUDA events, or
perf_counter with a sync). Per step = layers x calls per step x time per call, summed over a
layer's calls; the speed-up is PyTorch's default SDPA (TORCH_SDPA) over attnrt's choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from attnrt.errors import AttnrtError
from attnrt.selection import registry
from attnrt.selection.device import Device
from attnrt.selection.dispatch import decide, reasons_for
from attnrt.selection.request import NAME_DTYPES, AttentionRequest
from attnrt.tools import benchmark, model_sparse, timing
from attnrt.tools.models import AttentionShape, ModelPreset

BASELINE = "TORCH_SDPA"
LONG_RUN_S = 60.0
# Rough forward throughput (FLOP/s) per platform for the run-time estimate; REFERENCE is slower.
_RATE = {"cpu": 3e10}
_GPU_RATE, _REFERENCE_SLOWDOWN = 2e14, 8.0
# Grid flags of `attnrt bench` that have no meaning with --model, and their defaults.
_GRID_ONLY = {"heads": None, "kv_heads": None, "head_sizes": None, "seq_lens": None,
              "causal": "0", "pass_": "fwd", "batch": 1, "rounds": None}


@dataclass
class Row:
    backend: str
    shape: str
    status: str  # "ok", "WRONG" (failed the reference check, not timed), "FAILED" (raised)
    ms: float | None = None
    rel_error: float | None = None
    error: str = ""
    chosen: bool = False
    method: str = "dense"  # what is computed: a sparse row (model_sparse) names its method


def _request(shape: AttentionShape, dtype: str) -> AttentionRequest:
    return AttentionRequest(shape.head_size, dtype, shape.heads, shape.kv_heads, shape.causal,
                            seq_len=shape.n)


def _inputs(shape: AttentionShape, n: int, m: int, dtype: str,
            device: str) -> tuple[torch.Tensor, ...]:
    dt = NAME_DTYPES[dtype]
    return (torch.randn(shape.batch, n, shape.heads, shape.head_size, dtype=dt, device=device),
            *(torch.randn(shape.batch, m, shape.kv_heads, shape.head_size, dtype=dt,
                          device=device) for _ in range(2)))


def check_shape(impl: Any, shape: AttentionShape, dtype: str, device: str,
                check_seq: int) -> float:
    """Relative L2 error vs the float64 reference on at most `check_seq` queries and keys."""
    from attnrt.backends.reference import chunked_attention

    n, m = min(shape.n, check_seq), min(shape.m, check_seq)
    if shape.causal:
        n = m = min(n, m)
    q, k, v = _inputs(shape, n, m, dtype, device)
    with torch.no_grad():
        out = impl.forward(q, k, v, None)
    ref_dev = benchmark._reference_device(device)
    q64, k64, v64 = (t.to(ref_dev, torch.float64) for t in (q, k, v))
    ref = chunked_attention(q64, k64, v64, shape.causal, shape.head_size ** -0.5)
    return benchmark._rel(out.to(ref_dev), ref)


def measure_shape(name: str, shape: AttentionShape, dtype: str, device: str, repeats: int,
                  check_seq: int) -> Row:
    """Check `name` on `shape`, then time its forward if it is right."""
    errors = (AttnrtError, RuntimeError, ValueError, TypeError)
    try:
        impl = registry.load(name).get_impl_cls()(
            num_heads=shape.heads, head_size=shape.head_size,
            softmax_scale=shape.head_size ** -0.5, causal=shape.causal,
            num_kv_heads=shape.kv_heads, prefix="bench-model")
        err = check_shape(impl, shape, dtype, device, check_seq)
        if not err <= benchmark.TOLERANCE[dtype]:  # also catches NaN
            return Row(name, shape.label, "WRONG", rel_error=err, error=f"rel error {err:.2e}")
        q, k, v = _inputs(shape, shape.n, shape.m, dtype, device)

        def forward() -> Any:
            with torch.no_grad():
                return impl.forward(q, k, v, None)

        timing.run_times(forward, lambda: None, device, 1)  # compiles, autotuning
        ms = statistics.median(timing.run_times(forward, lambda: None, device, repeats))
    except errors as exc:
        return Row(name, shape.label, "FAILED", error=f"{type(exc).__name__}: "
                   f"{benchmark._first_line(exc)}")
    return Row(name, shape.label, "ok", ms, err)


def plan(model: ModelPreset, dtype: str, device: Device,
         names: list[str] | None) -> list[tuple[AttentionShape, list[str], str | None]]:
    """(shape, backends that can serve it here, attnrt's choice) per shape of the preset."""
    pool = names if names is not None else registry.names()
    out = []
    for shape in model.attention:
        request = _request(shape, dtype)
        out.append((shape, [n for n in pool if not reasons_for(n, request, device)],
                    decide(request, device).backend))
    return out


def estimate_seconds(steps: list[tuple[AttentionShape, list[str], str | None]],
                     device: Device, repeats: int) -> float:
    """A rough run time from the grid: FLOPs of every timed run at a per-platform rate."""
    rate = _RATE.get(device.platform, _GPU_RATE)
    total = 0.0
    for shape, names, _ in steps:
        for name in names:
            slow = _REFERENCE_SLOWDOWN if name == "REFERENCE" else 1.0
            total += shape.flops() * (repeats + 2) * slow / rate
    return total


def per_step(model: ModelPreset, rows: list[Row]) -> dict[str, float]:
    """Attention ms per step for each backend that ran every shape, and 'attnrt' for the
    backend attnrt picks per shape."""
    times: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.status == "ok" and r.ms is not None:
            times.setdefault(r.backend, {})[r.shape] = r.ms
            if r.chosen:
                total = "attnrt" if r.method == "dense" else f"attnrt + {r.method}"
                times.setdefault(total, {})[r.shape] = r.ms
    for name in [n for n in times if n.startswith("attnrt + ")]:  # dense where not sparse
        times[name] = {**times.get("attnrt", {}), **times[name]}
    weight = model.layers * model.calls_per_step
    labels = [a.label for a in model.attention]
    return {name: weight * sum(t[label] for label in labels)
            for name, t in times.items() if all(label in t for label in labels)}


def summary(model: ModelPreset, rows: list[Row]) -> dict[str, Any]:
    """Per-step attention time per backend, attnrt's, the SDPA baseline's and the speed-up."""
    steps = per_step(model, rows)
    chosen, base = steps.get("attnrt"), steps.get(BASELINE)
    sparse = {name.removeprefix("attnrt + "): ms for name, ms in steps.items()
              if name.startswith("attnrt + ")}
    return {"per_step_ms": steps, "attnrt_ms_per_step": chosen,
            "attnrt_s_per_generation": chosen * model.steps / 1e3 if chosen else None,
            "sdpa_ms_per_step": base,
            "speedup_over_sdpa": base / chosen if base and chosen else None,
            "sparse_ms_per_step": sparse,
            "sparse_speedup_over_sdpa": {m: base / ms for m, ms in sparse.items()} if base
            else {}}


def format_report(model: ModelPreset, rows: list[Row], device: Device, dtype: str,
                  notes: list[str] | None = None) -> str:
    lines = [f"attnrt bench --model {model.name} on {device.describe()}, {dtype}; "
             "* = attnrt's choice",
             f"  {model.title}: {model.layers} layers x {model.calls_per_step} calls/step, "
             f"{model.steps} steps  ({model.source})"]
    lines += [f"    {a.describe()}" for a in model.attention]
    notes = notes or []
    lines.append(f"  {'backend':<32} {'call':<8} {'ms/call':>10} {'ms/step':>11} {'rel err':>9}")
    weight = model.layers * model.calls_per_step
    for r in rows:
        err = f"{r.rel_error:.1e}" if r.rel_error is not None else "-"
        cols = (f"{r.ms:>10.3f} {r.ms * weight:>11.1f} {err:>9}" if r.ms is not None
                else f"{r.status:>10} {'':>11} {err:>9}  {r.error}")
        lines.append(f"{'*' if r.chosen else ' '} {r.backend:<32} {r.shape:<8} {cols}")
    s = summary(model, rows)
    if s["attnrt_ms_per_step"] is not None:
        lines.append(f"attention per step: {s['attnrt_ms_per_step']:.1f} ms through attnrt "
                     f"({s['attnrt_s_per_generation']:.1f} s per {model.steps}-step generation)")
    if s["speedup_over_sdpa"] is not None:
        lines.append(f"speed-up over PyTorch's default SDPA: {s['speedup_over_sdpa']:.2f}x "
                     f"({s['sdpa_ms_per_step']:.1f} ms per step)")
    for method, ms in s["sparse_ms_per_step"].items():
        speedup = s["sparse_speedup_over_sdpa"].get(method)
        lines.append(f"with {method} where the model's sparse variant uses it: {ms:.1f} ms per "
                     "step" + (f", {speedup:.2f}x over PyTorch's default SDPA" if speedup
                               else ""))
    return "\n".join(lines + notes)


def require_matplotlib(path: str) -> Any:
    """pyplot, or BenchDependencyError before anything runs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise benchmark.BenchDependencyError(
            f"--plot={path} needs matplotlib ({exc}); install it with pip install matplotlib "
            "(or attnrt[plot])") from None
    return plt


def write_model_plot(model: ModelPreset, rows: list[Row], device: Device, path: str) -> None:
    """Bars of attention ms per step per backend; attnrt's choice marked, the device named."""
    plt = require_matplotlib(path)
    steps = per_step(model, rows)
    chosen = {r.backend for r in rows if r.chosen}
    names = [n for n in steps if n != "attnrt"]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * max(len(names), 1)))
    colors = ["tab:orange" if n in chosen else "tab:blue" for n in names]
    ax.barh(names, [steps[n] for n in names], color=colors)
    for i, n in enumerate(names):
        if n in chosen:
            ax.annotate(" * attnrt's choice", (steps[n], i), va="center", fontsize=8)
    ax.set_xlabel("attention ms per denoising step")
    ax.set_title(f"{model.title}\n{device.describe()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _check_flags(args: argparse.Namespace) -> str | None:
    """Refuse grid flags that --model would otherwise ignore; the dtype (or None: default)."""
    for flag, default in _GRID_ONLY.items():
        if getattr(args, flag, default) != default:
            raise ValueError(f"--{flag.rstrip('_').replace('_', '-')}="
                             f"{getattr(args, flag)!r} does not apply with --model; allowed "
                             "with --model: --dtypes (one), --backends, --repeats, --check-seq, "
                             "--scale, --plot, --out, --json")
    if args.scale < 1:
        raise ValueError(f"--scale={args.scale} is not allowed; allowed: an integer >= 1")
    dtypes = benchmark._csv(args.dtypes) if args.dtypes else []
    if len(dtypes) > 1 or (dtypes and dtypes[0] not in benchmark.TOLERANCE):
        raise ValueError(f"--dtypes={args.dtypes!r} is not allowed with --model; allowed: one "
                         f"of {', '.join(benchmark.TOLERANCE)}")
    return dtypes[0] if dtypes else None


def run_model_bench(args: argparse.Namespace, model: ModelPreset) -> int:
    dtype = _check_flags(args)
    if args.plot:
        require_matplotlib(args.plot)  # before anything runs
    device = benchmark.bench_device()
    dtype = dtype or ("fp32" if device.platform == "cpu" else "bf16")
    model = model.scaled(args.scale) if args.scale > 1 else model
    names = benchmark._csv(args.backends) if args.backends else None
    for name in names or ():
        registry.spec(name)  # unknown names fail here, listing the registered ones
    repeats = args.repeats or 5
    sparsity = model_sparse.check_sparsity(args.vsa_sparsity)
    grid = plan(model, dtype, device, names)
    sparse = model_sparse.vsa_plan(model, dtype, device, names)
    seconds = estimate_seconds(grid, device, repeats) + (1 - sparsity) * estimate_seconds(
        sparse, device, repeats)
    if seconds > LONG_RUN_S:
        print(f"attnrt: warning: this run may take about {seconds / 60:.0f} min on "
              f"{device.describe()} (estimated from the grid); --scale, --backends or "
              "--repeats shorten it", file=sys.stderr)
    rows = _run(grid, dtype, benchmark._torch_type(device), repeats, args.check_seq,
                sparse, sparsity)
    data = {**benchmark.environment(device), "model": asdict(model), "dtype": dtype,
            "results": [asdict(r) for r in rows], **summary(model, rows)}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    if args.plot:
        write_model_plot(model, rows, device, args.plot)
    print(json.dumps(data, indent=2) if args.json else format_report(
        model, rows, device, dtype, model_sparse.unserved(sparse, sparsity)))
    return 0


def _run(grid: list[tuple[AttentionShape, list[str], str | None]], dtype: str, device: str,
         repeats: int, check_seq: int, sparse: model_sparse.Plan | None = None,
         sparsity: float = 0.875) -> list[Row]:
    """Dense rows for `grid`, then VSA rows for `sparse` (model_sparse), with progress."""
    from attnrt.tools.progress import Progress

    sparse = sparse or []
    count = sum(len(names) for _, names, _ in grid + sparse)
    progress, rows = Progress([1.0] * count), []
    for shape, names, chosen in grid:
        for name in names:
            progress.step(f"{name} {shape.describe()}")
            rows.append(measure_shape(name, shape, dtype, device, repeats, check_seq))
            rows[-1].chosen = name == chosen
    for shape, names, chosen in sparse:
        for name in names:
            progress.step(f"{name} {model_sparse.method_label(sparsity)} {shape.describe()}")
            rows.append(model_sparse.measure_vsa(name, shape, dtype, device, repeats,
                                                 check_seq, sparsity))
            rows[-1].chosen = name == chosen
    progress.close()
    return rows
