"""tanh as PTX tanh.approx.f32 in the generated kernels (engine/kernel.FAST_TANH, off until a
GPU run checks it): where it applies, what the generated text holds, and on the GPU the
soft-capping variant against the float64 reference, forward and backward, Triton and Gluon."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from attnrt.engine import gluon_forward, kernel
from attnrt.engine.codegen import KernelFlags, source
from attnrt.engine.gluon_codegen import gluon_source
from attnrt.engine.library import AttentionLibrary
from tests.engine.cases import CASES
from tests.engine.test_examples import _check


def _softcap():
    return AttentionLibrary("SoftcapAttention", "None", head_size=128, softcap=30.0,
                            backend="triton")


def test_it_ships_off():
    assert kernel.FAST_TANH is False


def test_it_applies_to_16_bit_cuda_calls_of_variants_with_tanh(monkeypatch):
    monkeypatch.setattr(kernel, "FAST_TANH", True)
    softcap = _softcap().variant
    plain = AttentionLibrary("SoftmaxAttention", "None", head_size=128,
                             backend="triton").variant

    def q(dtype, cuda=True):
        return SimpleNamespace(is_cuda=cuda, dtype=dtype)

    assert kernel.fast_tanh(softcap, q(torch.bfloat16))
    assert kernel.fast_tanh(softcap, q(torch.float16))
    assert not kernel.fast_tanh(softcap, q(torch.float32))  # float32's tolerance is 1e-5
    assert not kernel.fast_tanh(softcap, q(torch.bfloat16, cuda=False))  # the interpreter
    assert not kernel.fast_tanh(plain, q(torch.bfloat16))
    monkeypatch.setattr(kernel, "FAST_TANH", False)
    assert not kernel.fast_tanh(softcap, q(torch.bfloat16))


@pytest.mark.parametrize("fast", [False, True])
def test_the_generated_text_takes_tanh_approx_only_when_asked(fast):
    variant = _softcap().variant
    flags = KernelFlags(False, True, (), fast)
    for text in (source(variant, flags), gluon_source(variant, flags, 128)):
        assert ("tanh.approx.f32" in text) is fast
        # the exact form: exp(-2|x|), present without the flag in every tanh
        assert ("exp(-2.0 *" in text) is not fast


@pytest.mark.gpu
@pytest.mark.parametrize("gluon", [False, True], ids=["triton", "gluon"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_softcap_with_tanh_approx_matches_the_reference(monkeypatch, gluon, dtype):
    monkeypatch.setattr(kernel, "FAST_TANH", True)
    kernel.clear_modules()
    case = CASES["softcap"]()
    with gluon_forward.gluon_forward(gluon):
        _check(case, case.make("triton"), (2, 300, 4, 128), dtype, "cuda")
    kernel.clear_modules()
