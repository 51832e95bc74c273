"""The UAT-MC experiment (METHODS.md A.7-A.8): defences x promotion attacks.

  python -m experiments.uatmc \\
    --config=experiments/configs/uatmc.py:dataset=synthetic,model=vbpr_mlp,seeds=1+2+3,runlocal=True \\
    --workdir=runs/uatmc

Arguments (``k=v`` joined by ``,``; lists joined by ``+`` or ``;``):
  dataset: ``synthetic`` or an MMRec-layout folder (synthetic).
  model: vbpr_mlp | mmgcn | mmgcn_mmrec | vbpr (vbpr_mlp; vbpr and mmgcn_mmrec have no
    common projected space, so only defences without alignment and attackers without the
    cosine reward apply).
  seeds: a count n (seeds 1..n) or a list "1+2+3" (1+2+3): training seed, attack
    anchors and targets.
  defences: subset of vanilla+apr+amr+uat_mc_no_align+uat_mc (all).
  epochs / patience: backbone (and APR/AMR) training (1000 / 20, A.3).
  finetune_epochs / finetune_patience: UAT-MC fine-tuning from the backbone (50 / 20, A.7).
  batch_size (2048), lr (None = train_recsys's default for the model and dataset,
    ``recsys.default_learning_rate``: 5e-3 for VBPR / VBPR-MLP on MMRec folders, else
    1e-3; UAT-MC fine-tuning uses the same rate), reg_weight (None = train_recsys's
    default, ``recsys.default_reg_weight``: VBPR-MLP 2.0, 0.01 on synthetic; VBPR 2.0;
    MMGCN 0), embedding_dim (64),
    model_align_weight (VBPR-MLP InfoNCE; per-dataset default of
    ``recsys.default_model_align_weight``: 0 on synthetic, else 1.0): the training protocol.
  preset: UAT-MC reference hyper-parameters (default mmgcn_baby for the graph models
    mmgcn / mmgcn_mmrec, else vbpr_baby);
    epsilon, adv_weight, align_weight override it.
  apr_epsilon (0.5), apr_weight (1.0); amr_epsilon (0.1, relative), amr_weight (1.0),
    amr_modality (the image-like one).
  graph_items: which items AMR and UAT-MC perturb on a graph model (MMGCN):
    "with_gradient" (every item the batch's loss has a gradient on, A.7's "every item is
    a potential target"; default) or "batch" (only the batch's items).
  adv_from_backbone: APR/AMR start from the backbone's best checkpoint, as in their
    papers (APR is initialised from BPR-MF, AMR from VBPR), for finetune_epochs (True);
    False trains them from scratch for epochs.
  targets (100), attack_epsilon (0.05; a list such as 0.05+0.2+0.5 attacks every
    model at each budget, the first being the main one: results.json's ``attacks``, the
    sweep and the plots), anchor_share (0.4), attack_k (50), attack_align_weight (1.0,
    the aligned attacker's λ_align): the A.4 protocol.
  attackers: fgsm+pgd+pgd_aligned (default), any of those and the group variants
    pgd_pcgrad_groups / pgd_shared_groups (A.6), or ``all`` (the five);
    group_temperature (0.1): τ of pgd_shared_groups.
  sweep: "adv_weight" or "epsilon" of UAT-MC for the trade-off plot (adv_weight);
    sweep_values: list (1+10); sweep_seeds: how many of the seeds run the sweep (all).
  runlocal: the few-minutes variant (backbone <= 15 epochs, fine-tune <= 4, 25
    targets, sweep on the first seed only, learning rate 1e-2 for the short schedule).
"""
from __future__ import annotations

import ml_collections

from experiments.configs import common
from experiments.configs import recsys
from uatmc_jax.core.errors import ConfigError

DEFENCE_NAMES = ("vanilla", "apr", "amr", "uat_mc_no_align", "uat_mc")
GRAPH_MODELS = ("mmgcn", "mmgcn_mmrec")  # their UAT-MC preset is mmgcn_baby (A.7)

