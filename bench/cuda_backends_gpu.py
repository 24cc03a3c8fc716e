"""Every cuda backend on one GPU: declared limits vs what really runs, then the speed grid.

Shapes: B batch, N sequence, H heads, Hkv kv heads, D head size. Grid (forward, B=1, H=24,
Hkv=8 for GQA): D in 64, 72, 80, 96, 128, 160, 192, 256 x bf16, fp16 x causal/not x GQA/not at
N=4096, and N=16384 (causal also 8192) for D=64/128; plus a few backward cells. Each backend is
checked against the float64 REFERENCE first (attnrt.tools.benchmark.measure) and a wrong one is not
timed.

The table gives TFLOP/s per backend, the fastest, and the backend the manifest would choose here
(the first of the matching rule's rank that ran correctly in that cell) with its ratio to the
fastest: the shipped cuda rules aim at >= 0.95 everywhere.

    # on the GPU machine (writes cuda_bench.json, limits.json, tuned.yaml, log under --out-dir)
    PYTHONUNBUFFERED=1 python bench/cuda_backends_gpu.py --out-dir "$OUT" --budget 300
    # anywhere, no GPU: the same table against the current capability.yaml
    python bench/cuda_backends_gpu.py --from-json run1/cuda_bench.json run2/cuda_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

from attnrt.backends.reference import chunked_attention
from attnrt.errors import KernelCompileError
from attnrt.selection import registry
from attnrt.selection.device import Device, probe
from attnrt.selection.dispatch import reasons_for
from attnrt.selection.manifest import current_manifest
from attnrt.selection.request import AttentionRequest
from attnrt.tools import benchmark, tune
from attnrt.tools.benchmark import Case, Result, measure

HEAD_SIZES = (128, 64, 96, 80, 72, 160, 192, 256)  # most used first: the budget may cut the tail
LONG_HEAD_SIZES = (64, 128)
TIMED = ("TORCH_SDPA", "TORCH_SDPA_CUDNN", "TORCH_SDPA_FLASH", "TORCH_SDPA_EFFICIENT",
         "TRITON_FLASH_ATTN", "FLEX_ATTN", "FLASH_ATTN", "FLASH_ATTN_3", "SAGE_ATTN")
PROBED = ("TORCH_SDPA_CUDNN", "TORCH_SDPA_FLASH", "TORCH_SDPA_EFFICIENT", "TRITON_FLASH_ATTN")
# (gqa, causal, N, M): square, GQA, causal, and causal with N != M both ways.
PROBE_SHAPES = ((False, False, 256, 256), (True, False, 256, 256), (False, True, 256, 256),
                (False, True, 200, 328), (False, True, 328, 200), (True, True, 200, 328))
TOL = {"bf16": 1.5e-2, "fp16": 3e-3, "fp32": 1e-5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def grid(heads: int, kv_heads: int, head_sizes: tuple[int, ...] = HEAD_SIZES,
         bwd_cells: bool = True) -> list[Case]:
    cases = []
    for d in head_sizes:
        for dtype in ("bf16", "fp16"):
            for causal in (False, True):
                for hkv in (heads, kv_heads):
                    cases += [Case(1, heads, hkv, d, n, dtype, causal, "fwd")
                              for n in _lengths(d, causal)]
    bwd = [Case(1, heads, heads, d, 4096, "bf16", c, "bwd")
           for d in (128, 64) for c in (False, True)]
    return bwd + cases if bwd_cells else cases


def _lengths(d: int, causal: bool) -> tuple[int, ...]:
    """N=4096 for every head size; D=64/128 also at 16384, and causal at 8192, where the
    shipped rules split causal forwards by length (seq_len)."""
    if d not in LONG_HEAD_SIZES:
        return (4096,)
    return (16384, 8192, 4096) if causal else (16384, 4096)


def wanted(name: str, case: Case) -> bool:
    """FLEX_ATTN compiles per shape: time it only where the issue quotes it (bf16 D128 N16384)."""
    if name != "FLEX_ATTN":
        return True
    return (case.dtype, case.head_size, case.seq_len, case.pass_) == ("bf16", 128, 16384, "fwd") \
        and case.kv_heads == case.heads


# ---------------------------------------------------------------- declared limits vs reality


def _try(name: str, dtype: str, d: int, shape: tuple, heads: int = 4) -> tuple[str, str]:
    gqa, causal, n, m = shape
    impl = registry.load(name).get_impl_cls()(heads, d, d ** -0.5, causal, 2 if gqa else heads)
    dt = DTYPES[dtype]
    q = torch.randn(1, n, heads, d, device="cuda", dtype=dt)
    k, v = (torch.randn(1, m, 2 if gqa else heads, d, device="cuda", dtype=dt) for _ in "kv")
    try:
        out = impl.forward(q, k, v, None)
        torch.cuda.synchronize()
    except KernelCompileError as exc:
        return "REFUSED", str(exc)[:300]
    except Exception as exc:  # noqa: BLE001 - a probe reports whatever happened
        return "ERROR", f"{type(exc).__name__}: {str(exc)[:300]}"
    ref = chunked_attention(q.double(), k.double(), v.double(), causal, d ** -0.5)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    return ("ok" if err <= TOL[dtype] else "WRONG"), f"{err:.2e}"


def probe_limits(device: Device, quick: bool = False) -> list[dict[str, Any]]:
    """Each probed backend on tiny inputs; quick: only causal N != M (the mask-alignment cases)."""
    rows = []
    shapes = [s for s in PROBE_SHAPES if s[2] != s[3]] if quick else PROBE_SHAPES
    for name in PROBED:
        sizes = (64, 72) if name == "TRITON_FLASH_ATTN" else (64, 72, 128, 160, 192, 256)
        for dtype in ("bf16", "fp16", "fp32"):
            for d in sizes:
                for shape in shapes:
                    gqa, causal, n, m = shape
                    request = AttentionRequest(d, dtype, 4, 2 if gqa else 4, causal)
                    declared = [str(r) for r in reasons_for(name, request, device)]
                    status, detail = _try(name, dtype, d, shape)
                    rows.append({"backend": name, "dtype": dtype, "head_size": d, "gqa": gqa,
                                 "causal": causal, "n": n, "m": m, "declared_ok": not declared,
                                 "declared": declared, "status": status, "detail": detail})
    return rows


def verdict(row: dict[str, Any]) -> str:
    ran = row["status"] == "ok"
    if row["declared_ok"]:
        return {"ok": "agree", "REFUSED": "FALLBACK"}.get(row["status"], "BUG")
    return "OVER-STRICT" if ran else "agree-refused"


def print_limits(rows: list[dict[str, Any]]) -> None:
    print("\n== declared limits vs what ran (tiny shapes) ==")
    print("FALLBACK: declared ok, refused at run time with KernelCompileError (layer falls back);")
    print("BUG: declared ok but wrong or crashed; OVER-STRICT: declared refused but ran correctly")
    counts: dict[str, int] = {}
    for r in rows:
        tag = verdict(r)
        counts[tag] = counts.get(tag, 0) + 1
        gate = any("on this GPU" in d for d in r["declared"])  # PyTorch's own gate refused
        if tag == "agree" or (tag == "agree-refused" and not (gate and not r["gqa"]
                                                              and not r["causal"])):
            continue
        print(f"{tag:<11} {r['backend']:<21} {r['dtype']} D{r['head_size']:<3} gqa={r['gqa']:d} "
              f"causal={r['causal']:d} N{r['n']} M{r['m']}: {r['status']} {r['detail'][:150]}"
              f" | declared: {'; '.join(r['declared'])[:150] or 'ok'}")
    print(f"verdicts: {counts}", flush=True)


# ---------------------------------------------------------------- the grid and its table


def run_grid(device: Device, cases: list[Case], budget: float, out_dir: str,
             only: tuple[str, ...] = TIMED, rounds: int = 10) -> list[Result]:
    results: list[Result] = []
    start = time.time()
    for i, case in enumerate(cases):
        if time.time() - start > budget:
            print(f"budget of {budget:.0f}s spent: {len(cases) - i} cases not run", flush=True)
            break
        names = [n for n in TIMED if n in only and wanted(n, case)
                 and not reasons_for(n, case.request(), device)]
        cell = [measure(name, case, "cuda", repeats=10, check_seq=1024) for name in names]
        benchmark.retime(cell, "cuda", repeats=5, rounds=rounds)
        results += cell
        line = ", ".join(f"{r.backend}={r.tflops:.0f}" if r.status == "ok" else
                         f"{r.backend}={r.status}" for r in cell)
        print(f"[{time.time() - start:5.0f}s] {case.label()}: {line}", flush=True)
        if out_dir and i % 8 == 7:
            save(results, device, os.path.join(out_dir, "cuda_bench.json"))
    return results


def save(results: list[Result], device: Device, path: str) -> None:
    data = {**benchmark.environment(device), "results": [r.to_dict() for r in results]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def load(paths: list[str]) -> tuple[dict[str, Any], list[Result]]:
    """Saved runs merged; a later file's (backend, case) result replaces an earlier one's."""
    merged: dict[tuple[str, Case], Result] = {}
    data: dict[str, Any] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for r in data["results"]:
            case = Case(**{k: v for k, v in r["case"].items() if k != "label"})
            merged[(r["backend"], case)] = Result(r["backend"], case, r["status"], r["ms"],
                                                  r["tflops"], r["rel_error"], r["error"],
                                                  r["chosen"])
    return data, list(merged.values())


def default_choice(case: Case, cell: dict[str, Result], device: Device) -> str:
    """What the manifest picks here: the first ranked backend that ran correctly in this cell."""
    rule = current_manifest().match(case.request(), device)
    for name in rule.rank if rule else ():
        if name in cell and cell[name].status == "ok":
            return name
    return "REFERENCE"


def table(results: list[Result], device: Device) -> tuple[str, int, int]:
    cells: dict[Case, dict[str, Result]] = {}
    for r in results:
        cells.setdefault(r.case, {})[r.backend] = r
    names = [n for n in TIMED if any(n in c for c in cells.values())]
    short = {n: n.replace("TORCH_SDPA_", "SDPA_").replace("_ATTN", "")[:11] for n in names}
    head = f"{'case':<34}" + "".join(f"{short[n]:>12}" for n in names)
    lines = [head + f"  {'fastest':<12} {'default':<12} ratio"]
    good = total = 0
    for case, cell in cells.items():
        vals = {n: cell[n].tflops for n in names if n in cell and cell[n].status == "ok"}
        cols = "".join(f"{vals[n]:>12.0f}" if n in vals else
                       f"{(cell[n].status if n in cell else '-'):>12}" for n in names)
        if not vals:
            lines.append(f"{case.label():<34}{cols}")
            continue
        fastest = max(vals, key=vals.__getitem__)
        chosen = default_choice(case, cell, device)
        ratio = vals.get(chosen, 0.0) / vals[fastest]
        good, total = good + (ratio >= 0.95), total + 1
        lines.append(f"{case.label():<34}{cols}  {short[fastest]:<12} "
                     f"{short.get(chosen, chosen):<12} {ratio:.2f}"
                     f"{'' if ratio >= 0.95 else '  MISS'}")
    return "\n".join(lines), good, total


def report(results: list[Result], device: Device) -> None:
    text, good, total = table(results, device)
    print("\n== TFLOP/s (4*B*H*N^2*D per forward, /2 causal, x2.5 backward) ==")
    print(text)
    print(f"\nmanifest default within 5% of the fastest in {good}/{total} cells")
    failures = [r for r in results if r.status != "ok"]
    for r in failures:
        print(f"  {r.status} {r.backend} {r.case.label()}: {r.error[:200]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.environ.get("OUT", ""))
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the timed grid")
    ap.add_argument("--from-json", nargs="*", default=None,
                    help="re-render saved runs, later files winning (no GPU needed)")
    ap.add_argument("--skip-limits", action="store_true")
    ap.add_argument("--quick-limits", action="store_true", help="only causal N != M probes")
    ap.add_argument("--head-sizes", default=",".join(map(str, HEAD_SIZES)))
    ap.add_argument("--backends", default=",".join(TIMED))
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--rounds", type=int, default=10,
                    help="interleaved timing rounds per cell (attnrt.tools.benchmark.retime)")
    args = ap.parse_args()
    if args.from_json:
        data, results = load(args.from_json)
        dev = data["device"]
        report(results, Device(dev["platform"], dev["arch"], dev["name"]))
        return 0
    for knob in ("cache_size_limit", "recompile_limit"):  # FLEX_ATTN recompiles per shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    device = probe()
    print(json.dumps(benchmark.environment(device), indent=1), flush=True)
    if not args.skip_limits:
        rows = probe_limits(device, args.quick_limits)
        print_limits(rows)
        if args.out_dir:
            with open(os.path.join(args.out_dir, "limits.json"), "w", encoding="utf-8") as f:
                json.dump(rows, f, indent=1)
    sizes = tuple(int(x) for x in args.head_sizes.split(","))
    cases = grid(24, 8, sizes, not args.no_bwd)
    results = run_grid(device, cases, args.budget, args.out_dir, tuple(args.backends.split(",")),
                       args.rounds)
    if args.out_dir:
        save(results, device, os.path.join(args.out_dir, "cuda_bench.json"))
        fwd = [r for r in results if r.case.pass_ == "fwd"]
        rules = tune.tune_rules(fwd, device, benchmark.environment(device))
        tune.write_manifest(rules, os.path.join(args.out_dir, "tuned.yaml"), device)
    report(results, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
