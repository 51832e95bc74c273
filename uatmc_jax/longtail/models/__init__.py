"""Image classifiers with a feature map and a linear head (METHODS.md B.4)."""
