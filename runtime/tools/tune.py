"""`attnrt tune`: run the bench grid and write an override manifest: one rule per measured
(platform, arch, head size, dtype, causal, gqa), ranking the backends that ran correctly by
measured time (REFERENCE last), each with its provenance (`measured:` device, date, versions,
TFLOP/s per backend). Load it with ATTNRT_CAPABILITY=FILE or attnrt.load_capability(FILE).

With `--pass both`, a cell whose forward alone ranks otherwise than forward plus backward gets
two rules: `grad: false` (inference) ranked by the forward, `grad: true` (training) by the sum.
With several `--seq-lens`, a cell whose fastest backend differs between lengths gets rules keyed
on `seq_len`: adjacent lengths with the same fastest backend share one (ranked over them
together), split at the geometric mean of the lengths on either side of a change (4096 and
16384 split at 8192). Backends that trail the fastest swap places between lengths with the
noise of a run, so only the lead splits.

A ranking is written only where the measurements order it: each backend's runs have a spread
(25th-75th percentile, summed over the shapes a rule covers), and where two neighbours in a
rule's ranking have overlapping spreads tune writes nothing and raises UnresolvedRankingError
naming them (on a busy CPU single calls are bimodal, and a ranking read off such medians once
put the measured-fastest backend last). REFERENCE is last by policy, not by measure.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from typing import Any

from attnrt.errors import AttnrtError, ManifestError
from attnrt.selection.device import Device
from attnrt.selection.dispatch import LAST_RESORT
from attnrt.tools.benchmark import (
    Case,
    Result,
    add_grid_arguments,
    bench_device,
    environment,
    format_table,
    run_grid,
)
from attnrt.tools.timing import overlaps

TUNE_HELP = "measure the grid and write an override manifest ranking by what was measured"


class UnresolvedRankingError(AttnrtError, ValueError):
    """The measurements do not order two backends a rule would rank (their spreads overlap)."""


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser)
    parser.add_argument("--out", default="attnrt-tuned.yaml",
                        help="override manifest to write (default attnrt-tuned.yaml)")


def _cell(case: Case) -> tuple[int, str, bool, bool]:
    return case.head_size, case.dtype, case.causal, case.kv_heads < case.heads


def _three_digits(x: float) -> float:
    return float(f"{x:.3g}")


def tune_rules(results: list[Result], device: Device, env: dict[str, Any]) -> list[dict]:
    """One rule per measured (head size, dtype, causal, gqa): backends by measured time; two
    (grad false / true) where the forward alone ranks otherwise than forward plus backward;
    per span of lengths (seq_len) where the fastest backend changes with the length."""
    cells: dict[tuple[int, str, bool, bool], list[Result]] = {}
    for r in results:
        cells.setdefault(_cell(r.case), []).append(r)
    rules = []
    for key, rs in cells.items():
        spans: list[tuple[list[int], list]] = []  # adjacent lengths with the same leaders
        for n in sorted({r.case.seq_len for r in rs}):
            leads = _leaders(_cell_rules(key, [r for r in rs if r.case.seq_len == n], device,
                                         env))
            if spans and spans[-1][1] == leads:
                spans[-1][0].append(n)
            else:
                spans.append(([n], leads))
        cuts = [int(math.sqrt(spans[j - 1][0][-1] * spans[j][0][0])) for j in range(1, len(spans))]
        for j, (lengths, _) in enumerate(spans):
            bounds = [f">{cuts[j - 1]}"] if j else []
            bounds += [f"<={cuts[j]}"] if j < len(cuts) else []
            part = [r for r in rs if r.case.seq_len in lengths]
            rules += _cell_rules(key, part, device, env, ",".join(bounds) or None)
    unresolved = [line for rule in rules for line in rule.pop("_overlaps")]
    if unresolved:
        raise UnresolvedRankingError(
            "attnrt tune wrote nothing: these measurements do not order the backends a rule "
            "would rank (their spreads, 25th-75th percentile of the runs, overlap):\n"
            + "\n".join(unresolved) + "\ntime them again with more --repeats or --rounds, on a "
            "quieter machine, or leave one out with --backends")
    return rules


def _leaders(rules: list[dict]) -> list[tuple[Any, str]]:
    return [(rule.get("grad"), rule["rank"][0]) for rule in rules]


def _cell_rules(key: tuple[int, str, bool, bool], rs: list[Result], device: Device,
                env: dict[str, Any], seq_len: str | None = None) -> list[dict]:
    """The cell's rule, or its grad false / true pair where the passes rank apart."""
    both = _rule(key, rs, device, env, seq_len=seq_len)
    fwd = [r for r in rs if r.case.pass_ == "fwd"]
    if len(fwd) in (0, len(rs)):
        return [both]
    inference = _rule(key, fwd, device, env, grad=False, seq_len=seq_len)
    if inference["rank"] == both["rank"]:
        return [both]
    return [inference, _rule(key, rs, device, env, grad=True, seq_len=seq_len)]


