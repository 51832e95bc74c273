"""Data layer: the InteractionData contract, the MMRec-layout reader, the synthetic set."""
from uatmc_jax.recsys.data.interactions import InteractionData
from uatmc_jax.recsys.data.mmrec import load_dataset, load_mmrec
from uatmc_jax.recsys.data.synthetic import SyntheticConfig, make_synthetic, write_synthetic
