"""The selection walk: force, fallback, allow-lists, errors, caching, logging, threads."""

from __future__ import annotations

import logging
import threading

import pytest

import attnrt
from attnrt.integrations import fastvideo
from attnrt.selection import dispatch
from attnrt.selection.request import AttentionRequest
from tests.helpers import make_backend

REQ = AttentionRequest(64, "fp32", num_heads=4)


@pytest.fixture
def cpu_override(write_yaml, monkeypatch):
    """A manifest override ranking FAST_ATTN first on cpu."""

    def _use(rank: str = "[FAST_ATTN, TORCH_SDPA, REFERENCE]") -> str:
        path = write_yaml(f"schema: 1\nrules:\n  - platform: cpu\n    rank: {rank}\n")
        monkeypatch.setenv("ATTNRT_CAPABILITY", path)
        return path

    return _use


class TestForce:
    def test_env_force_wins_over_the_ranking(self, monkeypatch):
        monkeypatch.setenv("ATTNRT_BACKEND", "reference")
        decision = attnrt.select(REQ)
        assert decision.backend == "REFERENCE"
        assert decision.forced == "ATTNRT_BACKEND=reference"

    def test_context_manager_wins_over_env_and_restores(self, monkeypatch):
        monkeypatch.setenv("ATTNRT_BACKEND", "TORCH_SDPA")
        with attnrt.force_backend("REFERENCE"):
            assert attnrt.select(REQ).backend == "REFERENCE"
        assert attnrt.select(REQ).backend == "TORCH_SDPA"

    def test_context_manager_restores_after_an_exception(self):
        with pytest.raises(RuntimeError), attnrt.force_backend("REFERENCE"):
            raise RuntimeError("boom")
        assert dispatch.forced_backend() is None

    def test_fastvideo_global_force_and_context_manager(self):
        with attnrt.global_force_attn_backend_context_manager(
                attnrt.backend_name_to_enum("REFERENCE")):
            assert attnrt.select(REQ).backend == "REFERENCE"
            assert fastvideo.get_global_forced_attn_backend() == "REFERENCE"
        assert fastvideo.get_global_forced_attn_backend() is None

    def test_unknown_forced_name_lists_valid_names(self, monkeypatch):
        monkeypatch.setenv("ATTNRT_BACKEND", "NOPE_ATTN")
        with pytest.raises(attnrt.UnknownBackendError, match="'NOPE_ATTN'.*REFERENCE.*TORCH_SDPA"):
            attnrt.select(REQ)
        with pytest.raises(attnrt.UnknownBackendError, match="registered:"):
            attnrt.force_backend("NOPE_ATTN").__enter__()

    def test_forced_backend_that_cannot_run_raises_with_reasons(self, register):
        register("HALF_ONLY", make_backend("HALF_ONLY", DTYPES=frozenset({"fp16"})))
        with attnrt.force_backend("HALF_ONLY"), pytest.raises(
                attnrt.BackendUnavailableError, match=r"dtype=fp32 is not supported by HALF_ONLY"):
            attnrt.select(REQ)

    def test_forced_backend_fallback_is_opt_in_and_warns(self, register, monkeypatch):
        register("HALF_ONLY", make_backend("HALF_ONLY", DTYPES=frozenset({"fp16"})))
        monkeypatch.setenv("ATTNRT_FALLBACK", "warn")
        with attnrt.force_backend("HALF_ONLY"), pytest.warns(UserWarning, match="HALF_ONLY"):
            decision = attnrt.select(REQ)
        assert decision.backend == "TORCH_SDPA"
        assert decision.candidates[0].name == "HALF_ONLY"
        assert not decision.candidates[0].ok
        assert "ATTNRT_FALLBACK=warn" in decision.notes[0]

    def test_force_is_per_thread(self):
        barrier = threading.Barrier(32)
        results: dict[int, str] = {}
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                name = "REFERENCE" if i % 2 else "TORCH_SDPA"
                with attnrt.force_backend(name):
                    barrier.wait(timeout=10)
                    results[i] = attnrt.select(REQ).backend
                    barrier.wait(timeout=10)
                assert dispatch.forced_backend() is None
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert results == {i: "REFERENCE" if i % 2 else "TORCH_SDPA" for i in range(32)}


class TestWalk:
    def test_first_usable_in_the_ranking_wins_and_skips_are_recorded(self, register,
                                                                      cpu_override):
        register("FAST_ATTN", make_backend("FAST_ATTN", HEAD_SIZES=(128,)))
        cpu_override()
        decision = attnrt.select(REQ)
        assert decision.backend == "TORCH_SDPA"
        fast = decision.candidates[0]
        assert fast.name == "FAST_ATTN"
        assert fast.reasons[0].code == "HEAD_SIZE"
        assert decision.rule is not None
        assert decision.rule.where.endswith("rules.yaml:3")

    def test_allow_list_restricts_candidates(self):
        decision = attnrt.select(AttentionRequest(64, "fp32", allowed=("REFERENCE",)))
        assert decision.backend == "REFERENCE"
        sdpa = decision.candidates[0]
        assert sdpa.name == "TORCH_SDPA"
        assert sdpa.reasons[0].code == "NOT_ALLOWED"

    def test_allow_list_with_unknown_name_is_an_error(self):
        with pytest.raises(attnrt.UnknownBackendError, match="'NOT_A_BACKEND'"):
            attnrt.select(AttentionRequest(64, "fp32", allowed=("NOT_A_BACKEND",)))

    def test_nothing_usable_lists_every_candidate_and_hint(self, register):
        from attnrt.selection.capability import Package

        register("VENDOR_ATTN", make_backend(
            "VENDOR_ATTN", PACKAGES=(Package("no_such_vendor_pkg", hint="pip install vendor"),)))
        request = AttentionRequest(64, "fp32", allowed=("VENDOR_ATTN",))
        with pytest.raises(attnrt.BackendUnavailableError) as info:
            attnrt.select(request)
        text = str(info.value)
        assert "VENDOR_ATTN: import no_such_vendor_pkg failed" in text
        assert "REFERENCE: REFERENCE is not in the layer's supported_attention_backends" in text
        assert "hint: pip install vendor" in text
        assert attnrt.explain(request).backend is None  # explain shows it instead of raising

    def test_no_rule_matched_falls_to_reference(self, write_yaml, monkeypatch):
        from attnrt.selection.manifest import load_manifest

        manifest = load_manifest([write_yaml("schema: 1\nrules:\n  - platform: mps\n"
                                             "    rank: [TORCH_SDPA]\n")])
        decision = dispatch.decide(REQ, manifest=manifest)
        assert decision.backend == "REFERENCE"
        assert decision.rule is None
        assert "no rule matched" in decision.rule_where


