"""One target's attack as pure functions of its perturbation (METHODS.md A.4).

``target_view`` returns the target's scores, per-user losses and exact ranks as
closures over the model and the ``PromotionContext``; ``attack_and_evaluate_target``
attacks one target and measures it (Hit@K before/after, A.5 diagnostics). The runner
vmaps it over a chunk of targets.

Metrics (A.4): the rank of t for user u is the number of items scored strictly higher
(ties favour the target); Hit@K = share of anchors with rank < K. Ranks come from each
anchor's clean scores (``context.count_clean_above``: sorted rows in the dense layout,
rows recomputed by item chunks in the top-k layout), minus the target's own clean
score when it beats its perturbed one, so they are exact for non-graph models; graph
models add the changed items' new scores (local path) or count against the re-encoded
scores (full path). Unmasked ranking over all items is the reference's (default); the
masked variant removes each user's train items (a target the user interacted with gets
score −∞ for that user).

Graph models (MMGCN, ``is_graph``) move the user and item vectors within the L-hop
neighbourhood of t. Their default path ("local", ``_graph_local_view``) recomputes only
that neighbourhood from a clean per-layer cache (``graph_local``) and gets each anchor's
K-th score exactly from its clean top-(K+|I_c|) list minus the changed items I_c plus
their new scores (full rows for anchors whose own vector moved), skipping anchors whose
hinge provably stays at zero; the reference path ("full") re-encodes the whole graph
with the perturbed table and takes ``top_k`` every step. Both are exact; tests check
them against each other.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from uatmc_jax.core import ops
from uatmc_jax.recsys.attacks import alignment as alignment_lib
from uatmc_jax.recsys.attacks import mismatch as mismatch_lib
from uatmc_jax.recsys.attacks.attackers import PromotionAttack, run_attack
from uatmc_jax.recsys.attacks.context import (PromotionContext, clean_column,
                                              count_clean_above, train_rows, train_seen)
from uatmc_jax.recsys.attacks.objective import (METRIC_KS, others_threshold_columns,
                                                promotion_per_user_loss)
from uatmc_jax.recsys.attacks.surface import AttackSurface

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


def target_view(surface: AttackSurface, params, attack_table, projected_table,
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

    clean_t = clean_column(ctx, target)

    def ranks_fn(delta):
      # δ = {} (the clean model) reads the table itself: ties with t's own entry exact.
      s = target_scores(delta) if delta else clean_t
      ranks = count_clean_above(ctx, s, target[None])
      masked = None
      if ctx.masked:
        seen = train_seen(ctx, target[None])[:, 0]
        masked = count_clean_above(ctx, jnp.where(seen, -jnp.inf, s), target[None],
                                   masked=True)
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
    if ctx.masked:
      ms = jnp.where(train_rows(ctx, jnp.arange(ctx.anchors.shape[0])), -jnp.inf, scores)
      sm = ms[:, target]
      masked = jnp.sum((ms > sm[:, None]) & ~is_t[None, :], axis=1).astype(jnp.int32)
    return ranks, masked

  return _TargetView(x_t, scores_fn, ranks_fn, perturbed_projected_row)


def _unchanged_top(desc_values, desc_indices, moved, k, width):
  """The top-K clean scores of the unchanged items, from the clean top-``width`` lists.

  Returns (top (n_A, K): descending, −∞ where fewer than K unchanged items remain in
  the list; u_K (n_A,) = top[:, K−1], the K-th score of the unchanged items). With
  ``width`` ≥ K + |moved ∩ list| the list holds the top-K of the unchanged items. The
  top-K of the unchanged items together with any new scores is the top-K of these K
  and the new ones, so a step never looks at the ``width``-wide lists again.
  """
  keep = ~jnp.take(moved, desc_indices[:, :width])
  top = ops.top_k(jnp.where(keep, desc_values[:, :width], -jnp.inf), k)[0]
  return top, top[:, k - 1]


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

  def count_above(masked, new_cols, s, changed_full, s_changed):
    # Unchanged items' clean entries above s, plus I_c ∖ {t}'s new ones.
    unchanged = (count_clean_above(ctx, s, item_drop, masked=masked)
                 + jnp.sum(others_valid & (new_cols > s[:, None]), axis=1))
    full = jnp.sum((changed_full > s_changed[:, None]) & ~is_t, axis=1)
    return unchanged.astype(jnp.int32).at[rows].set(full.astype(jnp.int32), mode="drop")

  def ranks_fn(delta):
    clean_t = clean_column(ctx, target)
    if not delta:  # the clean model reads the table itself: ties with t's own entry exact
      ranks = count_clean_above(ctx, clean_t, target[None])
      masked = None
      if ctx.masked:
        masked = count_clean_above(
            ctx, jnp.where(train_seen(ctx, target[None])[:, 0], -jnp.inf, clean_t),
            target[None], masked=True)
      return ranks, masked
    iv, uv = vectors(delta)
    s, s_changed = target_scores(iv, uv)
    new = ctx.anchor_vectors @ iv.T
    full = changed_rows(iv, uv)
    ranks = count_above(False, new, s, full, s_changed)
    masked = None
    if ctx.masked:
      seen = train_seen(ctx, target[None])[:, 0]
      seen_items = train_seen(ctx, item_ids)
      seen_rows = train_rows(ctx, rows_clip)
      masked = count_above(
          True, jnp.where(seen_items, -jnp.inf, new), jnp.where(seen, -jnp.inf, s),
          jnp.where(seen_rows, -jnp.inf, full),
          jnp.where(jnp.take(seen, rows_clip), -jnp.inf, s_changed))
    return ranks, masked

  return _TargetView(x_t, scores_fn, ranks_fn, projected_row, per_user_loss, exact_fn,
                     activity_fn)



@functools.partial(jax.jit, static_argnames=("k", "width"))
def clean_active_count(desc_values, desc_indices, column, moved, changed, margin, k, width):
  """``PromotionAttackRunner.clean_active_counts`` for one target (fixed shapes).

  ``column``: (n_A,) the target's clean scores (``context.clean_column``).
  """
  _, u_k = _unchanged_top(desc_values, desc_indices, moved, k, width)
  lower = jnp.maximum(u_k, desc_values[:, k])  # the view's activity at δ = 0, no slack
  return jnp.sum(~changed & (column + margin > lower))


def _rank_metrics(ranks: jax.Array, ks: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  hits = jnp.stack([jnp.mean((ranks < k).astype(jnp.float32)) for k in ks])
  return hits, jnp.mean(ranks.astype(jnp.float32))


def attack_and_evaluate_target(surface: AttackSurface, attack: PromotionAttack, params,
                               attack_table, projected_table, ctx: PromotionContext,
                               group_weights: jax.Array, target: jax.Array, nb=None, *,
                               ks: Sequence[int] = METRIC_KS,
                               with_mismatch: bool = True,
                               clean_mismatch: bool = True,
                               local: LocalGraphSpec | None = None,
                               epsilon: jax.Array | None = None) -> dict[str, Any]:
  """Attack one target and measure it (pure; the runner vmaps it over targets).

  ``clean_mismatch=False`` leaves out the A.5 diagnostics at δ = 0 (``mismatch``; the
  runner reuses them from an earlier attacker with the same objective).

  With ``local`` (graph models: the exact local path, ``nb`` the target's neighbourhood)
  the result has ``exact``: False when the active-anchor cap was exceeded at some
  evaluated point (the runner then re-runs the target with the cap lifted). ``epsilon``
  (a traced scalar, or None for ``attack.epsilon``) is the budget.
  """
  view = target_view(surface, params, attack_table, projected_table, ctx, target, attack.k,
                      nb, local)
  attacked = attack.modalities or surface.modalities
  x_att = {m: view.x_t[m] for m in attacked}

  def per_user_loss(delta, eta=None):
    if view.per_user_loss is not None:
      return view.per_user_loss(delta, eta, attack.margin)
    s, others = view.scores_fn(delta, eta)
    return promotion_per_user_loss(s, others, attack.margin, attack.surrogate,
                                   attack.temperature)

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
  if with_mismatch and clean_mismatch:  # A.5 diagnostics at the clean point
    out["mismatch"] = mismatch_lib.mismatch_diagnostics(per_user_loss, zero, group_weights,
                                                        probe, shared_space=surface.shared_space)
  if with_mismatch:  # ... and at the attacker's final perturbation, whose gains are those
    # of the attacker's own step δ (A.5: a_u = ∇ℓ_u · δ^v).
    out["mismatch_at_delta"] = mismatch_lib.mismatch_diagnostics(
        per_user_loss, delta, group_weights, probe, shared_space=surface.shared_space,
        gain_step=delta)
  return out