DEFAULTS = dict(
    dataset="synthetic", model="vbpr_mlp", seeds="1+2+3", defences=None,
    epochs=1000, patience=20, finetune_epochs=50, finetune_patience=20,
    batch_size=2048, lr=None, reg_weight=None, embedding_dim=64, model_align_weight=None,
    preset=None, epsilon=None, adv_weight=None, align_weight=None,
    apr_epsilon=0.5, apr_weight=1.0, amr_epsilon=0.1, amr_weight=1.0, amr_modality=None,
    adv_from_backbone=True, graph_items="with_gradient",
    targets=100, attack_epsilon=0.05, anchor_share=0.4, attack_k=50,
    attack_align_weight=1.0, attackers="fgsm+pgd+pgd_aligned", group_temperature=0.1, chunk_size=64, graph_path="local",
    sweep="adv_weight", sweep_values="1+10", sweep_seeds=None,
    mesh_data=-1, eval_batch_size=2048, runlocal=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = recsys.fill_protocol_defaults(common.parse_arg(arg, **DEFAULTS),
                                    align_key="model_align_weight")
  cfg = ml_collections.ConfigDict()
  cfg.dataset = str(a["dataset"])
  cfg.model = str(a["model"])
  seeds = a["seeds"]
  cfg.seeds = (list(range(1, seeds + 1)) if isinstance(seeds, int)
               else common.as_list(seeds, int))
  cfg.defences = common.as_list(a["defences"], str) or list(DEFENCE_NAMES)
  cfg.runlocal = common.as_bool(a["runlocal"], "runlocal")
  cfg.model_config = dict(embedding_dim=int(a["embedding_dim"]),
                          align_weight=float(a["model_align_weight"]))
  cfg.train = dict(epochs=int(a["epochs"]), patience=int(a["patience"]),
                   batch_size=int(a["batch_size"]),
                   learning_rate=float(a["lr"]), reg_weight=float(a["reg_weight"]),
                   eval_batch_size=int(a["eval_batch_size"]),
                   ks=(5, 10, 20, 50))
  cfg.finetune = dict(epochs=int(a["finetune_epochs"]), patience=int(a["finetune_patience"]))
  cfg.uat_mc = dict(defence_preset=a["preset"] or
                    ("mmgcn_baby" if cfg.model in GRAPH_MODELS else "vbpr_baby"),
                    epsilon=a["epsilon"], adv_weight=a["adv_weight"],
                    align_weight=a["align_weight"], graph_items=str(a["graph_items"]))
  cfg.apr = dict(epsilon=float(a["apr_epsilon"]), adv_weight=float(a["apr_weight"]))
  cfg.amr = dict(epsilon=float(a["amr_epsilon"]), adv_weight=float(a["amr_weight"]),
                 amr_modality=a["amr_modality"], amr_relative_budget=True,
                 graph_items=str(a["graph_items"]))
  cfg.adv_from_backbone = common.as_bool(a["adv_from_backbone"], "adv_from_backbone")
  epsilons = common.as_list(a["attack_epsilon"], float)
  if not epsilons or len(set(epsilons)) != len(epsilons):
    raise ConfigError(f"attack_epsilon={a['attack_epsilon']!r}: expected one budget or a "
                      "list of distinct budgets such as 0.05+0.2+0.5")
  attackers = common.as_list(a["attackers"], str)
  cfg.attack = dict(targets=int(a["targets"]), epsilon=epsilons[0], epsilons=epsilons,
                    attackers=attackers, group_temperature=float(a["group_temperature"]),
                    anchor_share=float(a["anchor_share"]), k=int(a["attack_k"]),
                    align_weight=float(a["attack_align_weight"]),
                    chunk_size=int(a["chunk_size"]), graph_path=str(a["graph_path"]))
  cfg.sweep = str(a["sweep"]) if a["sweep"] else ""
  cfg.sweep_values = common.as_list(a["sweep_values"], float)
  cfg.sweep_seeds = int(a["sweep_seeds"]) if a["sweep_seeds"] is not None else len(cfg.seeds)
  cfg.mesh_data = int(a["mesh_data"])
  if cfg.runlocal:
    cfg.train["epochs"] = min(cfg.train["epochs"], 15)
    cfg.train["patience"] = min(cfg.train["patience"], 5)
    cfg.train["learning_rate"] = max(cfg.train["learning_rate"], 1e-2)
    cfg.finetune["epochs"] = min(cfg.finetune["epochs"], 4)
    cfg.finetune["patience"] = min(cfg.finetune["patience"], 4)
    cfg.attack["targets"] = min(cfg.attack["targets"], 25)
    cfg.sweep_seeds = min(cfg.sweep_seeds, 1)
  return cfg
