"""Robust accuracy, per-class accuracy and feature geometry of image classifiers (METHODS.md B.5)."""
