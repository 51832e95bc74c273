"""Flax NNX multimodal recommenders: VBPR, VBPR-MLP, MMGCN (``base`` defines the protocol; METHODS.md A.2)."""
