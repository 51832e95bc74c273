"""uatmc_jax: adversarial robustness under imbalance, in JAX.

Layers (lower never imports upper):
  data -> models -> objectives / attacks / defences -> training / evaluation -> experiments

* ``uatmc_jax.data``        readers (MMRec layout, image folders, TFDS), synthetic data, long-tail subsets.
* ``uatmc_jax.models``      Flax NNX recommenders (VBPR, VBPR-MLP, MMGCN) and image classifiers.
* ``uatmc_jax.objectives``  pure losses (BPR, EmbLoss, InfoNCE, TRADES, MART, balanced softmax, ETF, manifold).
* ``uatmc_jax.attacks``     promotion attacks + cross-modal mismatch/alignment; image attacks (PGD, CW, AutoAttack).
* ``uatmc_jax.defences``    adversarial-training loss transforms (APR, AMR, UAT-MC).
* ``uatmc_jax.training``    one trainer per task, checkpointing.
* ``uatmc_jax.evaluation``  ranking metrics, robust accuracy, geometry diagnostics, reporting.
* ``uatmc_jax.parallel``    meshes, sharding, multi-host initialisation.
"""

__version__ = "0.1.0"
