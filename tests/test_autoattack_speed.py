"""AutoAttack's cheaper programs and Square's exact-size last batch give the same
per-point results (METHODS.md B.5; docs/results/performance.md, "AutoAttack").

  * Square's last batch runs at its pending count, not padded to a bucket.
  * Random draws are made 1-D and reshaped (the same values, cheaper to compile).
  * Square draws all its random words before its loop, none inside it.
"""
import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.longtail.attacks import apgd
from uatmc_jax.longtail.attacks import autoattack
from uatmc_jax.longtail.attacks import batching
from uatmc_jax.longtail.attacks import linf
from uatmc_jax.longtail.attacks import square

from image_attack_fixtures import assert_same_outcome, tiny_mlp


def _mlp(seed=1, n=24):
  return tiny_mlp(seed, n)


def test_one_run_stages_last_batch_runs_at_its_exact_size_with_the_same_results():
  """APGD-CE's and Square's pending points (not bucket sizes) run as exactly that many
  rows, one compile each; the bucketed and the single-shape runs pad them. Robust set,
  fooling stage and adversarial examples are identical in all three (per-point keys)."""
  logits_fn, x, y = _mlp()
  x, y = x[:21], y[:21]                 # 7 points reach Square
  runs, traces = {}, {}
  for name, min_rows, exact in (("exact", 2, True), ("bucket", 2, False),
                                ("full", 16, True)):
    aa = autoattack.AutoAttack(logits_fn, autoattack.AutoAttackConfig(
        epsilon=0.02, batch_size=16, min_bucket_rows=min_rows, exact_last_batch=exact,
        square_queries=200, apgd_iterations=20, fab_iterations=20, seed=3))
    runs[name] = aa.run(x, y)
    traces[name] = dict(aa.trace_counts)
  sq = {name: r.stage_stats["square"] for name, r in runs.items()}
  pending = sq["exact"]["points_in"]
  # a case where the exact size is not a bucket: 3, 5, 6, 7, 9 ... rows
  assert 2 < pending < 16 and pending not in batching.bucket_sizes(16, 2), pending
  assert sq["exact"]["rows"] == sq["exact"]["pair_rows"] == pending
  assert sq["bucket"]["rows"] == min(b for b in (2, 4, 8, 16) if b >= pending)
  assert sq["full"]["rows"] == 16                 # the single-shape mode keeps one shape
  assert traces["exact"]["square"] == traces["full"]["square"] == 1
  # APGD-CE: 18 clean-correct points = one full batch of 16 and a last batch of 2
  ce = {name: r.stage_stats["apgd-ce"] for name, r in runs.items()}
  assert ce["exact"]["points_in"] == 18
  assert ce["exact"]["rows"] == ce["exact"]["pair_rows"] == 18
  assert ce["full"]["rows"] == 32
  assert traces["exact"]["apgd-ce"] == 2     # the full batch and the exact last batch
  ref = runs["full"]
  assert set(ref.fooled_by) >= {"clean", "apgd-ce", ""}, ref.fooled_by
  for name in ("exact", "bucket"):
    assert_same_outcome(runs[name], ref, name)


def test_queue_exact_multiple_pads_only_to_the_multiple():
  """run_until_fooled(exact_multiple=m): a batch the queue cannot fill runs at its
  pending count rounded up to m (not a bucket); full batches keep batch_size."""
  images = np.arange(21, dtype=np.float32)[:, None]
  labels = np.arange(21, dtype=np.int32)
  for multiple, expected in ((1, [8, 8, 5]), (2, [8, 8, 6]), (4, [8, 8, 8])):
    rows = []
    still, adv = batching.run_until_fooled(
        lambda x, y, run, b: (x + 1., y % 2 == 0), images, labels, np.arange(21), 1, 8,
        buckets=(2, 4, 8), exact_multiple=multiple,
        on_batch=lambda r, real: rows.append(r))
    assert rows == expected, (multiple, rows)
    np.testing.assert_array_equal(still, labels % 2 == 0)
    np.testing.assert_array_equal(adv[:, 0], images[:, 0] + 1.)


def _random_eqns(jaxpr, in_loop=False, out=None):
  """(primitive name, output shape, inside a while loop) of every random primitive."""
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ("random_bits", "threefry2x32", "random_split", "random_fold_in"):
      out.append((name, tuple(eqn.outvars[0].aval.shape), in_loop))
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else (value,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _random_eqns(inner, in_loop or name == "while", out)
  return out


def test_square_draws_every_random_word_before_its_loop():
  """One random draw per example, outside the while loop (the loop only indexes it):
  the structure that compiles ~1 s faster on XLA:CPU than ~10 draws per query."""
  logits_fn, x, y = _mlp(n=5)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(5))
  for key in (keys, jax.random.PRNGKey(1)):
    jaxpr = jax.make_jaxpr(lambda x, y, k: square.square_attack(
        logits_fn, x, y, epsilon=0.02, key=k, num_queries=30).x_adv)(
            jnp.asarray(x), jnp.asarray(y), key)
    draws = _random_eqns(jaxpr.jaxpr)
    assert draws, "no random draw found"
    assert not any(in_loop for _, _, in_loop in draws), draws
    assert len({shape for name, shape, _ in draws if name == "random_bits"}) == 1, draws


