"""Full-ranking metrics (METHODS.md A.3) against hand-computed cases and brute force."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uatmc_jax.core.parallel.mesh import make_mesh
from uatmc_jax.recsys import metrics as rm
from uatmc_jax.recsys.data.interactions import InteractionData

L2, L3, L6 = math.log2(2), math.log2(3), math.log2(6)


def hand_data():
  # 3 users, 6 items. Every user ranks items 0 > 1 > 2 > 3 > 4 > 5 (score = -id).
  train = np.array([[0, 0], [1, 5], [2, 1]], np.int32)
  valid = np.array([[0, 1], [0, 3], [1, 4]], np.int32)       # user 2 has no valid item
  test = np.array([[0, 4], [2, 2]], np.int32)                 # user 1 has no test item
  feats = {"x": np.zeros((6, 1), np.float32)}
  return InteractionData("hand", 3, 6, train, valid, test, feats)


def tables():
  return jnp.ones((3, 1)), -jnp.arange(6, dtype=jnp.float32)[:, None]


def test_valid_split_hand_computed():
  ev = rm.RankingEvaluator(hand_data(), "valid", ks=(1, 2, 3, 5))
  assert ev.n_users == 2  # user 2 has no held-out item and is not averaged
  got = ev.evaluate(*tables())
  # user 0: train {0} masked, ranked [1,2,3,4,5], relevant {1,3}: hits 1,0,1,0,0 (T=2)
  # user 1: train {5} masked, ranked [0,1,2,3,4], relevant {4}: hit at rank 5 (T=1 < K)
  idcg2 = 1 + 1 / L3
  u0 = {"recall@1": .5, "precision@1": 1, "hr@1": 1, "ndcg@1": 1, "map@1": 1,
        "recall@2": .5, "precision@2": .5, "hr@2": 1, "ndcg@2": 1 / idcg2, "map@2": .5,
        "recall@3": 1, "precision@3": 2 / 3, "hr@3": 1, "ndcg@3": (1 + .5) / idcg2,
        "map@3": (1 + 2 / 3) / 2,
        "recall@5": 1, "precision@5": 2 / 5, "hr@5": 1, "ndcg@5": (1 + .5) / idcg2,
        "map@5": (1 + 2 / 3) / 2}
  u1 = {k: 0.0 for k in u0}
  u1.update({"recall@5": 1, "precision@5": 1 / 5, "hr@5": 1, "ndcg@5": 1 / L6, "map@5": 1 / 5})
  for k in u0:
    np.testing.assert_allclose(got[k], (u0[k] + u1[k]) / 2, rtol=1e-6, err_msg=k)


def test_test_split_masks_valid_items_too():
  got = rm.RankingEvaluator(hand_data(), "test", ks=(1, 2)).evaluate(*tables())
  # user 0: {0} train and {1,3} valid masked -> ranked [2,4,5]: test item 4 at rank 2.
  # user 2: {1} train masked -> ranked [0,2,...]: test item 2 at rank 2.
  np.testing.assert_allclose(got["recall@1"], 0.0)
  np.testing.assert_allclose(got["recall@2"], 1.0)
  np.testing.assert_allclose(got["ndcg@2"], 1 / L3, rtol=1e-6)
  np.testing.assert_allclose(got["map@2"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(got["precision@2"], 0.5, rtol=1e-6)


def brute_force(hits, n_rel, k):
  out = {}
  h = hits[:k]
  t = n_rel
  out["recall"] = h.sum() / t
  out["precision"] = h.sum() / k
  out["hr"] = float(h.sum() > 0)
  dcg = sum(h[i] / math.log2(i + 2) for i in range(k))
  idcg = sum(1 / math.log2(i + 2) for i in range(min(t, k)))
  out["ndcg"] = dcg / idcg
  out["map"] = sum(h[:i + 1].sum() / (i + 1) * h[i] for i in range(k)) / min(t, k)
  return out


def test_metrics_from_hits_vs_brute_force():
  rng = np.random.default_rng(0)
  hits = (rng.random((20, 10)) < 0.3).astype(np.float32)
  n_rel = np.maximum(hits.sum(1).astype(int) + rng.integers(0, 3, 20), 1)
  got = rm.metrics_from_hits(jnp.asarray(hits), jnp.asarray(n_rel), ks=(1, 4, 10))
  for u in range(20):
    for k in (1, 4, 10):
      for name, val in brute_force(hits[u], int(n_rel[u]), k).items():
        np.testing.assert_allclose(got[f"{name}@{k}"][u], val, rtol=1e-5, atol=1e-7)


def test_k_larger_than_catalogue_and_sharded_equals_unsharded():
  data = hand_data()
  plain = rm.RankingEvaluator(data, "valid", ks=(5, 10), batch_size=1).evaluate(*tables())
  sharded = rm.RankingEvaluator(data, "valid", ks=(5, 10), batch_size=1,
                                mesh=make_mesh()).evaluate(*tables())
  for k in plain:
    np.testing.assert_allclose(sharded[k], plain[k], rtol=1e-6, err_msg=k)
  # Only 5 unmasked items exist: @10 has the same hits as @5.
  np.testing.assert_allclose(plain["recall@10"], plain["recall@5"])
  np.testing.assert_allclose(plain["precision@10"], plain["precision@5"] / 2)


def test_most_popular_baseline():
  rng = np.random.default_rng(1)
  n_users, n_items = 30, 8
  # Popularity decreasing in item id: item j is in train of users u < 20 - 2j.
  train = np.array([[u, j] for j in range(n_items) for u in range(max(20 - 2 * j, 0))
                    if not (u == 29)], np.int32)
  # Users 20..29 have empty train; their test item is item 0 (most popular) or 7.
  test = np.array([[u, 0 if u % 2 == 0 else 7] for u in range(20, 30)], np.int32)
  valid = np.array([[20, 1]], np.int32)
  data = InteractionData("pop", n_users, n_items, train, valid, test,
                         {"x": rng.standard_normal((n_items, 2)).astype(np.float32)})
  got = rm.most_popular_metrics(data, "test", ks=(1,))
  # Even users hit item 0 at rank 1 (user 20 still ranks 0 first: only item 1 masked).
  np.testing.assert_allclose(got["recall@1"], 0.5)


def skewed_data(n_users=300, n_items=400, seed=0):
  """Random interactions with a few heavy users (long excluded lists), like TikTok."""
  rng = np.random.default_rng(seed)
  lengths = np.where(rng.random(n_users) < 0.03, rng.integers(150, 300, n_users),
                     rng.integers(3, 12, n_users))
  users = np.repeat(np.arange(n_users), lengths)
  items = rng.integers(0, n_items, users.size)
  pairs = np.unique(np.stack([users, items], 1), axis=0).astype(np.int32)
  label = rng.choice(3, size=len(pairs), p=[0.8, 0.1, 0.1])
  return InteractionData("skewed", n_users, n_items, pairs[label == 0], pairs[label == 1],
                         pairs[label == 2], {})


@pytest.mark.parametrize("split", ["valid", "test"])
def test_bucketed_evaluation_equals_one_width_padding(split):
  data = skewed_data()
  rng = np.random.default_rng(1)
  users = jnp.asarray(rng.standard_normal((data.n_users, 8)), jnp.float32)
  items = jnp.asarray(rng.standard_normal((data.n_items, 8)), jnp.float32)
  ks = (5, 20, 50)
  old = rm.RankingEvaluator(data, split, ks, batch_size=64, bucket=False)
  new = rm.RankingEvaluator(data, split, ks, batch_size=64)
  sharded = rm.RankingEvaluator(data, split, ks, batch_size=64, mesh=make_mesh())
  a, b, c = old.evaluate(users, items), new.evaluate(users, items), sharded.evaluate(users, items)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(c[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
  # the heavy users no longer set every batch's width
  assert new.padding_ratio < old.padding_ratio / 2, (new.padding_ratio, old.padding_ratio)
  widths = {b["excluded"].shape[1] for b in new._batches}
  assert len(widths) > 1 and all(w & (w - 1) == 0 or w == old._batches[0]["excluded"].shape[1]
                                 for w in widths)
