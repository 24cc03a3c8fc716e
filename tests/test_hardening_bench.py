"""Hardening (issue 18): bench and tune report spread, tune refuses to rank by noise, and the
README's full bench line is announced with an estimate and shows progress.

On a busy CPU single SDPA calls were bimodal (0.45 ms or 8 ms), and `attnrt tune --pass both`
wrote a ranking that put the measured-fastest backend last. Timings here are scripted (no
timing asserts): the fakes of tests/test_bench_tune.py, with `timing.time_runs` replaced.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from attnrt.selection.device import probe
from attnrt.tools import benchmark, progress, timing, tune
from tests.test_bench_tune import TINY, _fake, _run

README = Path(__file__).resolve().parents[1] / "README.md"


def _scripted(monkeypatch, runs: dict[str, list[float]]) -> None:
    """Each fake backend's timed runs, by name (the first `repeats` of its script)."""
    def time_runs(impl: Any, case: Any, device: str, repeats: int) -> list[float]:
        return runs[type(impl).backend.NAME][:repeats]

    monkeypatch.setattr(timing, "time_runs", time_runs)


def test_bench_reports_the_spread_of_its_runs(register, tmp_path, capsys, monkeypatch):
    for name in ("FAKE_A", "FAKE_B"):
        _fake(register, name)
    # Bimodal runs, as single CPU calls were: the medians differ, the spreads overlap.
    _scripted(monkeypatch, {"FAKE_A": [0.45, 0.45, 8.0, 8.0, 0.45],
                            "FAKE_B": [0.5, 0.5, 0.5, 8.0, 8.0]})
    out = tmp_path / "bench.json"
    assert _run("bench", *TINY[:-2], "--repeats", "5", "--backends", "FAKE_A,FAKE_B",
                "--out", str(out)) == 0
    results = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert (results["FAKE_A"]["ms_lo"], results["FAKE_A"]["ms"],
            results["FAKE_A"]["ms_hi"]) == (0.45, 0.45, 8.0)
    assert (results["FAKE_B"]["ms_lo"], results["FAKE_B"]["ms"],
            results["FAKE_B"]["ms_hi"]) == (0.5, 0.5, 8.0)
    text = capsys.readouterr().out
    assert "spread ms" in text
    assert "0.450-8.000" in text
    assert re.search(r"overlapping spreads at .*: FAKE_A and FAKE_B are not told apart", text)


def test_tune_refuses_to_rank_backends_whose_spreads_overlap(register, tmp_path, capsys,
                                                            monkeypatch):
    for name in ("FAKE_A", "FAKE_B"):
        _fake(register, name)
    _scripted(monkeypatch, {"FAKE_A": [0.45, 0.45, 8.0, 8.0, 0.45],
                            "FAKE_B": [0.5, 0.5, 0.5, 8.0, 8.0]})
    path = tmp_path / "tuned.yaml"
    rc = _run("tune", *TINY[:-2], "--repeats", "5", "--backends", "FAKE_A,FAKE_B",
              "--out", str(path))
    captured = capsys.readouterr()
    assert rc == 2
    assert not path.exists()
    assert "wrote nothing" in captured.err
    assert re.search(r"FAKE_A 0\.450-8\.000 ms and FAKE_B 0\.500-8\.000 ms", captured.err)
    assert "spread ms" in captured.out  # the table it refused to rank by


def test_tune_ranks_where_the_spreads_are_apart(register, tmp_path, monkeypatch):
    for name in ("FAKE_A", "FAKE_B"):
        _fake(register, name)
    _scripted(monkeypatch, {"FAKE_A": [2.0, 2.1, 2.2, 9.0, 2.0],
                            "FAKE_B": [1.0, 1.1, 1.2, 1.1, 1.0]})
    path = tmp_path / "tuned.yaml"
    assert _run("tune", *TINY[:-2], "--repeats", "5", "--backends", "FAKE_A,FAKE_B",
                "--out", str(path)) == 0
    assert "rank: [FAKE_B, FAKE_A, REFERENCE]" in path.read_text()


def _result(name: str, lo: float, ms: float, hi: float,
            pass_: str = "fwd") -> benchmark.Result:
    case = benchmark.Case(1, 2, 2, 32, 40, "fp32", False, pass_)
    return benchmark.Result(name, case, "ok", ms=ms, tflops=1.0, ms_lo=lo, ms_hi=hi)


