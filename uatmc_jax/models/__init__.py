"""Flax NNX models: multimodal recommenders (see recsys_base for the protocol)."""
