"""cuda platform pack: its facts, probe (probe.py), vendor adapters and SDPA-pinned backends.

Capability lives on each backend class; which one is preferred lives in capability.yaml.
TRITON_FLASH_ATTN is portable (attnrt.backends, shared with ROCm); its per-arch block configs
live beside the kernel (attnrt.kernels.flash.configs_cuda).
"""

from attnrt.selection.packs import Platform

_PACK = "attnrt.platforms.cuda"

PLATFORM = Platform(
    name="cuda",
    probe_order=20,  # after rocm: a ROCm build of torch answers torch.cuda too
    arch_pattern=r"sm(\d{2,3})[a-z]?",  # compute capability: sm80 < sm90 (sm90a) < sm100
    arch_bases=(10,),
    default_arch="sm90",
    torch_device_types=("cuda",),
    indexed=True,
    dist_backend="nccl",
    backends={
        "TORCH_SDPA_CUDNN": f"{_PACK}.sdpa_pinned:CudnnSdpaBackend",
        "TORCH_SDPA_FLASH": f"{_PACK}.sdpa_pinned:FlashSdpaBackend",
        "TORCH_SDPA_EFFICIENT": f"{_PACK}.sdpa_pinned:EfficientSdpaBackend",
        "FLASH_ATTN": f"{_PACK}.flash_attn:FlashAttnBackend",
        "FLASH_ATTN_3": f"{_PACK}.flash_attn3:FlashAttn3Backend",
        "SAGE_ATTN": f"{_PACK}.sage:SageAttnBackend",
        "FASTVIDEO_KERNEL_VSA": "attnrt.sparse.vsa_fastvideo_kernel:FastVideoKernelVSABackend",
        "CUDNN_BSA_VSA": "attnrt.sparse.vsa_cudnn_bsa:CudnnBsaVSABackend",
    },
)