class TestCacheAndLogging:
    def test_thousand_layers_cost_one_walk(self, register, cpu_override):
        backend = register("FAST_ATTN", make_backend("FAST_ATTN"))
        cpu_override()
        layers = [attnrt.LocalAttention(4, 64) for _ in range(1000)]
        assert all(layer.backend_name == "FAST_ATTN" for layer in layers)
        assert backend.check_calls == 1

    def test_one_info_line_per_new_decision(self, caplog):
        with caplog.at_level(logging.INFO, logger="attnrt"):
            attnrt.select(REQ)
            attnrt.select(REQ)
            attnrt.select(AttentionRequest(128, "fp32"))
        lines = [r.getMessage() for r in caplog.records if r.name == "attnrt"]
        assert len(lines) == 2
        assert "TORCH_SDPA" in lines[0]
        assert "64" in lines[0]

    def test_clear_caches_forgets_decisions(self, register, cpu_override):
        backend = register("FAST_ATTN", make_backend("FAST_ATTN"))
        cpu_override()
        attnrt.select(REQ)
        attnrt.clear_caches()
        attnrt.select(REQ)
        assert backend.check_calls == 2


class TestBadEnvironment:
    @pytest.mark.parametrize(("var", "value", "match"), [
        ("ATTNRT_DEVICE", "tpu:v5", "unknown platform"),
        ("ATTNRT_DEVICE", "cuda:gfx942", "not a cuda arch"),
        ("ATTNRT_FALLBACK", "maybe", "ATTNRT_FALLBACK='maybe'"),
    ])
    def test_bad_values_are_named(self, monkeypatch, var, value, match):
        monkeypatch.setenv(var, value)
        with pytest.raises(ValueError, match=match):
            attnrt.select(REQ)

    def test_bad_strict_value_is_named(self, monkeypatch):
        monkeypatch.setenv("ATTNRT_STRICT", "sometimes")
        with pytest.raises(ValueError, match="ATTNRT_STRICT='sometimes'"):
            dispatch.strict_mode()

    def test_missing_override_file_is_an_error(self, monkeypatch, tmp_path):
        monkeypatch.setenv("ATTNRT_CAPABILITY", str(tmp_path / "absent.yaml"))
        with pytest.raises(attnrt.ManifestError, match="absent.yaml:0: cannot read"):
            attnrt.select(REQ)


def test_backend_enum_is_open_and_names_registered_backends(register):
    assert attnrt.AttentionBackendEnum.TORCH_SDPA.name == "TORCH_SDPA"
    register("FAST_ATTN", make_backend("FAST_ATTN"))
    assert attnrt.AttentionBackendEnum.FAST_ATTN == "FAST_ATTN"
    assert attnrt.backend_name_to_enum("nope") is None
    with pytest.raises(AttributeError, match="NOPE"):
        _ = attnrt.AttentionBackendEnum.NOPE


def test_strict_wins_over_fallback_warn(register, monkeypatch):
    register("HALF_ONLY", make_backend("HALF_ONLY", DTYPES=frozenset({"fp16"})))
    monkeypatch.setenv("ATTNRT_FALLBACK", "warn")
    monkeypatch.setenv("ATTNRT_STRICT", "1")
    with attnrt.force_backend("HALF_ONLY"), pytest.raises(attnrt.BackendUnavailableError):
        attnrt.select(REQ)


def test_registering_a_backend_refreshes_cached_decisions(register, cpu_override):
    from attnrt.selection.registry import unregister_backend

    register("FAST_ATTN", make_backend("FAST_ATTN", HEAD_SIZES=(128,)))
    cpu_override()
    assert attnrt.select(REQ).backend == "TORCH_SDPA"  # head_size 64 refused
    unregister_backend("FAST_ATTN")
    register("FAST_ATTN", make_backend("FAST_ATTN"))  # a new version without the limit
    assert attnrt.select(REQ).backend == "FAST_ATTN"


def test_devices_that_differ_in_versions_get_their_own_decisions():
    from attnrt.selection.device import Device

    old = Device("mps", "apple", versions=(("macos", "13.6"),), simulated=True)
    new = Device("mps", "apple", versions=(("macos", "14.2"),), simulated=True)
    request = AttentionRequest(64, "bf16")
    assert dispatch.decide(request, old).backend is None
    assert dispatch.decide(request, new).backend is not None