def test_tune_checks_every_neighbour_but_not_reference_last():
    device = probe()
    env = {"date": "2026-01-01", "versions": {"torch": "x"}}
    apart = [_result("A", 1.0, 1.1, 1.2), _result("B", 2.0, 2.1, 2.2),
             _result("REFERENCE", 0.1, 0.2, 9.0)]
    assert tune.tune_rules(apart, device, env)[0]["rank"] == ["A", "B", "REFERENCE"]
    trailing = [*apart, _result("C", 2.1, 2.3, 2.5)]  # B and C overlap, behind A
    with pytest.raises(tune.UnresolvedRankingError, match="B 2.000-2.200 ms and C 2.100-2.500"):
        tune.tune_rules(trailing, device, env)
    # Spreads add up over the shapes a rule covers (here forward and backward).
    both = [_result("A", 1.0, 1.1, 1.2), _result("B", 2.0, 2.1, 2.2),
            _result("A", 5.0, 5.1, 5.2, "bwd"), _result("B", 3.9, 4.0, 4.3, "bwd")]
    with pytest.raises(tune.UnresolvedRankingError,
                       match="grad=True: B 5.900-6.500 ms and A 6.000-6.400"):
        tune.tune_rules(both, device, env)


def _readme_bench_line() -> list[str]:
    """The README's full `attnrt bench [...]` line, less its output files."""
    text = README.read_text()
    found = re.search(r"attnrt bench \[([^\]]*)\]", text)
    assert found, "the README has no full `attnrt bench [...]` line"
    words = found.group(1).split()
    keep = []
    for flag, value in zip(words[::2], words[1::2], strict=True):
        if flag not in ("--out", "--plot"):
            keep += [flag, value]
    return keep


def test_readme_full_bench_line_is_announced_with_an_estimate_and_progress(
        register, capsys, monkeypatch):
    line = _readme_bench_line()
    assert "--seq-lens" in line
    assert "--pass" in line
    # A 2-core CPU's SDPA rate (measured ~50 GFLOP/s fp32 here); runs stubbed to nothing.
    monkeypatch.setattr(progress, "calibrate",
                        lambda device, dtypes, heads, head_size, seq_len: dict.fromkeys(
                            [*dtypes, "fp64"], 5e10))
    measured: list[str] = []

    def measure(name, case, device, repeats, check_seq):
        measured.append(capsys.readouterr().err)  # what was said before this measure
        return benchmark.Result(name, case, "ok", ms=1.0, tflops=1.0, ms_lo=1.0, ms_hi=1.0)

    monkeypatch.setattr(benchmark, "measure", measure)
    monkeypatch.setattr(timing, "retime", lambda *args: None)
    assert _run("bench", *line) == 0
    first = measured[0]
    said = re.search(r"estimated at about (\d+) (min|h)", first)
    assert said, first  # announced before the first measure, in minutes at least
    assert "--seq-lens" in first
    assert "Ctrl-C" in first
    assert first.index("estimated") < first.index("[#")  # the warning, then the progress
    assert re.search(r"\] 2/\d+ \d+ s elapsed, ~\d+ (s|min|h) left", measured[1])


def test_a_tiny_bench_is_not_announced(capsys):
    assert _run("bench", *TINY, "--backends", "TORCH_SDPA") == 0
    err = capsys.readouterr().err
    assert "estimated" not in err
    assert "elapsed" in err


def test_the_estimate_grows_with_the_grid_and_prices_the_reference_check():
    rates = {"fp32": 5e10, "fp64": 2.5e10}
    small = benchmark.Case(1, 4, 4, 64, 256, "fp32", False, "fwd")
    big = benchmark.Case(1, 4, 4, 64, 4096, "fp32", False, "fwd")
    bwd = benchmark.Case(1, 4, 4, 64, 4096, "fp32", False, "bwd")
    s = progress.step_seconds(small, rates, repeats=5, rounds=1, check_seq=2048)
    b = progress.step_seconds(big, rates, repeats=5, rounds=1, check_seq=2048)
    assert s < 0.1 < b
    assert progress.step_seconds(big, rates, 5, 10, 2048) > 5 * b  # ten more rounds
    assert progress.step_seconds(bwd, rates, 5, 1, 2048) > 2 * b
    # The check runs at min(N, check_seq) in fp64 too: a slower fp64 costs more.
    assert progress.step_seconds(big, {**rates, "fp64": 1e9}, 5, 1, 2048) > b + 1
    calibrated = progress.calibrate("cpu", ["fp32"], 4, 64)
    assert set(calibrated) == {"fp32", "fp64"}
    assert all(0 < r < float("inf") for r in calibrated.values())
