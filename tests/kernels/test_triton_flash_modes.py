"""TRITON_FLASH_ATTN's optional paths against the float64 reference: the one-launch and the
atomic-dQ backward, the peeled causal dK/dV diagonal (untimed candidate), causal config
entries, the maxnreg launch option, and their refusals.

Interpreter cases use tiny fp16/fp32 shapes (see test_triton_flash.py); GPU cases start from
the shipped config of the device and switch one path on.
"""

from __future__ import annotations

import pytest
import torch

from attnrt.kernels.flash import autotune as flash_autotune
from attnrt.kernels.flash import launch as tf
from attnrt.kernels.flash.configs import make_config
from tests.kernels.test_triton_flash import (  # noqa: F401 - nan_buffers is an autouse fixture
    _bad,
    _check_parity,
    _gpu_config,
    _inputs,
    nan_buffers,
)

# Different blocks for dK/dV and dQ, so the one-launch grid has unequal halves.
SMALL = {"fwd": {"BLOCK_M": 16, "BLOCK_N": 16}, "bwd_dkdv": {"BLOCK_M": 16, "BLOCK_N": 32},
         "bwd_dq": {"BLOCK_M": 32, "BLOCK_N": 16}}
MODES = ("single_launch", "atomic_dq")


def _with_mode(config: dict, mode: str, causal: bool) -> dict:
    """The resolved config with one backward path switched on (launch keys made to agree)."""
    cfg = {name: dict(entry) for name, entry in tf._resolve_config(config, causal).items()}
    dkdv, dq = cfg["bwd_dkdv"], cfg["bwd_dq"]
    dkdv.update({"single_launch": 0, "atomic_dq": 0, mode: 1})
    if mode == "single_launch":
        dq.pop("maxnreg", None)
        dq.update({key: dkdv[key] for key in ("num_warps", "num_stages", "maxnreg") if key in dkdv})
    return cfg


# (B, N, M, H, Hkv, D): GQA with N < M, and N > M (causal rows that see no key), padded D.
MODE_CASES = [((1, 21, 57, 4, 2, 32), torch.float32), ((2, 33, 20, 2, 1, 40), torch.float16)]


@pytest.mark.interpret
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("shape", "dtype"), MODE_CASES,
                         ids=lambda x: str(x).replace(" ", "").replace("torch.", ""))
def test_backward_modes_interpreter(shape, dtype, causal, mode):
    _check_parity(shape, dtype, causal, _with_mode(SMALL, mode, causal))


# Opt-in candidates: (name, config laid over SMALL). peel_diagonal with BLOCK_M below, above and
# equal to BLOCK_N (1 to 3 unrolled diagonal steps), alone and with the other backward modes.
CANDIDATES = [
    ("peel_m16_n32", {"bwd_dkdv": {"BLOCK_M": 16, "BLOCK_N": 32, "peel_diagonal": 1}}),
    ("peel_m32_n16", {"bwd_dkdv": {"BLOCK_M": 32, "BLOCK_N": 16, "peel_diagonal": 1}}),
    ("peel_single_launch", {"bwd_dkdv": {"BLOCK_M": 16, "BLOCK_N": 16, "peel_diagonal": 1,
                                         "single_launch": 1}}),
    ("peel_atomic_dq", {"bwd_dkdv": {"BLOCK_M": 16, "BLOCK_N": 32, "peel_diagonal": 1,
                                     "atomic_dq": 1}}),
]


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("shape", "dtype"), MODE_CASES,
                         ids=lambda x: str(x).replace(" ", "").replace("torch.", ""))
@pytest.mark.parametrize(("name", "change"), CANDIDATES, ids=[c[0] for c in CANDIDATES])
def test_candidates_interpreter(name, change, shape, dtype, causal):
    _check_parity(shape, dtype, causal, {**SMALL, **change}, scale=0.3 if causal else None)


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_peel_diagonal_reaches_the_kernel(monkeypatch, causal):
    # The switch becomes the PEEL launch constant, only where causal dK/dV runs.
    seen: list[bool] = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["PEEL"])
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tf, "_bwd_kernel", Spy(tf._bwd_kernel))
    _check_parity((1, 19, 23, 2, 1, 32), torch.float32, causal, {**SMALL, **CANDIDATES[0][1]})
    assert seen == [causal, False]


@pytest.mark.interpret
@pytest.mark.parametrize("mode", ["split", "single_launch"])
@pytest.mark.parametrize("group", [1, 3, 8], ids=lambda g: f"group{g}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("shape", "dtype"), MODE_CASES,
                         ids=lambda x: str(x).replace(" ", "").replace("torch.", ""))
