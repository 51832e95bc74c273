"""Shared core of both papers: errors, top-k op, checkpointing, progress, metric writer,
reports, and ``parallel`` (meshes, sharding rules, multi-host start, precision, FLOPs).

Nothing here imports ``uatmc_jax.recsys`` or ``uatmc_jax.longtail`` (docs/design.md).
"""
