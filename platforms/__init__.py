"""Platform packs, one folder each. A pack's __init__.py declares its facts as data
(`PLATFORM = attnrt.selection.packs.Platform(...)`: probe order, arch pattern, torch device types,
distributed backend, backends table); probe.py holds its probe; the rest are vendor adapters.
None holds selection logic. The core finds packs by listing this package."""
