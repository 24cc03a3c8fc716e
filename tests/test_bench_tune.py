"""`attnrt bench` and `attnrt tune` on CPU: tiny grids, a wrong backend refused, tuned rules.

Fake backends make the outcome deterministic: FAKE_WRONG is off by 10% (bench must refuse to
time it), FAKE_A/FAKE_B sleep for a chosen time per call (tune must rank them by it).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import torch
import yaml

import attnrt
from attnrt.selection.manifest import validate_files
from attnrt.tools import benchmark, timing
from attnrt.tools.cli import main
from tests.helpers import CountingBackend, CountingImpl, make_backend

TINY = ["--head-sizes", "32", "--seq-lens", "40", "--heads", "2", "--repeats", "2"]


class _SlowBackward(torch.autograd.Function):
    """The identity, whose backward sleeps `delay` seconds."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, delay: float) -> torch.Tensor:
        ctx.delay = delay
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(ctx.delay)
        return grad, None


class _ScaledImpl(CountingImpl):
    """Reference attention times `factor`, after sleeping `delay` seconds (its backward
    `backward_delay` more); counts calls."""

    def forward(self, query, key, value, attn_metadata):
        backend: Any = type(self).backend
        time.sleep(backend.delay + (backend.long_delay if query.shape[1] > 48 else 0.0))
        out = super().forward(query, key, value, attn_metadata) * backend.factor
        return _SlowBackward.apply(out, backend.backward_delay)


def _fake(register, name: str, factor: float = 1.0, delay: float = 0.0,
          backward_delay: float = 0.0, long_delay: float = 0.0) -> type[CountingBackend]:
    """long_delay: more sleep on sequences longer than 48."""
    backend: Any = make_backend(name, PLATFORMS=frozenset({"cpu"}), factor=factor, delay=delay,
                                backward_delay=backward_delay, long_delay=long_delay)
    backend.get_impl_cls = classmethod(
        lambda cls: type(f"{cls.NAME}Impl", (_ScaledImpl,), {"backend": cls}))
    register(name, backend)
    return backend


def _run(*argv: str) -> int:
    attnrt.clear_caches()
    return main(list(argv))


