"""TRITON_FLASH_ATTN on one GPU: correctness tests, a config sweep, and a table against SDPA.

Shapes: B batch, N sequence (N == M here), H heads, D head size; bf16 throughout.
TFLOP/s = 4 * B * H * N^2 * D / time, halved when causal; backward counts 2.5x that.

    python bench/triton_flash_gpu.py --out "$OUT"              # tests, sweep, table
    python bench/triton_flash_gpu.py --phases sweep,table       # any subset, in that order

Needs the repo installed (`pip install --no-deps --no-build-isolation -e .`; see
_ensure_attnrt). Everything is timed with
triton.testing.do_bench (median, after warm-up) on fresh torch.randn inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
B, H = 1, 24
SWEEP_N = 8192
TABLE_N = (4096, 8192, 16384, 32768)
FLEX_N = (8192, 16384)
# (BLOCK_M, BLOCK_N, num_warps, num_stages[, forward switch]) candidates per kernel and head-size
# bucket. The first of each list is what platforms/cuda/triton_flash_configs.py ships (chosen by
# the first sweep, 2026-11-25); the rest are this round's challengers.
CANDIDATES = {
    "fwd": {
        128: [(128, 64, 8, 3), (128, 64, 8, 3, "tma"), (128, 64, 8, 4, "tma"),
              (128, 128, 8, 3, "tma"), (128, 64, 8, 3, "warp_specialize")],
        64: [(128, 64, 8, 3), (128, 64, 8, 3, "tma"), (128, 64, 4, 3, "tma"),
             (128, 128, 8, 3, "tma")],
        256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2), (64, 64, 4, 3)],
    },
    "bwd_dkdv": {
        128: [(32, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 4),
              (32, 64, 4, 2), (64, 128, 8, 4), (16, 64, 4, 3)],
        64: [(32, 128, 4, 3), (32, 64, 4, 3), (16, 128, 4, 3)],
        256: [(32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2), (32, 64, 4, 3), (16, 64, 4, 2)],
    },
    "bwd_dq": {
        128: [(128, 64, 8, 3)],
        64: [(64, 64, 4, 3)],
        256: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2), (64, 64, 4, 2)],
    },
}
KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def _ensure_attnrt() -> str:
    """Stop with the install command when attnrt is not importable; returns the repo root."""
    if importlib.util.find_spec("attnrt") is None:
        raise SystemExit("attnrt is not installed: run `pip install --no-deps "
                         "--no-build-isolation -e .` in the repo first (bench/gpu_checks.sh does)")
    return str(ROOT)


def _log(out: Path, line: str) -> None:
    print(line, flush=True)
    with open(out / "bench.log", "a") as f:
        f.write(line + "\n")


def _flops(n: int, d: int, causal: bool) -> float:
    return 4.0 * B * H * n * n * d / (2.0 if causal else 1.0)


def _inputs(n: int, d: int, layout: str = "bnhd"):
    import torch

    shape = (B, n, H, d) if layout == "bnhd" else (B, H, n, d)
    return [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4)]


def _bench(fn) -> float:
    import triton

    fn()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


# ----------------------------------------------------------------------------- tests


def run_tests(out: Path, shim: str, seconds: float) -> None:
    paths = (shim, str(ROOT), os.environ.get("PYTHONPATH", ""))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    xdist = importlib.util.find_spec("xdist") is not None
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/kernels", "-q", "--maxfail=10",
           *(["-n", "8"] if xdist else [])]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=seconds)
        text, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT", -1
    (out / "pytest.log").write_text(text)
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    _log(out, f"gpu tests rc={rc} in {time.time() - t0:.0f}s: {tail}")


# ----------------------------------------------------------------------------- sweep


def _cfg(vals) -> dict:
    return {**dict(zip(KEYS, vals[:4], strict=True)), **{switch: 1 for switch in vals[4:]}}


def _time_kernel(kernel: str, n: int, d: int, causal: bool, vals) -> float:
    """Milliseconds for one kernel of ours with one config, on fresh random inputs."""
    from attnrt.kernels import triton_flash as tf

    q, k, v, dout = _inputs(n, d)
    scale = 1.0 / math.sqrt(d)
    if kernel == "fwd":
        return _bench(lambda: tf._forward(q, k, v, causal, scale, {"fwd": _cfg(vals)}))
    out, lse = tf._forward(q, k, v, causal, scale, tf.DEFAULT_CONFIG)
    delta = tf._backward_delta(out, dout, None)
    launch = tf._launch_dkdv if kernel == "bwd_dkdv" else tf._launch_dq
    return _bench(lambda: launch(q, k, v, dout, lse, delta, causal, scale, _cfg(vals)))


def _warm_one(job) -> tuple:
    """Compile one (kernel, D, causal, config) by running it at a small N (child process)."""
    kernel, d, causal, vals = job
    try:
        _time_kernel(kernel, 512, d, causal, vals)
        return job, ""
    except Exception as e:  # noqa: BLE001 - any compile failure just drops the candidate
        return job, f"{type(e).__name__}: {str(e)[:160]}"


def _jobs() -> list[tuple]:
    return [(kernel, d, causal, vals) for kernel, by_d in CANDIDATES.items()
            for d, cands in by_d.items() for causal in (False, True) for vals in cands]


def warm_cache(out: Path, shim: str) -> set:
    """Compile every candidate in 8 processes first; the timing loop then hits the disk cache."""
    t0 = time.time()
    with mp.get_context("spawn").Pool(8, initializer=sys.path.insert, initargs=(0, shim)) as p:
        results = p.map(_warm_one, _jobs(), chunksize=1)
    bad = {job for job, err in results if err}
    for job, err in results:
        if err:
            _log(out, f"candidate failed {job}: {err}")
    _log(out, f"warmed {len(results)} kernels in {time.time() - t0:.0f}s, {len(bad)} failed")
    return bad


def sweep(out: Path, bad: set, deadline: float) -> dict:
    """Best config per kernel and bucket: lowest geometric mean over causal and not, N=8192."""
    best: dict = {}
    rows = []
    for kernel, d, causal, vals in _jobs():
        if (kernel, d, causal, vals) in bad or time.time() > deadline:
            continue
        ms = _time_kernel(kernel, SWEEP_N, d, causal, vals)
        mult = 1.0 if kernel == "fwd" else 1.25  # dK/dV and dQ each do about half the bwd flops
        tflops = mult * _flops(SWEEP_N, d, causal) / ms / 1e9
        rows.append({"kernel": kernel, "d": d, "causal": causal, "cfg": vals, "ms": ms,
                     "tflops": tflops})
        _log(out, f"sweep {kernel:8s} D={d:3d} causal={causal!s:5s} {vals} {ms:8.3f} ms "
                  f"{tflops:6.1f} TFLOP/s")
    for kernel, by_d in CANDIDATES.items():
        for d, cands in by_d.items():
            score = {c: [r["ms"] for r in rows if (r["kernel"], r["d"], r["cfg"]) ==
                         (kernel, d, c)] for c in cands}
            score = {c: math.prod(v) for c, v in score.items() if len(v) == 2}
            if score:
                best.setdefault(d, {})[kernel] = _cfg(min(score, key=score.get))
    (out / "sweep.json").write_text(json.dumps({"rows": rows, "best": best}, indent=1))
    _log(out, f"best configs: {json.dumps(best)}")
    return best


# ----------------------------------------------------------------------------- table


def _ours(d: int, best: dict):
    from attnrt.kernels import triton_flash as tf
    from attnrt.platforms.cuda.triton_flash_configs import select_config

    cfg = best.get(d) or select_config("sm90", d)
    cfg = {**select_config("sm90", d), **cfg}
    return lambda q, k, v, causal: tf.flash_attention(q, k, v, causal=causal, config=cfg)


def _sdpa(backend):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _flex():
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks: dict = {}

    def run(q, k, v, causal):
        # The block mask is built once per shape, outside the timed calls (as a model would).
        key = (q.shape[2], k.shape[2])
        if causal and key not in masks:
            masks[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, *key,
                                           device="cuda")
        return compiled(q, k, v, block_mask=masks.get(key) if causal else None)
    return run


def _time_fwd_bwd(fn, layout: str, n: int, d: int, causal: bool) -> tuple[float, float]:
    import torch

    q, k, v, dout = (t.requires_grad_(i < 3) for i, t in enumerate(_inputs(n, d, layout)))
    fwd = _bench(lambda: fn(q, k, v, causal))
    out = fn(q, k, v, causal)
    bwd = _bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    return fwd, bwd


def _check_against_sdpa(out_dir: Path, best: dict, d: int, causal: bool) -> None:
    """Ours vs SDPA flash at N=4096 on the same inputs: outputs and all three gradients."""
    import torch
    from torch.nn.attention import SDPBackend

    q, k, v, dout = (t.requires_grad_(i < 3) for i, t in enumerate(_inputs(4096, d)))
    mine = _ours(d, best)(q, k, v, causal)
    g1 = torch.autograd.grad(mine, (q, k, v), dout)
    t = [x.transpose(1, 2) for x in (q, k, v)]
    ref = _sdpa(SDPBackend.FLASH_ATTENTION)(*t, causal).transpose(1, 2)
    g2 = torch.autograd.grad(ref, (q, k, v), dout)
    errs = [((a.float() - b.float()).norm() / b.float().norm()).item()
            for a, b in zip((mine, *g1), (ref, *g2), strict=True)]
    _log(out_dir, f"check vs SDPA flash D={d} causal={causal}: rel L2 out/dq/dk/dv "
                  + " ".join(f"{e:.1e}" for e in errs))


def table(out: Path, best: dict, deadline: float) -> list[dict]:
    from torch.nn.attention import SDPBackend

    impls = {"ours": (_ours, "bnhd"), "cudnn": (lambda d, b: _sdpa(SDPBackend.CUDNN_ATTENTION),
             "bhnd"), "flash": (lambda d, b: _sdpa(SDPBackend.FLASH_ATTENTION), "bhnd"),
             "flex": (lambda d, b: _flex(), "bhnd")}
    rows = []
    for d in (128, 64):
        for causal in (False, True):
            _check_against_sdpa(out, best, d, causal)
            for n in TABLE_N:
                rows.append(_table_row(out, impls, best, d, causal, n, deadline))
    # Padded (96) and wide (256) head sizes at one length, flex left out (one compile each).
    for d in (96, 256):
        for causal in (False, True):
            rows.append(_table_row(out, {k: impls[k] for k in ("ours", "cudnn", "flash")}, best,
                                   d, causal, 16384, deadline))
    # The headline shape again, ours and cuDNN only: the spread between the two passes is the
    # noise floor for every ratio above.
    for causal in (False, True):
        rows.append(_table_row(out, {k: impls[k] for k in ("ours", "cudnn")}, best, 128, causal,
                               16384, deadline))
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(markdown(rows))
    return rows


def markdown(rows: list[dict]) -> str:
    """Markdown table: TFLOP/s fwd / bwd per implementation, then ours over each baseline."""
    names = ("ours", "cudnn", "flash", "flex")
    lines = ["| D | N | mask | " + " | ".join(f"{n} fwd/bwd" for n in names)
             + " | ours/cudnn | ours/flash | ours/flex |", "|" + "---|" * 10]
    for row in rows:
        cells = [str(row["d"]), str(row["n"]), "causal" if row["causal"] else "full"]
        for n in names:
            r = row.get(n)
            cells.append(f"{r['fwd_tflops']:.0f} / {r['bwd_tflops']:.0f}" if r else "-")
        ours = row.get("ours")
        for n in names[1:]:
            r = row.get(n)
            cells.append(f"{ours['fwd_tflops'] / r['fwd_tflops']:.2f} / "
                         f"{ours['bwd_tflops'] / r['bwd_tflops']:.2f}" if ours and r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _table_row(out: Path, impls: dict, best: dict, d: int, causal: bool, n: int,
               deadline: float) -> dict:
    row = {"d": d, "causal": causal, "n": n}
    for name, (make, layout) in impls.items():
        # Each new flex shape is a fresh torch.compile, so flex gets the headline shapes only.
        skip = name == "flex" and (n not in FLEX_N or d != 128 or time.time() > deadline - 60)
        if time.time() > deadline or skip:
            continue
        try:
            fwd, bwd = _time_fwd_bwd(make(d, best), layout, n, d, causal)
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            _log(out, f"{name} D={d} N={n} causal={causal} failed: {type(e).__name__}: {e}"[:300])
            continue
        flops = _flops(n, d, causal)
        row[name] = {"fwd_ms": fwd, "bwd_ms": bwd, "fwd_tflops": flops / fwd / 1e9,
                     "bwd_tflops": 2.5 * flops / bwd / 1e9}
    _log(out, _format_row(row))
    return row


def _format_row(row: dict) -> str:
    parts = [f"D={row['d']:3d} N={row['n']:5d} {'causal' if row['causal'] else 'full  '}"]
    for name in ("ours", "cudnn", "flash", "flex"):
        r = row.get(name)
        parts.append(f"{name} " + (f"{r['fwd_tflops']:5.0f}/{r['bwd_tflops']:4.0f}" if r
                                   else "   -/   -"))
    ours = row.get("ours")
    for name in ("cudnn", "flash", "flex"):
        if ours and row.get(name):
            parts.append(f"x{name} {ours['fwd_tflops'] / row[name]['fwd_tflops']:.2f}/"
                         f"{ours['bwd_tflops'] / row[name]['bwd_tflops']:.2f}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- main


def _environment(out: Path) -> None:
    import torch
    import triton

    _log(out, f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} "
              f"{torch.cuda.get_device_name()} torch {torch.__version__} triton "
              f"{triton.__version__} cuda {torch.version.cuda} cudnn "
              f"{torch.backends.cudnn.version()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--phases", default="tests,sweep,table")
    p.add_argument("--budget-s", type=float, default=540.0)
    p.add_argument("--test-s", type=float, default=200.0)
    args = p.parse_args()
    deadline = time.time() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shim = _ensure_attnrt()
    phases = args.phases.split(",")
    _environment(out)
    best: dict = {}
    with contextlib.suppress(FileNotFoundError):
        best = {int(d): c for d, c in json.loads((out / "best.json").read_text()).items()}
    if "tests" in phases:
        run_tests(out, shim, min(args.test_s, deadline - time.time()))
    if "sweep" in phases:
        best = sweep(out, warm_cache(out, shim), deadline - 150)
    if "table" in phases:
        table(out, best, deadline)


if __name__ == "__main__":
    main()
