"""Portable backends, runnable on any platform a pack ranks them for."""

BACKENDS = {
    "REFERENCE": "attnrt.backends.reference:ReferenceBackend",
    "TORCH_SDPA": "attnrt.backends.sdpa:TorchSdpaBackend",
    "FLEX_ATTN": "attnrt.backends.flex:FlexAttentionBackend",
    "TRITON_FLASH_ATTN": "attnrt.backends.triton_flash:TritonFlashAttnBackend",
}
