"""User-defined attention: AttentionEngine (softmax family) and LinearAttentionEngine."""