def test_head_groups_interpreter(monkeypatch, shape, dtype, causal, group, mode):
    # Every program once, whatever the grouping: 4 heads (2 kv heads in the backward) in
    # groups of 1, of 3 (a short last group) and of more than there are; the backward split
    # in two launches or in one.
    monkeypatch.setattr(tf, "head_group", lambda q, k, causal: group)
    monkeypatch.setattr(tf, "bwd_head_group", lambda q, k, causal: group)
    cfg = SMALL if mode == "split" else _with_mode(SMALL, "single_launch", causal)
    _check_parity(shape, dtype, causal, cfg)


@pytest.mark.interpret
def test_forward_without_autograd_matches_the_autograd_path():
    # No input needs a gradient (or grad mode is off): the kernels run without the
    # autograd Function; same launches, so the same bits.
    q, k, v = _inputs((1, 21, 57, 4, 2, 32), torch.float32)
    plain = tf.flash_attention(q, k, v, causal=True, return_lse=True, config=SMALL)
    with torch.no_grad():
        no_grad = tf.flash_attention(q, k, v, causal=True, return_lse=True, config=SMALL)
    qg = q.clone().requires_grad_()
    tracked = tf.flash_attention(qg, k, v, causal=True, return_lse=True, config=SMALL)
    assert tracked[0].grad_fn is not None
    assert plain[0].grad_fn is None
    for a, b, c in zip(plain, no_grad, tracked, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, c.detach())


def test_resolved_config_follows_changes_in_place():
    config = {"fwd": {"BLOCK_M": 16, "BLOCK_N": 16}}
    assert tf._resolve_config(config)["fwd"]["BLOCK_M"] == 16
    config["fwd"]["BLOCK_M"] = 32  # same object, new contents
    assert tf._resolve_config(config)["fwd"]["BLOCK_M"] == 32
    config["fwd"]["BLOCK_M"] = 48
    with pytest.raises(ValueError, match=r"config\['fwd'\]"):
        tf._resolve_config(config)
    config["fwd_causal"] = {"BLOCK_N": 64}
    config["fwd"]["BLOCK_M"] = 64
    assert tf._resolve_config(config, causal=True)["fwd"]["BLOCK_N"] == 64
    assert tf._resolve_config(config, causal=False)["fwd"]["BLOCK_N"] == 16


def test_bwd_head_group_counts_what_a_kv_head_reads(monkeypatch):
    monkeypatch.setattr(tf, "_sms_and_l2", lambda device: (132, 8 << 20))
    q = torch.empty(1, 4096, 24, 64, dtype=torch.bfloat16)
    k = torch.empty(1, 4096, 8, 64, dtype=torch.bfloat16)
    # Per kv head: K, V and the Q, dO of its 3 query heads, 4096 x 64 x 2 bytes each: 4 MiB.
    assert tf.bwd_head_group(q, k, causal=True) == 2
    assert tf.bwd_head_group(q, k, causal=False) == 1
    long_q = q[:, :1].expand(1, 2**17, 24, 64)  # no wave cut-off: only what fits L2 counts
    assert tf.bwd_head_group(long_q, k[:, :1].expand(1, 2**17, 8, 64), causal=True) == 1
    monkeypatch.setattr(tf, "_sms_and_l2", lambda device: (132, 1 << 40))
    assert tf.bwd_head_group(long_q, k[:, :1].expand(1, 2**17, 8, 64), causal=True) == 8


def test_head_group_keeps_the_group_kv_inside_l2(monkeypatch):
    monkeypatch.setattr(tf, "_sms_and_l2", lambda device: (132, 8 << 20))
    q = torch.empty(2, 100, 24, 64, dtype=torch.bfloat16)
    k = torch.empty(2, 4096, 24, 64, dtype=torch.bfloat16)  # K and V: 1 MiB per head
    assert tf.head_group(q, k, causal=False) == 1
    assert tf.head_group(q, k, causal=True) == 8
    assert tf.head_group(q, k[:, :, :8], causal=True) == 24  # GQA: 3 heads share each K/V
    assert tf.head_group(q, k[:, :1].expand(2, 2**20, 24, 64), causal=True) == 1
    # One head whose 128-row blocks fill 1.5 waves of 132 SMs: heads one after another.
    assert tf.head_group(q[:, :1].expand(2, 198 * 128, 24, 64), k, causal=True) == 1
    assert tf.head_group(q[:, :1].expand(2, 197 * 128, 24, 64), k, causal=True) == 8
    monkeypatch.setattr(tf, "_sms_and_l2", lambda device: (132, 1 << 40))
    assert tf.head_group(q, k, causal=True) == 48  # at most every head of every batch


