"""MCAT (METHODS.md part B): adversarial training on long-tailed images with a
class-conditional manifold constraint and a simplex-ETF geometry term, beside PGD-AT,
TRADES, MART, AT-BSL and RoBal, and robust evaluation up to AutoAttack.

Sub-packages: ``data``, ``models``, ``attacks``, ``evaluation``; modules ``losses``,
``etf``, ``manifold``, ``methods``, ``train_config``, ``trainer`` (with
``epoch_metrics`` and ``diagnostics``), ``trained_classifier``, ``experiment`` and
``table``. Imports only ``uatmc_jax.core``.
"""
