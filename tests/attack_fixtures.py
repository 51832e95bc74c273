"""Hand-made score models for the attack tests (no dependency on the real models).

score(u, i) = <U_u, E_i + Σ_m f(x_i^m) W_m>, with f = identity (linear model: the
best L∞ step is known in closed form) or tanh (smooth non-linear: second-order terms
are non-zero).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.recsys.attacks.surface import AttackSurface, identity_lift


def make_surface(key, *, n_users=12, n_items=30, dims=(("a", 5), ("b", 5)), width=4,
                 nonlinear=False, is_graph=False, params=None, table=None):
  modalities = tuple(m for m, _ in dims)
  keys = jax.random.split(key, 3 + 2 * len(dims))
  if params is None:
    params = {
        "U": jax.random.normal(keys[0], (n_users, width)),
        "E": jax.random.normal(keys[1], (n_items, width)),
        "W": {m: jax.random.normal(keys[3 + i], (d, width)) / np.sqrt(d)
              for i, (m, d) in enumerate(dims)},
    }
  if table is None:
    table = {m: jax.random.normal(keys[3 + len(dims) + i], (n_items, d))
             for i, (m, d) in enumerate(dims)}
  f = jnp.tanh if nonlinear else (lambda x: x)

  def item_vectors_fn(p, rows, ids):
    v = jnp.take(p["E"], ids, axis=0)
    for m in modalities:
      v = v + f(rows[m]) @ p["W"][m]
    return v

  def encode_fn(p, tbl):
    n = next(iter(tbl.values())).shape[0]
    return p["U"], item_vectors_fn(p, tbl, jnp.arange(n))

  return AttackSurface(modalities, is_graph, "projected", params, table, table,
                       identity_lift, item_vectors_fn, encode_fn)


def brute_force_scores(surface, target, delta):
  """(n_users, n_items) scores with the target's rows perturbed, full forward."""
  table = {m: surface.projected_table[m].at[target].add(delta.get(m, 0.0))
           for m in surface.modalities}
  users, items = surface.encode_fn(surface.params, table)
  return users @ items.T


def make_raw_surface(key, *, raw_dims=(("a", 7), ("b", 3)), p=5, **kw):
  """A raw-feature attack surface: x̂^m = tanh(x^m A_m), widths differ per modality."""
  base = make_surface(key, dims=tuple((m, p) for m, _ in raw_dims), **kw)
  keys = jax.random.split(jax.random.fold_in(key, 1), 2 * len(raw_dims))
  lift_mats = {m: jax.random.normal(keys[i], (d, p)) / np.sqrt(d)
               for i, (m, d) in enumerate(raw_dims)}
  n_items = next(iter(base.attack_table.values())).shape[0]
  raw = {m: jax.random.normal(keys[len(raw_dims) + i], (n_items, d))
         for i, (m, d) in enumerate(raw_dims)}
  params = dict(base.params, A=lift_mats)

  def lift_fn(prm, rows):
    return {m: jnp.tanh(rows[m] @ prm["A"][m]) for m in rows}

  projected = lift_fn(params, raw)
  return AttackSurface(base.modalities, base.is_graph, "raw", params, raw, projected, lift_fn,
                       base.item_vectors_fn, base.encode_fn)