@pytest.mark.interpret
def test_peel_diagonal_int64_interpreter(monkeypatch):
    monkeypatch.setattr(tf, "_needs_int64", lambda *tensors: True)
    cfg = {**SMALL, "bwd_dkdv": {"BLOCK_M": 16, "BLOCK_N": 32, "peel_diagonal": 1}}
    _check_parity((1, 21, 57, 4, 2, 32), torch.float32, True, cfg)


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_int64_row_offsets_interpreter(monkeypatch, causal):
    # The int64 path of tensors with more than 2**31 elements per head, on a tiny shape.
    calls = []

    def forced(*tensors):
        calls.append(len(tensors))
        return True

    monkeypatch.setattr(tf, "_needs_int64", forced)
    _check_parity((1, 21, 57, 4, 2, 32), torch.float32, causal, SMALL)
    assert calls  # every launch asks about q, k, v, dout and the three gradients
    assert all(n == 7 for n in calls), calls


def test_int64_needed_only_past_int32_row_offsets():
    class Fake:  # only shape and strides matter
        def __init__(self, n, row_stride):
            self.shape = (1, n, 1, 128)
            self._strides = (n * row_stride, row_stride, 128, 1)

        def stride(self, dim):
            return self._strides[dim]

    assert not tf._needs_int64(Fake(2**16, 2**14))  # last row starts at 2**30 - 2**14
    assert tf._needs_int64(Fake(2**17 + 1, 2**14))


@pytest.mark.interpret
def test_single_launch_is_deterministic():
    q, k, v = _inputs((1, 24, 40, 4, 1, 32), torch.float16, "cpu")
    dout = torch.randn(1, 24, 4, 32, dtype=torch.float16)
    cfg = _with_mode(SMALL, "single_launch", True)
    runs = []
    for _ in range(2):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = tf.flash_attention(qq, kk, vv, causal=True, config=cfg)
        runs.append(torch.autograd.grad(out, (qq, kk, vv), dout))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.interpret
def test_deterministic_algorithms_turn_the_atomic_paths_off(monkeypatch):
    """Under torch.use_deterministic_algorithms the atomic_dq and Gluon backwards (dQ's sum
    order varies) give way to the two-launch Triton backward: the same bits on every run."""
    seen: list[bool] = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["ATOMIC_DQ"])
                return real[grid](*args, **kwargs)
            return launch

    real = tf._bwd_kernel
    monkeypatch.setattr(tf, "_bwd_kernel", Spy())
    cfg = {**SMALL, "bwd_dkdv": {"BLOCK_M": 16, "BLOCK_N": 32, "atomic_dq": 1, "gluon": 1}}
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _check_parity((1, 21, 57, 4, 2, 32), torch.float32, True, cfg)
    finally:
        torch.use_deterministic_algorithms(before)
    assert seen == [False, False]
    seen.clear()
    _check_parity((1, 21, 57, 4, 2, 32), torch.float32, True, cfg)
    assert seen == [True]


@pytest.mark.interpret
def test_causal_entries_replace_plain_ones(monkeypatch):
    seen: list[int] = []
    real = tf._launch_args

    def spy(cfg):
        seen.append(cfg["BLOCK_M"])
        return real(cfg)

    monkeypatch.setattr(tf, "_launch_args", spy)
    cfg = {"fwd": {"BLOCK_M": 32, "BLOCK_N": 16}, "fwd_causal": {"BLOCK_M": 16, "BLOCK_N": 16}}
    q, k, v = _inputs((1, 9, 9, 2, 1, 32), torch.float32, "cpu")
    with torch.no_grad():
        for causal in (False, True):
            tf.flash_attention(q, k, v, causal=causal, config=cfg)
    assert seen == [32, 16]


@pytest.mark.interpret
def test_causal_entries_give_the_same_result():
    cfg = {**SMALL, "fwd_causal": {"BLOCK_M": 32, "BLOCK_N": 32, "maxnreg": 128},
           "bwd_dkdv_causal": {"BLOCK_M": 32, "BLOCK_N": 16, "atomic_dq": 1}}
    _check_parity((1, 21, 30, 2, 1, 32), torch.float32, True, cfg)


