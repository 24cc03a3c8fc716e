"""rocm platform pack: probe (probe.py), its backend table, vendor adapters and kernel configs.

Also served on ROCm, registered elsewhere: TORCH_SDPA (PyTorch's AOTriton flash path on ROCm),
TRITON_FLASH_ATTN (attnrt.backends, with block configs from triton_flash_configs.py here) and
FLASH_ATTN (the ROCm build of flash_attn, declared with PLATFORMS cuda+rocm by the cuda pack).
"""

BACKENDS: dict[str, str] = {
    "AITER": "attnrt.platforms.rocm.aiter:AiterFlashAttnBackend",
}

# torch.distributed backend for sequence parallelism: RCCL, which torch names nccl on ROCm builds.
DIST_BACKEND = "nccl"
