"""`attnrt bench`: time every backend available here on a grid of shapes (`attnrt tune`, in
attnrt.tools.tune, ranks by what it measures).

Shapes: B batch, N sequence (queries and keys), H heads, Hkv kv heads, D head size.

For every case of the grid and every backend that can serve it on this device, bench first checks
the backend against the float64 REFERENCE on fresh random inputs (output, and gradients for the
backward pass) and refuses to time a wrong one (status WRONG, with its error); then it times it
(CUDA/ROCm: torch.cuda.Event pairs around each run, synchronized once at the end as
triton.testing.do_bench does; elsewhere time.perf_counter with a device sync) and reports the
median and the spread of its runs (25th-75th percentile); a case whose fastest backend's spread
overlaps another's is flagged, as their order there is noise (attnrt.tools.timing). With
--rounds R > 1 (GPU default 10) the contenders of a case (within 0.5x of the fastest) are timed
again in R interleaved rounds, and each keeps the median and spread of all its runs (see
timing.retime). A run estimated longer than a minute is announced with its estimate before it
starts, and the progress line shows time elapsed and left (attnrt.tools.progress). FLOPs
count 4*B*H*N*N*D per forward, half of that when causal, 2.5x forward for the backward pass.
The backend the manifest would choose for the case is marked with '*'.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from attnrt.errors import AttnrtError
from attnrt.selection import packs, registry
from attnrt.selection.device import Device, probe
from attnrt.selection.dispatch import decide, reasons_for
from attnrt.selection.request import AttentionRequest
from attnrt.tools import progress, timing

BENCH_HELP = "time every available backend on a grid of shapes"
TOLERANCE = {"fp64": 1e-10, "fp32": 1e-5, "fp16": 3e-3, "bf16": 1.5e-2}


@dataclass(frozen=True)
class Defaults:
    """Grid defaults: small on CPU so `attnrt bench` ends in seconds, model-sized on GPUs."""

    heads: int
    head_sizes: str
    seq_lens: str
    dtypes: str
    repeats: int
    rounds: int


CPU_DEFAULTS = Defaults(heads=4, head_sizes="64", seq_lens="256", dtypes="fp32", repeats=5,
                        rounds=1)
GPU_DEFAULTS = Defaults(heads=24, head_sizes="64,128", seq_lens="4096", dtypes="bf16",
                        repeats=5, rounds=10)


def _torch_type(device: Device) -> str:
    """The torch.device type of tensors on `device`'s platform (its pack says)."""
    return packs.get(device.platform).torch_device_types[0]


class BenchDependencyError(AttnrtError, RuntimeError):
    """An optional package a bench option needs (matplotlib for --plot) is missing."""


@dataclass(frozen=True)
class Case:
    """One shape of the grid; `pass_` is "fwd" or "bwd"."""

    batch: int
    heads: int
    kv_heads: int
    head_size: int
    seq_len: int
    dtype: str
    causal: bool
    pass_: str

    def request(self) -> AttentionRequest:
        """What a layer asks for in this pass: the backward is timed on calls made under
        autograd, which rules may rank apart (their `grad` key), as they may lengths."""
        return AttentionRequest(self.head_size, self.dtype, self.heads, self.kv_heads,
                                self.causal, grad=self.pass_ == "bwd", seq_len=self.seq_len)

    def flops(self) -> float:
        fwd = 4.0 * self.batch * self.heads * self.seq_len ** 2 * self.head_size
        fwd = fwd / 2 if self.causal else fwd
        return fwd * 2.5 if self.pass_ == "bwd" else fwd

    def label(self) -> str:
        heads = f"H{self.heads}" + (f"/{self.kv_heads}" if self.kv_heads != self.heads else "")
        return (f"B{self.batch} N{self.seq_len} {heads} D{self.head_size} {self.dtype}"
                f"{' causal' if self.causal else ''} {self.pass_}")


