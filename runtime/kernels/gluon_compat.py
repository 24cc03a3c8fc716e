"""Gluon names that differ between Triton versions, for attnrt's Gluon kernels (imported only
where Triton has Gluon; importing this needs Triton).

tma_load: TMA's global -> shared copy, async_copy_global_to_shared in Triton 3.6 and renamed
async_load later. Kernels call it as tma_load(desc, [row, col], barrier, smem).
"""

from triton.experimental.gluon.language.nvidia.hopper import tma

tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