def _rule(key: tuple[int, str, bool, bool], results: list[Result], device: Device,
          env: dict[str, Any], grad: bool | None = None,
          seq_len: str | None = None) -> dict[str, Any]:
    head_size, dtype, causal, gqa = key
    names = list(dict.fromkeys(r.backend for r in results))
    cases = {r.case for r in results}
    ok = {(r.backend, r.case) for r in results if r.status == "ok"}
    good = [n for n in names if all((n, c) in ok for c in cases)]  # right on every case
    total = {n: sum(r.ms or 0.0 for r in results if r.backend == n) for n in good}
    rank = [n for n in sorted(good, key=total.__getitem__) if n != LAST_RESORT] + [LAST_RESORT]
    spread = {n: (sum(r.spread()[0] for r in results if r.backend == n),
                  sum(r.spread()[1] for r in results if r.backend == n)) for n in good}
    tflops = {n: _three_digits(statistics.mean(r.tflops or 0.0 for r in results
                                               if r.backend == n)) for n in good}
    shapes = sorted({(c.seq_len, c.pass_) for c in cases})
    measured = {"device": device.name or device.describe(), "date": env["date"],
                **env["versions"], "tflops": tflops,
                "note": "attnrt tune; " + ", ".join(f"N={n} {p}" for n, p in shapes)
                        + (f"; not ranked (wrong, failed or not run on every shape): "
                           f"{', '.join(sorted(set(names) - set(good)))}"
                           if set(names) - set(good) else "")}
    return {"platform": device.platform, "arch": [device.arch], "head_size": [head_size],
            "dtype": [dtype], "causal": causal, "gqa": gqa,
            **({} if grad is None else {"grad": grad}),
            **({} if seq_len is None else {"seq_len": seq_len}), "rank": rank,
            "measured": measured, "_overlaps": _overlapping(rank, spread, key, grad, seq_len)}


def _overlapping(rank: list[str], spread: dict[str, tuple[float, float]],
                 key: tuple[int, str, bool, bool], grad: bool | None,
                 seq_len: str | None) -> list[str]:
    """A line per pair of neighbours in `rank` whose summed spreads overlap."""
    measured = [n for n in rank if n != LAST_RESORT]
    where = (f"D={key[0]} {key[1]} causal={key[2]} gqa={key[3]}"
             + (f" grad={grad}" if grad is not None else "")
             + (f" seq_len={seq_len}" if seq_len else ""))
    return [f"  {where}: {a} {spread[a][0]:.3f}-{spread[a][1]:.3f} ms and {b} "
            f"{spread[b][0]:.3f}-{spread[b][1]:.3f} ms"
            for a, b in zip(measured, measured[1:], strict=False)
            if overlaps(spread[a], spread[b])]


def write_manifest(rules: list[dict], path: str, device: Device) -> None:
    """Write the override file, then validate it alone and in front of the shipped one."""
    import yaml

    from attnrt.selection.manifest import load_manifest, shipped_path, validate_files

    header = (f"# attnrt tune on {device.describe()}: rules ranked by measured time.\n"
              f"# Load with ATTNRT_CAPABILITY={path} (read before the shipped manifest).\n")
    body = yaml.safe_dump({"schema": 1, "rules": rules}, sort_keys=False, width=100,
                          default_flow_style=None)
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + body)
    errors = validate_files([path])
    if errors:
        raise ManifestError("\n".join(errors))
    load_manifest([path, shipped_path()])


def run_tune(args: argparse.Namespace) -> int:
    device = bench_device()
    results = run_grid(args, device)
    env = environment(device)
    try:
        rules = tune_rules(results, device, env)
    except UnresolvedRankingError:
        if not args.json:
            print(format_table(results, device))  # the spreads it refuses to rank by
        raise
    write_manifest(rules, args.out, device)
    if args.json:
        print(json.dumps({**env, "out": args.out, "rules": rules}, indent=2))
    else:
        print(format_table(results, device))
        print(f"wrote {len(rules)} rule(s) to {args.out}; use ATTNRT_CAPABILITY={args.out}")
        for rule in rules:
            extra = "".join(f" {k}={rule[k]}" for k in ("grad", "seq_len") if k in rule)
            print(f"  D={rule['head_size'][0]} {rule['dtype'][0]} causal={rule['causal']} "
                  f"gqa={rule['gqa']}{extra}: {', '.join(rule['rank'])}")
    return 0
