"""TRITON_FLASH_ATTN: Triton and Gluon kernels, checks, reference, configs, autotuning."""
