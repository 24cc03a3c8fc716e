"""attnrt.integrations.diffusers on tiny random-initialised Wan 2.1, CogVideoX, HunyuanVideo and
Flux transformers built from diffusers' own classes (no download): same output as natively,
every attention call served by attnrt, a forced backend visible, and enable/disable restoring.

Shapes: B batch, N sequence, H heads, D head size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install attnrt[test])")

import attnrt  # noqa: E402
from attnrt.integrations import diffusers as attnrt_diffusers  # noqa: E402
from attnrt.integrations.diffusers import DiffusersIntegrationError  # noqa: E402
from attnrt.integrations.sdpa_router import UnsupportedAttentionArgument  # noqa: E402
from tests.conftest import rel_l2  # noqa: E402
from tests.integrations.tiny_models import MODELS, build, sample  # noqa: E402


class CountTorchSdpa(TorchFunctionMode):
    """Counts calls that reach torch's SDPA (natively: one per attention call)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def native(model, inputs):
    with torch.no_grad(), CountTorchSdpa() as count:
        return sample(model(**inputs)), count.calls


@pytest.fixture(scope="module", params=list(MODELS))
def model_case(request):
    model, inputs = build(request.param)
    ref, calls = native(model, inputs)
    return request.param, model, inputs, ref, calls


def test_same_output_and_every_call_served(model_case):
    name, model, inputs, ref, calls = model_case
    assert calls > 0
    with attnrt_diffusers.enabled(model) as router, torch.no_grad():
        out = sample(model(**inputs))
    assert rel_l2(out, ref) < 1e-5, name
    assert router.served.total() == calls, (name, router.served)


def test_forced_backend_serves_every_call_and_torch_sdpa_is_never_reached(model_case):
    name, model, inputs, ref, calls = model_case
    with (attnrt_diffusers.enabled(model) as router, torch.no_grad(),
          attnrt.force_backend("REFERENCE"), CountTorchSdpa() as reached):
        out = sample(model(**inputs))
    assert rel_l2(out, ref) < 1e-5, name
    assert router.served == {"REFERENCE": calls}, name
    assert reached.calls == 0, name


def test_hunyuan_text_padding_reaches_attnrt_as_a_mask():
    model, inputs = build("hunyuan_video")
    with attnrt_diffusers.enabled(model) as router, torch.no_grad():
        model(**inputs)
    assert router.served_masked.total() > 0


@pytest.mark.parametrize("name", ["wan2.1", "cogvideox"])
def test_disable_restores_processors_hooks_and_registry(name):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    model, inputs = build(name)
    modules = attnrt_diffusers.attention_modules(model)
    before = [getattr(m.processor, "_attention_backend", "none") for m in modules]
    router = attnrt_diffusers.enable(model)
    key = attnrt_diffusers.dispatcher_backend(model)
    assert key in _AttentionBackendRegistry._backends
    attnrt_diffusers.disable(model)
    assert [getattr(m.processor, "_attention_backend", "none") for m in modules] == before
    assert key not in _AttentionBackendRegistry._backends
    assert attnrt_diffusers.router_of(model) is None
    with torch.no_grad():
        model(**inputs)
    assert router.served.total() == 0  # nothing routed once disabled


def test_context_manager_restores_on_error():
    model, inputs = build("cogvideox")
    with pytest.raises(RuntimeError, match="boom"), attnrt_diffusers.enabled(model):
        raise RuntimeError("boom")
    assert attnrt_diffusers.router_of(model) is None
    attnrt_diffusers.enable(model)  # enabling again works: nothing was left behind
    attnrt_diffusers.disable(model)


def test_a_dropped_model_leaves_no_registry_entry():
    import gc

    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    model, _ = build("flux")
    attnrt_diffusers.enable(model)
    key = attnrt_diffusers.dispatcher_backend(model)
    assert key in _AttentionBackendRegistry._backends
    del model
    gc.collect()
    assert key not in _AttentionBackendRegistry._backends


def test_enable_twice_disable_unknown_and_non_diffusers_models_are_refused():
    model, _ = build("flux")
    with attnrt_diffusers.enabled(model), pytest.raises(DiffusersIntegrationError,
                                                        match="already routed"):
        attnrt_diffusers.enable(model)
    with pytest.raises(DiffusersIntegrationError, match="not routed"):
        attnrt_diffusers.disable(model)
    with pytest.raises(DiffusersIntegrationError, match="no diffusers attention module"):
        attnrt_diffusers.enable(torch.nn.Linear(2, 2))


