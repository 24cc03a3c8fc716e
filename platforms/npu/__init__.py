"""npu platform pack (Huawei Ascend): its facts, probe (probe.py), the torch_npu adapter.

TORCH_SDPA (attnrt.backends) is the fallback: torch_npu routes SDPA to its FlashAttentionScore op.
"""

from attnrt.selection.packs import Platform

PLATFORM = Platform(
    name="npu",
    probe_order=30,
    arch_pattern=r"ascend[0-9]{3}[a-z0-9]*",  # from the SoC name: ascend910b, ascend310p
    default_arch="ascend910b",
    torch_device_types=("npu",),
    indexed=True,
    dist_backend="hccl",  # DistributedAttention's all-to-all on Ascend (HCCL, from torch_npu)
    backends={"NPU_FUSION_ATTN": "attnrt.platforms.npu.fusion_attention:NpuFusionAttnBackend"},
)
