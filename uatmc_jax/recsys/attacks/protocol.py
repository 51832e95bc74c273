"""The A.4 attack protocol, one implementation for every launcher (METHODS.md A.4-A.6).

One trained model, one seed:

1. anchors: a seeded share of the users (``targets.select_anchors``);
2. targets: seeded random / cold / hot items (``targets.select_targets``);
3. context: the anchors' clean top lists and what exact ranks need (sorted score rows,
   or above ``context.DENSE_CONTEXT_ELEMENTS`` anchor × item scores only top lists with
   rows recomputed per evaluation), once per model (``context.build_context``);
4. groups: the anchors' user groups of the A.5 diagnostics and the group alignments,
   the data's planted groups or k-means of the anchors' clean vectors
   (``user_groups.anchor_groups``);
5. run: ``PromotionAttackRunner.run`` for each attacker on the same context.

``experiments.attack_recsys`` (one trained model) and the UAT-MC experiment (every
defence of every seed) both call :func:`seed_setup` and :func:`make_runner`, and name
attackers through :func:`make_attacker`, so the two report the same protocol.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from uatmc_jax.core import errors
from uatmc_jax.recsys.attacks import targets as targets_lib
from uatmc_jax.recsys.attacks import user_groups
from uatmc_jax.recsys.attacks.attackers import PromotionAttack, fgsm_attack, pgd_attack
from uatmc_jax.recsys.attacks.context import PromotionContext, build_context
from uatmc_jax.recsys.attacks.objective import METRIC_KS
from uatmc_jax.recsys.attacks.runner import PromotionAttackRunner, chunk_size_for
from uatmc_jax.recsys.attacks.surface import AttackSurface

ATTACKERS = ("fgsm", "pgd", "pgd_aligned")  # the UAT-MC table's default set (A.8)
GROUP_ATTACKERS = ("pgd_pcgrad_groups", "pgd_shared_groups")  # A.6 group variants
ALL_ATTACKERS = ATTACKERS + GROUP_ATTACKERS
SWEEP_ATTACKERS = ("pgd", "pgd_aligned")  # the UAT-MC λ_adv / ε sweep's attackers
ATTACKER_LABELS = {"fgsm": "FGSM", "pgd": "PGD", "pgd_aligned": "PGD-aligned",
                   "pgd_pcgrad_groups": "PGD-PCGrad groups",
                   "pgd_shared_groups": "PGD-shared groups"}
GROUP_MODES = ("auto", "planted", "kmeans")
RANKING_NOTE = ("ranks over all items; users' train items NOT masked (the reference's "
                "protocol); the masked variant is under 'masked'")


def attacker_names(modalities: Sequence[str], shared_space: bool = True) -> list[str]:
  """Every attacker of a model; ``pgd_aligned`` (cosine reward) only with a shared space."""
  names = ["fgsm", "pgd"] + (["pgd_aligned"] if shared_space else [])
  names += list(GROUP_ATTACKERS)
  names += [f"fgsm_{m}" for m in modalities] + [f"pgd_{m}" for m in modalities]
  return names


def make_attacker(name: str, epsilon: float, settings: Any,
                  modalities: Sequence[str]) -> PromotionAttack:
  """fgsm | pgd | pgd_aligned | pgd_<alignment> | fgsm_<m> | pgd_<m> at budget ε.

  ``settings`` has attributes ``k``, ``align_weight`` and ``group_temperature``, and
  optionally ``surrogate`` ("relu", A.4's hinge; "softplus", the smooth surrogate of
  ``objective``) with its ``temperature`` τ, applied to every attacker.
  """
  common = dict(k=settings.k, align_weight=settings.align_weight,
                group_temperature=settings.group_temperature,
                surrogate=getattr(settings, "surrogate", "relu"),
                temperature=getattr(settings, "temperature", 0.1))
  method, _, rest = name.partition("_")
  if method not in ("fgsm", "pgd"):
    raise errors.ConfigError(f"attack {name!r}: expected one of {attacker_names(modalities)}")
  factory = fgsm_attack if method == "fgsm" else pgd_attack
  if not rest:
    return factory(epsilon, **common)
  if rest in modalities:
    return factory(epsilon, modalities=(rest,), **common)
  alignment = "cosine" if rest == "aligned" else rest
  try:
    return factory(epsilon, alignment=alignment, **common)
  except errors.ConfigError as e:
    raise errors.ConfigError(f"attack {name!r}: {e}; expected one of "
                             f"{attacker_names(modalities)}") from None


def use_planted_groups(data, groups: str = "auto") -> bool:
  """Whether the A.5 groups are the data's planted ones (``groups``: auto|planted|kmeans)."""
  if groups not in GROUP_MODES:
    raise errors.ConfigError(f"groups must be one of {GROUP_MODES}, got {groups!r}")
  planted = groups == "planted" or (groups == "auto" and data.user_groups is not None)
  if planted and data.user_groups is None:
    raise errors.ConfigError(f"groups=planted but dataset {data.name!r} has no user groups")
  return planted


