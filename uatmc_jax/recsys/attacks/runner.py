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
o_K, o_K stays K-th. Graph models (MMGCN, ``is_graph``) move the user and item vectors
within the L-hop neighbourhood of t. Their default path ("local",
``_graph_local_view``) recomputes only that neighbourhood from a clean per-layer cache
(``uatmc_jax.recsys.attacks.graph_local``) and gets each anchor's K-th score exactly from its
clean top-(K+|I_c|) list minus the changed items I_c plus their new scores (full rows for
anchors whose own vector moved), skipping anchors whose hinge provably stays at zero;
the reference path ("full") re-encodes the whole graph with the perturbed table and takes
``top_k`` every step. Both are exact; tests check them against each other.

Attacks (A.4, reference settings):
  FGSM: δ^m = ε_m · sign(∇_{δ^m} L(0)), ε_m = ε·||x_t^m||₂ (relative), margin 10.
  PGD:  10 iterations, step 1.25·ε/10, sign gradient, projection ||δ^m||∞ ≤ ε
        (absolute), no random start, margin 1.
The ascent direction is chosen by name (``alignment``; "none" = naive; see
``uatmc_jax.recsys.attacks.alignment``) so aligned PGD (A.6) is one field of the config.

Metrics (A.4): the rank of t for user u is the number of items scored strictly higher
(ties favour the target); Hit@K = share of anchors with rank < K. Ranks come from each
anchor's clean scores sorted once (``searchsorted``), minus the target's own clean
score when it beats its perturbed one, so they are exact for non-graph models; graph
models add the changed items' new scores (local path) or count against the re-encoded
scores (full path). Unmasked ranking over all items is the
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

from uatmc_jax.core import errors, ops
from uatmc_jax.recsys.attacks import alignment as alignment_lib
from uatmc_jax.recsys.attacks import mismatch as mismatch_lib
from uatmc_jax.recsys.attacks.surface import AttackSurface

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


def budgets(attack: PromotionAttack, x_t: Mapping[str, jax.Array],
            epsilon: jax.Array | float | None = None) -> dict[str, jax.Array]:
  """ε_m per attacked modality for a target with (clean, attacked-space) rows x_t.

  ``epsilon`` (may be traced) overrides ``attack.epsilon``: the runner passes the budget
  as an argument so that one compiled function serves every budget.
  """
  eps = attack.epsilon if epsilon is None else epsilon
  if attack.budget == "relative":
    return {m: (eps * jnp.linalg.norm(x)).astype(x.dtype) for m, x in x_t.items()}
  return {m: jnp.asarray(eps, x.dtype) for m, x in x_t.items()}


