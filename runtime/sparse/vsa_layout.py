"""VSA's tile layout: the latent video grid (T, H, W) cut into 4x4x4 cubes of 64 tokens.

Shapes: B batch, N = T * H * W video tokens in row-major (t, h, w) order, C cubes
(ceil(T/4) * ceil(H/4) * ceil(W/4), in row-major (t-cube, h-cube, w-cube) order), S = 64 * C
slots of the tiled layout; cube c owns slots [64 c, 64 c + valid_c), its tokens in row-major
order, and the rest of its 64 slots are padding (zeros). FastVideo's layout, names and semantics.
Built once per shape and device (cached); the tile/untile steps are single gathers on the device.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

VSA_TILE_SIZE = (4, 4, 4)
CUBE_TOKENS = math.prod(VSA_TILE_SIZE)


def num_tiles(dit_seq_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Cubes along (T, H, W), partial edge cubes included."""
    return tuple(-(-n // t) for n, t in zip(dit_seq_shape, VSA_TILE_SIZE, strict=True))  # type: ignore[return-value]


def cube_of_tokens(dit_seq_shape: tuple[int, int, int]) -> torch.Tensor:
    """int64 [N]: the cube of each token (row-major order of both), on the CPU."""
    t, h, w = (torch.arange(n) for n in dit_seq_shape)
    _, nh, nw = num_tiles(dit_seq_shape)
    ts, hs, ws = VSA_TILE_SIZE
    cube = ((t[:, None, None] // ts) * nh + h[None, :, None] // hs) * nw + w[None, None, :] // ws
    return cube.reshape(-1)


def _cpu_layout(dit_seq_shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    cube = cube_of_tokens(dit_seq_shape)
    n_cubes = math.prod(num_tiles(dit_seq_shape))
    # Tokens sorted by cube, row-major inside each (a stable sort keeps row-major order).
    partition = torch.sort(cube, stable=True).indices
    sizes = torch.bincount(cube, minlength=n_cubes)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(cube.numel()) - starts[cube[partition]]
    non_pad = cube[partition] * CUBE_TOKENS + rank  # slot of the i-th tiled token
    reverse = torch.argsort(partition)
    return {"tile_partition_indices": partition, "reverse_tile_partition_indices": reverse,
            "variable_block_sizes": sizes.to(torch.int32), "non_pad_index": non_pad,
            "untile_combined_index": non_pad[reverse]}


@lru_cache(maxsize=32)
def tile_layout(dit_seq_shape: tuple[int, int, int],
                device: torch.device) -> dict[str, torch.Tensor]:
    """The layout tensors of one shape on `device` (cached per shape and device):
    tile_partition_indices int64 [N] (token of each tiled position), its inverse
    reverse_tile_partition_indices, variable_block_sizes int32 [C] (valid tokens per cube),
    non_pad_index int64 [N] (slot of each tiled position) and untile_combined_index int64 [N]
    (slot of each token: out_tokens = out_slots[:, untile_combined_index])."""
    return {k: v.to(device) for k, v in _cpu_layout(dit_seq_shape).items()}


def tile(x: torch.Tensor, partition: torch.Tensor, non_pad: torch.Tensor,
         n_slots: int) -> torch.Tensor:
    """[B, N, H, D] tokens -> [B, S, H, D] slots (padding zero). Differentiable; no host sync."""
    out = x.new_zeros((x.shape[0], n_slots, *x.shape[2:]))
    return out.index_copy(1, non_pad, x.index_select(1, partition))


def untile(x: torch.Tensor, untile_combined_index: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] slots -> [B, N, H, D] tokens (one gather)."""
    return x.index_select(1, untile_combined_index)


def clear_layout_cache() -> None:
    tile_layout.cache_clear()
