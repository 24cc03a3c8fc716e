"""cuda platform pack: probe (probe.py), vendor adapters and SDPA-pinned backends, its table.

Capability lives on each backend class; which one is preferred lives in capability.yaml.
TRITON_FLASH_ATTN is portable (runtime/backends/triton_flash.py, shared with ROCm), registered
by the core table; its per-arch block configs live here in triton_flash_configs.py.
"""

_PACK = "attnrt.platforms.cuda"

BACKENDS: dict[str, str] = {
    "TORCH_SDPA_CUDNN": f"{_PACK}.sdpa_pinned:CudnnSdpaBackend",
    "TORCH_SDPA_FLASH": f"{_PACK}.sdpa_pinned:FlashSdpaBackend",
    "TORCH_SDPA_EFFICIENT": f"{_PACK}.sdpa_pinned:EfficientSdpaBackend",
    "FLASH_ATTN": f"{_PACK}.flash_attn:FlashAttnBackend",
    "FLASH_ATTN_3": f"{_PACK}.flash_attn3:FlashAttn3Backend",
    "SAGE_ATTN": f"{_PACK}.sage:SageAttnBackend",
}

# torch.distributed backend for sequence parallelism: NCCL between NVIDIA GPUs.
DIST_BACKEND = "nccl"
