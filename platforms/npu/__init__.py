"""npu platform pack (Huawei Ascend): probe (probe.py), its backend table, the torch_npu adapter.

TORCH_SDPA (attnrt.backends) is the fallback: torch_npu routes SDPA to its FlashAttentionScore op.
"""

BACKENDS: dict[str, str] = {
    "NPU_FUSION_ATTN": "attnrt.platforms.npu.fusion_attention:NpuFusionAttnBackend",
}

# torch.distributed backend for DistributedAttention's all-to-all on Ascend (HCCL, from torch_npu);
# "nccl" is the CUDA/ROCm one (RCCL answers to "nccl") and "gloo" the CPU one.
DIST_BACKEND = "hccl"
