"""Hardening (issue 18): what a new user trips over on the command line and in the README."""

from __future__ import annotations

import argparse
import inspect
import pydoc
import re
import sys
from pathlib import Path

import pytest

import attnrt
from attnrt.selection.request import AttentionRequest
from attnrt.tools import benchmark
from attnrt.tools.cli import _parser, main
from tests.triton_support import MIN_INTERPRETER_TRITON, interpreter_skip_reason

ROOT = Path(__file__).resolve().parent.parent


def test_version_flag_prints_the_package_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"attnrt {attnrt.__version__}"


def _flags_without_help(parser: argparse.ArgumentParser, name: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                missing += _flags_without_help(sub, sub_name)
        elif not action.help and not isinstance(action, argparse._HelpAction):
            missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_flag_of_every_command_has_help() -> None:
    assert _flags_without_help(_parser(), "attnrt") == []


def test_explain_states_the_mode_it_assumed_and_takes_grad_or_no_grad(capsys) -> None:
    assert main(["explain", "--head-size", "64", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mode:     inference")
    assert main(["explain", "--head-size", "64", "--dtype", "fp32", "--grad"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mode:     training")
    assert "with backward" in out
    assert main(["explain", "--head-size", "64", "--dtype", "fp32", "--no-grad"]) == 0
    assert "with backward" not in capsys.readouterr().out


def test_one_head_is_singular() -> None:
    assert AttentionRequest(64, "fp32", 1).describe().startswith("1 head of 64")
    gqa = AttentionRequest(64, "fp32", 4, num_kv_heads=1).describe()
    assert gqa.startswith("4 heads, 1 kv head of 64")


def test_info_names_a_bad_forced_backend_and_fails(monkeypatch, capsys) -> None:
    monkeypatch.setenv("ATTNRT_BACKEND", "FOO")
    assert main(["info"]) == 1
    out = capsys.readouterr().out
    assert "ATTNRT_BACKEND=FOO: unknown backend 'FOO'" in out


def test_info_availability_agrees_with_explain(capsys) -> None:
    from attnrt.selection.report import info_dict

    rows = {r["name"]: r for r in info_dict()["backends"]}
    for name, row in rows.items():
        method = row.get("methods", ["dense"])[0]
        decision = attnrt.explain(AttentionRequest(64, "fp16", 2, allowed=(name,), method=method))
        reasons = next(c for c in decision.candidates if c.name == name).reasons
        platform_refused = any(r.code in ("PLATFORM", "ARCH", "PACKAGE_MISSING",
                                          "VERSION_WINDOW") for r in reasons)
        assert row["available"] is not platform_refused, (name, row, reasons)


def test_bench_plot_without_matplotlib_fails_before_measuring(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError

    def measured(*args, **kwargs):
        raise AssertionError("the grid ran before the missing matplotlib was found")

    monkeypatch.setattr(benchmark, "run_grid", measured)
    with pytest.raises(benchmark.BenchDependencyError, match="--plot=x.png needs matplotlib"):
        benchmark.run_bench(argparse.Namespace(plot="x.png", out=None, json=False))


def test_numpy_is_a_dependency_so_import_torch_stays_quiet() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*)\]$", text, re.MULTILINE)
    assert dependencies is not None
    assert re.search(r'"numpy\b', dependencies.group(1))


def test_the_readme_usage_snippet_runs_as_written() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using it", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["out"].shape == namespace["q"].shape  # type: ignore[attr-defined]


def test_help_of_local_attention_documents_every_argument() -> None:
    text = inspect.getdoc(attnrt.LocalAttention) or ""
    assert text in pydoc.render_doc(attnrt.LocalAttention, renderer=pydoc.plaintext).replace(
        "\n |  ", "\n")  # what help() shows
    for arg in ("num_heads", "head_size", "num_kv_heads", "softmax_scale", "causal",
                "supported_attention_backends", "prefix", "extra_impl_args"):
        assert re.search(rf"^\s+(\*\*)?{arg}: [A-Za-z]", text, re.MULTILINE), arg


@pytest.mark.parametrize(("version", "interpreting", "skips"), [
    ("3.6.0", True, True), ("3.8.1", True, True), ("3.9.0", True, False),
    ("3.10.0", True, False), ("3.6.0", False, False), (None, True, False),
])
def test_interpreter_tests_skip_below_the_supported_triton(version, interpreting,
                                                           skips) -> None:
    reason = interpreter_skip_reason(version, interpreting)
    assert (reason is not None) is skips
    if skips:
        assert f"triton >= {MIN_INTERPRETER_TRITON}" in reason
