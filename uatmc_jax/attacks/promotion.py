"""Evasion-based promotion attacks on a trained recommender (METHODS.md A.4).

The attacker owns a target item t and perturbs its features in (a subset of) the
modalities, δ = {m: δ^m}, to maximise the multi-user promotion objective

    L(δ) = mean_{u∈A} ReLU(s(u, t; δ) − s_K(u; δ) + margin),

A = anchor users, s_K(u; δ) = the K-th highest score of u over all items with the
perturbed target included.

Exactness without re-sorting. While one item's features move, no other item's score
moves for a non-graph model (VBPR, VBPR-MLP: item vectors are row-wise), so with
o_1 ≥ ... ≥ o_K the K highest scores of the *other* items (computed once per model with
``jax.lax.top_k`` of size K+1 and the target removed from each user's list),

    s_K(u; δ) = clip(s_t, o_K, o_{K-1})      (o_0 = +∞),

exactly: t above o_{K-1} leaves o_{K-1} K-th; between them it is K-th itself; below
o_K, o_K stays K-th. Graph models (MMGCN, ``is_graph``) move every user and item
vector, so their path re-encodes with the perturbed table and takes ``top_k`` every
step (exact, chunked over targets).

Attacks (A.4, reference settings):
  FGSM: δ^m = ε_m · sign(∇_{δ^m} L(0)), ε_m = ε·||x_t^m||₂ (relative), margin 10.
  PGD:  10 iterations, step 1.25·ε/10, sign gradient, projection ||δ^m||∞ ≤ ε
        (absolute), no random start, margin 1.
The ascent direction is chosen by name (``alignment``; "none" = naive; see
``uatmc_jax.attacks.alignment``) so aligned PGD (A.6) is one field of the config.

Metrics (A.4): the rank of t for user u is the number of items scored strictly higher
(ties favour the target); Hit@K = share of anchors with rank < K. Ranks come from each
anchor's clean scores sorted once (``searchsorted``), minus the target's own clean
score when it beats its perturbed one, so they are exact for non-graph models; graph
models count against the re-encoded scores. Unmasked ranking over all items is the
reference's (default); the masked variant removes each user's train items (a target
the user interacted with gets score −∞ for that user).

Many targets are attacked at once: ``PromotionAttackRunner`` vmaps the per-target
attack over a fixed-size chunk of targets (padding the last chunk) with one jitted
function reused for every chunk, so memory is bounded and nothing recompiles; results
do not depend on the chunk size. Given a ``mesh`` the runner splits each chunk of targets
over all of the mesh's devices (``shard_map``; every target's attack is independent), on
one host or many: each process feeds and attacks only its block of targets and the
per-target results are gathered on every process. The model tables, context and groups
are replicated for the attack.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Mapping, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from uatmc_jax import errors
from uatmc_jax.attacks import alignment as alignment_lib
from uatmc_jax.attacks import mismatch as mismatch_lib
from uatmc_jax.attacks.surface import AttackSurface

METRIC_KS = (10, 20, 50, 100)


# ----------------------------------------------------------------------------------
# The objective.


def kth_score_with_target(target_scores: jax.Array, other_topk: jax.Array) -> jax.Array:
  """The K-th highest score over all items, target included, without a sort.

  Args:
    target_scores: (n,) the (perturbed) target's score per user.
    other_topk: (n, K) the K highest scores of the other items, descending.

  Returns:
    (n,) clip(s_t, o_K, o_{K-1}) with o_0 = +∞.
  """
  n, k = other_topk.shape
  chex.assert_shape(target_scores, (n,))
  o_k = other_topk[:, k - 1]
  lower = jnp.maximum(target_scores, o_k)
  if k == 1:
    return lower
  return jnp.minimum(lower, other_topk[:, k - 2])


def promotion_per_user_loss(target_scores: jax.Array, other_topk: jax.Array,
                            margin: float) -> jax.Array:
  """ℓ_u = ReLU(s(u,t) − s_K(u) + margin), (n,); K = other_topk.shape[1]."""
  return jax.nn.relu(target_scores - kth_score_with_target(target_scores, other_topk) + margin)


def promotion_objective(target_scores: jax.Array, other_topk: jax.Array,
                        margin: float) -> jax.Array:
  """L = mean_u ReLU(s(u,t) − s_K(u) + margin) (A.4), a scalar to maximise."""
  return jnp.mean(promotion_per_user_loss(target_scores, other_topk, margin))


def others_topk_without_target(topk_values: jax.Array, topk_indices: jax.Array,
                               target: jax.Array, k: int) -> jax.Array:
  """The top-k of the other items from a clean top-(k+1) list, per user, no re-sort.

  Args:
    topk_values, topk_indices: (n, k+1) clean top-(k+1) over all items, descending.
    target: () item id to remove.
    k: width of the result.

  Returns:
    (n, k): entries before the target's position kept, later ones shifted up by one;
    users whose list lacks the target keep its first k entries.
  """
  n = topk_values.shape[0]
  chex.assert_shape([topk_values, topk_indices], (n, k + 1))
  is_t = topk_indices == target
  pos = jnp.where(jnp.any(is_t, axis=1), jnp.argmax(is_t, axis=1), k + 1)
  keep_head = jnp.arange(k)[None, :] < pos[:, None]
  return jnp.where(keep_head, topk_values[:, :k], topk_values[:, 1:])


def others_threshold_columns(topk_values: jax.Array, topk_indices: jax.Array,
                             target: jax.Array, k: int) -> jax.Array:
  """The last two columns of ``others_topk_without_target`` (o_{K-1}, o_K), (n, min(k, 2)).

  ``kth_score_with_target`` reads only these, so the attack loop carries (n, 2) instead
  of (n, K) per target (K = 50: 25x less memory traffic per chunk).
  """
  n = topk_values.shape[0]
  chex.assert_shape([topk_values, topk_indices], (n, k + 1))
  cols = jnp.arange(max(k - 2, 0), k)
  is_t = topk_indices == target
  pos = jnp.where(jnp.any(is_t, axis=1), jnp.argmax(is_t, axis=1), k + 1)
  return jnp.where(cols[None, :] < pos[:, None], topk_values[:, cols], topk_values[:, cols + 1])


# ----------------------------------------------------------------------------------
# Attack configurations.


@dataclasses.dataclass(frozen=True)
class PromotionAttack:
  """One promotion attacker (hashable: it keys the compiled chunk function).

  Attributes:
    method: "fgsm" or "pgd".
    epsilon: budget ε.
    budget: "relative" (ε_m = ε·||x_t^m||₂, FGSM's) or "absolute" (ε_m = ε, PGD's).
    steps: PGD iterations (FGSM: 1).
    step_scale: PGD step = step_scale · ε_m / steps (1.25).
    margin: hinge margin (FGSM 10, PGD 1).
    k: the top-K of the objective (50).
    modalities: attacked modalities (None = all); others keep δ = 0.
    alignment: ascent direction name ("none", "cosine", "pcgrad_groups", ...).
    align_weight: λ_align of the cosine reward.
    group_temperature: τ of "shared_groups".
  """
  method: str = "pgd"
  epsilon: float = 0.05
  budget: str = "absolute"
  steps: int = 10
  step_scale: float = 1.25
  margin: float = 1.0
  k: int = 50
  modalities: tuple[str, ...] | None = None
  alignment: str = "none"
  align_weight: float = 1.0
  group_temperature: float = 0.1

  def __post_init__(self):
    if self.method not in ("fgsm", "pgd"):
      raise errors.ConfigError(f"attack method must be 'fgsm' or 'pgd', got {self.method!r}")
    if self.budget not in ("relative", "absolute"):
      raise errors.ConfigError(f"budget must be 'relative' or 'absolute', got {self.budget!r}")
    if not self.epsilon >= 0:
      raise errors.ConfigError(f"epsilon must be >= 0, got {self.epsilon}")
    if self.steps < 1 or self.k < 1:
      raise errors.ConfigError("steps and k must be >= 1")
    alignment_lib.get_ascent_direction(self.alignment)


def fgsm_attack(epsilon: float, **overrides) -> PromotionAttack:
  """A.4 FGSM: one relative-budget sign step, margin 10."""
  kw = dict(method="fgsm", epsilon=epsilon, budget="relative", steps=1, margin=10.0)
  kw.update(overrides)
  return PromotionAttack(**kw)


def pgd_attack(epsilon: float, **overrides) -> PromotionAttack:
  """A.4 PGD: 10 sign steps of 1.25·ε/10, absolute L∞ ball, no random start, margin 1."""
  kw = dict(method="pgd", epsilon=epsilon, budget="absolute", steps=10, step_scale=1.25,
            margin=1.0)
  kw.update(overrides)
  return PromotionAttack(**kw)


def budgets(attack: PromotionAttack, x_t: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """ε_m per attacked modality for a target with (clean, attacked-space) rows x_t."""
  if attack.budget == "relative":
    return {m: attack.epsilon * jnp.linalg.norm(x) for m, x in x_t.items()}
  return {m: jnp.asarray(attack.epsilon, x.dtype) for m, x in x_t.items()}


def project_linf(delta: Mapping[str, jax.Array],
                 eps: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Projection onto {||δ^m||∞ ≤ ε_m} for every modality."""
  return {m: jnp.clip(d, -eps[m], eps[m]) for m, d in delta.items()}