def test_resolved_config_reads_the_causal_entry():
    cfg = make_config((64, 32, 4, 1, {"maxnreg": 128}), (32, 32, 4, 1), (32, 32, 4, 1),
                      causal=(None, (16, 32, 8, 2, "single_launch"), (32, 16, 8, 2)))
    assert cfg["fwd"]["maxnreg"] == 128
    plain, causal = tf._resolve_config(cfg, False), tf._resolve_config(cfg, True)
    assert plain["bwd_dkdv"] == {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    assert causal["bwd_dkdv"]["single_launch"] == 1
    assert causal["bwd_dq"]["num_warps"] == 8
    assert plain["fwd"] == causal["fwd"]  # no fwd_causal: the plain entry serves both


def test_autotune_drops_the_causal_forward_entry():
    base = make_config((64, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1),
                       causal=((16, 16, 4, 1), None, None))
    chosen = flash_autotune.tuned_config(("modes", 1), base, [(32, 32, 4, 2)], lambda c: None,
                                         timer=lambda fn: 1.0)
    flash_autotune.clear_tuning_cache()
    assert "fwd_causal" not in chosen
    assert chosen["fwd"]["BLOCK_M"] == 32


class TestConfigRefusals:
    """Each new config key: a bad value is refused with a ValueError that names it."""

    @pytest.mark.parametrize(("config", "needle"), [
        ({"fwd": {"maxnreg": 16}}, r"config\['fwd'\].*maxnreg=16 is out of range"),
        ({"bwd_dq": {"maxnreg": "128"}}, r"config\['bwd_dq'\].*maxnreg='128' is not an int"),
        ({"bwd_dkdv": {"atomic_dq": 2}}, r"config\['bwd_dkdv'\].*take 0 or 1"),
        ({"bwd_dq": {"tma": 1}}, r"config\['bwd_dq'\].*unknown key 'tma'"),
        ({"bwd_dkdv": {"single_launch": 1, "atomic_dq": 1}}, "exclude each other"),
        ({"bwd_dkdv": {"single_launch": 1, "num_warps": 8}},
         "single_launch needs bwd_dq num_warps=4 to equal bwd_dkdv num_warps=8"),
        ({"bwd_dkdv": {"single_launch": 1, "maxnreg": 128}}, "bwd_dq maxnreg=None"),
        ({"fwd_causal": {"BLOCK_M": 48}}, r"config\['fwd_causal'\].*powers of two"),
        ({"fwd_causal": []}, r"config\['fwd_causal'\].*expected a dict"),
        ({"bwd_causal": {}}, "keys among"),
        ({"bwd_dkdv": {"peel_diagonal": -1}}, r"config\['bwd_dkdv'\].*take 0 or 1"),
        ({"bwd_dq": {"peel_diagonal": 1}}, r"config\['bwd_dq'\].*unknown key 'peel_diagonal'"),
    ], ids=["maxnreg_range", "maxnreg_type", "switch_value", "foreign_switch", "both_modes",
            "launch_mismatch", "maxnreg_mismatch", "causal_entry", "causal_type", "unknown",
            "peel_value", "peel_foreign"])
    def test_refused(self, config, needle):
        # A non-causal call checks the causal entries too: a bad one fails every call.
        with pytest.raises(ValueError, match=needle):
            tf.flash_attention(**_bad(), causal=False, config=config)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 96, 128], ids=lambda d: f"h{d}")
def test_gpu_backward_modes(d, causal, mode):
    # B=2, GQA, N not a multiple of any block: every mask and both program kinds' tails.
    cfg = _with_mode(_gpu_config(torch.bfloat16, d), mode, causal)
    _check_parity((2, 1000, 1000, 4, 2, d), torch.bfloat16, causal, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [128, 64, 96], ids=lambda d: f"h{d}")
def test_gpu_candidates(d, causal):
    # The shipped config with peel_diagonal switched on; GQA, N != M.
    cfg = {name: dict(entry) for name, entry in
           tf._resolve_config(_gpu_config(torch.bfloat16, d), causal).items()}
    cfg["bwd_dkdv"]["peel_diagonal"] = 1
    _check_parity((2, 1000, 1100, 4, 2, d), torch.bfloat16, causal, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_forward_maxnreg(causal):
    cfg = tf._resolve_config(_gpu_config(torch.float16, 128), causal)
    cfg["fwd"] = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "maxnreg": 168}
    _check_parity((1, 700, 900, 4, 1, 128), torch.float16, causal, cfg)