@dataclass
class Result:
    backend: str
    case: Case
    status: str  # "ok", "WRONG" (failed the reference check, not timed), "FAILED" (raised)
    ms: float | None = None  # the median run
    tflops: float | None = None
    rel_error: float | None = None
    error: str = ""
    chosen: bool = False
    ms_lo: float | None = None  # the runs' spread: 25th and 75th percentiles (timing.spread)
    ms_hi: float | None = None

    def spread(self) -> tuple[float, float]:
        return (self.ms_lo if self.ms_lo is not None else self.ms or 0.0,
                self.ms_hi if self.ms_hi is not None else self.ms or 0.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["case"] = {**asdict(self.case), "label": self.case.label()}
        return data


# ---------------------------------------------------------------- arguments


def _csv(text: str, kind: Callable[[str], Any] = str) -> list[Any]:
    return [kind(x.strip()) for x in str(text).split(",") if x.strip()]


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heads", type=int, default=None, help="query heads (CPU 4, GPU 24)")
    parser.add_argument("--kv-heads", type=int, default=None, help="kv heads (default: --heads)")
    parser.add_argument("--head-sizes", default=None, help="comma list (CPU 64, GPU 64,128)")
    parser.add_argument("--seq-lens", default=None, help="comma list (CPU 256, GPU 4096)")
    parser.add_argument("--dtypes", default=None, help="comma list (CPU fp32, GPU bf16)")
    parser.add_argument("--causal", choices=("0", "1", "both"), default="0",
                        help="0: non-causal (default), 1: causal, both: each")
    parser.add_argument("--pass", dest="pass_", choices=("fwd", "bwd", "both"), default="fwd",
                        help="fwd: inference forward (default), bwd: training forward+backward, "
                             "both: each")
    parser.add_argument("--batch", type=int, default=1, help="B, the batch size (default 1)")
    parser.add_argument("--backends", default=None,
                        help="comma list (default: every backend available here)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per round (CPU 5, GPU 5)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds per case for the backends within 0.5x "
                             "of the fastest; each keeps the median of its runs (CPU 1, GPU 10)")
    parser.add_argument("--check-seq", type=int, default=2048,
                        help="longest N checked against the float64 reference (default 2048)")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser)
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    parser.add_argument("--plot", default=None, help="write a PNG bar chart (needs matplotlib)")
    from attnrt.tools.models import add_model_args

    add_model_args(parser)


def build_grid(args: argparse.Namespace, device: Device) -> list[Case]:
    """The cases the flags ask for, with CPU or GPU defaults for the ones left out."""
    defaults = CPU_DEFAULTS if _torch_type(device) == "cpu" else GPU_DEFAULTS
    heads = args.heads or defaults.heads
    kv_heads = args.kv_heads or heads
    if heads % kv_heads:
        raise ValueError(f"--kv-heads={kv_heads} must divide --heads={heads}")
    causal = {"0": [False], "1": [True], "both": [False, True]}[args.causal]
    passes = ["fwd", "bwd"] if args.pass_ == "both" else [args.pass_]
    dtypes = _csv(args.dtypes or defaults.dtypes)
    for dt in dtypes:
        if dt not in TOLERANCE:
            raise ValueError(f"--dtypes {dt!r} is not allowed; allowed: {', '.join(TOLERANCE)}")
    return [Case(args.batch, heads, kv_heads, d, n, dt, c, p)
            for d in _csv(args.head_sizes or defaults.head_sizes, int)
            for dt in dtypes for c in causal
            for n in _csv(args.seq_lens or defaults.seq_lens, int) for p in passes]


# ---------------------------------------------------------------- checking and timing


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _reference_device(device: str) -> str:
    return "cpu" if device == "mps" else device  # MPS has no float64


