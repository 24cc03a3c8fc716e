"""cpu platform pack: probe (probe.py) and its backend table."""

BACKENDS: dict[str, str] = {}

# torch.distributed backend for sequence parallelism: gloo on CPU tensors.
DIST_BACKEND = "gloo"
