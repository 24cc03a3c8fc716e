"""`attnrt bench --model` / `--list-models` on CPU, with presets scaled down (--scale).

Shapes: N query tokens, M key tokens, H heads, D head size.
"""

from __future__ import annotations

import json
import sys

import pytest

from attnrt.tools import model_bench
from attnrt.tools.cli import main
from attnrt.tools.models import PRESETS, AttentionShape, ModelPreset, preset

LLAMA_TINY = ["bench", "--model", "llama-3-8b-prefill-8k", "--scale", "512", "--backends",
              "TORCH_SDPA,REFERENCE", "--repeats", "1"]


def test_list_models_text_and_json(capsys):
    assert main(["bench", "--list-models"]) == 0
    text = capsys.readouterr().out
    for name in PRESETS:
        assert name in text
    assert main(["bench", "--list-models", "--json"]) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)]
    assert names == list(PRESETS)
    assert len(names) == 8


def test_presets_carry_the_published_sequence_lengths():
    # Wan's own generate script: seq_len 32760 at 480p and 75600 at 720p (81 frames).
    assert preset("wan2.1-1.3b-480p").attention[0].n == 32760
    assert preset("wan2.1-14b-720p").attention[0].n == 75600
    assert preset("WAN2.1-14B-720P").attention[1].m == 512  # umT5 text length, any case
    llama = preset("llama-3-8b-prefill-8k").attention[0]
    assert (llama.heads, llama.kv_heads, llama.causal) == (32, 8, True)


def test_model_run_json_marks_the_choice_and_sums_per_step(capsys):
    assert main([*LLAMA_TINY, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["results"]
    assert {r["backend"] for r in rows} == {"TORCH_SDPA", "REFERENCE"}
    assert all(r["status"] == "ok" for r in rows)
    assert sum(r["chosen"] for r in rows) == 1
    chosen = next(r for r in rows if r["chosen"])
    model = data["model"]
    weight = model["layers"] * model["calls_per_step"]
    assert data["attnrt_ms_per_step"] == pytest.approx(weight * chosen["ms"])
    sdpa = next(r for r in rows if r["backend"] == "TORCH_SDPA")
    assert data["speedup_over_sdpa"] == pytest.approx(sdpa["ms"] / chosen["ms"])
    assert model["attention"][0]["n"] == 16  # 8192 / 512


def test_model_run_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "m.png"
    assert main([*LLAMA_TINY, "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert "speed-up over PyTorch's default SDPA" in out
    assert out.count("\n*") == 1
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_before_running(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(model_bench, "_run", lambda *a: pytest.fail("ran before the check"))
    assert main([*LLAMA_TINY, "--plot", "x.png"]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "named"), [
    (["--model", "gpt-5"], "--model='gpt-5' is not a preset"),
    (["--model", "flux.1-1024px", "--heads", "4"], "--heads=4 does not apply with --model"),
    (["--model", "flux.1-1024px", "--dtypes", "bf16,fp16"], "--dtypes='bf16,fp16'"),
    (["--model", "flux.1-1024px", "--scale", "0"], "--scale=0"),
])
def test_bad_model_flags_are_refused(extra, named, capsys):
    assert main(["bench", *extra]) == 2
    assert named in capsys.readouterr().err


def test_long_run_is_warned_from_the_estimate(monkeypatch, capsys):
    monkeypatch.setattr(model_bench, "_run", lambda *a: [])
    assert main(["bench", "--model", "wan2.1-14b-720p", "--backends", "TORCH_SDPA"]) == 0
    assert "warning: this run may take about" in capsys.readouterr().err
    assert main(["bench", "--model", "wan2.1-14b-720p", "--backends", "TORCH_SDPA",
                 "--scale", "1000"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_per_step_needs_every_shape_of_a_backend():
    shapes = (AttentionShape("self", 8, 8, 2, 2, 4), AttentionShape("cross", 8, 2, 2, 2, 4))
    model = ModelPreset("t", "t", layers=3, calls_per_step=2, steps=1, attention=shapes,
                        source="test")
    rows = [model_bench.Row("A", "self", "ok", 1.0, chosen=True),
            model_bench.Row("A", "cross", "ok", 0.5),
            model_bench.Row("B", "self", "ok", 2.0),
            model_bench.Row("B", "cross", "FAILED", error="x"),
            model_bench.Row("C", "cross", "ok", 0.25, chosen=True)]
    steps = model_bench.per_step(model, rows)
    assert steps == {"A": 6 * 1.5, "attnrt": 6 * 1.25}


WAN_TINY = ["bench", "--model", "wan2.1-1.3b-480p", "--scale", "256", "--repeats", "1",
            "--check-seq", "128", "--backends", "TORCH_SDPA,VIDEO_SPARSE_ATTN"]


@pytest.mark.interpret
def test_wan_times_vsa_on_its_self_attention_checked_against_vsa_s_reference(capsys):
    """Wan's sparse variants use VSA: its self-attention (the shape with a grid) gets a VSA row,
    checked against the published algorithm's reference, and the per-step total with VSA takes
    it for the self-attention and attnrt's dense choice for the cross-attention."""
    assert main([*WAN_TINY, "--vsa-sparsity", "0.5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["results"]
    vsa = [r for r in rows if r["method"] == "vsa"]
    assert [(r["backend"], r["shape"], r["status"]) for r in vsa] == [
        ("VIDEO_SPARSE_ATTN vsa s=0.5", "self", "ok")]
    assert vsa[0]["rel_error"] < 1e-5
    assert vsa[0]["chosen"]
    cross = next(r for r in rows if r["chosen"] and r["shape"] == "cross")
    weight = data["model"]["layers"] * data["model"]["calls_per_step"]
    assert data["sparse_ms_per_step"]["vsa"] == pytest.approx(
        weight * (vsa[0]["ms"] + cross["ms"]))
    self_shape = data["model"]["attention"][0]
    t, h, w = self_shape["grid"]
    assert self_shape["n"] == t * h * w == data["model"]["attention"][1]["n"]


def test_vsa_rows_follow_backends_and_say_when_none_is_timed(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(model_bench, "_run", lambda *a: seen.setdefault("sparse", a[5]) and [])
    assert main(["bench", "--model", "wan2.1-1.3b-480p", "--scale", "256", "--backends",
                 "TORCH_SDPA"]) == 0
    assert seen["sparse"][0][1] == []  # VSA backends not in --backends are not timed ...
    assert "vsa s=0.875 on self: not timed: --backends names none of method vsa" in \
        capsys.readouterr().out  # ... and the report says so


@pytest.mark.parametrize(("argv", "named"), [
    (["--model", "wan2.1-1.3b-480p", "--vsa-sparsity", "1.0"], "--vsa-sparsity=1.0 is not "
                                                               "allowed"),
    (["--vsa-sparsity", "0.5"], "--vsa-sparsity=0.5 applies only with --model"),
    (["--scale", "4"], "--scale=4 applies only with --model"),
])
def test_model_only_flags_are_refused_where_they_do_not_apply(argv, named, capsys):
    assert main(["bench", *argv]) == 2
    assert named in capsys.readouterr().err


def test_scaled_video_grid_keeps_its_calls_consistent():
    model = preset("wan2.1-14b-720p").scaled(100)
    self_shape, cross = model.attention
    assert self_shape.grid is not None
    t, h, w = self_shape.grid
    assert self_shape.n == self_shape.m == t * h * w <= 75600 // 100
    assert cross.n == self_shape.n
    assert cross.m == 5
