"""uatmc_jax: adversarial robustness under two kinds of imbalance, in JAX.

One package per paper on a shared core (docs/design.md):

* ``uatmc_jax.core``      errors, top-k, checkpointing, progress, metric writer, reports,
                          ``parallel`` (meshes, sharding, multi-host, precision, FLOPs).
* ``uatmc_jax.recsys``    UAT-MC (METHODS.md part A): multimodal recommenders, promotion
                          attacks, cross-modal mismatch, adversarial-training defences.
* ``uatmc_jax.longtail``  MCAT (METHODS.md part B): long-tailed adversarial training,
                          manifold and ETF terms, robust evaluation up to AutoAttack.

``recsys`` and ``longtail`` import only ``core``, never each other.
"""

__version__ = "0.1.0"