def run_attack(attack: PromotionAttack, per_user_loss_fn, x_t: Mapping[str, jax.Array],
               group_weights: jax.Array, probe=None) -> dict[str, jax.Array]:
  """The perturbation {m: (d_m,)} of one target (pure; vmap it over targets).

  Args:
    attack: the attacker.
    per_user_loss_fn: δ -> (n_anchor,) ℓ_u (margin already bound).
    x_t: {m: (d_m,)} clean rows of the attacked modalities (for relative budgets).
    group_weights: (n_anchor, G) user groups (used by group-level alignments).
    probe: None, or ``alignment.Probe(probe_loss_fn(δ, η), η0, lift)`` for attacks
      outside the projected space (the cosine alignments compare modalities there).

  Returns:
    δ, inside the budget.
  """
  direction_fn = functools.partial(
      alignment_lib.get_ascent_direction(attack.alignment), per_user_loss_fn,
      group_weights=group_weights, align_weight=attack.align_weight,
      group_temperature=attack.group_temperature, probe=probe)
  eps = budgets(attack, x_t)
  delta0 = {m: jnp.zeros_like(x) for m, x in x_t.items()}
  if attack.method == "fgsm":
    g = direction_fn(delta0)
    return {m: eps[m] * jnp.sign(g[m]) for m in x_t}
  step = {m: attack.step_scale * eps[m] / attack.steps for m in x_t}

  def body(_, delta):
    g = direction_fn(delta)
    return project_linf({m: delta[m] + step[m] * jnp.sign(g[m]) for m in x_t}, eps)

  return jax.lax.fori_loop(0, attack.steps, body, delta0)


