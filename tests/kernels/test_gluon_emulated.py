"""The Gluon sm90 kernels (block-sparse forward / backward, the engine's generated forward, the
dense forward / backward) run on CPU under tests/gluon_emu's emulator, in a subprocess, and
checked against float64 references by relative L2, with outputs poisoned (NaN) before the
kernels write them and the lse -inf pattern (rows that see no key) exact.

Shapes: B batch, N query length, M key length, H heads, Hkv key/value heads, D head size.
The emulator checks arithmetic and the mbarrier protocol (a deadlock fails the run), not the
async proxy, layouts or compilation (tests/gluon_emu/__init__.py). The dense kernels are
known-good on an H100: a failure there means the emulator is wrong.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TOLERANCE

ROOT = Path(__file__).resolve().parents[2]


def _gluon_missing() -> str | None:
    try:
        found = importlib.util.find_spec("triton.experimental.gluon") is not None
    except ImportError:
        found = False
    if found:
        return None
    return ("the installed Triton has no triton.experimental.gluon, so the Gluon kernel "
            "modules cannot be imported (even with the emulator's fakes)")


pytestmark = [pytest.mark.gluon_emulated,
              pytest.mark.skipif(_gluon_missing() is not None, reason=str(_gluon_missing()))]


def _bs(seed, b, n, m, h, hkv, d, bq, bk, dtype, valid, backward=True):
    return {"kind": "block_sparse", "seed": seed, "b": b, "n": n, "m": m, "h": h, "hkv": hkv,
            "d": d, "bq": bq, "bk": bk, "dtype": dtype, "valid": valid, "backward": backward}


BLOCK_SPARSE = [
    # shared forward / whole backward (128 x 128): tails, empty lists, GQA
    _bs(0, 1, 200, 230, 2, 1, 64, 128, 128, "float16", False),
    _bs(1, 1, 256, 256, 2, 2, 128, 128, 128, "bfloat16", True),
    _bs(2, 2, 256, 256, 2, 1, 128, 128, 128, "float16", True),  # B=2
    # shared forward (128 x 64) / pair backward
    _bs(3, 1, 250, 200, 2, 1, 128, 128, 64, "float16", True),
    _bs(4, 2, 256, 256, 2, 2, 64, 128, 64, "bfloat16", False),
    # split forward / pair backward (64 x 64): odd NQB, odd NKB, tails, key_block_valid
    _bs(5, 1, 192, 190, 2, 1, 64, 64, 64, "float16", True),
    _bs(6, 1, 130, 250, 2, 2, 128, 64, 64, "bfloat16", True),
    _bs(7, 2, 256, 192, 2, 1, 128, 64, 64, "float16", False),
    _bs(8, 1, 64, 64, 1, 1, 64, 64, 64, "float16", False),
    _bs(9, 1, 256, 256, 2, 1, 64, 64, 64, "bfloat16", True),
]

ENGINE = [{"kind": "engine", "name": name, "b": b, "n": n, "h": 2, "d": d, "dtype": dtype}
          for name in ("plain", "causal", "alibi", "sliding_window", "sigmoid", "relpos_bias")
          for b, n, d, dtype in ((1, 200, 64, "float16"), (2, 256, 128, "bfloat16"))]


def _dense(seed, b, n, m, h, hkv, d, dtype, causal):
    return {"kind": "dense", "seed": seed, "b": b, "n": n, "m": m, "h": h, "hkv": hkv, "d": d,
            "dtype": dtype, "causal": causal, "backward": True}


DENSE = [
    _dense(0, 1, 200, 230, 2, 1, 64, "float16", False),
    _dense(1, 1, 256, 256, 2, 2, 128, "bfloat16", True),
    _dense(2, 1, 250, 140, 2, 1, 128, "float16", True),  # N > M: rows that see no key
    _dense(3, 2, 192, 256, 2, 1, 64, "bfloat16", True),
]

GROUPS = {"block_sparse": BLOCK_SPARSE, "engine": ENGINE, "dense": DENSE}
OUTPUTS = ("out", "dq", "dk", "dv")


def run_emulated(cases: list[dict], timeout_s: float = 8.0) -> subprocess.CompletedProcess:
    """`python -m tests.gluon_emu.run` on the cases (JSON on stdin); never in this process."""
    env = {**os.environ, "GLUON_EMU_TIMEOUT": str(timeout_s), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "tests.gluon_emu.run"],
                          input=json.dumps(cases), capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300, check=False)


def _problems(result: dict) -> list[str]:
    """What is wrong with one case's result (empty when it passed)."""
    case = result["case"]
    if "error" in result or "refused" in result:
        return [result.get("error") or f"refused: {result['refused']}"]
    tol = TOLERANCE[getattr(torch, case["dtype"])]
    found = [f"{name} rel L2 {result[name]:.2e} >= {tol}" for name in (*OUTPUTS, "lse")
             if name in result and not result[name] < tol]
    if not result["lse_inf_match"]:
        found.append("the lse -inf pattern differs from the reference")
    if result["nan_left"]:
        found.append("NaN left in an output (an element the kernel did not write)")
    if not result["ran"]:
        found.append("no Gluon kernel was launched")
    return found


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_gluon_kernels_match_float64_under_the_emulator(group: str) -> None:
    proc = run_emulated(GROUPS[group])
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(GROUPS[group]), proc.stderr[-3000:]
    failures = [f"{r['case']}: {'; '.join(p)}" for r in results if (p := _problems(r))]
    assert not failures, "\n".join(failures)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_deadlock_fails_the_run_naming_each_stuck_partition() -> None:
    proc = run_emulated([{"kind": "deadlock_selftest"}], timeout_s=0.5)
    assert proc.returncode == 2
    error = json.loads(proc.stdout.splitlines()[0])["error"]
    assert error.startswith("deadlock")
    assert "first (program" in error
    assert "second (program" in error
    assert "mbarrier.wait(bars.index(1), 0)" in error
