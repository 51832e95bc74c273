"""The exact local graph path's driver: size buckets, active-anchor caps, exact re-runs.

``PromotionAttackRunner`` hands graph models on the local path (METHODS.md A.4;
``views`` builds each target's neighbourhood-local recomputation) to ``run_local``:
targets are grouped by neighbourhood size bucket (``graph_local.GraphNeighbourhoods``),
buckets with few or small targets are merged into one program of their elementwise
largest shape (``graph_local.plan_buckets``), each program runs at the first cap of the
active-anchor ladder (``cap_ladder``) that the target's clean point fits
(``clean_active_counts``), targets that were not exact are re-run at the next cap, one
program per cap, and the results are put back in the targets' order. The runner's
docstring describes the knobs (``active_cap``, ``cap_growth``, ``uncapped_after``,
``route_clean_active``, ``chunk_elements``, ``compile_seconds``);
docs/results/performance.md measures them.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.recsys.attacks import graph_local
from uatmc_jax.recsys.attacks.attackers import PromotionAttack
from uatmc_jax.recsys.attacks.context import PromotionContext, clean_column
from uatmc_jax.recsys.attacks.surface import AttackSurface
from uatmc_jax.recsys.attacks.views import LocalGraphSpec, clean_active_count

# (ctx, target) -> (n_A,) the target's clean scores, in either context layout.
_clean_column = jax.jit(clean_column)


def target_elements(surface: AttackSurface, shape, n_anchors: int, k: int) -> int:
  """Elements of one target's working arrays at a neighbourhood bucket's shape."""
  return (n_anchors * (k + 2 * shape.items) + 2 * shape.users * surface.n_items
          + 64 * (shape.edges[-1] + shape.nodes))


def cap_ladder(active_cap: int, cap_growth: int, n_anchors: int,
               uncapped: bool = False) -> tuple[int, ...]:
  """The active-anchor caps: active_cap·cap_growth^i below n_A, then n_A (only n_A when
  ``uncapped``)."""
  caps, cap = [], int(active_cap)
  while not uncapped and cap < n_anchors:
    caps.append(cap)
    cap *= int(cap_growth)
  return tuple(caps) + (int(n_anchors),)


def clean_active_counts(surface: AttackSurface, ctx: PromotionContext,
                        targets: Sequence[int], attack: PromotionAttack) -> np.ndarray:
  """Per target, the active anchors of the local graph path at δ = 0 (n_targets,).

  Those with s(u, t) + margin > max(u_K, clean (K+1)-th score) among the anchors whose
  own vector does not move: the local view's activity at the clean point (without its
  float32 slack, so never more). A target above the first cap here fails ``exact``.
  """
  hoods = surface.graph.neighbourhoods
  n_a, n_items = int(ctx.anchors.shape[0]), ctx.n_items
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
    counts.append(clean_active_count(ctx.desc_values, ctx.desc_indices,
                                      _clean_column(ctx, jnp.asarray(t)), jnp.asarray(moved),
                                      jnp.asarray(changed[:n_a]), attack.margin, attack.k,
                                      width))
  return np.asarray(jax.device_get(counts), np.int64)


def run_local(runner, attack: PromotionAttack, ctx: PromotionContext, args, targets,
              place, fetch, clean_mismatch: bool = True):
  """The local graph path of ``runner.run``: per size bucket, then exact re-runs.

  ``args`` are the chunk function's leading arguments (placed for the mesh, if any);
  ``place``/``fetch`` move a chunk's targets in and its results out. Returns (result,
  re-runs, targets started above the first cap).
  """
  hoods = runner.surface.graph.neighbourhoods
  n_a = int(ctx.anchors.shape[0])
  buckets = hoods.bucket_of_item[targets]
  unique, per_bucket = np.unique(buckets, return_counts=True)
  # Per-target cost of a shape: its working elements (``target_elements``) times the
  # attack's loss evaluations, at about 1.2 ns each (TikTok, 2-core CPU).
  passes = attack.steps + 3

  def cost(shape):
    return 1.2e-9 * passes * target_elements(runner.surface, shape, n_a, attack.k)

  groups = graph_local.plan_buckets([hoods.shapes[int(b)] for b in unique], per_bucket,
                                    cost, runner.compile_seconds)
  template = attack.without_budget()  # the attacker without its budget: re-run statistics
  devices = 1 if runner.mesh is None else runner.mesh.size
  pieces = []  # (target positions, their exact results), in the order they finish
  pending: dict[int, list[int]] = {}  # cap level -> target positions (levels >= 1)
  fallbacks = n_direct = 0
  t_start = time.perf_counter()

  def run_level(pos, shape, cap):
    """Attacks targets[pos] at one shape and cap; returns the positions not exact."""
    budget = runner.bucket_chunk(shape, n_a, attack.k)
    # A chunk no wider than needed (a power of two: few shapes to compile); a 1-target
    # bucket padded to 64 targets did 64 targets' work.
    chunk = min(budget, 1 << max(0, math.ceil(math.log2(math.ceil(len(pos) / devices)))))
    spec = LocalGraphSpec(shape, cap, chunk)
    fresh = not runner.is_compiled(attack, spec, clean_mismatch)
    out = runner.run_chunks(runner.chunk_function(attack, spec, clean_mismatch), args,
                             targets[pos], chunk, place, fetch,
                             functools.partial(hoods.batch, shape=shape))
    exact = np.asarray(out["exact"])  # the last level (all anchors) is always exact
    pieces.append((pos[exact], jax.tree.map(lambda a: a[exact], out)))
    return pos[~exact], fresh

  def report(what, n, t0, fresh, started, redo):
    if runner.log is not None:
      runner.log(f"{attack.display_name} ε={attack.epsilon:g}: {what}: {n} targets in "
                 f"{time.perf_counter() - t0:.1f} s{' incl. compile' if fresh else ''}, "
                 f"{started} started above the first cap, {redo} re-run with more anchors; "
                 f"{sum(len(p) for p, _ in pieces)}/{len(targets)} targets, "
                 f"{time.perf_counter() - t_start:.0f} s")

  caps = runner.cap_ladder(n_a, uncapped=template in runner.uncapped)
  for i, members in enumerate(groups):  # a handful of programs, each compiled once
    t0 = time.perf_counter()
    shape = graph_local.merged_shape(hoods.shapes[int(unique[m])] for m in members)
    pos = np.flatnonzero(np.isin(buckets, unique[members]))
    # Targets whose clean point already has more active anchors than a cap would fail
    # ``exact`` at δ = 0 and be re-run: they start at the first cap that holds them.
    level = np.zeros(len(pos), np.int64)
    if len(caps) > 1 and runner.route_clean_active:
      active = clean_active_counts(runner.surface, ctx, targets[pos], attack)
      level = np.searchsorted(np.asarray(caps), active, side="left")
    redo, fresh = (run_level(pos[level == 0], shape, caps[0]) if np.any(level == 0)
                   else (pos[:0], False))
    for lv in range(1, len(caps)):
      pending.setdefault(lv, []).extend(pos[level == lv].tolist())
    if len(redo):
      pending.setdefault(1, []).extend(redo.tolist())
    started = int(np.sum(level > 0))
    fallbacks, n_direct = fallbacks + len(redo), n_direct + started
    seen = runner.rerun_counts.setdefault(template, [0, 0])
    seen[0] += started + len(redo)  # targets that needed more than the first cap
    seen[1] += len(pos)
    if seen[0] >= runner.uncapped_after and 2 * seen[0] > seen[1]:
      runner.uncapped.add(template)
      caps = (n_a,)  # later programs: all anchors
    report(f"program {i + 1}/{len(groups)} ({len(members)} bucket"
           f"{'s' if len(members) > 1 else ''}, {shape.items} items x {shape.users} users)",
           len(pos), t0, fresh, started, len(redo))
  # Targets that need a larger cap (few): one program per cap for all of them, at the
  # largest shape among theirs.
  ladder = runner.cap_ladder(n_a)
  for lv in range(1, len(ladder)):
    pos = np.array(sorted(pending.get(lv, [])), np.int64)
    if not len(pos):
      continue
    t0 = time.perf_counter()
    shape = graph_local.merged_shape(hoods.shapes[int(b)] for b in np.unique(buckets[pos]))
    redo, fresh = run_level(pos, shape, ladder[lv])
    if len(redo):
      pending.setdefault(lv + 1, []).extend(redo.tolist())
    fallbacks += len(redo)
    report(f"cap {ladder[lv]} ({shape.items} items x {shape.users} users)", len(pos), t0,
           fresh, 0, len(redo))
  inverse = np.argsort(np.concatenate([p for p, _ in pieces]))
  result = jax.tree.map(lambda *xs: np.concatenate(xs)[inverse], *(o for _, o in pieces))
  return result, fallbacks, n_direct