# ----------------------------------------------------------------------------------
# Precomputed per-model state and per-target views.


class PromotionContext(NamedTuple):
  """Clean-model quantities computed once per (model, anchor set).

  anchors: (n_A,) int32 anchor user ids.
  anchor_vectors: (n_A, D) clean user vectors of the anchors.
  scores: (n_A, n_items) clean scores (the target's own clean score is read here, so
    rank comparisons against the sorted rows are exact, not off by rounding).
  topk_values, topk_indices: (n_A, k+1) clean top-(k+1) scores over all items.
  sorted_scores: (n_A, n_items) clean scores, ascending per user (ranks).
  masked_sorted_scores: (n_A, n_items) same with each user's train items at −∞, or None.
  train_mask: (n_A, n_items) bool, True for (anchor, train item) pairs, or None.
  """
  anchors: jax.Array
  anchor_vectors: jax.Array
  scores: jax.Array
  topk_values: jax.Array
  topk_indices: jax.Array
  sorted_scores: jax.Array
  masked_sorted_scores: jax.Array | None
  train_mask: jax.Array | None


def anchor_train_mask(anchors: np.ndarray, n_users: int, n_items: int,
                      train_pairs: np.ndarray) -> np.ndarray:
  """Dense (n_A, n_items) bool of the anchors' train interactions."""
  row_of = np.full(n_users, -1, np.int64)
  row_of[np.asarray(anchors)] = np.arange(len(anchors))
  rows = row_of[train_pairs[:, 0]]
  keep = rows >= 0
  mask = np.zeros((len(anchors), n_items), bool)
  mask[rows[keep], train_pairs[keep, 1]] = True
  return mask


