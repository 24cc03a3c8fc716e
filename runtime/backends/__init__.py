"""Portable backends, runnable on any platform whose rules in the manifest rank them, and the
implementations of the non-dense methods (engine/, sparse/), each declaring its METHODS."""

BACKENDS = {
    "REFERENCE": "attnrt.backends.reference:ReferenceBackend",
    "TORCH_SDPA": "attnrt.backends.sdpa:TorchSdpaBackend",
    "FLEX_ATTN": "attnrt.backends.flex:FlexAttentionBackend",
    "TRITON_FLASH_ATTN": "attnrt.backends.triton_flash:TritonFlashAttnBackend",
    # Method custom (AttentionEngine: score_mod, mask_mod, online_func).
    "ENGINE_TRITON": "attnrt.engine.backends:TritonEngineBackend",
    "ENGINE_FLEX": "attnrt.engine.backends:FlexEngineBackend",
    "ENGINE_REFERENCE": "attnrt.engine.backends:ReferenceEngineBackend",
    # Method linear (LinearAttentionEngine).
    "TRITON_LINEAR_ATTN": "attnrt.engine.linear_backends:TritonLinearAttnBackend",
    "FLA_LINEAR_ATTN": "attnrt.engine.linear_backends:FlaLinearAttnBackend",
    "REFERENCE_LINEAR_ATTN": "attnrt.engine.linear_backends:ReferenceLinearAttnBackend",
    # Sparse methods sla, sage_sla, vmoba (FastVideo's names), on the block-sparse kernel.
    "SLA_ATTN": "attnrt.sparse.sla_backend:SLAAttentionBackend",
    "SAGE_SLA_ATTN": "attnrt.sparse.sla_backend:SageSLAAttentionBackend",
    "VMOBA_ATTN": "attnrt.sparse.sla_backend:VMOBAAttentionBackend",
    "VIDEO_SPARSE_ATTN": "attnrt.sparse.vsa_backend:VideoSparseAttentionBackend",
}
