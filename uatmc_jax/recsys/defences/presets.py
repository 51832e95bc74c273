"""Reference hyper-parameters of the defences (METHODS.md A.7), as named presets.

UAT-MC presets are the reference code's (ε, λ_adv, λ_align) per backbone and dataset;
where the reference gives a range, the preset takes its middle (ε 0.025–0.075 -> 0.05,
λ_adv 6–7 -> 6.5) and where it leaves a value unstated ("…", the MMGCN Sports and
Clothing ε) it reuses the same backbone's stated value (0.1). "vbpr_*" refers to the
paper's VBPR backbone with projection MLPs (``vbpr_mlp`` here). APR and AMR presets
are their papers' defaults (APR: ε 0.5, λ 1; AMR: ε 1 ... λ 1 on unit-scale features,
here relative to each item's feature norm).
"""
from __future__ import annotations

UAT_MC_PRESETS: dict[str, dict[str, float]] = {
    "vbpr_baby": {"epsilon": 0.05, "adv_weight": 5.0, "align_weight": 4.0},
    "vbpr_sports": {"epsilon": 0.05, "adv_weight": 9.0, "align_weight": 0.1},
    "vbpr_clothing": {"epsilon": 0.05, "adv_weight": 5.0, "align_weight": 3.0},
    "mmgcn_baby": {"epsilon": 0.1, "adv_weight": 6.5, "align_weight": 0.1},
    "mmgcn_sports": {"epsilon": 0.1, "adv_weight": 10.0, "align_weight": 1.0},
    "mmgcn_clothing": {"epsilon": 0.1, "adv_weight": 8.0, "align_weight": 8.0},
}

# Defaults per defence when neither config nor a preset sets a value.
# ``graph_items`` (AMR, UAT-MC; graph models only): "with_gradient" perturbs every item
# the batch's loss has a gradient on (A.7: every item is a potential target), "batch"
# only the batch's own items (see ``batch_slots.perturbed_rows``).
DEFENCE_DEFAULTS: dict[str, dict] = {
    "vanilla": {},
    "apr": {"epsilon": 0.5, "adv_weight": 1.0},
    "amr": {"epsilon": 0.1, "adv_weight": 1.0, "relative_budget": True, "modality": None,
            "graph_items": "with_gradient"},
    "uat_mc_no_align": {**UAT_MC_PRESETS["vbpr_baby"], "align_weight": 0.0,
                        "graph_items": "with_gradient"},
    "uat_mc": {**UAT_MC_PRESETS["vbpr_baby"], "graph_items": "with_gradient"},
}