def check_error(impl: Any, case: Case, device: str, check_seq: int) -> float:
    """Relative L2 error vs float64 REFERENCE on fresh inputs (output, plus grads for bwd)."""
    from attnrt.backends.reference import chunked_attention

    grad = case.pass_ == "bwd"
    q, k, v = timing.inputs(case, min(case.seq_len, check_seq), device, grad)
    out = impl.forward(q, k, v, None)
    ref_dev = _reference_device(device)
    ref_in = [t.detach().to(ref_dev, torch.float64).requires_grad_(grad) for t in (q, k, v)]
    ref = chunked_attention(ref_in[0], ref_in[1], ref_in[2], case.causal,
                            case.head_size ** -0.5)
    errors = [_rel(out.to(ref_dev), ref)]
    if grad:
        if out.grad_fn is None:
            raise RuntimeError("the backward pass was requested but the output has no gradient")
        g = torch.randn_like(ref)
        out.backward(g.to(device, out.dtype))
        ref.backward(g)
        for t, r in zip((q, k, v), ref_in, strict=True):
            if t.grad is None or r.grad is None:
                raise RuntimeError("the backward pass left an input without a gradient")
            errors.append(_rel(t.grad.to(ref_dev), r.grad))
    return max(errors)


def measure(name: str, case: Case, device: str, repeats: int, check_seq: int) -> Result:
    """Check `name` against the reference, then time it if it is right."""
    impl = timing.make_impl(name, case)
    try:
        err = check_error(impl, case, device, check_seq)
    except (AttnrtError, RuntimeError, ValueError, TypeError) as exc:
        return Result(name, case, "FAILED", error=f"{type(exc).__name__}: {_first_line(exc)}")
    tol = TOLERANCE[case.dtype]
    if not err <= tol:  # also catches NaN
        return Result(name, case, "WRONG", rel_error=err,
                      error=f"rel error {err:.2e} > {tol:.0e} vs float64 REFERENCE; not timed")
    try:
        runs = timing.time_runs(impl, case, device, repeats)
    except (AttnrtError, RuntimeError, ValueError, TypeError) as exc:
        return Result(name, case, "FAILED", rel_error=err,
                      error=f"{type(exc).__name__}: {_first_line(exc)}")
    result = Result(name, case, "ok", rel_error=err)
    timing.set_measure(result, runs)
    return result


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


# ---------------------------------------------------------------- the run


def _candidates(case: Case, device: Device, names: list[str] | None) -> list[str]:
    pool = names if names is not None else registry.names()
    return [n for n in pool if not reasons_for(n, case.request(), device)]


def _chosen(case: Case, device: Device) -> str | None:
    try:
        return decide(case.request(), device).backend
    except (AttnrtError, ValueError):
        return None


def bench_device() -> Device:
    device = probe()
    if device.simulated:
        raise ValueError(f"attnrt bench times real hardware, but the device is simulated "
                         f"({device.describe()}); drop --device and unset ATTNRT_DEVICE")
    return device


def run_grid(args: argparse.Namespace, device: Device) -> list[Result]:
    """Every (case, available backend) of the grid: checked, then timed."""
    cases = build_grid(args, device)
    names = _csv(args.backends) if args.backends else None
    for name in names or ():
        registry.spec(name)  # unknown names fail here, listing the registered ones
    defaults = CPU_DEFAULTS if _torch_type(device) == "cpu" else GPU_DEFAULTS
    repeats = defaults.repeats if args.repeats is None else args.repeats
    rounds = defaults.rounds if args.rounds is None else args.rounds
    for flag, value in (("--repeats", repeats), ("--rounds", rounds)):
        if value < 1:
            raise ValueError(f"{flag}={value}: give a positive count")
    plan = {c: _candidates(c, device, names) for c in cases}
    torch_device = _torch_type(device)
    bar, results = _start(plan, args, torch_device, repeats, rounds), []
    for case, cell_names in plan.items():
        cell = []
        for name in cell_names:
            bar.step(f"{name} {case.label()}")
            cell.append(measure(name, case, torch_device, repeats, args.check_seq))
            cell[-1].chosen = name == _chosen(case, device)
        timing.retime(cell, torch_device, repeats, rounds)
        results += cell
    bar.close()
    return results


