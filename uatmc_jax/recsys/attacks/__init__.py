"""Evasion-based promotion attacks on multimodal recommenders (METHODS.md A.4-A.6)."""
