"""Sequence parallelism: process groups, DistributedAttention layers, Ulysses, ring/USP."""
