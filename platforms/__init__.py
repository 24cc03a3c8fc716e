"""Platform packs. Each holds a probe (probe.py), a BACKENDS table of lazy "module:Class"
targets, vendor adapters and per-arch kernel configs; none holds selection logic."""
