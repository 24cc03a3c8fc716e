"""VMoBA's token layouts: the chunk order of the video grid, and the padded key layout (each
chunk whole key blocks) that lets attnrt's block-sparse kernel list chunks by key block.

Shapes: B batch, N = T * Hp * Wp tokens (the patch grid, row-major t, h, w), H query heads,
Hkv key/value heads, D head size, C chunks.

Chunk shapes (FastVideo's process_moba_input / process_moba_output):
- int ct: temporal, ct whole frames per chunk (ct * Hp * Wp tokens, the last chunk may be
  shorter); the token order is unchanged.
- (ch, cw): spatial, every frame's ch x cw tile, all frames, per chunk (T * ch * cw tokens);
  Hp % ch == 0 and Wp % cw == 0.
- (ct, ch, cw): spatio-temporal cubes (ct * ch * cw tokens); each of T, Hp, Wp divisible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812

from .method_errors import SparseArgumentError

Chunk = int | Sequence[int]


def check_chunk(name: str, chunk: object, grid: Sequence[int]) -> int:
    """Tokens per chunk for `chunk` on the patch grid (T, Hp, Wp), or SparseArgumentError."""
    t, hp, wp = grid
    if isinstance(chunk, int) and not isinstance(chunk, bool):
        if chunk < 1:
            raise SparseArgumentError(f"{name}={chunk!r} is not allowed; allowed: an int >= 1 "
                                      f"(frames per chunk)")
        return chunk * hp * wp
    sizes = tuple(chunk) if isinstance(chunk, (tuple, list)) else None
    if sizes is None or len(sizes) not in (2, 3) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise SparseArgumentError(f"{name}={chunk!r} is not allowed; allowed: an int (frames), "
                                  "(ch, cw) or (ct, ch, cw) of positive ints")
    dims = (hp, wp) if len(sizes) == 2 else (t, hp, wp)
    if any(d % s for d, s in zip(dims, sizes, strict=True)):
        raise SparseArgumentError(f"{name}={chunk!r} does not fit the latent patch grid "
                                  f"{tuple(grid)}; allowed: sizes dividing {dims}")
    tokens = 1
    for s in sizes:
        tokens *= s
    return tokens * (t if len(sizes) == 2 else 1)


def _split(chunk: Chunk, grid: Sequence[int]) -> tuple[int, ...]:
    """View sizes (nt, ct, nh, ch, nw, cw) of a grid-shaped chunk."""
    t, hp, wp = grid
    sizes = tuple(chunk) if not isinstance(chunk, int) else (chunk,)
    ct, ch, cw = (t, *sizes) if len(sizes) == 2 else sizes
    return t // ct, ct, hp // ch, ch, wp // cw, cw


def to_chunk_order(x: torch.Tensor, grid: Sequence[int], chunk: Chunk) -> torch.Tensor:
    """[B, N, H, D] in grid order -> [B, N, H, D] with each chunk's tokens contiguous."""
    if isinstance(chunk, int):
        return x
    b, n, h, d = x.shape
    parts = _split(chunk, grid)
    return x.reshape(b, *parts, h, d).permute(0, 1, 3, 5, 2, 4, 6, 7, 8).reshape(b, n, h, d)


def from_chunk_order(x: torch.Tensor, grid: Sequence[int], chunk: Chunk) -> torch.Tensor:
    """The inverse of to_chunk_order."""
    if isinstance(chunk, int):
        return x
    b, n, h, d = x.shape
    nt, ct, nh, ch, nw, cw = _split(chunk, grid)
    return (x.reshape(b, nt, nh, nw, ct, ch, cw, h, d).permute(0, 1, 4, 2, 5, 3, 6, 7, 8)
            .reshape(b, n, h, d))


def padded_keys(x: torch.Tensor, chunk: int, block_k: int) -> torch.Tensor:
    """[B, N, Hkv, D] in chunk order -> [B, C * KB * block_k, Hkv, D]: every chunk padded to
    KB = ceil(chunk / block_k) whole key blocks (zeros; the kernel ignores them)."""
    b, n, h, d = x.shape
    c = -(-n // chunk)
    kb = -(-chunk // block_k)
    if n == c * chunk and chunk == kb * block_k:
        return x
    x = F.pad(x, (0, 0, 0, 0, 0, c * chunk - n)).view(b, c, chunk, h, d)
    return F.pad(x, (0, 0, 0, 0, 0, kb * block_k - chunk)).reshape(b, -1, h, d)


def key_blocks(n: int, chunk: int, block_k: int, device: torch.device
               ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(key_block_valid int32 [C * KB] or None, per-chunk block ids int32 [C, KB], per-chunk
    count of non-empty blocks int32 [C]) of the padded key layout."""
    c, kb = -(-n // chunk), -(-chunk // block_k)
    lengths = (n - torch.arange(c, device=device) * chunk).clamp(max=chunk)  # [C]
    valid = (lengths[:, None] - torch.arange(kb, device=device) * block_k).clamp(0, block_k)
    ids = (torch.arange(c, device=device)[:, None] * kb + torch.arange(kb, device=device))
    counts = (valid > 0).sum(1)
    full = n == c * chunk and chunk == kb * block_k
    return (None if full else valid.reshape(-1).to(torch.int32), ids.to(torch.int32),
            counts.to(torch.int32))
