"""Image data for the long-tail experiments: folders, TFDS, long-tailed subsets, pipelines (METHODS.md B.3)."""