class SeedSetup(NamedTuple):
  """Steps 1-4 of the protocol for one (model, seed)."""
  anchors: np.ndarray        # (n_A,) anchor user ids
  targets: np.ndarray        # (n_targets,) target item ids
  ctx: PromotionContext      # the anchors' clean-model quantities
  groups: jax.Array          # (n_A, G) one-hot user groups of the anchors


def seed_setup(surface: AttackSurface, data, seed: int, *, anchor_share: float,
               n_targets: int, k: int, target_set: str = "random", planted: bool = True,
               n_groups: int = 4, train_pairs: np.ndarray | None = None) -> SeedSetup:
  """Anchors, targets, context and groups of one seed (the protocol's steps 1-4).

  Args:
    surface: the attacked model.
    data: the ``InteractionData`` it was trained on.
    seed: draws the anchors, the targets and the k-means start.
    anchor_share: share of users that are anchors (A.4: 0.4).
    n_targets: targets to draw (at most ``data.n_items``).
    k: the objective's top-K.
    target_set: random | cold | hot.
    planted: use ``data.user_groups`` (see :func:`use_planted_groups`), else k-means.
    n_groups: k-means groups.
    train_pairs: optional (n, 2) train interactions, for the masked ranks.
  """
  anchors = targets_lib.select_anchors(data.n_users, anchor_share, seed)
  targets = targets_lib.select_targets(target_set, n_targets, data.item_popularity(), seed)
  ctx = build_context(surface, anchors, k=k, train_pairs=train_pairs)
  groups = user_groups.anchor_groups(data.user_groups if planted else None, anchors,
                                     ctx.anchor_vectors, jax.random.key(seed), n_groups)
  return SeedSetup(anchors, targets, ctx, groups)


def make_runner(surface: AttackSurface, *, chunk_size: int, n_targets: int, mesh=None,
                graph_path: str = "local", ks: Sequence[int] = METRIC_KS,
                with_mismatch: bool = True,
                log: Callable[[str], None] | None = None) -> PromotionAttackRunner:
  """The runner of step 5, its chunk sized for ``n_targets`` (``chunk_size_for``).

  Hit@K is reported at every K of ``ks`` plus the objective's own K where callers add it.
  """
  chunk = chunk_size_for(surface, chunk_size, n_targets, mesh, graph_path)
  return PromotionAttackRunner(surface, chunk_size=chunk, ks=tuple(ks),
                               with_mismatch=with_mismatch, mesh=mesh,
                               graph_path=graph_path, log=log)


def local_copy(model):
  """A full copy on this process's default device of a model whose parameters live on
  a mesh (several processes, or several devices of this one).

  The protocol's set-up (context, groups) runs per process on local arrays; a model
  whose parameters are arrays of a training mesh is copied first. (On one process with
  a multi-device mesh, the context's top-k over sharded scores aborted inside XLA:CPU's
  TopkDecomposer.) A model already on one device is returned as it is.
  """
  from flax import nnx
  on_mesh = any(isinstance(x, jax.Array) and len(x.sharding.device_set) > 1
                for x in jax.tree.leaves(nnx.state(model)))
  if jax.process_count() == 1 and not on_mesh:
    return model
  from uatmc_jax.core.parallel import multihost
  copy = nnx.merge(*nnx.split(model))
  nnx.update(copy, multihost.to_local(nnx.state(copy)))
  return copy