@functools.partial(jax.jit, static_argnames=("k", "masked"))
def _context_arrays(anchor_vectors, item_vectors, train_mask, *, k, masked):
  scores = anchor_vectors @ item_vectors.T
  values, indices = jax.lax.top_k(scores, k + 1)
  sorted_scores = jnp.sort(scores, axis=1)
  masked_sorted = None
  if masked:
    masked_sorted = jnp.sort(jnp.where(train_mask, -jnp.inf, scores), axis=1)
  return scores, values, indices.astype(jnp.int32), sorted_scores, masked_sorted


def build_context(surface: AttackSurface, anchors: np.ndarray, *, k: int = 50,
                  train_pairs: np.ndarray | None = None) -> PromotionContext:
  """Clean scores of the anchors, their top-(k+1) and sorted rows (once per model).

  Args:
    surface: the attacked model.
    anchors: (n_A,) anchor user ids.
    k: the objective's K.
    train_pairs: optional (n, 2) (user, item) train interactions; enables the masked
      metrics.
  """
  users, items = surface.clean_vectors()
  anchors = np.asarray(anchors, np.int32)
  anchor_vectors = jnp.take(users, jnp.asarray(anchors), axis=0)
  n_items = items.shape[0]
  if k + 1 > n_items:
    raise errors.ConfigError(f"attack k={k} needs at least k+1 items, have {n_items}")
  mask = None
  if train_pairs is not None:
    mask = jnp.asarray(anchor_train_mask(anchors, users.shape[0], n_items, train_pairs))
  scores, values, indices, sorted_scores, masked_sorted = _context_arrays(
      anchor_vectors, items, mask if mask is not None else jnp.zeros((1, 1), bool), k=k,
      masked=mask is not None)
  ctx = PromotionContext(jnp.asarray(anchors), anchor_vectors, scores, values, indices,
                         sorted_scores, masked_sorted, mask)
  return jax.block_until_ready(ctx)  # so attack timings do not absorb this set-up


def count_greater(sorted_rows: jax.Array, values: jax.Array) -> jax.Array:
  """Per row, the number of entries of an ascending row strictly above ``values``."""
  n = sorted_rows.shape[1]
  pos = jax.vmap(functools.partial(jnp.searchsorted, side="right"))(sorted_rows, values)
  return (n - pos).astype(jnp.int32)


class _TargetView(NamedTuple):
  x_t: dict            # attacked-space clean rows of the target {m: (d_m,)}
  scores_fn: Any       # δ -> (target scores (n_A,), others' top-k (n_A, k))
  ranks_fn: Any        # δ -> (ranks (n_A,), masked ranks (n_A,) or None)
  projected_row: Any   # δ -> {m: (1, p_m)} the target's projected rows at x_t + δ


