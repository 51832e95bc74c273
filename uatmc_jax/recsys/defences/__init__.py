"""Defences against promotion attacks as loss transforms on BPR (METHODS.md A.7).

See ``registry`` for the names (vanilla, apr, amr, uat_mc_no_align, uat_mc).
"""
from uatmc_jax.recsys.defences.registry import (DEFENCES, FINE_TUNES_BACKBONE,  # noqa: F401
                                         defence_hyperparameters, make_defence_loss)
