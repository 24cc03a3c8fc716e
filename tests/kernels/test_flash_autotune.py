"""Opt-in autotuning of the Triton forward config: chooses the fastest candidate once per shape
bucket, skips candidates that fail to compile, and the layer uses what was chosen."""

from __future__ import annotations

import pytest
import torch

from attnrt.kernels.flash import autotune as flash_autotune
from attnrt.kernels.flash.autotune import sequence_bucket, tuned_config
from attnrt.kernels.flash.configs import make_config

BASE = make_config((64, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1))


@pytest.fixture(autouse=True)
def _fresh():
    flash_autotune.clear_tuning_cache()
    yield
    flash_autotune.clear_tuning_cache()


def one_ms(fn) -> float:
    fn()
    return 1.0


def fake_timer(costs: dict[int, float]):
    """A timer that reads the candidate's BLOCK_M from the config the run saw."""
    seen: list[dict] = []

    def timer(fn):
        fn()
        return costs[seen[-1]["fwd"]["BLOCK_M"]]

    return timer, seen


def test_fastest_candidate_wins_and_is_cached_per_key():
    timer, seen = fake_timer({128: 2.0, 64: 1.0, 32: 3.0})
    run = seen.append
    cands = [(128, 64, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2)]
    chosen = tuned_config(("k", 1), BASE, cands, run, timer=timer)
    assert chosen["fwd"] == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    assert chosen["bwd_dq"] == BASE["bwd_dq"]  # only the forward is tuned
    assert len(seen) == 6  # two timing rounds
    assert tuned_config(("k", 1), BASE, cands, run, timer=timer) is chosen
    assert len(seen) == 6  # cached: nothing ran again


def test_a_slow_first_round_does_not_decide():
    """Round one: A looks slow (clocks ramping); round two: A is the fastest. A wins."""
    order = iter([5.0, 2.0, 1.0, 2.0])  # A, B (round 1); A, B (round 2)
    chosen = tuned_config(("k", 5), BASE, [(128, 64, 8, 3), (64, 64, 4, 3)], lambda c: None,
                          timer=lambda fn: next(order))
    assert chosen["fwd"]["BLOCK_M"] == 128


def test_failing_candidates_are_skipped_and_base_kept_if_all_fail():
    class CompileFailure(Exception):
        pass

    tried = []

    def run(config):
        tried.append(config["fwd"]["BLOCK_M"])
        if config["fwd"]["BLOCK_M"] == 128:
            raise CompileFailure("out of shared memory")

    chosen = tuned_config(("k", 2), BASE, [(128, 64, 8, 3), (64, 64, 4, 3)], run,
                          skip=(CompileFailure,), timer=one_ms)
    assert chosen["fwd"]["BLOCK_M"] == 64
    assert tried.count(128) == 1  # a candidate that failed to compile is not tried again
    assert tuned_config(("k", 3), BASE, [(128, 64, 8, 3)], run, skip=(CompileFailure,),
                        timer=one_ms) == BASE


def test_other_errors_are_not_swallowed():
    def run(config):
        raise RuntimeError("CUDA error: illegal memory access")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        tuned_config(("k", 4), BASE, [(64, 64, 4, 3)], run, skip=(ValueError,),
                     timer=one_ms)


@pytest.mark.parametrize(("n", "m", "bucket"), [(1, 1, 128), (100, 120, 128), (129, 64, 256),
                                                (4096, 4096, 4096), (4097, 10, 8192)])
def test_sequence_buckets(n, m, bucket):
    assert sequence_bucket(n, m) == bucket


@pytest.mark.interpret
def test_triton_backend_tunes_once_per_bucket_under_the_interpreter(monkeypatch):
    """On CPU the kernel runs in Triton's interpreter: the mechanics, not the timings."""
    from attnrt.backends import triton_flash as backend
    from attnrt.selection.device import Device

    calls = []
    real = flash_autotune.tuned_config

    def spy(key, base, candidates, run, skip=(), timer=None):
        calls.append(key)
        return real(key, base, candidates, run, skip, timer=one_ms)

    monkeypatch.setattr(flash_autotune, "tuned_config", spy)
    monkeypatch.setattr(backend, "device_for_tensor", lambda d: Device("cuda", "sm90"))
    impl = backend.TritonFlashAttnImpl(2, 32, 32 ** -0.5, triton_autotune=True)
    for n in (40, 60, 200, 60):
        q = torch.randn(1, n, 2, 32, dtype=torch.float16)
        out = impl.forward(q, q.clone(), q.clone(), None)
        assert out.shape == q.shape
        assert torch.isfinite(out).all()
    assert len(calls) == 2  # N=40 and N=60 share bucket 128 (the impl asks once); N=200 is 256
    assert {k[-1] for k in calls} == {128, 256}
    assert len(flash_autotune.tuned_keys()) == 2


def test_autotune_flag_is_read_from_env_and_layer_args(monkeypatch):
    from attnrt.backends.triton_flash import autotune_requested

    assert autotune_requested({}) is False
    monkeypatch.setenv("ATTNRT_TRITON_AUTOTUNE", "1")
    assert autotune_requested({}) is True
    assert autotune_requested({"triton_autotune": False}) is False
    monkeypatch.setenv("ATTNRT_TRITON_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="ATTNRT_TRITON_AUTOTUNE='maybe'"):
        autotune_requested({})
