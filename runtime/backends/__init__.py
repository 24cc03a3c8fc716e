"""Portable backends, runnable on any platform whose rules in the manifest rank them."""

BACKENDS = {
    "REFERENCE": "attnrt.backends.reference:ReferenceBackend",
    "TORCH_SDPA": "attnrt.backends.sdpa:TorchSdpaBackend",
    "FLEX_ATTN": "attnrt.backends.flex:FlexAttentionBackend",
    "TRITON_FLASH_ATTN": "attnrt.backends.triton_flash:TritonFlashAttnBackend",
    "VIDEO_SPARSE_ATTN": "attnrt.sparse.vsa_backend:VideoSparseAttentionBackend",
}
