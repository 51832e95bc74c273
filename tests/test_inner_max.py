"""Inner-maximisation strength of UAT-MC with and without alignment (recsys/inner_max.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys import inner_max
from uatmc_jax.recsys.data.interactions import InteractionData
from uatmc_jax.recsys.defences import batch_slots as bs
from uatmc_jax.recsys.defences import uat_mc
from uatmc_jax.recsys.models.registry import build_recommender

N_USERS, N_ITEMS, P, D = 7, 11, 4, 3


class LinearToy(nnx.Module):
  """score(u, i) = <U_u, E_i + Σ_m x̂_i^m W_m>, x̂ = the raw features (identity projection)."""
  modalities = ("a", "b")
  is_graph = False
  shared_projected_space = True
  n_users, n_items = N_USERS, N_ITEMS

  def __init__(self, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    self.U = nnx.Param(jax.random.normal(k[0], (N_USERS, D)))
    self.E = nnx.Param(jax.random.normal(k[1], (N_ITEMS, D)))
    self.Wa = nnx.Param(jax.random.normal(k[2], (P, D)) / 2)
    self.Wb = nnx.Param(jax.random.normal(k[3], (P, D)) / 2)

  def project(self, features):
    return dict(features)

  def user_vectors(self):
    return self.U[...]

  def item_vectors(self, projected, item_ids):
    return (jnp.take(self.E[...], item_ids, axis=0) + projected["a"] @ self.Wa[...]
            + projected["b"] @ self.Wb[...])


def toy_features(seed=1):
  k = jax.random.split(jax.random.key(seed), 2)
  return {"a": jax.random.normal(k[0], (N_ITEMS, P)), "b": jax.random.normal(k[1], (N_ITEMS, P))}


def toy_batches(n=3, b=5, seed=2):
  rng = np.random.default_rng(seed)
  return {"users": jnp.asarray(rng.integers(0, N_USERS, (n, b)), jnp.int32),
          "pos": jnp.asarray(rng.integers(0, N_ITEMS, (n, b)), jnp.int32),
          "neg": jnp.asarray(rng.integers(0, N_ITEMS, (n, b)), jnp.int32),
          "mask": jnp.ones((n, b), jnp.float32)}


def one(batches, i):
  return {k: v[i] for k, v in batches.items()}


def hand_one_step(model, feats, batch, eps):
  """Closed-form BPR gradient of the linear toy, the unaligned one-step δ and its BPR."""
  U, E = np.asarray(model.U[...], np.float64), np.asarray(model.E[...], np.float64)
  W = {"a": np.asarray(model.Wa[...], np.float64), "b": np.asarray(model.Wb[...], np.float64)}
  x = {m: np.asarray(f, np.float64) for m, f in feats.items()}
  u, p, n = (np.asarray(batch[k]) for k in ("users", "pos", "neg"))
  b = u.size

  def bpr(xx):
    v = E + xx["a"] @ W["a"] + xx["b"] @ W["b"]
    z = np.sum(U[u] * (v[p] - v[n]), -1)
    return -np.mean(np.log(1e-10 + 1 / (1 + np.exp(-z)))), z

  clean, z = bpr(x)
  dv = np.zeros_like(E)  # dL/dv_i, summed over the item's occurrences
  coef = -(1 - 1 / (1 + np.exp(-z)))[:, None] * U[u] / b
  np.add.at(dv, p, coef)
  np.add.at(dv, n, -coef)
  delta, first_order = {}, 0.0
  for m in x:
    g = dv @ W[m].T  # (N_ITEMS, P); zero rows for items outside the batch
    gn = np.linalg.norm(g, axis=1, keepdims=True)
    budget = eps * np.linalg.norm(x[m], axis=1, keepdims=True)
    delta[m] = np.where(gn > 0, budget * g / np.where(gn > 0, gn, 1), 0.0)
    first_order += float(np.sum(budget * gn))
  adv, _ = bpr({m: x[m] + delta[m] for m in x})
  return clean, adv, first_order


def test_one_step_matches_hand_computed_bpr_and_first_order():
  model, feats, batches = LinearToy(), toy_features(), toy_batches()
  eps = 1e-3
  out = inner_max.inner_max_over_batches(model, feats, batches, epsilon=eps, align_weight=0.5,
                                         pgd_steps=(2,))
  for i in range(3):
    clean, adv, first = hand_one_step(model, feats, one(batches, i), eps)
    np.testing.assert_allclose(out["clean"][i], clean, rtol=1e-5)
    np.testing.assert_allclose(out["adv/one_step/no_align"][i], adv, rtol=1e-5)
    inc = float(out["adv/one_step/no_align"][i] - out["clean"][i])
    # first-order value ε Σ ||x̂_i^m|| ||g_i^m||; the remainder is O(ε²)
    np.testing.assert_allclose(inc, first, rtol=2e-2)
    assert first > 0


def test_align_weight_zero_variants_coincide_exactly():
  model, feats, batches = LinearToy(), toy_features(), toy_batches()
  out = inner_max.inner_max_over_batches(model, feats, batches, epsilon=0.1, align_weight=0.0,
                                         pgd_steps=(3,))
  for method in ("one_step", "pgd3"):
    np.testing.assert_array_equal(out[f"adv/{method}/align"], out[f"adv/{method}/no_align"])
    np.testing.assert_array_equal(out[f"delta_cos/{method}/align"],
                                  out[f"delta_cos/{method}/no_align"])
    np.testing.assert_allclose(out[f"agreement/{method}"], 1.0, rtol=1e-5)


def test_alignment_changes_the_step_and_batches_are_shared():
  model, feats, batches = LinearToy(), toy_features(), toy_batches()
  out = inner_max.inner_max_over_batches(model, feats, batches, epsilon=0.1, align_weight=5.0,
                                         pgd_steps=(3,))
  # BPR is curved in x̂ (log-sigmoid), so the cosine reward moves the step ...
  assert np.all(np.asarray(out["agreement/one_step"]) < 1 - 1e-4)
  # ... and the aligned δ is more aligned across modalities than the unaligned one.
  assert np.all(np.asarray(out["delta_cos/one_step/align"])
                > np.asarray(out["delta_cos/one_step/no_align"]))
  # The scanned result equals the per-batch function on each batch (same batches, budgets).
  for i in range(3):
    single = inner_max.inner_max_batch(model, feats, one(batches, i), epsilon=0.1,
                                       align_weight=5.0, pgd_steps=(3,))
    for key, v in single.items():
      np.testing.assert_allclose(out[key][i], v, rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_one_pgd_step_of_full_size_is_the_defence_step(lam):
  model, feats, batches = LinearToy(), toy_features(), toy_batches()
  batch = one(batches, 0)
  slots = bs.slots_for(model, batch)
  projected = model.project(bs.slot_features(model, feats, slots))

  def adv_loss(perturbed):
    return bs.slot_bpr(*bs.slot_vectors(model, perturbed, slots), slots)

  rows = slots.item_in_batch.astype(jnp.float32)
  ref = uat_mc.uat_mc_perturbation(adv_loss, projected, slots.item_in_batch, epsilon=0.2,
                                   align_weight=lam)
  got = inner_max.pgd_perturbation(
      lambda d: adv_loss({m: projected[m] + d[m] * rows[:, None] for m in projected}),
      projected, rows, epsilon=0.2, align_weight=lam, steps=1, step_scale=1.0)
  for m in projected:
    np.testing.assert_allclose(got[m], ref[m], rtol=1e-5, atol=1e-7)


def test_pgd_stays_in_budget_and_only_moves_batch_rows():
  model, feats, batches = LinearToy(), toy_features(), toy_batches()
  batch = one(batches, 1)
  slots = bs.slots_for(model, batch)
  projected = model.project(bs.slot_features(model, feats, slots))
  rows = slots.item_in_batch.astype(jnp.float32)

  def loss(d):
    return bs.slot_bpr(*bs.slot_vectors(
        model, {m: projected[m] + d[m] * rows[:, None] for m in projected}, slots), slots)

  delta = inner_max.pgd_perturbation(loss, projected, rows, epsilon=0.3, align_weight=2.0,
                                     steps=10, step_scale=2.5)
  for m in projected:
    norm = np.linalg.norm(np.asarray(delta[m]), axis=1)
    budget = 0.3 * np.linalg.norm(np.asarray(projected[m]), axis=1)
    assert np.all(norm <= budget * (1 + 1e-5))
    assert np.all(norm[~np.asarray(slots.item_in_batch)] == 0)
    assert np.any(norm > 0.5 * budget)


def test_real_vbpr_mlp_runs_and_summarizes():
  rng = np.random.default_rng(0)
  pairs = np.unique(np.stack([rng.integers(0, 8, 60), rng.integers(0, 12, 60)], 1),
                    axis=0).astype(np.int32)
  feats = {"audio": rng.standard_normal((12, 6)).astype(np.float32),
           "image": rng.standard_normal((12, 10)).astype(np.float32)}
  data = InteractionData("tiny", 8, 12, pairs[:-6], pairs[-6:-3], pairs[-3:], feats)
  model = build_recommender("vbpr_mlp", data, {"embedding_dim": 8}, nnx.Rngs(0))
  batches = {"users": jnp.asarray(rng.integers(0, 8, (4, 6)), jnp.int32),
             "pos": jnp.asarray(rng.integers(0, 12, (4, 6)), jnp.int32),
             "neg": jnp.asarray(rng.integers(0, 12, (4, 6)), jnp.int32),
             "mask": jnp.asarray(np.r_[np.ones(5), 0.0][None].repeat(4, 0), jnp.float32)}
  out = inner_max.inner_max_over_batches(model, {m: jnp.asarray(f) for m, f in feats.items()},
                                         batches, epsilon=0.1, align_weight=1.0,
                                         pgd_steps=(2,))
  table = inner_max.summarize(jax.device_get(out))
  assert table["n_batches"] == 4 and set(table["methods"]) == {"one_step", "pgd2"}
  row = table["methods"]["one_step"]
  d = np.asarray(out["adv/one_step/align"]) - np.asarray(out["adv/one_step/no_align"])
  np.testing.assert_allclose(row["align_minus_no_align"]["mean"], d.mean(), rtol=1e-6)
  assert row["align_minus_no_align"]["lo"] <= d.mean() <= row["align_minus_no_align"]["hi"]
  assert "| one_step |" in inner_max.markdown_table(table)
  with pytest.raises(ConfigError):
    inner_max.inner_max_over_batches(model, feats, batches, epsilon=0.0, align_weight=1.0)


def test_paired_interval_closed_form():
  r = inner_max.paired_interval(np.array([1.0, 2.0, 3.0, 6.0]))
  sd = np.std([1, 2, 3, 6], ddof=1)
  assert r["mean"] == 3.0
  np.testing.assert_allclose(r["hi"] - r["mean"], 1.96 * sd / 2.0)
