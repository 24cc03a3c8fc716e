"""Integrations: plug attnrt into diffusers and FastVideo models."""
