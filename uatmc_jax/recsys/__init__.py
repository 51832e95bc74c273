"""UAT-MC (METHODS.md part A): multimodal recommenders, evasion-based promotion attacks,
the cross-modal gradient mismatch and untargeted adversarial training.

Sub-packages: ``data`` (MMRec layout, synthetic, sampling), ``models`` (VBPR, VBPR-MLP,
MMGCN), ``attacks`` (A.4 protocol, objective, attackers, alignment, diagnostics),
``defences`` (vanilla, APR, AMR, UAT-MC); modules ``losses``, ``trainer``, ``metrics``,
``experiment`` and ``report``. Imports only ``uatmc_jax.core``.
"""