def test_bench_tiny_grid_json_has_tflops_errors_and_choice(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = _run("bench", *TINY, "--backends", "REFERENCE,TORCH_SDPA", "--causal", "both",
              "--pass", "both", "--out", str(out))
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["device"]["platform"] == "cpu"
    assert data["versions"]["torch"]
    results = data["results"]
    assert len(results) == 2 * 2 * 2  # backends x causal x pass
    for r in results:
        assert r["status"] == "ok", r
        assert r["tflops"] > 0
        assert r["ms"] > 0
        assert 0 < r["rel_error"] < 1e-5
    assert {r["backend"] for r in results if r["chosen"]} == {"TORCH_SDPA"}
    causal_fwd = [r for r in results if r["case"]["causal"] and r["case"]["pass_"] == "fwd"]
    plain_fwd = [r for r in results if not r["case"]["causal"] and r["case"]["pass_"] == "fwd"]
    # FLOPs: causal counts half, backward 2.5x forward.
    assert causal_fwd[0]["tflops"] * causal_fwd[0]["ms"] == pytest.approx(
        plain_fwd[0]["tflops"] * plain_fwd[0]["ms"] / 2, rel=1e-6)
    captured = capsys.readouterr()
    assert "* TORCH_SDPA" in captured.out
    assert "TFLOP/s" in captured.out
    assert "[###" in captured.err  # the progress bar


def test_bench_refuses_to_time_a_wrong_backend(register, tmp_path, capsys):
    wrong = _fake(register, "FAKE_WRONG", factor=1.1)
    out = tmp_path / "bench.json"
    assert _run("bench", *TINY, "--backends", "FAKE_WRONG,TORCH_SDPA", "--out", str(out)) == 0
    by_name = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert by_name["FAKE_WRONG"]["status"] == "WRONG"
    assert by_name["FAKE_WRONG"]["ms"] is None
    assert by_name["FAKE_WRONG"]["tflops"] is None
    assert by_name["FAKE_WRONG"]["rel_error"] == pytest.approx(0.1, rel=1e-3)
    assert "not timed" in by_name["FAKE_WRONG"]["error"]
    assert wrong.forward_calls == 1  # the reference check ran it once; no timing runs
    assert by_name["TORCH_SDPA"]["status"] == "ok"
    assert "WRONG" in capsys.readouterr().out


def test_bench_refuses_simulated_devices_and_unknown_backends(capsys):
    assert _run("bench", *TINY, "--device", "cuda:sm90") == 2
    assert "simulated" in capsys.readouterr().err
    assert _run("bench", *TINY, "--backends", "NOPE_ATTN") == 2
    assert "NOPE_ATTN" in capsys.readouterr().err
    assert _run("bench", *TINY, "--rounds", "0") == 2
    assert "--rounds=0: give a positive count" in capsys.readouterr().err


def test_rounds_interleave_the_contenders_and_keep_the_median_run(monkeypatch):
    case = benchmark.Case(1, 2, 2, 32, 40, "fp32", False, "fwd")
    cell = [benchmark.Result("A", case, "ok", ms=1.0), benchmark.Result("B", case, "ok", ms=1.2),
            benchmark.Result("C", case, "ok", ms=1.3), benchmark.Result("SLOW", case, "ok", ms=2.5),
            benchmark.Result("W", case, "WRONG", rel_error=0.1)]
    runs = {"A": [[3.0, 3.0], [2.0, 9.0], [2.0, 2.0], [1.0, 1.0], [5.0, 5.0], [4.0, 4.0]],
            "B": [[1.0, 1.0]] * 6, "C": [[2.0, 2.0]] * 6}
    order: list[str] = []

    def scripted(fn, reset, device, repeats):
        assert repeats == 2
        order.append(fn)
        return runs[fn].pop(0)

    monkeypatch.setattr(timing, "make_impl", lambda name, case: name)
    monkeypatch.setattr(timing, "runner", lambda impl, case, device: (impl, lambda: None))
    monkeypatch.setattr(timing, "run_times", scripted)
    timing.retime(cell, "cpu", repeats=2, rounds=6)
    # Contenders are within 0.5x of the fastest first measure (SLOW is not, nor the wrong one);
    # each pair of rounds is one rotation forwards then backwards: every contender leads twice.
    assert "".join(order) == "ABC" "CBA" "BCA" "ACB" "CAB" "BAC"
    assert [r.ms for r in cell[:4]] == [3.0, 1.0, 2.0, 2.5]  # median of A's 12 runs: 3.0
    assert cell[0].tflops == pytest.approx(case.flops() / 3e-3 / 1e12)
    assert cell[4].ms is None
    order.clear()
    timing.retime(cell, "cpu", repeats=2, rounds=1)  # one round: the first measures stand
    assert order == []


def test_bench_plot_needs_matplotlib_or_writes_png(tmp_path, capsys):
    png = tmp_path / "bench.png"
    rc = _run("bench", *TINY, "--backends", "TORCH_SDPA", "--plot", str(png))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert rc == 2
        assert "matplotlib" in capsys.readouterr().err
        assert not png.exists()
    else:
        assert rc == 0
        assert png.read_bytes()[:4] == b"\x89PNG"


def _tune(tmp_path, name: str, *flags: str) -> dict[str, Any]:
    path = tmp_path / name
    rc = _run("tune", *TINY, "--backends", "FAKE_A,FAKE_B", "--causal", "both",
              "--out", str(path), *flags)
    assert rc == 0
    assert validate_files([str(path)]) == []
    return {"path": str(path), "doc": yaml.safe_load(path.read_text())}


def _choice(causal: bool, grad: bool = False) -> str | None:
    attnrt.clear_caches()
    return attnrt.explain(head_size=32, dtype="fp32", num_heads=2, causal=causal,
                          grad=grad).backend


def test_tune_writes_valid_rules_that_flip_the_choice(register, tmp_path, monkeypatch):
    fake_a = _fake(register, "FAKE_A", delay=0.05)
    fake_b = _fake(register, "FAKE_B", delay=0.0)
    assert _choice(False) == "TORCH_SDPA"  # the shipped cpu rule
    first = _tune(tmp_path, "first.yaml")
    rules = first["doc"]["rules"]
    assert len(rules) == 2  # one per measured causal value
    for rule in rules:
        assert rule["rank"] == ["FAKE_B", "FAKE_A", "REFERENCE"]
        assert rule["platform"] == "cpu"
        assert rule["head_size"] == [32]
        assert rule["dtype"] == ["fp32"]
        assert rule["gqa"] is False
        measured = rule["measured"]
        assert {"device", "date", "torch", "tflops"} <= set(measured)
        assert measured["tflops"]["FAKE_B"] > measured["tflops"]["FAKE_A"] > 0
    monkeypatch.setenv("ATTNRT_CAPABILITY", first["path"])
    assert _choice(False) == "FAKE_B"
    assert _choice(True) == "FAKE_B"
    assert _choice_rule_is(first["path"])

    fake_a.delay, fake_b.delay = 0.0, 0.05  # now A is the fast one: the tuned choice follows
    second = _tune(tmp_path, "second.yaml")
    assert all(r["rank"][:2] == ["FAKE_A", "FAKE_B"] for r in second["doc"]["rules"])
    monkeypatch.setenv("ATTNRT_CAPABILITY", second["path"])
    assert _choice(False) == "FAKE_A"


def _choice_rule_is(path: str) -> bool:
    decision = attnrt.explain(head_size=32, dtype="fp32", num_heads=2)
    return decision.rule is not None and decision.rule.file == path and \
        decision.rule.measured is not None


def test_tune_both_passes_splits_inference_from_training(register, tmp_path, monkeypatch):
    _fake(register, "FAKE_A", backward_delay=0.15)  # fastest forward, slow backward
    _fake(register, "FAKE_B", delay=0.05)            # slower forward, fast backward
    assert benchmark.Case(1, 2, 2, 32, 40, "fp32", False, "bwd").request().grad
    # 3 repeats: each median stays clear of one run stalled by a busy CI core.
    doc = _tune(tmp_path, "both.yaml", "--pass", "both", "--repeats", "3")["doc"]
    ranks = {(r["causal"], r["grad"]): r["rank"] for r in doc["rules"]}
    for causal in (False, True):
        assert ranks[(causal, False)] == ["FAKE_A", "FAKE_B", "REFERENCE"]  # forward alone
        assert ranks[(causal, True)] == ["FAKE_B", "FAKE_A", "REFERENCE"]   # forward + backward
    monkeypatch.setenv("ATTNRT_CAPABILITY", str(tmp_path / "both.yaml"))
    assert (_choice(False), _choice(False, grad=True)) == ("FAKE_A", "FAKE_B")
    layer = attnrt.LocalAttention(2, 32)
    q, k, v = (torch.randn(1, 40, 2, 32) for _ in range(3))
    with torch.no_grad():
        layer(q, k, v)
    assert layer.backend_name == "FAKE_A"
    layer(q, k, v)
    assert layer.backend_name == "FAKE_B"


def test_tune_splits_lengths_that_rank_apart(register, tmp_path, monkeypatch):
    _fake(register, "FAKE_A", long_delay=0.12)  # fast on short sequences only
    _fake(register, "FAKE_B", delay=0.05)       # the same at every length
    path = tmp_path / "lengths.yaml"
    assert _run("tune", *TINY[:2], "--seq-lens", "32,40,80", *TINY[4:6], "--repeats", "3",
                "--backends", "FAKE_A,FAKE_B", "--out", str(path)) == 0
    assert validate_files([str(path)]) == []
    rules = yaml.safe_load(path.read_text())["rules"]
    # 32 and 40 rank alike and share a rule; the split is at sqrt(40 * 80) = 56.
    assert [(r["seq_len"], r["rank"][0]) for r in rules] == [("<=56", "FAKE_A"),
                                                             (">56", "FAKE_B")]
    assert "N=32 fwd, N=40 fwd" in rules[0]["measured"]["note"]
    monkeypatch.setenv("ATTNRT_CAPABILITY", str(path))
    layer = attnrt.LocalAttention(2, 32)
    with torch.no_grad():
        for n, want in ((40, "FAKE_A"), (56, "FAKE_A"), (57, "FAKE_B"), (80, "FAKE_B")):
            layer(*(torch.randn(1, n, 2, 32) for _ in range(3)))
            assert layer.backend_name == want, n


def test_tune_ranks_only_backends_that_were_right(register, tmp_path):
    _fake(register, "FAKE_A")
    _fake(register, "FAKE_B", factor=1.1)  # wrong: must not be ranked at all
    doc = _tune(tmp_path, "tuned.yaml")["doc"]
    for rule in doc["rules"]:
        assert rule["rank"] == ["FAKE_A", "REFERENCE"]
        assert "FAKE_B" in rule["measured"]["note"]
