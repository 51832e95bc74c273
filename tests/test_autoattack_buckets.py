"""AutoAttack's bucketed batches: the last points of a stage run at a small shape, and
a point's outcome does not depend on the batch, bucket or row it runs in
(METHODS.md B.5; uatmc_jax/longtail/attacks/autoattack.py)."""
import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.longtail.attacks import apgd
from uatmc_jax.longtail.attacks import autoattack
from uatmc_jax.longtail.attacks import batching
from uatmc_jax.longtail.attacks import square

from image_attack_fixtures import assert_same_outcome, tiny_mlp


def test_bucket_sizes_halve_down_to_the_minimum():
  assert batching.bucket_sizes(128, 16) == (16, 32, 64, 128)
  assert batching.bucket_sizes(128, 17) == (32, 64, 128)
  assert batching.bucket_sizes(128, 128) == (128,)
  assert batching.bucket_sizes(8, 16) == (8,)          # a batch below the minimum
  assert batching.bucket_sizes(96, 1) == (3, 6, 12, 24, 48, 96)  # stops at an odd size
  assert batching.bucket_sizes(128, 1, multiple=8) == (8, 16, 32, 64, 128)  # mesh of 8


def test_queue_with_buckets_matches_brute_force_and_runs_few_rows():
  """Point p is fooled at its run fool_at[p]. With buckets the outcome is still that
  of running each point's runs one by one; a batch the queue cannot fill takes the
  smallest bucket that holds its pending pairs, and the rows run drop well below the
  full-batch padding's."""
  rng = np.random.default_rng(1)
  buckets, batch = (4, 8, 16, 32), 32
  for n_runs, n in ((1, 37), (4, 45), (9, 3)):
    fool_at = rng.integers(0, n_runs + 2, n)
    images = np.arange(n, dtype=np.float32)[:, None] * 10.
    labels = np.arange(n, dtype=np.int32)
    points = np.flatnonzero(rng.uniform(size=n) < 0.9)
    results = {}
    for name, bk in (("full", None), ("bucketed", buckets)):
      calls = []

      def fn(x, y, run, ids, batch_index):
        np.testing.assert_array_equal(ids, y)          # ids index the images
        calls.append((len(x), len(set(zip(y.tolist(), run.tolist())))))
        return x + run[:, None] + 0.5, run < fool_at[y]

      rows = []
      still, adv = batching.run_until_fooled(fn, images, labels, points, n_runs, batch,
                                             buckets=bk, with_ids=True,
                                             on_batch=lambda r, real: rows.append((r, real)))
      assert [r for r, _ in rows] == [c[0] for c in calls]
      assert [real for _, real in rows] == [c[1] for c in calls]
      np.testing.assert_array_equal(still, fool_at[points] >= n_runs)
      first_or_last = np.minimum(fool_at[points], n_runs - 1)
      np.testing.assert_allclose(adv[:, 0], images[points, 0] + first_or_last + 0.5)
      results[name] = calls
    assert all(size in buckets for size, _ in results["bucketed"])
    for size, real in results["bucketed"]:
      # the smallest bucket holding the batch's pairs (run-ahead fills only its rows)
      assert size == batch or real == size or size == buckets[0] or real > size // 2
    full_rows = sum(size for size, _ in results["full"])
    bucket_rows = sum(size for size, _ in results["bucketed"])
    assert bucket_rows < full_rows, (n_runs, bucket_rows, full_rows)


def _mlp(seed=1, n=24):
  return tiny_mlp(seed, n)


def test_autoattack_outcome_per_point_does_not_depend_on_batching():
  """Standard AutoAttack with batch 16 as one padded shape (the full-batch path),
  batch 16 in buckets of 2-16 rows, and batch 4: the same robust set, the same fooling
  stage per point and the same adversarial examples, because every random draw (APGD
  start, Square stripes / windows / signs) comes from (seed, stage, point, target).
  With keys drawn per batch (batch index and row position), batch 4 and batch 16 start
  APGD at other random points and the examples differ."""
  logits_fn, x, y = _mlp()
  eps = 0.02
  runs = {}
  for name, batch, min_rows in (("full", 16, 16), ("buckets", 16, 2), ("batch4", 4, 4)):
    aa = autoattack.AutoAttack(logits_fn, autoattack.AutoAttackConfig(
        epsilon=eps, batch_size=batch, min_bucket_rows=min_rows, square_queries=200,
        apgd_iterations=20, fab_iterations=20, seed=3))
    runs[name] = aa.run(x, y)
    if name == "full":
      assert aa.trace_counts == {"apgd-ce": 1, "apgd-t": 1, "fab-t": 1, "square": 1}
    if name == "buckets":
      assert aa.buckets == (2, 4, 8, 16)
      assert all(1 <= c <= 4 for c in aa.trace_counts.values()), aa.trace_counts
      # the later stages ran at least one batch below the full shape
      st = runs[name].stage_stats
      assert any(s["rows"] < 16 * s["batches"] for s in st.values()), st
  ref = runs["full"]
  # a non-trivial case: clean errors, points fooled by APGD, and robust points
  assert set(ref.fooled_by) >= {"clean", "apgd-ce", ""}, ref.fooled_by
  for name in ("buckets", "batch4"):
    assert_same_outcome(runs[name], ref, name)
    assert runs[name].robust_after == ref.robust_after
  # fooled_by agrees with the stage counts
  order = ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
  n = len(y)
  left = [n - int(np.isin(ref.fooled_by, order[:i + 1]).sum()) for i in range(len(order))]
  assert left == [ref.robust_after[s] for s in order]
  assert ref.stage_stats["apgd-ce"]["points_in"] == ref.robust_after["clean"]
  assert ref.stage_stats["square"]["points_out"] == ref.robust_after["square"]


def test_per_row_keys_make_rows_independent_of_the_batch():
  """apgd_attack / square_attack with one key per row: a row's result equals that of
  the row run alone with its key (a batch of one; no early stop, which is decided by
  the whole batch)."""
  logits_fn, x, y = _mlp(n=6)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(6))
  full_apgd = apgd.apgd_attack(logits_fn, x, y, epsilon=0.02, key=keys, num_iterations=10,
                               early_stop=False)
  full_sq = square.square_attack(logits_fn, jnp.asarray(x), jnp.asarray(y), epsilon=0.02,
                                 key=keys, num_queries=30, early_stop=False)
  for i in (0, 4):
    one = apgd.apgd_attack(logits_fn, x[i:i + 1], y[i:i + 1], epsilon=0.02,
                           key=keys[i:i + 1], num_iterations=10, early_stop=False)
    np.testing.assert_array_equal(one.x_best[0], full_apgd.x_best[i])
    np.testing.assert_array_equal(one.x_adv[0], full_apgd.x_adv[i])
    sq = square.square_attack(logits_fn, jnp.asarray(x[i:i + 1]), jnp.asarray(y[i:i + 1]),
                              epsilon=0.02, key=keys[i:i + 1], num_queries=30,
                              early_stop=False)
    np.testing.assert_array_equal(sq.x_adv[0], full_sq.x_adv[i])
    np.testing.assert_array_equal(sq.queries[0], full_sq.queries[i])
