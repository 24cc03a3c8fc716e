"""Model presets for `attnrt bench --model NAME`: attention in the shapes real models run.

Shapes: B batch, N query tokens, M key tokens, H query heads, Hkv kv heads, D head size.

Each preset is taken from the model's published config (numbers and their derivation below):
the attention calls one layer makes (self- and cross-attention), the number of such layers,
calls per denoising step (2 with classifier-free guidance, which runs the transformer twice),
and the default number of steps. Attention time per step = sum over a layer's calls of
layers x calls_per_step x time per call.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from attnrt.errors import AttnrtError


class UnknownModelError(AttnrtError, ValueError):
    """A --model name that no preset has."""


@dataclass(frozen=True)
class AttentionShape:
    """One attention call of a layer: q [B, N, H, D], k/v [B, M, Hkv, D]."""

    label: str
    n: int
    m: int
    heads: int
    kv_heads: int
    head_size: int
    causal: bool = False
    batch: int = 1
    # The latent video grid (T, H, W) after patching, for a video self-attention whose N == M
    # tokens are that grid in order: what the video sparse methods (VSA) tile.
    grid: tuple[int, int, int] | None = None

    def flops(self) -> float:
        """Forward FLOPs: 4*B*H*N*M*D, halved when causal (N == M)."""
        f = 4.0 * self.batch * self.heads * self.n * self.m * self.head_size
        return f / 2 if self.causal else f

    def describe(self) -> str:
        heads = f"H{self.heads}" + (f"/{self.kv_heads}" if self.kv_heads != self.heads else "")
        grid = f" grid {'x'.join(map(str, self.grid))}" if self.grid else ""
        return (f"{self.label}: B{self.batch} N{self.n} M{self.m} {heads} D{self.head_size}"
                f"{' causal' if self.causal else ''}{grid}")


@dataclass(frozen=True)
class ModelPreset:
    """A model's attention workload per denoising step (per forward for LLM prefill)."""

    name: str
    title: str
    layers: int
    calls_per_step: int
    steps: int
    attention: tuple[AttentionShape, ...]
    source: str
    # Sparse methods this model's sparse variants use (FastVideo's VSA checkpoints of Wan),
    # timed on its shapes that have a grid.
    sparse: tuple[str, ...] = ()

    def scaled(self, factor: int) -> ModelPreset:
        """The same model with every sequence length divided by `factor` (at least 1 token); a
        video grid's largest side is halved until the grid has at most N / factor tokens."""
        shapes = [scaled_shape(a, factor) for a in self.attention]
        # Other calls over the same video tokens (cross-attention's queries) follow the grid.
        video = {a.n: b.n for a, b in zip(self.attention, shapes, strict=True) if a.grid}
        shapes = [b if a.grid or a.n not in video else replace(b, n=video[a.n])
                  for a, b in zip(self.attention, shapes, strict=True)]
        return replace(self, attention=tuple(shapes),
                       title=f"{self.title} (lengths / {factor})")


