"""attnrt info | explain | validate, text and --json, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest

from attnrt.tools.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_no_arguments_prints_info(capsys):
    code, out, _ = run(capsys)
    assert code == 0
    assert out.startswith("device: cpu:")
    assert "platforms probed (in order):" in out
    assert "TORCH_SDPA" in out
    assert "capability.yaml" in out


def test_info_json_on_simulated_device(capsys):
    code, out, _ = run(capsys, "info", "--json", "--device", "cuda:sm90")
    data = json.loads(out)
    assert code == 0
    assert data["device"]["simulated"] is True
    assert data["device"]["arch"] == "sm90"
    assert {b["name"] for b in data["backends"]} >= {"REFERENCE", "TORCH_SDPA"}
    kinds = {r["provenance_kind"] for r in data["rules"]}
    assert kinds <= {"measured", "published", "untested"}
    assert "measured" in kinds
    published = [r for r in data["rules"] if r["provenance_kind"] == "published"]
    assert published
    assert all("untested here" in r["label"] for r in published)


def test_explain_text_names_rule_and_candidates(capsys):
    code, out, _ = run(capsys, "explain", "--head-size", "128", "--dtype", "bf16", "--heads",
                       "24", "--kv-heads", "8", "--causal", "--device", "rocm:gfx942")
    assert code == 0
    assert "24 heads, 8 kv heads of 128, bf16, causal" in out
    assert "rocm:gfx942 (simulated)" in out
    assert "capability.yaml:" in out
    assert "chosen:" in out


def test_explain_grad_picks_the_training_rule(capsys):
    args = ["explain", "--head-size", "128", "--heads", "24", "--causal", "--device", "cuda:sm90",
            "--seq-len", "4096", "--json"]
    code, out, _ = run(capsys, *args)
    inference = json.loads(out)
    code, out, _ = run(capsys, *args, "--grad")
    training = json.loads(out)
    assert (inference["request"]["grad"], training["request"]["grad"]) == (False, True)
    assert "grad=False" in inference["rule"]["conditions"]
    assert "grad" not in training["rule"]["conditions"]
    assert inference["rule"]["where"] != training["rule"]["where"]


def test_explain_seq_len_picks_the_length_rule(capsys):
    args = ["explain", "--head-size", "64", "--heads", "24", "--causal", "--device", "cuda:sm90",
            "--json"]
    picks = {}
    for n in ("4096", "16384"):
        code, out, _ = run(capsys, *args, "--seq-len", n)
        picks[n] = json.loads(out)
        assert picks[n]["request"]["seq_len"] == int(n)
    assert "seq_len=<=5792" in picks["4096"]["rule"]["conditions"]
    assert "seq_len" not in picks["16384"]["rule"]["conditions"]
    assert picks["4096"]["rule"]["where"] != picks["16384"]["rule"]["where"]
    assert picks["4096"]["notes"] == []
    code, out, _ = run(capsys, *args)  # no length: the general rule, and a note saying why
    assert "seq_len" not in json.loads(out)["rule"]["conditions"]
    assert "apply only with a query length" in json.loads(out)["notes"][0]
    code, _, err = run(capsys, "explain", "--head-size", "64", "--seq-len", "-1")
    assert code != 0
    assert "seq_len=-1 is not allowed" in err


def test_explain_json_matches_the_api(capsys):
    import attnrt

    code, out, _ = run(capsys, "explain", "--head-size", "64", "--dtype", "fp32", "--json")
    data = json.loads(out)
    assert data["chosen"] == attnrt.explain(head_size=64, dtype="fp32").backend
    assert data["candidates"][0]["ok"] is True


def test_explain_with_nothing_usable_exits_one(capsys):
    code, out, _ = run(capsys, "explain", "--head-size", "64", "--backends", "FLEX_ATTN",
                       "--device", "mps")
    assert code == 1
    assert "chosen:   none" in out
    assert "platform=mps" in out


def test_bad_arguments_exit_nonzero_with_one_line(capsys):
    code, _, err = run(capsys, "explain", "--head-size", "64", "--dtype", "int8")
    assert code == 2
    assert err.startswith("attnrt: error: dtype='int8'")
    assert len(err.strip().splitlines()) == 1


def test_validate_good_and_bad_files(capsys, write_yaml, tmp_path):
    from attnrt.selection.manifest import shipped_path

    code, out, _ = run(capsys, "validate", shipped_path())
    assert code == 0
    assert out.strip().endswith(": ok")
    bad = write_yaml("schema: 1\nrules:\n  - platform: cuda\n    rank: [NOPE]\n")
    code, out, _ = run(capsys, "validate", bad, "--json")
    data = json.loads(out)
    assert code == 1
    assert data["ok"] is False
    assert "rules.yaml:4: rank: unknown backend 'NOPE'" in data["files"][bad][0]


@pytest.mark.slow
def test_console_script_runs(tmp_path):
    import shutil
    import subprocess

    exe = shutil.which("attnrt")
    if exe is None:
        pytest.fail("the attnrt console script is not installed; pip install -e . first")
    res = subprocess.run([exe, "explain", "--head-size", "64", "--device", "npu:ascend910b"],
                         capture_output=True, text=True, check=False, timeout=120)
    assert res.returncode == 0
    assert "npu:ascend910b (simulated)" in res.stdout
