"""Typed errors. Each message is one sentence: the argument, its value, what is allowed."""

from __future__ import annotations


class AttnrtError(Exception):
    """Base class of every error attnrt raises on purpose."""


class ManifestError(AttnrtError, ValueError):
    """A capability file is malformed; the message starts with file:line."""


class RegistryError(AttnrtError, ValueError):
    """A backend registration breaks the contract or clashes with a registered name."""


class UnknownBackendError(AttnrtError, ValueError):
    """A backend name that nothing registered."""


class BackendUnavailableError(AttnrtError, RuntimeError):
    """A forced backend, or every candidate, cannot serve the request; the message tells why."""


class DeviceSpecError(AttnrtError, ValueError):
    """A simulated device spec such as ATTNRT_DEVICE=cuda:sm90 that cannot be parsed."""


class KernelCompileError(AttnrtError, RuntimeError):
    """A kernel failed to compile for one shape; the layer may move to the next ranked backend."""


class MethodError(AttnrtError, ValueError):
    """An unknown attention method (attnrt.selection.methods), or a bad method name to register."""