def scaled_shape(shape: AttentionShape, factor: int) -> AttentionShape:
    """`shape` with N and M divided by `factor`; a grid shrinks by halving its largest side
    until it has at most N / factor tokens, and N = M = its tokens."""
    n, m = max(1, shape.n // factor), max(1, shape.m // factor)
    if shape.grid is None:
        return replace(shape, n=n, m=m)
    grid = list(shape.grid)
    while grid[0] * grid[1] * grid[2] > n and max(grid) > 1:
        side = grid.index(max(grid))
        grid[side] = max(1, grid[side] // 2)
    tokens = grid[0] * grid[1] * grid[2]
    return replace(shape, n=tokens, m=tokens, grid=(grid[0], grid[1], grid[2]))


def _wan(size: str, width: int, height: int, dim: int, heads: int, layers: int) -> ModelPreset:
    # VAE stride (4, 8, 8), patch (1, 2, 2), 81 frames -> 21 latent frames; text 512 tokens.
    grid = (21, height // 16, width // 16)
    tokens = grid[0] * grid[1] * grid[2]
    return ModelPreset(
        f"wan2.1-{size.lower()}-{height}p", f"Wan 2.1 {size} {width}x{height}x81", layers, 2,
        50, (AttentionShape("self", tokens, tokens, heads, heads, 128, grid=grid),
             AttentionShape("cross", tokens, 512, heads, heads, 128)),
        f"Wan-AI/Wan2.1-T2V-{size} config: dim {dim}, {heads} heads of 128, {layers} layers; "
        "CFG (2 calls/step), 50 steps; FastVideo's VSA variants sparsify the self-attention",
        sparse=("vsa",))


PRESETS: dict[str, ModelPreset] = {p.name: p for p in (
    _wan("1.3B", 832, 480, 1536, 12, 30),
    _wan("1.3B", 1280, 720, 1536, 12, 30),
    _wan("14B", 832, 480, 5120, 40, 40),
    _wan("14B", 1280, 720, 5120, 40, 40),
    # 129 frames -> 33 latent, 720x1280 -> 45x80 patches: 118800 video + 256 text tokens,
    # joint attention in 20 double- and 40 single-stream blocks; guidance embedded (1 call).
    ModelPreset("hunyuanvideo-720p", "HunyuanVideo 1280x720x129", 60, 1, 50,
                (AttentionShape("joint", 119056, 119056, 24, 24, 128),),
                "tencent/HunyuanVideo config: 24 heads of 128, 20 double + 40 single blocks; "
                "embedded guidance, 50 steps"),
    # 49 frames -> 13 latent, 480x720 -> 30x45 patches: 17550 video + 226 text tokens.
    ModelPreset("cogvideox-5b", "CogVideoX-5B 720x480x49", 42, 2, 50,
                (AttentionShape("joint", 17776, 17776, 48, 48, 64),),
                "THUDM/CogVideoX-5b config: 48 heads of 64, 42 layers; CFG, 50 steps"),
    # 1024x1024 -> 128x128 latent -> 64x64 patches: 4096 image + 512 text tokens.
    ModelPreset("flux.1-1024px", "Flux.1-dev 1024x1024", 57, 1, 28,
                (AttentionShape("joint", 4608, 4608, 24, 24, 128),),
                "black-forest-labs/FLUX.1-dev config: 24 heads of 128, 19 double + 38 single "
                "blocks; guidance-distilled (1 call), 28 steps"),
    ModelPreset("llama-3-8b-prefill-8k", "Llama-3-8B prefill, 8192 tokens", 32, 1, 1,
                (AttentionShape("self", 8192, 8192, 32, 8, 128, causal=True),),
                "meta-llama/Meta-Llama-3-8B config: 32 heads, 8 kv heads of 128, 32 layers; "
                "one prefill"),
)}


def preset(name: str) -> ModelPreset:
    """The preset called `name` (case-insensitive)."""
    found = PRESETS.get(name.lower())
    if found is None:
        raise UnknownModelError(f"--model={name!r} is not a preset; allowed: "
                                f"{', '.join(PRESETS)}")
    return found


def format_presets() -> str:
    lines = ["attnrt bench --model presets (attention per layer; layers x calls/step, steps):"]
    for p in PRESETS.values():
        lines.append(f"  {p.name:<24} {p.title}: {p.layers} layers x {p.calls_per_step} "
                     f"calls/step, {p.steps} steps")
        lines += [f"  {'':<26}{a.describe()}" for a in p.attention]
    return "\n".join(lines)


def presets_dict() -> list[dict[str, object]]:
    from dataclasses import asdict

    return [asdict(p) for p in PRESETS.values()]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`attnrt bench` flags for model presets (the grid flags do not apply with --model)."""
    parser.add_argument("--model", default=None,
                        help="time attention in a model's shapes (see --list-models)")
    parser.add_argument("--list-models", action="store_true", help="show the model presets")
    parser.add_argument("--scale", type=int, default=1,
                        help="with --model: divide every sequence length by this (quick looks)")
    parser.add_argument("--vsa-sparsity", type=float, default=0.875,
                        help="with --model: VSA_sparsity for the models whose sparse variants "
                             "use VSA (Wan 2.1); the share of key cubes dropped, in [0, 1)")


def run_models(args: argparse.Namespace) -> int:
    """`attnrt bench --model NAME` / `--list-models`."""
    import json

    if args.list_models:
        print(json.dumps(presets_dict(), indent=2) if args.json else format_presets())
        return 0
    from attnrt.tools.model_bench import run_model_bench

    return run_model_bench(args, preset(args.model))