def test_window_from_words_is_uniform_over_every_corner_and_sign():
  """Corners cover 0 … H − side (the last row/column included) uniformly; each
  channel's sign is its own bit."""
  rng = np.random.default_rng(0)
  n, height, width, channels = 40000, 7, 5, 3
  words = jnp.asarray(rng.integers(0, 2 ** 32, size=(n, 3), dtype=np.uint64).astype(np.uint32))
  for side in (1, 3, 4):
    top, left, signs = square.window_from_words(words, side, height, width, channels)
    assert top.shape == left.shape == (n, 1, 1, 1) and signs.shape == (n, 1, 1, channels)
    for corner, size in ((np.asarray(top).ravel(), height), (np.asarray(left).ravel(), width)):
      counts = np.bincount(corner, minlength=size - side + 1)
      assert len(counts) == size - side + 1            # never beyond H − side
      expected = n / (size - side + 1)
      assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), (side, counts)
    s = np.asarray(signs).reshape(n, channels)
    assert set(np.unique(s)) == {-1., 1.}
    np.testing.assert_array_equal(s[:, 1] > 0, (np.asarray(words[:, 2]) >> 1) & 1)
    assert np.all(np.abs(s.mean(0)) < 0.03)


def test_flat_draws_equal_the_shaped_draws_and_are_one_dimensional():
  """Random starts drawn 1-D and reshaped: bit-identical to drawing the shape (threefry
  numbers a shape's draws in row-major order), and the draw itself is 1-D per row
  (the form that compiles fast)."""
  key = jax.random.PRNGKey(3)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(5))
  x = jnp.zeros((5, 4, 6, 3))
  np.testing.assert_array_equal(
      apgd.per_example_uniform(keys, x.shape, x.dtype, -1., 1.),
      jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -1., 1.))(keys))
  np.testing.assert_array_equal(apgd.per_example_uniform(key, x.shape, x.dtype, -1., 1.),
                                jax.random.uniform(key, x.shape, x.dtype, -1., 1.))
  np.testing.assert_array_equal(
      linf.linf_random_init(key, x + 0.5, 0.1),
      linf.linf_project(x + 0.5 + 0.1 * jax.random.uniform(key, x.shape, x.dtype, -1., 1.),
                        x + 0.5, 0.1))
  np.testing.assert_array_equal(
      linf.linf_gaussian_init(key, x + 0.5, 0.1),
      linf.linf_project(x + 0.5 + linf.GAUSSIAN_START_STD * jax.random.normal(
          key, x.shape, x.dtype), x + 0.5, 0.1))
  for k in (keys, key):
    jaxpr = jax.make_jaxpr(lambda k: apgd.per_example_uniform(k, x.shape, x.dtype, -1., 1.))(k)
    shapes = [shape for name, shape, _ in _random_eqns(jaxpr.jaxpr) if name == "random_bits"]
    assert shapes and all(len(s) <= 2 for s in shapes), shapes


def test_exact_last_batch_on_a_mesh_is_rounded_to_the_device_count():
  """On a 4-device mesh the one-run stages' last batch is padded only to a multiple of
  4 (so it splits over the devices), and the results equal the single-device run."""
  from uatmc_jax.core.parallel import mesh as mesh_lib
  logits_fn, x, y = _mlp()
  x, y = x[:21], y[:21]                 # 18 clean-correct points, 7 reach Square
  config = autoattack.AutoAttackConfig(
      epsilon=0.02, batch_size=16, min_bucket_rows=4, square_queries=100,
      apgd_iterations=10, fab_iterations=10, seed=3)
  plain = autoattack.AutoAttack(logits_fn, config).run(x, y)
  sharded_aa = autoattack.AutoAttack(logits_fn, config, mesh=mesh_lib.make_mesh(4, 1))
  sharded = sharded_aa.run(x, y)
  assert sharded_aa.buckets == (4, 8, 16)
  for name, stats in sharded.stage_stats.items():
    assert stats["rows"] % 4 == 0, (name, stats)
  sq = sharded.stage_stats["square"]
  assert sq["rows"] == -(-sq["points_in"] // 4) * 4 and sq["rows"] < 16
  np.testing.assert_array_equal(sharded.robust, plain.robust)
  np.testing.assert_array_equal(sharded.fooled_by, plain.fooled_by)
  np.testing.assert_allclose(sharded.x_adv, plain.x_adv, rtol=0, atol=1e-6)
  assert sharded_aa.local_rows > 0
