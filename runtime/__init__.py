"""attnrt: an attention runtime for PyTorch.

It probes the device, reads a capability manifest that ranks backends per platform, arch, head
size and dtype, and runs the first backend that can really serve the request; every choice can be
explained (`attnrt explain`). Importing attnrt does nothing: no device init, no env writes, no I/O.
"""

from attnrt.context import ForwardContext, get_forward_context, set_forward_context
from attnrt.errors import (
    AttnrtError,
    BackendUnavailableError,
    DeviceSpecError,
    KernelCompileError,
    ManifestError,
    MethodError,
    RegistryError,
    UnknownBackendError,
)
from attnrt.integrations.fastvideo import (
    AttentionBackendEnum,
    backend_name_to_enum,
    global_force_attn_backend,
    global_force_attn_backend_context_manager,
)
from attnrt.interfaces import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadata,
    AttentionMetadataBuilder,
)
from attnrt.layers import LocalAttention
from attnrt.parallel.groups import (
    SequenceParallelError,
    ShardError,
    ShardMismatchError,
    init_sequence_parallel,
)
from attnrt.parallel.layers import DistributedAttention, DistributedAttention_VSA
from attnrt.selection.capability import Package, Reason
from attnrt.selection.device import Device, probe, simulated_device
from attnrt.selection.dispatch import (
    Candidate,
    Decision,
    clear_caches,
    explain,
    force_backend,
    select,
)
from attnrt.selection.manifest import load_capability
from attnrt.selection.methods import methods, register_method
from attnrt.selection.registry import register_backend, unregister_backend
from attnrt.selection.request import AttentionRequest

__version__ = "0.1.0"

__all__ = [
    "MethodError", "methods", "register_method",
    "AttentionBackend", "AttentionBackendEnum", "AttentionImpl", "AttentionLayer",
    "AttentionMetadata", "AttentionMetadataBuilder", "AttentionRequest", "AttnrtError",
    "BackendUnavailableError", "Candidate", "Decision", "Device", "DeviceSpecError",
    "DistributedAttention", "DistributedAttention_VSA", "SequenceParallelError", "ShardError",
    "ShardMismatchError", "init_sequence_parallel",
    "ForwardContext", "KernelCompileError", "LocalAttention", "ManifestError", "Package",
    "Reason", "RegistryError", "UnknownBackendError", "backend_name_to_enum", "clear_caches",
    "explain", "force_backend", "get_forward_context", "global_force_attn_backend",
    "global_force_attn_backend_context_manager", "load_capability", "probe", "register_backend",
    "select", "set_forward_context", "simulated_device", "unregister_backend",
]