def _target_view(surface: AttackSurface, params, attack_table, projected_table,
                 ctx: PromotionContext, target: jax.Array, k: int) -> _TargetView:
  """The pure functions of one target's attack (closures over traced arrays)."""
  x_t = {m: attack_table[m][target] for m in surface.modalities}

  def perturbed_projected_row(delta, eta=None):
    rows = {m: (x_t[m] + delta[m] if m in delta else x_t[m])[None] for m in x_t}
    projected = surface.lift_fn(params, rows)
    if eta:  # an additive probe in the projected space (raw attacks: shared space)
      projected = {m: projected[m] + eta[m] if m in eta else projected[m] for m in projected}
    return projected

  if not surface.is_graph:
    others = others_threshold_columns(ctx.topk_values, ctx.topk_indices, target, k)

    def target_scores(delta, eta=None):
      v = surface.item_vectors_fn(params, perturbed_projected_row(delta, eta),
                                  target[None])[0]
      return ctx.anchor_vectors @ v

    def scores_fn(delta, eta=None):
      return target_scores(delta, eta), others

    clean_t = ctx.scores[:, target]

    def ranks_fn(delta):
      # δ = {} (the clean model) reads the table itself: ties with t's own entry exact.
      s = target_scores(delta) if delta else clean_t
      ranks = count_greater(ctx.sorted_scores, s) - (clean_t > s)
      masked = None
      if ctx.masked_sorted_scores is not None:
        seen = ctx.train_mask[:, target]
        sm = jnp.where(seen, -jnp.inf, s)
        cm = jnp.where(seen, -jnp.inf, clean_t)
        masked = count_greater(ctx.masked_sorted_scores, sm) - (cm > sm)
      return ranks, masked

    return _TargetView(x_t, scores_fn, ranks_fn, perturbed_projected_row)

  def all_scores(delta, eta=None):
    row = perturbed_projected_row(delta, eta)
    table = {m: projected_table[m].at[target].set(row[m][0]) for m in projected_table}
    users, items = surface.encode_fn(params, table)
    return jnp.take(users, ctx.anchors, axis=0) @ items.T

  def scores_fn(delta, eta=None):
    scores = all_scores(delta, eta)
    s = scores[:, target]
    others = jax.lax.top_k(scores.at[:, target].set(-jnp.inf), k)[0][:, max(k - 2, 0):]
    return s, others

  def ranks_fn(delta):
    scores = all_scores(delta)
    s = scores[:, target]
    is_t = jnp.arange(scores.shape[1]) == target
    ranks = jnp.sum((scores > s[:, None]) & ~is_t[None, :], axis=1).astype(jnp.int32)
    masked = None
    if ctx.train_mask is not None:
      ms = jnp.where(ctx.train_mask, -jnp.inf, scores)
      sm = ms[:, target]
      masked = jnp.sum((ms > sm[:, None]) & ~is_t[None, :], axis=1).astype(jnp.int32)
    return ranks, masked

  return _TargetView(x_t, scores_fn, ranks_fn, perturbed_projected_row)


# ----------------------------------------------------------------------------------
# Many targets at once.