def _start(plan: dict[Case, list[str]], args: argparse.Namespace, device: str, repeats: int,
           rounds: int) -> progress.Progress:
    """Announce a long run with its estimate; the progress line weighted by estimated time."""
    steps = [(c, i < 2) for c, names in plan.items() for i in range(len(names))]
    cases = [c for c, _ in steps]
    rates = (progress.calibrate(device, sorted({c.dtype for c in cases}),
                                max(c.heads for c in cases), max(c.head_size for c in cases),
                                max(c.seq_len for c in cases)) if cases else {})
    weights = [progress.step_seconds(c, rates, repeats, rounds, args.check_seq, contender)
               for c, contender in steps]
    progress.announce(sum(weights), len(cases), len(plan))
    return progress.Progress(weights)


def environment(device: Device) -> dict[str, Any]:
    versions = {"torch": str(torch.__version__)}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions["triton"] = importlib.metadata.version("triton")
    return {"device": device.to_dict(), "date": datetime.date.today().isoformat(),
            "versions": versions}


def format_table(results: list[Result], device: Device) -> str:
    lines = [f"attnrt bench on {device.describe()}; * = the manifest's choice; ms: median run, "
             "spread: 25th-75th percentile of the runs",
             f"  {'backend':<22} {'shape':<40} {'TFLOP/s':>9} {'ms':>10} {'spread ms':>17} "
             f"{'rel err':>9}"]
    for r in results:
        mark = "*" if r.chosen else " "
        err = f"{r.rel_error:.1e}" if r.rel_error is not None else "-"
        if r.status == "ok":
            lo, hi = r.spread()
            cols = f"{r.tflops:>9.3g} {r.ms:>10.3f} {f'{lo:.3f}-{hi:.3f}':>17} {err:>9}"
        else:
            cols = f"{r.status:>9} {err:>38}  {r.error}"
        lines.append(f"{mark} {r.backend:<22} {r.case.label():<40} {cols}")
    return "\n".join(lines + overlap_notes(results))


def overlap_notes(results: list[Result]) -> list[str]:
    """One line per case whose fastest backend's spread overlaps another's: their order there
    is noise, so nothing should be ranked by it (attnrt tune refuses to)."""
    notes = []
    for case in dict.fromkeys(r.case for r in results):
        ok = sorted((r for r in results if r.case == case and r.status == "ok" and r.ms),
                    key=lambda r: r.ms or 0.0)
        tied = [r for r in ok[1:] if ok and timing.overlaps(ok[0].spread(), r.spread())]
        if tied:
            names = ", ".join(r.backend for r in tied)
            notes.append(f"  overlapping spreads at {case.label()}: {ok[0].backend} and {names} "
                         "are not told apart by these runs (more --repeats or --rounds, or a "
                         "quieter machine)")
    return notes


def _pyplot(path: str) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BenchDependencyError(f"--plot={path} needs matplotlib ({exc}); install it with "
                                   "pip install matplotlib (or attnrt[plot])") from None
    return plt


def write_plot(results: list[Result], path: str) -> None:
    plt = _pyplot(path)
    ok = [r for r in results if r.status == "ok"]
    labels = list(dict.fromkeys(r.case.label() for r in ok))
    names = list(dict.fromkeys(r.backend for r in ok))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * len(names) ** 0.5), 4))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = {r.case.label(): r.tflops or 0.0 for r in ok if r.backend == name}
        ax.bar([x + i * width for x in range(len(labels))],
               [vals.get(lbl, 0.0) for lbl in labels], width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=30,
                  ha="right", fontsize=7)
    ax.set_ylabel("TFLOP/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(args: argparse.Namespace) -> int:
    if getattr(args, "model", None) or getattr(args, "list_models", False):
        from attnrt.tools.models import run_models

        return run_models(args)
    for flag, default in (("scale", 1), ("vsa_sparsity", 0.875)):
        if getattr(args, flag, default) != default:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)!r} applies only "
                             "with --model; allowed without it: the default")
    if args.plot:
        _pyplot(args.plot)  # a missing matplotlib fails now, not after the whole run
    device = bench_device()
    results = run_grid(args, device)
    data = {**environment(device), "results": [r.to_dict() for r in results]}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    if args.plot:
        write_plot(results, args.plot)
    print(json.dumps(data, indent=2) if args.json else format_table(results, device))
    return 0