def project_linf(delta: Mapping[str, jax.Array],
                 eps: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Projection onto {||δ^m||∞ ≤ ε_m} for every modality."""
  return {m: jnp.clip(d, -eps[m], eps[m]) for m, d in delta.items()}


def run_attack(attack: PromotionAttack, per_user_loss_fn, x_t: Mapping[str, jax.Array],
               group_weights: jax.Array, probe=None, monitor=None, epsilon=None):
  """The perturbation {m: (d_m,)} of one target (pure; vmap it over targets).

  Args:
    attack: the attacker.
    per_user_loss_fn: δ -> (n_anchor,) ℓ_u (margin already bound).
    x_t: {m: (d_m,)} clean rows of the attacked modalities (for relative budgets).
    group_weights: (n_anchor, G) user groups (used by group-level alignments).
    probe: None, or ``alignment.Probe(probe_loss_fn(δ, η), η0, lift)`` for attacks
      outside the projected space (the cosine alignments compare modalities there).
    monitor: None, or δ -> bool scalar evaluated at every point where the loss is
      differentiated (δ = 0 and each PGD iterate).
    epsilon: None (``attack.epsilon``) or the budget ε as a (traced) scalar.

  Returns:
    δ, inside the budget; ``(δ, all monitor values true)`` when ``monitor`` is given.
  """
  direction_fn = functools.partial(
      alignment_lib.get_ascent_direction(attack.alignment), per_user_loss_fn,
      group_weights=group_weights, align_weight=attack.align_weight,
      group_temperature=attack.group_temperature, probe=probe)
  eps = budgets(attack, x_t, epsilon)
  delta0 = {m: jnp.zeros_like(x) for m, x in x_t.items()}
  check = monitor or (lambda _: jnp.asarray(True))
  if attack.method == "fgsm":
    g = direction_fn(delta0)
    delta, ok = {m: eps[m] * jnp.sign(g[m]) for m in x_t}, check(delta0)
  else:
    step = {m: attack.step_scale * eps[m] / attack.steps for m in x_t}

    def body(_, carry):
      delta, ok = carry
      g = direction_fn(delta)
      return (project_linf({m: delta[m] + step[m] * jnp.sign(g[m]) for m in x_t}, eps),
              ok & check(delta))

    delta, ok = jax.lax.fori_loop(0, attack.steps, body, (delta0, jnp.asarray(True)))
  return delta if monitor is None else (delta, ok)


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
  Graph models with a local path (``surface.graph``) only, else None:
  desc_values, desc_indices: (n_A, W) clean top-W scores and their items, W = min(n_items,
    k + the largest number of items one target's features move).
  anchor_row: (n_users,) int32 each user's anchor row, n_A for non-anchors.
  graph_cache: ``graph_local.GraphCache``, the clean activations of every layer.
  """
  anchors: jax.Array
  anchor_vectors: jax.Array
  scores: jax.Array
  topk_values: jax.Array
  topk_indices: jax.Array
  sorted_scores: jax.Array
  masked_sorted_scores: jax.Array | None
  train_mask: jax.Array | None
  desc_values: jax.Array | None = None
  desc_indices: jax.Array | None = None
  anchor_row: jax.Array | None = None
  graph_cache: Any = None


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
  values, indices = ops.top_k(scores, k + 1)
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
  cache = None
  if surface.graph is not None:
    cache = jax.jit(surface.graph.clean_fn)(surface.params, surface.projected_table)
    users, items = cache.users, cache.items
  else:
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
  if cache is not None:
    width = min(n_items, k + surface.graph.neighbourhoods.max_changed_items())
    desc_values, desc_indices = jax.jit(jax.lax.top_k, static_argnums=1)(scores, width)
    anchor_row = np.full(users.shape[0], len(anchors), np.int32)
    anchor_row[anchors] = np.arange(len(anchors), dtype=np.int32)
    ctx = ctx._replace(desc_values=desc_values, desc_indices=desc_indices.astype(jnp.int32),
                       anchor_row=jnp.asarray(anchor_row), graph_cache=cache)
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
  per_user_loss: Any = None  # (δ, η, margin) -> ℓ (n_A,); None: from scores_fn
  exact_fn: Any = None       # (δ, margin) -> bool: per_user_loss is exact at δ
  activity_fn: Any = None    # (δ, margin) -> (n_A,): ℓ_u = 0 exactly where ≤ 0


class LocalGraphSpec(NamedTuple):
  """Static settings of the exact local graph path (hashable: keys compiled code).

  shape: the neighbourhood bucket's padded sizes.
  active_cap: anchors per step whose K-th score is recomputed (C_A; >= n_A: all).
  chunk: targets per chunk and device the runner compiled it for (0: unspecified).
  """
  shape: Any
  active_cap: int
  chunk: int = 0


def _target_view(surface: AttackSurface, params, attack_table, projected_table,
                 ctx: PromotionContext, target: jax.Array, k: int, nb=None,
                 local: LocalGraphSpec | None = None) -> _TargetView:
  """The pure functions of one target's attack (closures over traced arrays).

  ``nb`` (the target's padded ``graph_local.Neighbourhood``) and ``local`` select the
  exact local graph path; graph surfaces without them re-encode the whole graph.
  """
  x_t = {m: attack_table[m][target] for m in surface.modalities}

  def perturbed_projected_row(delta, eta=None):
    rows = {m: (x_t[m] + delta[m] if m in delta else x_t[m])[None] for m in x_t}
    projected = surface.lift_fn(params, rows)
    if eta:  # an additive probe in the projected space (raw attacks: shared space)
      projected = {m: projected[m] + eta[m] if m in eta else projected[m] for m in projected}
    return projected

  if local is not None:
    return _graph_local_view(surface, params, ctx, target, k, nb, local, x_t,
                             perturbed_projected_row)

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
    others = ops.top_k(scores.at[:, target].set(-jnp.inf), k)[0][:, max(k - 2, 0):]
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


def _unchanged_top(desc_values, desc_indices, moved, k, width):
  """The clean top-``width`` lists with the moved items removed, and their K-th.

  Returns (kept (n_A, width): the clean scores of the unchanged items, −∞ at the moved
  ones; u_K (n_A,): the K-th score of the unchanged items, −∞ if fewer than K remain).
  """
  keep = ~jnp.take(moved, desc_indices[:, :width])
  desc = desc_values[:, :width]
  nth = jnp.cumsum(keep, axis=1)
  at = jnp.argmax(nth >= k, axis=1)[:, None]
  u_k = jnp.where(nth[:, -1] >= k, jnp.take_along_axis(desc, at, axis=1)[:, 0], -jnp.inf)
  return jnp.where(keep, desc, -jnp.inf), u_k


def _graph_local_view(surface, params, ctx: PromotionContext, target, k, nb,
                      local: LocalGraphSpec, x_t, projected_row) -> _TargetView:
  """One target of a graph model, exact, from its L-hop neighbourhood only.

  The perturbed target moves the vectors of the changed items I_c (the items of its
  neighbourhood, t included) and changed users U_c (``graph_local.local_vectors``); every
  other vector is the clean cache's. Per anchor u the objective needs s(u, t) and the
  others' K-th/(K−1)-th scores o_K, o_{K−1} (``kth_score_with_target``):

  * u ∈ U_c (its own vector moved): its full row, u·(clean item table with I_c's rows
    replaced), then ``top_k`` without t.
  * u ∉ U_c: its scores of the unchanged items are clean, so its others' top-K is the
    top-K of (a) the clean top-(K+|I_c|) list with I_c's entries removed (it holds the
    top-K of the unchanged items: at most |I_c| entries are removed; computed once per
    target from ``ctx.desc_values``) and (b) the new scores u·v_j, j ∈ I_c∖{t}.
  * Active set: with u_K the K-th score of the unchanged items alone (o_K ≥ u_K: adding
    items only raises the K-th) and r_K = (K+1)-th clean score − ||u||·max_j ||Δv_j||
    (o_K ≥ r_K: at least K others are in the clean top-(K+1), none moved by more),
    an anchor with s(u, t) + margin ≤ max(u_K, r_K) has ℓ_u = 0 and zero gradient
    exactly. (u_K alone is loose for popular targets, whose changed items fill the
    anchors' top lists; r_K is loose for large moves.) Per step only the ``active_cap``
    anchors with the largest s + margin − max(u_K, r_K) get (b) recomputed; the loss is
    exact whenever at most that many have it > 0, which ``exact_fn`` reports (the runner
    re-runs a target whose attack ever exceeded it with ``active_cap`` = all anchors).

  Ranks count exactly: clean sorted row's count above s(u, t), minus I_c's clean entries
  above it, plus I_c∖{t}'s new entries above it (full rows for u ∈ U_c).
  """
  cache = ctx.graph_cache
  n_users, n_items = cache.users.shape[0], cache.items.shape[0]
  n_a = ctx.anchors.shape[0]
  item_ids = jnp.take(nb.nodes, nb.item_slots) - n_users
  item_drop = jnp.where(nb.item_valid, item_ids, n_items)  # padding -> out of range
  others_valid = nb.item_valid & (jnp.arange(item_ids.shape[0]) > 0)  # I_c ∖ {t}
  user_ids = jnp.take(nb.nodes, nb.user_slots)
  rows = jnp.where(nb.user_valid, jnp.take(ctx.anchor_row, user_ids), n_a)  # U_c's anchor rows
  rows_clip = jnp.minimum(rows, n_a - 1)
  changed = jnp.zeros(n_a, bool).at[rows].set(True, mode="drop")
  width = min(k + local.shape.items, ctx.desc_values.shape[1])
  moved = jnp.zeros(n_items, bool).at[item_drop].set(True, mode="drop")
  kept, unchanged_kth = _unchanged_top(ctx.desc_values, ctx.desc_indices, moved, k, width)
  clean_item_scores = jnp.take(ctx.scores, item_ids, axis=1)  # (n_A, P_i)
  is_t = jnp.arange(n_items) == target
  tail = max(k - 2, 0)
  # A second lower bound on o_K that does not fall when many top items are changed:
  # among the clean top-(K+1) at least K are others, and each changed item's score moves
  # by at most ||u||·max_j ||v_j − v_j^clean|| (Cauchy–Schwarz), so
  #   o_K ≥ desc[K] − ||u||·Δ_max   (``reach_bound``; slack for float32 rounding).
  clean_iv = jnp.take(cache.items, item_ids, axis=0)  # (P_i, D') clean changed vectors
  anchor_norm = jnp.linalg.norm(ctx.anchor_vectors, axis=1)
  item_norm = jnp.max(jnp.linalg.norm(cache.items, axis=1))
  kplus1 = ctx.desc_values[:, k]

  def reach_bound(iv):
    moved_by = jnp.linalg.norm(iv - clean_iv, axis=1)
    d_max = jnp.max(jnp.where(others_valid, moved_by, 0.0))
    return kplus1 - anchor_norm * (d_max * (1 + 1e-3) + 1e-5 * (item_norm + d_max))

  def vectors(delta, eta=None):
    row = projected_row(delta, eta)
    return surface.graph.local_fn(params, cache, {m: r[0] for m, r in row.items()}, nb,
                                  local.shape)

  def target_scores(iv, uv):
    s_changed = uv @ iv[0]
    return (ctx.anchor_vectors @ iv[0]).at[rows].set(s_changed, mode="drop"), s_changed

  def changed_rows(iv, uv):  # (P_u, n_items) full score rows of the changed users
    return (uv @ cache.items.T).at[:, item_drop].set(uv @ iv.T, mode="drop")

  def changed_others(iv, uv):
    return ops.top_k(jnp.where(is_t, -jnp.inf, changed_rows(iv, uv)), k)[0][:, tail:]

  def others_of(sel, iv):  # (len(sel), 2): anchors ∉ U_c
    new = jnp.take(ctx.anchor_vectors, sel, axis=0) @ iv.T
    cand = jnp.concatenate([jnp.take(kept, sel, axis=0),
                            jnp.where(others_valid, new, -jnp.inf)], axis=1)
    return ops.top_k(cand, k)[0][:, tail:]

  def scores_fn(delta, eta=None):
    iv, uv = vectors(delta, eta)
    s, _ = target_scores(iv, uv)
    others = others_of(jnp.arange(n_a), iv).at[rows].set(changed_others(iv, uv), mode="drop")
    return s, others

  def activity(s, iv, margin):
    # ℓ_u = 0 exactly where s + margin ≤ either lower bound of o_K.
    lower = jnp.maximum(unchanged_kth, jax.lax.stop_gradient(reach_bound(iv)))
    return jnp.where(changed, -jnp.inf, s + margin - lower)

  def per_user_loss(delta, eta, margin):
    iv, uv = vectors(delta, eta)
    s, s_changed = target_scores(iv, uv)
    if local.active_cap >= n_a:
      sel = jnp.arange(n_a)
    else:
      sel = ops.top_k(jax.lax.stop_gradient(activity(s, iv, margin)), local.active_cap)[1]
    loss = jnp.zeros(n_a, s.dtype).at[sel].set(
        promotion_per_user_loss(jnp.take(s, sel), others_of(sel, iv), margin))
    changed_loss = promotion_per_user_loss(s_changed, changed_others(iv, uv), margin)
    return loss.at[rows].set(changed_loss, mode="drop")

  def activity_fn(delta, margin):
    iv, uv = vectors(delta)
    return activity(target_scores(iv, uv)[0], iv, margin)

  def exact_fn(delta, margin):
    if local.active_cap >= n_a:
      return jnp.asarray(True)
    return jnp.sum(activity_fn(delta, margin) > 0) <= local.active_cap

  def count_above(sorted_rows, clean_cols, new_cols, s, changed_full, s_changed):
    unchanged = (count_greater(sorted_rows, s)
                 - jnp.sum(nb.item_valid & (clean_cols > s[:, None]), axis=1)
                 + jnp.sum(others_valid & (new_cols > s[:, None]), axis=1))
    full = jnp.sum((changed_full > s_changed[:, None]) & ~is_t, axis=1)
    return unchanged.astype(jnp.int32).at[rows].set(full.astype(jnp.int32), mode="drop")

  def ranks_fn(delta):
    clean_t = ctx.scores[:, target]
    if not delta:  # the clean model reads the table itself: ties with t's own entry exact
      ranks = count_greater(ctx.sorted_scores, clean_t)
      masked = None
      if ctx.masked_sorted_scores is not None:
        masked = count_greater(ctx.masked_sorted_scores,
                               jnp.where(ctx.train_mask[:, target], -jnp.inf, clean_t))
      return ranks, masked
    iv, uv = vectors(delta)
    s, s_changed = target_scores(iv, uv)
    new = ctx.anchor_vectors @ iv.T
    full = changed_rows(iv, uv)
    ranks = count_above(ctx.sorted_scores, clean_item_scores, new, s, full, s_changed)
    masked = None
    if ctx.masked_sorted_scores is not None:
      seen = ctx.train_mask[:, target]
      seen_items = jnp.take(ctx.train_mask, item_ids, axis=1)
      seen_rows = jnp.take(ctx.train_mask, rows_clip, axis=0)
      masked = count_above(
          ctx.masked_sorted_scores, jnp.where(seen_items, -jnp.inf, clean_item_scores),
          jnp.where(seen_items, -jnp.inf, new), jnp.where(seen, -jnp.inf, s),
          jnp.where(seen_rows, -jnp.inf, full),
          jnp.where(jnp.take(seen, rows_clip), -jnp.inf, s_changed))
    return ranks, masked

  return _TargetView(x_t, scores_fn, ranks_fn, projected_row, per_user_loss, exact_fn,
                     activity_fn)


# ----------------------------------------------------------------------------------
# Many targets at once.


@functools.partial(jax.jit, static_argnames=("k", "width"))
def _clean_active_count(desc_values, desc_indices, scores, target, moved, changed, margin,
                        k, width):
  """``PromotionAttackRunner.clean_active_counts`` for one target (fixed shapes)."""
  _, u_k = _unchanged_top(desc_values, desc_indices, moved, k, width)
  lower = jnp.maximum(u_k, desc_values[:, k])  # the view's activity at δ = 0, no slack
  s = jax.lax.dynamic_index_in_dim(scores, target, axis=1, keepdims=False)
  return jnp.sum(~changed & (s + margin > lower))


def _rank_metrics(ranks: jax.Array, ks: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  hits = jnp.stack([jnp.mean((ranks < k).astype(jnp.float32)) for k in ks])
  return hits, jnp.mean(ranks.astype(jnp.float32))


def attack_and_evaluate_target(surface: AttackSurface, attack: PromotionAttack, params,
                               attack_table, projected_table, ctx: PromotionContext,
                               group_weights: jax.Array, target: jax.Array, nb=None, *,
                               ks: Sequence[int] = METRIC_KS,
                               with_mismatch: bool = True,
                               local: LocalGraphSpec | None = None,
                               epsilon: jax.Array | None = None) -> dict[str, Any]:
  """Attack one target and measure it (pure; the runner vmaps it over targets).

  With ``local`` (graph models: the exact local path, ``nb`` the target's neighbourhood)
  the result has ``exact``: False when the active-anchor cap was exceeded at some
  evaluated point (the runner then re-runs the target with the cap lifted). ``epsilon``
  (a traced scalar, or None for ``attack.epsilon``) is the budget.
  """
  view = _target_view(surface, params, attack_table, projected_table, ctx, target, attack.k,
                      nb, local)
  attacked = attack.modalities or surface.modalities
  x_att = {m: view.x_t[m] for m in attacked}

  def per_user_loss(delta, eta=None):
    if view.per_user_loss is not None:
      return view.per_user_loss(delta, eta, attack.margin)
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
  monitor = None
  if view.exact_fn is not None:
    monitor = functools.partial(view.exact_fn, margin=attack.margin)
  delta = run_attack(attack, per_user_loss, x_att, group_weights, probe=probe,
                     monitor=monitor, epsilon=epsilon)
  if monitor is not None:
    delta, exact = delta
  delta = jax.lax.stop_gradient(delta)
  zero = {m: jnp.zeros_like(x) for m, x in x_att.items()}
  out = {"delta": delta,
         "loss_before": jnp.mean(per_user_loss(zero)),
         "loss_after": jnp.mean(per_user_loss(delta))}
  if monitor is not None:  # δ = 0 (before, mismatch) and the final δ are evaluated too
    out["exact"] = exact & monitor(zero) & monitor(delta)
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


GRAPH_PATHS = ("local", "full")


def chunk_size_for(surface: AttackSurface, chunk_size: int, n_targets: int, mesh=None,
                   graph_path: str = "local") -> int:
  """Targets per vmapped chunk (per device on a mesh) for ``n_targets`` targets.

  Graph surfaces on the full re-encode path recompute the propagation per target, so their
  chunks are capped at 4 (the local path caps each size bucket by memory instead, see
  ``PromotionAttackRunner``); on a mesh the per-device chunk is capped so that one chunk
  holds about ``n_targets`` (at most one padded target per device).
  """
  full_graph = surface.is_graph and (graph_path == "full" or surface.graph is None)
  chunk = min(int(chunk_size), 4) if full_graph else int(chunk_size)
  if mesh is not None:
    chunk = max(1, min(chunk, -(-int(n_targets) // mesh.size)))
  return chunk


def memory_map_usage() -> float | None:
  """This process's memory mappings as a share of Linux's ``vm.max_map_count`` (else None).

  XLA:CPU maps its code in many small regions per compiled program (~500 for an MMGCN
  attack chunk); a run that compiles ~100 of them (every neighbourhood bucket x attacker,
  capped and uncapped) reaches the default limit of 65,530 and aborts inside LLVM
  ("Unable to allocate section memory").
  """
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      limit = int(f.read())
    with open("/proc/self/maps", "rb") as f:
      used = sum(1 for _ in f)
  except (OSError, ValueError):
    return None
  return used / max(limit, 1)


def _budget_free(attack: PromotionAttack) -> PromotionAttack:
  """The attacker with its budget cleared: the key of its compiled chunk function."""
  return dataclasses.replace(attack, epsilon=0.0)


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
    graph_path: graph models only: "local" (default; the exact neighbourhood-local
      recomputation of ``_graph_local_view``, used when the surface has one, i.e.
      ``surface.graph``) or "full" (re-encode the whole graph every step: the reference).
    active_cap: local path: anchors per step whose K-th score is recomputed; a target that
      ever has more active anchors is re-run with all anchors (``graph_fallbacks``). An
      attacker whose targets mostly need the re-run (more than half of a bucket's, e.g.
      FGSM's margin 10 makes every anchor active) runs its later buckets with all anchors
      directly (``uncapped``): the same numbers without the wasted capped pass and its
      compile. "Mostly" counts over all of the attacker's targets so far, from
      ``uncapped_after`` re-runs on (one re-run in a bucket of one target is no evidence,
      and switching makes every later bucket and model compile the uncapped variant).
    route_clean_active: local path: a target whose clean point already has more active
      anchors than ``active_cap`` (``clean_active_counts``; it would fail ``exact`` at
      δ = 0) starts with all anchors instead of running capped and then again; such
      targets count as re-runs for ``uncapped``.
    chunk_elements: local path: a size bucket's chunk holds at most this many elements of
      per-target working arrays (about anchors x (K + 2·changed items) + changed users x
      items), so big neighbourhoods run in small chunks and small ones in big chunks.
    log: optional ``log(message)`` for progress on the local graph path (one line per
      size bucket: targets, seconds, compile included on first use, re-runs).

  On the local path targets are grouped by neighbourhood size bucket
  (``graph_local.GraphNeighbourhoods``), each bucket with its own compiled function (its
  shape depends on the graph only), and the results are put back in the targets' order.
  """

  def __init__(self, surface: AttackSurface, *, chunk_size: int = 64,
               ks: Sequence[int] = METRIC_KS, with_mismatch: bool = True,
               mesh: jax.sharding.Mesh | None = None, graph_path: str = "local",
               active_cap: int = 256, chunk_elements: int = 2**25, log=None,
               uncapped_after: int = 4, route_clean_active: bool = True):
    self.surface = surface
    self.log = log
    self.chunk_size = int(chunk_size)
    if self.chunk_size < 1:
      raise errors.ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if graph_path not in GRAPH_PATHS:
      raise errors.ConfigError(f"graph_path must be one of {GRAPH_PATHS}, got {graph_path!r}")
    if active_cap < 1 or chunk_elements < 1:
      raise errors.ConfigError("active_cap and chunk_elements must be >= 1")
    self.graph_path, self.active_cap = graph_path, int(active_cap)
    self.route_clean_active = bool(route_clean_active)
    self.chunk_elements = int(chunk_elements)
    self.ks = tuple(int(k) for k in ks)
    self.with_mismatch = with_mismatch
    if mesh is not None and mesh.size == 1 and jax.process_count() == 1:
      mesh = None
    self.mesh = mesh
    self.local_targets = 0
    self._replicated: dict[str, tuple[Any, Any]] = {}
    self._compiled: dict[PromotionAttack, Any] = {}
    self.uncapped: set[PromotionAttack] = set()  # attackers run with all anchors
    self._reruns: dict[PromotionAttack, list[int]] = {}  # attacker: [re-runs, targets]
    self.uncapped_after = int(uncapped_after)
    # Before each run: compiled programs are dropped above this share of the process's
    # memory-map limit (``memory_map_usage``; ``releases`` counts the drops).
    self.map_usage_fn, self.max_map_share, self.releases = memory_map_usage, 0.6, 0
    self.trace_counts: dict[PromotionAttack, int] = {}

  @property
  def targets_per_chunk(self) -> int:
    """Targets in one call of the chunk function (all devices together)."""
    return self.chunk_size * (1 if self.mesh is None else self.mesh.size)

  def _on_mesh(self, key: str, tree):
    """``tree`` replicated over the mesh, cached while the same object is passed."""
    from uatmc_jax.core.parallel import multihost
    held = self._replicated.get(key)
    if held is None or held[0] is not tree:
      held = (tree, multihost.put_replicated(tree, self.mesh))
      self._replicated[key] = held
    return held[1]

  @property
  def uses_local_graph_path(self) -> bool:
    """True when the current surface is attacked on the exact local graph path."""
    return self.graph_path == "local" and self.surface.graph is not None

  def chunk_function(self, attack: PromotionAttack, local: LocalGraphSpec | None = None):
    """The jitted (params, tables, ctx, groups, ε, neighbourhoods, targets (chunk,)) -> dict.

    ``neighbourhoods`` is None except on the local graph path (``local`` given). The
    budget ε is an argument (a float32 scalar), not part of the compiled program:
    attackers that differ only in ``epsilon`` share one function (a budget sweep
    compiles once).
    """
    attack = _budget_free(attack)
    key = attack if local is None else (attack, local)
    if key not in self._compiled:
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

      def chunk(params, attack_table, projected_table, ctx, group_weights, epsilon, nbs,
                targets):
        # Runs only when traced: a fixed chunk shape must never retrace (cf.
        # chex.assert_max_traces, which keys on the definition site, not the closure).
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > 1:
          raise AssertionError(f"promotion chunk function for {key} retraced")
        one = functools.partial(attack_and_evaluate_target, surface, attack, params,
                                attack_table, projected_table, ctx, group_weights, ks=ks,
                                with_mismatch=with_mismatch, local=local, epsilon=epsilon)
        return jax.vmap(one)(targets, nbs)

      if self.mesh is None:
        self._compiled[key] = jax.jit(chunk)
      else:
        # Targets (and their neighbourhoods) split over every mesh axis; everything else
        # replicated. Each device vmaps over its own targets, no communication inside.
        split = P(tuple(self.mesh.axis_names))
        self._compiled[key] = jax.jit(jax.shard_map(
            chunk, mesh=self.mesh, in_specs=(P(), P(), P(), P(), P(), P(), split, split),
            out_specs=split, check_vma=False))
    return self._compiled[key]

  def _bucket_chunk(self, shape, n_anchors: int, k: int) -> int:
    """Targets per chunk (per device) of one neighbourhood bucket, by working memory."""
    n_items = self.surface.n_items
    per_target = (n_anchors * (k + 2 * shape.items) + 2 * shape.users * n_items
                  + 64 * (shape.edges[-1] + shape.nodes))
    return max(1, min(self.chunk_size, self.chunk_elements // per_target))

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
    self._release_executables_if_needed()
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
    s = self.surface
    t0 = time.perf_counter()
    epsilon = jnp.asarray(attack.epsilon, jnp.float32)
    args = (s.params, s.attack_table, s.projected_table, ctx, group_weights, epsilon)
    place, fetch = jnp.asarray, jax.device_get
    if self.mesh is not None:
      from uatmc_jax.core.parallel import multihost
      args = tuple(self._on_mesh(k, v) for k, v in zip(
          ("params", "attack_table", "projected_table", "ctx"), args[:4]))
      args += (multihost.put_replicated(group_weights, self.mesh),
               multihost.put_replicated(epsilon, self.mesh))
      split = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
      place = lambda t: multihost.put_global(t, split)  # noqa: E731
      fetch = multihost.to_host
    if not self.uses_local_graph_path:
      result = self._run_chunks(self.chunk_function(attack), args, targets, self.chunk_size,
                                place, fetch)
    else:
      if ctx.graph_cache is None:
        raise errors.ConfigError("the local graph path needs a context built by "
                                 "build_context on this graph surface (graph_cache is None)")
      result, fallbacks, direct = self._run_local(attack, ctx, args, targets, place, fetch)
      result["graph_fallbacks"], result["graph_direct"] = fallbacks, direct
    result["targets"] = targets
    result["seconds"] = time.perf_counter() - t0
    return result

  def _release_executables_if_needed(self) -> None:
    """Drops every compiled program when the process nears its memory-map limit.

    They are rebuilt on next use: with the persistent compilation cache on (the
    launchers' default) that reads them back instead of compiling.
    """
    usage = self.map_usage_fn()
    if usage is None or usage < self.max_map_share:
      return
    if self.log is not None:
      self.log(f"memory maps at {usage:.0%} of vm.max_map_count: dropping "
               f"{len(self._compiled)} compiled attack programs (jax.clear_caches)")
    jax.clear_caches()
    self._compiled.clear()
    self.trace_counts.clear()
    self.releases += 1

  def _run_chunks(self, fn, args, targets, per_device, place, fetch, nbs_of=None):
    """``fn`` over fixed-size chunks of ``targets`` (last one padded with the first)."""
    n = len(targets)
    c = per_device * (1 if self.mesh is None else self.mesh.size)
    n_chunks = math.ceil(n / c)
    padded = np.concatenate([targets, np.full(n_chunks * c - n, targets[0], np.int32)])
    pieces = []
    for i in range(n_chunks):
      block = padded[i * c:(i + 1) * c]
      nbs = None if nbs_of is None else jax.tree.map(place, nbs_of(block))
      chunk_targets = place(block)
      if self.mesh is not None:
        self.local_targets += len(chunk_targets.addressable_shards) * per_device
      pieces.append(fetch(fn(*args, nbs, chunk_targets)))
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0)[:n], *pieces)

  def clean_active_counts(self, ctx: PromotionContext, targets: Sequence[int],
                          attack: PromotionAttack) -> np.ndarray:
    """Per target, the active anchors of the local graph path at δ = 0 (n_targets,).

    Those with s(u, t) + margin > max(u_K, clean (K+1)-th score) among the anchors whose
    own vector does not move: the local view's activity at the clean point (without its
    float32 slack, so never more). A target above ``active_cap`` here fails ``exact``.
    """
    hoods = self.surface.graph.neighbourhoods
    n_a, n_items = int(ctx.anchors.shape[0]), int(ctx.scores.shape[1])
    anchor_row = np.asarray(ctx.anchor_row)
    counts = []
    for t in np.asarray(targets):  # host set-up per target, like the neighbourhoods
      nb = hoods.neighbourhood(int(t), hoods.shapes[int(hoods.bucket_of_item[t])])
      moved = np.zeros(n_items, bool)
      moved[nb.nodes[nb.item_slots][nb.item_valid] - hoods.n_users] = True
      changed = np.zeros(n_a + 1, bool)
      changed[anchor_row[nb.nodes[nb.user_slots][nb.user_valid]]] = True
      # u_K lies in the first K + |I_c| of the clean list (at most |I_c| are removed).
      width = min(int(ctx.desc_values.shape[1]),
                  attack.k + hoods.shapes[int(hoods.bucket_of_item[t])].items)
      counts.append(_clean_active_count(ctx.desc_values, ctx.desc_indices, ctx.scores,
                                        jnp.asarray(t), jnp.asarray(moved),
                                        jnp.asarray(changed[:n_a]), attack.margin, attack.k,
                                        width))
    return np.asarray(jax.device_get(counts), np.int64)

  def _run_local(self, attack, ctx, args, targets, place, fetch):
    """The local graph path: per size bucket, then exact re-runs.

    Returns (result, re-runs, targets started with all anchors)."""
    hoods = self.surface.graph.neighbourhoods
    n_a = int(ctx.anchors.shape[0])
    buckets = hoods.bucket_of_item[targets]
    order, pieces, fallbacks, n_direct = [], [], 0, 0
    unique = np.unique(buckets)
    template = _budget_free(attack)  # the compile key; ε is an argument
    name = attack.method + ("" if attack.alignment == "none" else f"+{attack.alignment}")
    done, t_start = 0, time.perf_counter()
    for i, b in enumerate(unique):  # a handful of size buckets, each compiled once
      shape = hoods.shapes[int(b)]
      t0 = time.perf_counter()
      cap = n_a if template in self.uncapped else self.active_cap
      budget = self._bucket_chunk(shape, n_a, attack.k)
      devices = 1 if self.mesh is None else self.mesh.size

      def per_device(n_targets):
        # A chunk no wider than needed (a power of two: few shapes to compile); a
        # 1-target bucket padded to 64 targets did 64 targets' work.
        return min(budget, 1 << max(0, math.ceil(math.log2(math.ceil(n_targets / devices)))))

      nbs_of = functools.partial(hoods.batch, shape=shape)
      fresh, n_redo = False, 0
      in_bucket = np.flatnonzero(buckets == b)
      # Targets whose clean point already has more active anchors than the cap would
      # fail ``exact`` at δ = 0 and be re-run: they start with all anchors instead.
      direct = np.zeros(len(in_bucket), bool)
      if cap < n_a and self.route_clean_active:
        direct = self.clean_active_counts(ctx, targets[in_bucket], attack) > cap
      for idx, c in ((in_bucket[~direct], cap), (in_bucket[direct], n_a)):
        if not len(idx):
          continue
        spec = LocalGraphSpec(shape, c, per_device(len(idx)))
        fresh |= (template, spec) not in self._compiled
        out = self._run_chunks(self.chunk_function(attack, spec), args, targets[idx],
                               spec.chunk, place, fetch, nbs_of)
        redo = np.flatnonzero(~np.asarray(out["exact"]))
        if len(redo):
          n_redo += len(redo)
          again_spec = LocalGraphSpec(shape, n_a, per_device(len(redo)))
          fresh |= (template, again_spec) not in self._compiled
          again = self._run_chunks(self.chunk_function(attack, again_spec), args,
                                   targets[idx][redo], again_spec.chunk, place, fetch, nbs_of)

          def put(a, b, redo=redo):
            a = np.array(a)
            a[redo] = b
            return a

          out = jax.tree.map(put, out, again)
        order.append(idx)
        pieces.append(out)
      fallbacks += n_redo
      n_direct += int(direct.sum())
      seen = self._reruns.setdefault(template, [0, 0])
      seen[0] += n_redo + int(direct.sum())  # targets that needed all anchors
      seen[1] += len(in_bucket)
      if seen[0] >= self.uncapped_after and 2 * seen[0] > seen[1]:
        self.uncapped.add(template)
      done += len(in_bucket)
      if self.log is not None:
        self.log(f"{name} ε={attack.epsilon:g}: bucket {i + 1}/{len(unique)} ({shape.items} items x "
                 f"{shape.users} users): {len(in_bucket)} targets in "
                 f"{time.perf_counter() - t0:.1f} s{' incl. compile' if fresh else ''}, "
                 f"{int(direct.sum())} started with all anchors, {n_redo} re-run with all "
                 f"anchors; {done}/{len(targets)} targets, {time.perf_counter() - t_start:.0f} s")
    inverse = np.argsort(np.concatenate(order))
    result = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0)[inverse], *pieces)
    return result, fallbacks, n_direct