def test_dispatcher_hands_every_argument_unknown_ones_are_refused():
    """diffusers' dispatcher drops kwargs a backend does not declare; attnrt's declares every
    name, so an argument it cannot serve reaches it and is refused, not dropped."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    model, _ = build("flux")
    q = torch.randn(1, 6, 2, 8)
    with attnrt_diffusers.enabled(model):
        backend = attnrt_diffusers.dispatcher_backend(model)
        out = dispatch_attention_fn(q, q, q, backend=backend)
        assert rel_l2(out, F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, q, q))).transpose(1, 2)) < 1e-5
        with pytest.raises(UnsupportedAttentionArgument, match="window_size"):
            dispatch_attention_fn(q, q, q, attention_kwargs={"window_size": (2, 2)},
                                  backend=backend)
        with pytest.raises(UnsupportedAttentionArgument, match="dropout_p"):
            dispatch_attention_fn(q, q, q, dropout_p=0.5, backend=backend)


def test_the_enum_stays_closed():
    from diffusers.models.attention_dispatch import AttentionBackendName

    model, _ = build("flux")
    with attnrt_diffusers.enabled(model):
        value = attnrt_diffusers.dispatcher_backend(model).value
        with pytest.raises(ValueError, match=value):
            AttentionBackendName(value)


@pytest.mark.parametrize(("version", "ok"), [
    ("0.42.1", True), ("0.42.0", True), ("0.41.0", False), ("0.43.0", False),
    ("0.42.0.dev0", False), ("not-a-version", False)])
def test_version_check(version, ok):
    if ok:
        assert attnrt_diffusers.check_diffusers_version(version) == version
    else:
        with pytest.raises(DiffusersIntegrationError, match="supported: >=0.42,<0.43"):
            attnrt_diffusers.check_diffusers_version(version)


def test_installed_version_is_supported_and_checked_by_enable(monkeypatch):
    import diffusers

    attnrt_diffusers.check_diffusers_version()
    model, _ = build("flux")
    monkeypatch.setattr(diffusers, "__version__", "0.41.0")
    with pytest.raises(DiffusersIntegrationError, match="diffusers==0.41.0"):
        attnrt_diffusers.enable(model)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_gpu_bf16_every_call_served_close_to_native(name):
    """On CUDA in bf16 attnrt's choice (a flash kernel) replaces torch's: every call served,
    output within 3e-2 of native (two bf16 kernels through a few layers; the per-kernel bf16
    bound of 1.5e-2 applies to each call, not to the model)."""
    model, inputs = build(name)
    model = model.to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda")
              for k, v in inputs.items()}
    ref, calls = native(model, inputs)
    with attnrt_diffusers.enabled(model) as router, torch.no_grad():
        out = sample(model(**inputs))
    assert router.served.total() == calls
    assert rel_l2(out, ref) < 3e-2


def test_dispatcher_return_lse_and_checks_enabled(monkeypatch):
    """return_lse through attention_kwargs (as context-parallel callers pass it) comes back in
    diffusers' [B, N, H] layout; with DIFFUSERS_ATTN_CHECKS on, calls still reach attnrt."""
    from diffusers.models.attention_dispatch import (
        _AttentionBackendRegistry,
        dispatch_attention_fn,
    )

    monkeypatch.setattr(_AttentionBackendRegistry, "_checks_enabled", True)
    model, _ = build("flux")
    q, k = torch.randn(2, 6, 2, 8), torch.randn(2, 9, 2, 8)
    with attnrt_diffusers.enabled(model) as router:
        backend = attnrt_diffusers.dispatcher_backend(model)
        out, lse = dispatch_attention_fn(q, k, k, attention_kwargs={"return_lse": True},
                                         backend=backend)
    s = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) / 8 ** 0.5
    assert lse.shape == (2, 6, 2)
    assert rel_l2(lse, torch.logsumexp(s, -1).transpose(1, 2)) < 1e-5
    assert rel_l2(out, torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), k.double())) < 1e-5
    assert router.served.total() == 1
