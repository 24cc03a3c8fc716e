"""Sparse attention methods (VSA, SLA, SageSLA, VMoBA): algorithm, metadata, references."""