def _rank_metrics(ranks: jax.Array, ks: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  hits = jnp.stack([jnp.mean((ranks < k).astype(jnp.float32)) for k in ks])
  return hits, jnp.mean(ranks.astype(jnp.float32))


def attack_and_evaluate_target(surface: AttackSurface, attack: PromotionAttack, params,
                               attack_table, projected_table, ctx: PromotionContext,
                               group_weights: jax.Array, target: jax.Array, *,
                               ks: Sequence[int] = METRIC_KS,
                               with_mismatch: bool = True) -> dict[str, Any]:
  """Attack one target and measure it (pure; the runner vmaps it over targets)."""
  view = _target_view(surface, params, attack_table, projected_table, ctx, target, attack.k)
  attacked = attack.modalities or surface.modalities
  x_att = {m: view.x_t[m] for m in attacked}

  def per_user_loss(delta, eta=None):
    s, others = view.scores_fn(delta, eta)
    return promotion_per_user_loss(s, others, attack.margin)

  probe = None
  if surface.space != "projected":  # compare modalities in the shared projected space
    def lift(delta):  # the target's projected rows of the attacked modalities at x_t + δ
      rows = view.projected_row(delta)
      return {m: rows[m][0] for m in delta}

    probe = alignment_lib.Probe(
        per_user_loss, {m: jnp.zeros(surface.projected_table[m].shape[1:],
                                     surface.projected_table[m].dtype) for m in attacked},
        lift)
  delta = run_attack(attack, per_user_loss, x_att, group_weights, probe=probe)
  delta = jax.lax.stop_gradient(delta)
  zero = {m: jnp.zeros_like(x) for m, x in x_att.items()}
  out = {"delta": delta,
         "loss_before": jnp.mean(per_user_loss(zero)),
         "loss_after": jnp.mean(per_user_loss(delta))}
  for tag, d in (("before", {}), ("after", delta)):
    ranks, masked = view.ranks_fn(d)
    out[f"hit_{tag}"], out[f"rank_{tag}"] = _rank_metrics(ranks, ks)
    if masked is not None:
      out[f"masked_hit_{tag}"], out[f"masked_rank_{tag}"] = _rank_metrics(masked, ks)
  if with_mismatch:
    # A.5 diagnostics at the clean point and at the attacker's final perturbation.
    out["mismatch"] = mismatch_lib.mismatch_diagnostics(per_user_loss, zero, group_weights,
                                                        probe, shared_space=surface.shared_space)
    # ... the gains at δ are those of the attacker's own step δ (A.5: a_u = ∇ℓ_u · δ^v).
    out["mismatch_at_delta"] = mismatch_lib.mismatch_diagnostics(
        per_user_loss, delta, group_weights, probe, shared_space=surface.shared_space,
        gain_step=delta)
  return out


def chunk_size_for(surface: AttackSurface, chunk_size: int, n_targets: int, mesh=None) -> int:
  """Targets per vmapped chunk (per device on a mesh) for ``n_targets`` targets.

  Graph surfaces (MMGCN) recompute the propagation per target, so their chunks are capped
  at 4; on a mesh the per-device chunk is capped so that one chunk holds about
  ``n_targets`` (at most one padded target per device).
  """
  chunk = min(int(chunk_size), 4) if surface.is_graph else int(chunk_size)
  if mesh is not None:
    chunk = max(1, min(chunk, -(-int(n_targets) // mesh.size)))
  return chunk


class PromotionAttackRunner:
  """Attacks many targets of one model, chunk by chunk, with one compiled function.

  The compiled chunk function depends on the attack and the shapes only; the context
  (anchors, clean top-k, sorted scores) and the user groups are arguments, so other
  seeds' anchor sets of the same size reuse it.

  Args:
    surface: the attacked model.
    chunk_size: targets per vmapped chunk (memory ~ chunk_size × one target's attack).
    ks: Hit@K cut-offs.
    with_mismatch: compute the A.5 diagnostics too.
    mesh: None (one device), or a mesh whose devices (all axes, all processes) share
      each chunk: ``chunk_size`` is then per device, a chunk holds
      ``chunk_size * mesh.size`` targets laid out as a global array split over every
      mesh axis, and every process attacks only its devices' targets
      (``local_targets`` counts them, padding included). Parameters, tables, context
      and groups are replicated over the mesh (pass arrays that are identical on every
      process, e.g. local copies). A one-device, one-process mesh takes the plain path.
  """

  def __init__(self, surface: AttackSurface, *, chunk_size: int = 64,
               ks: Sequence[int] = METRIC_KS, with_mismatch: bool = True,
               mesh: jax.sharding.Mesh | None = None):
    self.surface = surface
    self.chunk_size = int(chunk_size)
    if self.chunk_size < 1:
      raise errors.ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    self.ks = tuple(int(k) for k in ks)
    self.with_mismatch = with_mismatch
    if mesh is not None and mesh.size == 1 and jax.process_count() == 1:
      mesh = None
    self.mesh = mesh
    self.local_targets = 0
    self._replicated: dict[str, tuple[Any, Any]] = {}
    self._compiled: dict[PromotionAttack, Any] = {}
    self.trace_counts: dict[PromotionAttack, int] = {}

  @property
  def targets_per_chunk(self) -> int:
    """Targets in one call of the chunk function (all devices together)."""
    return self.chunk_size * (1 if self.mesh is None else self.mesh.size)

  def _on_mesh(self, key: str, tree):
    """``tree`` replicated over the mesh, cached while the same object is passed."""
    from uatmc_jax.parallel import multihost
    held = self._replicated.get(key)
    if held is None or held[0] is not tree:
      held = (tree, multihost.put_replicated(tree, self.mesh))
      self._replicated[key] = held
    return held[1]

  def chunk_function(self, attack: PromotionAttack):
    """The jitted (params, tables, ctx, groups, targets (chunk,)) -> per-target dict."""
    if attack not in self._compiled:
      unknown = set(attack.modalities or ()) - set(self.surface.modalities)
      if unknown:
        raise errors.ConfigError(f"attacked modalities {sorted(unknown)} not in the model's "
                                 f"{list(self.surface.modalities)}")
      if (attack.alignment in alignment_lib.SHARED_SPACE_ALIGNMENTS
          and not self.surface.shared_space):
        raise errors.ConfigError(
            f"alignment {attack.alignment!r} compares modality gradients in a shared "
            "projected space, which this model does not have (shared_projected_space="
            "False, e.g. VBPR); use alignment 'none' or a group-level one")
      surface, ks, with_mismatch = self.surface, self.ks, self.with_mismatch
      counts = self.trace_counts

      def chunk(params, attack_table, projected_table, ctx, group_weights, targets):
        # Runs only when traced: a fixed chunk shape must never retrace (cf.
        # chex.assert_max_traces, which keys on the definition site, not the closure).
        counts[attack] = counts.get(attack, 0) + 1
        if counts[attack] > 1:
          raise AssertionError(f"promotion chunk function for {attack} retraced")
        one = functools.partial(attack_and_evaluate_target, surface, attack, params,
                                attack_table, projected_table, ctx, group_weights, ks=ks,
                                with_mismatch=with_mismatch)
        return jax.vmap(one)(targets)

      if self.mesh is None:
        self._compiled[attack] = jax.jit(chunk)
      else:
        # Targets split over every mesh axis; everything else replicated. Each device
        # vmaps over its own chunk_size targets, no communication inside.
        split = P(tuple(self.mesh.axis_names))
        self._compiled[attack] = jax.jit(jax.shard_map(
            chunk, mesh=self.mesh, in_specs=(P(), P(), P(), P(), P(), split),
            out_specs=split, check_vma=False))
    return self._compiled[attack]

  def run(self, attack: PromotionAttack, ctx: PromotionContext, targets: Sequence[int],
          group_weights: jax.Array | None = None) -> dict[str, Any]:
    """Attacks ``targets``; returns numpy arrays with a leading (n_targets,) axis.

    Args:
      attack: the attacker (its ``k`` must be the context's).
      ctx: the model's ``PromotionContext`` for one anchor set.
      targets: item ids.
      group_weights: (n_A, G) anchor user groups (one-hot); None = one group.

    The last chunk is padded with copies of the first target and the padding dropped,
    so every chunk has the same shape (no recompiles). ``seconds`` (wall time of the
    chunks, compile included on first use) is added.
    """
    if attack.k + 1 != ctx.topk_values.shape[1]:
      raise errors.ConfigError(f"attack k={attack.k} but the context was built for "
                               f"k={ctx.topk_values.shape[1] - 1}")
    n_a = int(ctx.anchors.shape[0])
    if group_weights is None:
      group_weights = jnp.ones((n_a, 1), jnp.float32)
    chex.assert_shape(group_weights, (n_a, None))
    group_weights = jnp.asarray(group_weights, jnp.float32)
    targets = np.asarray(targets, np.int32)
    n = len(targets)
    if n == 0:
      raise errors.ConfigError("no targets to attack")
    c = self.targets_per_chunk
    n_chunks = math.ceil(n / c)
    padded = np.concatenate([targets, np.full(n_chunks * c - n, targets[0], np.int32)])
    fn = self.chunk_function(attack)
    s = self.surface
    t0 = time.perf_counter()
    args = (s.params, s.attack_table, s.projected_table, ctx, group_weights)
    place, fetch = jnp.asarray, jax.device_get
    if self.mesh is not None:
      from uatmc_jax.parallel import multihost
      args = tuple(self._on_mesh(k, v) for k, v in zip(
          ("params", "attack_table", "projected_table", "ctx"), args[:4]))
      args += (multihost.put_replicated(group_weights, self.mesh),)
      split = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
      place = lambda t: multihost.put_global(t, split)  # noqa: E731
      fetch = multihost.to_host
    pieces = []
    for i in range(n_chunks):
      chunk_targets = place(padded[i * c:(i + 1) * c])
      if self.mesh is not None:
        self.local_targets += len(chunk_targets.addressable_shards) * self.chunk_size
      pieces.append(fetch(fn(*args, chunk_targets)))
    seconds = time.perf_counter() - t0
    result = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0)[:n], *pieces)
    result["targets"] = targets
    result["seconds"] = seconds
    return result
