"""VSA through the diffusers integration (`enable(model, sparse=VideoSparse(...))`): the video's
self-attention calls run VSA and equal the published algorithm's reference, other calls stay
dense, and what VSA cannot serve is refused. The kernel runs on CPU under TRITON_INTERPRET=1.

Shapes: B batch, N video tokens (T' * H' * W'), H heads, D head size; tensors [B, N, H, D].
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnrt.integrations.sdpa_router import SdpaRouter
from attnrt.integrations.video_sparse import VideoSparse, VideoSparseError
from attnrt.sparse.vsa_reference import vsa_reference
from tests.conftest import rel_l2

GRID = (4, 4, 8)  # 128 tokens: two whole 4x4x4 cubes
H, D = 2, 16


def _qkv(n: int = 128, m: int = 128, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, length, H, D, generator=gen) for length in (n, m, m)]


@pytest.mark.interpret
@pytest.mark.parametrize("gate", ["zeros", "ones"])
def test_video_self_attention_is_vsa_and_other_calls_stay_dense(gate):
    router = SdpaRouter(sparse=VideoSparse(GRID, (1, 1, 1), 0.5, gate=gate))
    q, k, v = _qkv()
    with torch.no_grad():
        out = router(q, k, v)
    fill = torch.zeros_like(q) if gate == "zeros" else torch.ones_like(q)
    ref = vsa_reference(*(t.double() for t in (q, k, v, fill)), GRID, 0.5)
    assert rel_l2(out, ref) < 1e-5
    assert router.served["VIDEO_SPARSE_ATTN"] == 1
    # Not dense attention: half the key cubes are dropped.
    dense = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    assert rel_l2(out, dense.transpose(1, 2)) > 1e-2

    q, k, v = _qkv(128, 12, seed=1)  # cross-attention to 12 text tokens: dense, as before
    with torch.no_grad():
        out = router(q, k, v)
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    assert rel_l2(out, want.transpose(1, 2)) < 1e-5
    assert router.served.total() == 2
    assert router.served["VIDEO_SPARSE_ATTN"] == 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"attn_mask": torch.ones(1, 1, 128, 128, dtype=torch.bool)}, r"attn_mask=<tensor> .*"
                                                                     r"allowed: None"),
    ({"is_causal": True}, r"is_causal=True .*allowed: False"),
    ({"return_lse": True}, r"return_lse=True .*allowed: False"),
])
def test_what_vsa_cannot_serve_on_the_video_call_is_refused(kwargs, message):
    router = SdpaRouter(sparse=VideoSparse(GRID, (1, 1, 1), 0.5))
    with pytest.raises(VideoSparseError, match=message):
        router(*_qkv(), **kwargs)
    assert router.served.total() == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gate": "random"}, r"gate='random' is not allowed; allowed: 'zeros', 'ones'"),
    ({"sparsity": 1.0}, r"sparsity=1.0 is not allowed; allowed: a number in \[0, 1\)"),
    ({"patch_size": (1, 2)}, r"patch_size=\(1, 2\) is not allowed; expected three ints"),
    ({"raw_latent_shape": (4, 1, 8), "patch_size": (1, 2, 2)}, r"at least its patch size"),
])
def test_bad_video_sparse_options_are_named(kwargs, message):
    args = {"raw_latent_shape": GRID, "patch_size": (1, 1, 1), "sparsity": 0.5, **kwargs}
    with pytest.raises(Exception, match=message) as info:
        VideoSparse(**args)
    assert isinstance(info.value, ValueError)


class TestTinyWan:
    """diffusers' own Wan 2.1 transformer, tiny and random: 2 layers, latent (4, 8, 16) with
    patch (1, 2, 2), so 128 video tokens; each layer makes one self- and one cross-attention
    call."""

    @staticmethod
    def _model():
        pytest.importorskip("diffusers", reason="diffusers is not installed")
        from diffusers import WanTransformer3DModel

        torch.manual_seed(0)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
        g = torch.Generator().manual_seed(1)
        inputs = {"hidden_states": torch.randn(1, 4, 4, 8, 16, generator=g),
                  "timestep": torch.tensor([500]),
                  "encoder_hidden_states": torch.randn(1, 12, 16, generator=g)}
        return model, inputs

    @pytest.mark.interpret
    def test_vsa_keeping_every_cube_equals_the_native_model(self):
        """sparsity 0 keeps every key cube and the zero gate drops the coarse term: VSA is
        then exact attention, so the whole model must match native (tiling round-trips)."""
        from attnrt.integrations import diffusers as attnrt_diffusers

        model, inputs = self._model()
        with torch.no_grad():
            native = model(**inputs).sample
            sparse = VideoSparse((4, 8, 16), (1, 2, 2), 0.0)
            with attnrt_diffusers.enabled(model, sparse=sparse) as router:
                out = model(**inputs).sample
        assert rel_l2(out, native) < 1e-5
        assert router.served["VIDEO_SPARSE_ATTN"] == 2  # the two self-attention calls
        assert router.served.total() == 4

    @pytest.mark.interpret
    def test_vsa_dropping_cubes_changes_the_model_output(self):
        from attnrt.integrations import diffusers as attnrt_diffusers

        model, inputs = self._model()
        with torch.no_grad():
            native = model(**inputs).sample
            sparse = VideoSparse((4, 8, 16), (1, 2, 2), 0.5)
            with attnrt_diffusers.enabled(model, sparse=sparse) as router:
                out = model(**inputs).sample
        assert torch.isfinite(out).all()
        assert rel_l2(out, native) > 1e-4
        assert router.served["VIDEO_SPARSE_ATTN"] == 2

    def test_sparse_must_be_a_video_sparse(self):
        from attnrt.integrations import diffusers as attnrt_diffusers

        model, _ = self._model()
        with pytest.raises(attnrt_diffusers.DiffusersIntegrationError,
                           match=r"sparse=str is not allowed"):
            attnrt_diffusers.enable(model, sparse="vsa")  # type: ignore[arg-type]
