"""Capability files: parsing, every validation error with file:line, overrides, rule matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import attnrt
from attnrt.selection.device import Device
from attnrt.selection.manifest import (
    current_manifest,
    load_manifest,
    parse_file,
    shipped_path,
    validate_files,
)
from attnrt.selection.ranges import ArchRange, SizeRange
from attnrt.selection.request import AttentionRequest
from tests.helpers import make_backend

HEAD = "schema: 1\nrules:\n"


def errors_of(write_yaml, body: str) -> list[str]:
    return validate_files([write_yaml(HEAD + body)])


class TestValidation:
    def test_shipped_manifest_is_clean(self):
        assert validate_files([shipped_path()]) == []

    def test_yaml_syntax_error_names_the_line(self, write_yaml):
        errs = errors_of(write_yaml, "  - platform: cpu\n    rank: [TORCH_SDPA\n")
        assert len(errs) == 1
        assert "rules.yaml:" in errs[0]
        assert "YAML syntax error" in errs[0]

    @pytest.mark.parametrize(("body", "where", "needle"), [
        ("  - platfrom: cpu\n    rank: [TORCH_SDPA]\n", ":3", "unknown rule key 'platfrom'"),
        ("  - platform: tpu\n    rank: [TORCH_SDPA]\n", ":3: platform", "unknown platform 'tpu'"),
        ("  - platform: cpu\n    rank: [FAST_TYPO]\n", ":4: rank", "unknown backend 'FAST_TYPO'"),
        ("  - head_size: '>=abc'\n    rank: [TORCH_SDPA]\n", ":3: head_size", "not an integer"),
        ("  - arch: '>=sm8x'\n    rank: [TORCH_SDPA]\n", ":3: arch", "has no order"),
        ("  - arch: '~sm80'\n    rank: [TORCH_SDPA]\n", ":3: arch", "unknown arch"),
        ("  - causal: yes please\n    rank: [TORCH_SDPA]\n", ":3: causal", "true or false"),
        ("  - dtype: int8\n    rank: [TORCH_SDPA]\n", ":3: dtype", "dtype='int8'"),
        ("  - head_size: 64\n", ":3", "rule has no rank list"),
        ("  - platform: cpu\n    platform: cuda\n    rank: [REFERENCE]\n", ":4",
         "duplicate key 'platform'"),
        ("  - rank: [REFERENCE]\n    measured: {date: today}\n", ":4: measured",
         "names the device"),
        ("  - rank: [REFERENCE, REFERENCE]\n", ":3: rank", "names a backend twice"),
    ])
    def test_each_error_names_file_line_and_key(self, write_yaml, body, where, needle):
        errs = errors_of(write_yaml, body)
        assert len(errs) == 1, errs
        assert f"rules.yaml{where}" in errs[0]
        assert needle in errs[0]

    def test_unknown_top_level_key_and_bad_schema(self, write_yaml):
        assert "unknown top-level key 'rulez'" in validate_files(
            [write_yaml("schema: 1\nrulez: []\n")])[0]
        assert "schema=2 is not supported" in validate_files(
            [write_yaml("schema: 2\nrules: []\n")])[0]

    def test_shadowed_rule_is_reported_with_both_lines(self, write_yaml):
        errs = errors_of(write_yaml, "  - platform: cuda\n    arch: '>=sm80'\n"
                                     "    rank: [TORCH_SDPA]\n"
                                     "  - platform: cuda\n    arch: [sm90]\n    head_size: [64]\n"
                                     "    rank: [REFERENCE]\n")
        assert len(errs) == 1
        assert "rules.yaml:6" in errs[0]
        assert "shadowed by the earlier rule at" in errs[0]
        assert "rules.yaml:3" in errs[0]

    def test_narrower_earlier_rule_does_not_shadow(self, write_yaml):
        assert errors_of(write_yaml, "  - platform: cuda\n    arch: [sm90]\n"
                                     "    rank: [TORCH_SDPA]\n"
                                     "  - platform: cuda\n    arch: '>=sm80'\n"
                                     "    rank: [REFERENCE]\n") == []

    def test_rank_a_backend_can_never_serve(self, write_yaml, register):
        register("CUDA_ONLY", make_backend("CUDA_ONLY", PLATFORMS=frozenset({"cuda"}),
                                           HEAD_SIZES=(64, 128)))
        errs = errors_of(write_yaml, "  - platform: cpu\n    rank: [CUDA_ONLY, REFERENCE]\n"
                                     "  - platform: cuda\n    head_size: [80, 96]\n"
                                     "    rank: [CUDA_ONLY]\n")
        assert len(errs) == 2
        assert "rules.yaml:4: rank: CUDA_ONLY can never serve this rule: it runs on cuda only" \
            in errs[0]
        assert "none of head_size 80, 96 is supported" in errs[1]

    def test_bad_override_is_an_error_at_load_never_ignored(self, write_yaml, monkeypatch):
        monkeypatch.setenv("ATTNRT_CAPABILITY", write_yaml(HEAD + "  - platform: cpuu\n"
                                                                  "    rank: [REFERENCE]\n"))
        with pytest.raises(attnrt.ManifestError, match="unknown platform 'cpuu'"):
            attnrt.select(AttentionRequest(64, "fp32"))

    def test_yaml_tags_are_not_executed(self, write_yaml):
        errs = errors_of(write_yaml, "  - rank: !!python/object/apply:os.system ['true']\n")
        assert len(errs) == 1
        assert "rules.yaml:3" in errs[0]
        assert "YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed" \
            in errs[0]


class TestOverrides:
    def test_env_override_is_read_before_shipped(self, write_yaml, monkeypatch):
        path = write_yaml(HEAD + "  - platform: cpu\n    rank: [REFERENCE]\n"
                                 "    source: test override\n")
        monkeypatch.setenv("ATTNRT_CAPABILITY", path)
        decision = attnrt.select(AttentionRequest(64, "fp32"))
        assert decision.backend == "REFERENCE"
        assert decision.rule.where == f"{path}:3"
        assert decision.rule.provenance == "source: test override"
        assert current_manifest().files[0] == path

    def test_several_env_files_first_wins(self, write_yaml, monkeypatch, tmp_path):
        import os

        a = write_yaml(HEAD + "  - platform: cpu\n    rank: [REFERENCE]\n", "a.yaml")
        b = write_yaml(HEAD + "  - platform: cpu\n    rank: [TORCH_SDPA]\n", "b.yaml")
        monkeypatch.setenv("ATTNRT_CAPABILITY", os.pathsep.join([b, a]))
        assert attnrt.select(AttentionRequest(64, "fp32")).backend == "TORCH_SDPA"

    def test_load_capability_api(self, write_yaml):
        path = write_yaml(HEAD + "  - platform: cpu\n    head_size: [64]\n    rank: [REFERENCE]\n")
        attnrt.load_capability(path)
        assert attnrt.select(AttentionRequest(64, "fp32")).backend == "REFERENCE"
        assert attnrt.select(AttentionRequest(128, "fp32")).backend == "TORCH_SDPA"

    def test_load_capability_rejects_bad_file_now(self, write_yaml):
        with pytest.raises(attnrt.ManifestError, match="rules.yaml:3"):
            attnrt.load_capability(write_yaml(HEAD + "  - platform: x\n    rank: [REFERENCE]\n"))

    def test_untested_rule_says_so(self, write_yaml):
        rules = parse_file(write_yaml(HEAD + "  - platform: cpu\n    rank: [REFERENCE]\n"))
        assert rules[0].provenance == "untested"


# ---- rule matching, by property: ranges agree with the plain comparisons they spell

SIZES = st.integers(min_value=1, max_value=512)


@given(low=SIZES, high=SIZES, size=SIZES)
def test_size_range_matches_like_the_comparisons(low, high, size):
    assert SizeRange.parse(f">={low},<={high}").contains(size) == (low <= size <= high)
    assert SizeRange.parse([low, high]).contains(size) == (size in (low, high))


CUDA_ARCHS = st.sampled_from([70, 75, 80, 86, 89, 90, 100, 103, 120])


@given(bound=CUDA_ARCHS, arch=CUDA_ARCHS)
def test_cuda_arch_range_orders_by_capability(bound, arch):
    assert ArchRange.parse(f">=sm{bound}").contains("cuda", f"sm{arch}") == (arch >= bound)
    assert ArchRange.parse(f"<sm{bound}").contains("cuda", f"sm{arch}") == (arch < bound)
    assert not ArchRange.parse(f">=sm{bound}").contains("rocm", f"sm{arch}")


def test_rocm_arch_order():
    newer = ArchRange.parse(">=gfx942")
    assert newer.contains("rocm", "gfx950")
    assert newer.contains("rocm", "gfx1100")
    assert not newer.contains("rocm", "gfx90a")


@given(head=SIZES, dtype=st.sampled_from(["fp16", "bf16", "fp32"]), causal=st.booleans(),
       gqa=st.booleans(), platform=st.sampled_from(["cpu", "cuda", "mps"]))
def test_first_matching_rule_decides(head, dtype, causal, gqa, platform):
    text = (HEAD + "  - platform: cuda\n    head_size: '<=128'\n    dtype: [bf16]\n"
            "    rank: [TORCH_SDPA]\n"
            "  - causal: true\n    gqa: false\n    rank: [REFERENCE]\n"
            "  - rank: [TORCH_SDPA, REFERENCE]\n")
    rules = parse_file("inline.yaml", text)
    manifest = type(current_manifest())(tuple(rules), ("inline.yaml",))
    request = AttentionRequest(head, dtype, num_heads=4, num_kv_heads=2 if gqa else 4,
                               causal=causal)
    device = Device(platform, {"cpu": "x86_64", "cuda": "sm90", "mps": "apple"}[platform])
    first = platform == "cuda" and head <= 128 and dtype == "bf16"
    second = causal and not gqa
    expected = rules[0] if first else rules[1] if second else rules[2]
    assert manifest.match(request, device) is expected


def test_grad_key_splits_inference_from_training(write_yaml):
    path = write_yaml(HEAD + "  - platform: cpu\n    grad: false\n    rank: [REFERENCE]\n"
                             "  - platform: cpu\n    grad: true\n    rank: [TORCH_SDPA]\n")
    manifest = load_manifest([path])
    device = Device("cpu", "x86_64")
    infer, train = (AttentionRequest(64, "fp32", grad=g) for g in (False, True))
    assert manifest.match(infer, device) is manifest.rules[0]
    assert manifest.match(train, device) is manifest.rules[1]
    assert manifest.rules[1].conditions() == "platform=cpu grad=True"
    assert validate_files([path]) == []  # neither rule shadows the other
    shadowed = write_yaml(HEAD + "  - platform: cpu\n    rank: [REFERENCE]\n"
                                 "  - platform: cpu\n    grad: true\n    rank: [TORCH_SDPA]\n",
                          "shadowed.yaml")
    assert "is shadowed by" in "\n".join(validate_files([shadowed]))
    bad = write_yaml(HEAD + "  - grad: sometimes\n    rank: [REFERENCE]\n", "bad.yaml")
    assert "grad" in "\n".join(validate_files([bad]))
    with pytest.raises(TypeError, match="grad=1 must be True or False"):
        AttentionRequest(64, "fp32", grad=1)  # type: ignore[arg-type]


def test_seq_len_key_splits_by_query_length(write_yaml):
    path = write_yaml(HEAD + "  - platform: cpu\n    seq_len: '<=8192'\n    rank: [REFERENCE]\n"
                             "  - platform: cpu\n    seq_len: [16384, '>=32768']\n"
                             "    rank: [TORCH_SDPA]\n"
                             "  - platform: cpu\n    rank: [SDPA_CHUNKED]\n")
    manifest = load_manifest([path])
    device = Device("cpu", "x86_64")
    first, listed, general = manifest.rules

    def matched(n: int | None) -> object:
        return manifest.match(AttentionRequest(64, "fp32", seq_len=n), device)

    assert [matched(n) for n in (1, 8192, 8193, 16384, 16385, 32768, 10**6, None)] == [
        first, first, general, listed, general, listed, listed, general]
    assert first.conditions() == "platform=cpu seq_len=<=8192"
    assert validate_files([path]) == []

    def span(n: int | None, request_device: Device = device, head_size: int = 64) -> tuple:
        return manifest.seq_span(AttentionRequest(head_size, "fp32", seq_len=n), request_device)

    # Spans: every length inside one is treated alike by every rule.
    assert manifest.seq_cuts(AttentionRequest(64, "fp32"), device) == (8193, 16384, 16385, 32768)
    assert span(4096) == span(0) == (0, 8193)
    assert span(8193) == (8193, 16384)
    assert span(16384) == (16384, 16385)
    assert span(40000) == (32768, float("inf"))
    assert span(None) == (0, 0)  # unknown: the first real length selects
    assert span(5, Device("cuda", "sm90")) == (0, float("inf"))  # the rules are for cpu only
    plain = load_manifest([write_yaml(HEAD + "  - platform: cpu\n    rank: [REFERENCE]\n",
                                      "plain.yaml")])
    request = AttentionRequest(64, "fp32")
    assert plain.seq_cuts(request, device) == ()
    assert plain.seq_span(request, device) == (0, float("inf"))
    # Only rules that can match the request split its lengths.
    sized = load_manifest([write_yaml(HEAD + "  - head_size: 256\n    seq_len: '<=64'\n"
                                             "    rank: [REFERENCE]\n", "sized.yaml")])
    assert sized.seq_cuts(AttentionRequest(256, "fp32"), device) == (65,)
    assert sized.seq_cuts(AttentionRequest(64, "fp32", seq_len=9), device) == ()


def test_seq_len_shadowing_and_bad_values(write_yaml):
    shadowed = write_yaml(HEAD + "  - platform: cpu\n    seq_len: '<=8192'\n    rank: [REFERENCE]\n"
                                 "  - platform: cpu\n    seq_len: [1024, '<=4096']\n"
                                 "    rank: [TORCH_SDPA]\n", "shadowed.yaml")
    assert "is shadowed by" in "\n".join(validate_files([shadowed]))
    disjoint = write_yaml(HEAD + "  - platform: cpu\n    seq_len: '<=8192'\n    rank: [REFERENCE]\n"
                                 "  - platform: cpu\n    seq_len: '>8192'\n"
                                 "    rank: [TORCH_SDPA]\n", "disjoint.yaml")
    assert validate_files([disjoint]) == []
    for value, needle in (("long", "seq_len: 'long': 'long' is not an integer"),
                          ("'>=8192,<4096'", "admits no seq_len"),
                          ("[-5, 10]", "or one below 1; allowed: positive integers"),
                          ("[]", "[] admits no seq_len; allowed"),
                          ("true", "seq_len: True is not an integer")):
        bad = write_yaml(HEAD + f"  - seq_len: {value}\n    rank: [REFERENCE]\n", "bad.yaml")
        errors = "\n".join(validate_files([bad]))
        assert "bad.yaml:3: seq_len" in errors
        assert needle in errors
    for n in (-1, 2.5, True):
        with pytest.raises(ValueError, match=r"seq_len=.* is not allowed; allowed: None"):
            AttentionRequest(64, "fp32", seq_len=n)  # type: ignore[arg-type]
    assert AttentionRequest(64, "fp32", seq_len=0).seq_len == 0  # an empty query


def test_manifest_loads_in_order(write_yaml):
    a = write_yaml(HEAD + "  - platform: cpu\n    rank: [REFERENCE]\n", "a.yaml")
    manifest = load_manifest([a, shipped_path()])
    assert manifest.rules[0].file == a
    assert manifest.files == (a, shipped_path())


def test_an_edited_override_file_is_read_again(write_yaml, monkeypatch):
    import os
    import time

    path = write_yaml(HEAD + "  - platform: cpu\n    rank: [TORCH_SDPA]\n")
    attnrt.load_capability(path)
    assert attnrt.select(AttentionRequest(64, "fp32")).backend == "TORCH_SDPA"
    with open(path, "w") as f:
        f.write(HEAD + "  - platform: cpu\n    rank: [REFERENCE]\n    source: edited\n")
    later = time.time_ns() + 10**9
    os.utime(path, ns=(later, later))  # a new mtime even on coarse-grained file systems
    decision = attnrt.select(AttentionRequest(64, "fp32"))
    assert decision.backend == "REFERENCE"
    assert decision.rule.provenance == "source: edited"
