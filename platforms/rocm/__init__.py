"""rocm platform pack: its facts, probe (probe.py), its backend table and vendor adapters.

Also served on ROCm, registered elsewhere: TORCH_SDPA (PyTorch's AOTriton flash path on ROCm),
TRITON_FLASH_ATTN (attnrt.backends; block configs in attnrt.kernels.flash.configs_rocm) and
FLASH_ATTN (the ROCm build of flash_attn, declared with PLATFORMS cuda+rocm by the cuda pack).
"""

from attnrt.selection.packs import Platform

PLATFORM = Platform(
    name="rocm",
    probe_order=10,  # first: ROCm builds answer torch.cuda too, so they are told apart here
    # gcnArchName without target features: gfx90a < gfx942 < gfx950 < gfx1100 (hex digits)
    arch_pattern=r"gfx([0-9]{1,2})([0-9a-f])([0-9a-f])",
    arch_bases=(10, 16, 16),
    default_arch="gfx942",
    torch_device_types=("cuda",),  # HIP builds of torch name the device "cuda"
    indexed=True,
    dist_backend="nccl",  # RCCL, which torch names nccl on ROCm builds
    backends={"AITER": "attnrt.platforms.rocm.aiter:AiterFlashAttnBackend"},
)
