"""Tiny random-initialised diffusers transformers (their own classes, no download) and inputs.

Each builder returns (model, kwargs for forward); configs are the smallest each class accepts
with several heads, so a forward takes milliseconds on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Built = tuple[torch.nn.Module, dict[str, Any]]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def wan() -> Built:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    g = _gen(1)
    return model, {"hidden_states": torch.randn(1, 4, 2, 8, 8, generator=g),
                   "timestep": torch.tensor([500]),
                   "encoder_hidden_states": torch.randn(1, 12, 16, generator=g)}


def cogvideox() -> Built:
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=4, text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=5, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8)
    g = _gen(2)
    return model, {"hidden_states": torch.randn(1, 2, 4, 8, 8, generator=g),
                   "encoder_hidden_states": torch.randn(1, 8, 8, generator=g),
                   "timestep": torch.tensor([500])}


def hunyuan_video() -> Built:
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4))
    g = _gen(3)
    text_mask = torch.ones(1, 6, dtype=torch.long)
    text_mask[:, 4:] = 0  # padded text tokens: the model builds an attention mask from these
    return model, {"hidden_states": torch.randn(1, 4, 2, 4, 4, generator=g),
                   "timestep": torch.tensor([500]),
                   "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
                   "encoder_attention_mask": text_mask,
                   "pooled_projections": torch.randn(1, 8, generator=g),
                   "guidance": torch.tensor([3500.0])}


def flux() -> Built:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8))
    g = _gen(4)
    return model, {"hidden_states": torch.randn(1, 16, 4, generator=g),
                   "encoder_hidden_states": torch.randn(1, 6, 32, generator=g),
                   "pooled_projections": torch.randn(1, 32, generator=g),
                   "timestep": torch.tensor([1.0]),
                   "img_ids": torch.randn(16, 3, generator=g),
                   "txt_ids": torch.randn(6, 3, generator=g)}


MODELS: dict[str, Callable[[], Built]] = {
    "wan2.1": wan, "cogvideox": cogvideox, "hunyuan_video": hunyuan_video, "flux": flux}


def build(name: str) -> Built:
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


def sample(output: Any) -> torch.Tensor:
    """The denoised sample of a diffusers transformer's output (dataclass or tuple)."""
    return output.sample if hasattr(output, "sample") else output[0]
