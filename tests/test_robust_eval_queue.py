"""Robust evaluation that skips broken points, packs full batches, compiles once per
attack and reports progress (METHODS.md B.5)."""
import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.longtail.attacks import autoattack
from uatmc_jax.longtail.attacks import batching
from uatmc_jax.longtail.attacks import fab
from uatmc_jax.longtail.evaluation import robust_accuracy


def test_run_until_fooled_matches_a_brute_force_schedule():
  """Point p is fooled at its run fool_at[p] (never if >= n_runs). Whatever the queue
  packs together, the outcome must be that of running each point's runs one by one
  and stopping at the first success; every batch but the last must be full (few
  points: later runs fill the free rows), each (point, run) run at most once."""
  rng = np.random.default_rng(0)
  n_runs, batch = 4, 5
  for n, share in ((23, 0.8), (3, 1.0)):   # many points; fewer points than a batch
    fool_at = rng.integers(0, 6, n)
    images = np.arange(n, dtype=np.float32)[:, None] * 10.
    labels = np.arange(n, dtype=np.int32)
    points = np.flatnonzero(rng.uniform(size=n) < share)   # the still-robust points
    calls = []

    def fn(x, y, run, batch_index):
      assert len(x) == batch                                # one shape: no retrace
      calls.append((batch_index, y.copy(), run.copy()))
      return x + run[:, None] + 0.5, run < fool_at[y]      # adv names its run

    still, adv = batching.run_until_fooled(fn, images, labels, points, n_runs, batch)
    np.testing.assert_array_equal(still, fool_at[points] >= n_runs)
    first_or_last = np.minimum(fool_at[points], n_runs - 1)
    np.testing.assert_allclose(adv[:, 0], images[points, 0] + first_or_last + 0.5)
    seen = {int(p): [] for p in points}
    for b, (batch_index, y, run) in enumerate(calls):
      assert batch_index == b
      pairs = set(zip(y.tolist(), run.tolist()))   # padding repeats row 0
      if b < len(calls) - 1:
        assert len(pairs) == batch, (n, b, pairs)  # full
      for yy, rr in sorted(pairs):
        seen[yy].append(rr)
    for p, need in zip(points, first_or_last):
      runs = sorted(seen[int(p)])
      assert runs == list(range(len(runs))) and len(runs) == len(set(runs))
      assert len(runs) >= need + 1   # ran up to its first success (or all runs)
    needed = int(np.sum(first_or_last + 1))
    assert len(calls) <= -(-needed // batch) + 1


def _mlp(seed=1, n=20, shape=(4, 4, 3), classes=10):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  dim = int(np.prod(shape))
  w1 = jax.random.normal(k1, (dim, 32)) / np.sqrt(dim)
  w2 = jax.random.normal(k2, (32, classes)) / np.sqrt(32)

  def logits_fn(z):
    return 4. * jnp.tanh(8. * (z.reshape(z.shape[0], -1) - 0.5) @ w1) @ w2

  x = np.asarray(jax.random.uniform(k3, (n,) + shape))
  y = np.array(jnp.argmax(logits_fn(x), -1)).astype(np.int32)
  y[:3] = (y[:3] + 1) % classes
  return logits_fn, x, y


def test_progress_lists_every_stage_and_traces_once_per_attack():
  logits_fn, x, y = _mlp()
  config = robust_accuracy.RobustEvalConfig(epsilon=0.02, step_size=0.005, batch_size=8,
                                            pgd_steps=5, cw_steps=5, apgd_iterations=10,
                                            fab_iterations=10, square_queries=30)
  ev = robust_accuracy.RobustEvaluator(logits_fn, config)
  lines = []
  outs = {a: ev.run(a, x, y, log=lines.append) for a in ("clean", "pgd20", "cw", "autoattack")}
  ev.run("pgd20", x[:11], y[:11])        # another size: 2 batches, the last padded
  # 17 clean-correct points = 3 batches of 8 (the last padded), one trace per attack.
  assert ev.trace_counts == {"clean": 1, "pgd20": 1, "cw": 1}
  assert ev.autoattack.trace_counts == {"apgd-ce": 1, "apgd-t": 1, "fab-t": 1, "square": 1}
  text = "\n".join(lines)
  for stage in ("pgd20", "cw", "autoattack apgd-ce", "autoattack apgd-t",
                "autoattack fab-t", "autoattack square"):
    progress = [l for l in lines if l.startswith(stage + ":") and "ETA" in l]
    assert progress, (stage, text)
    assert "robust" in progress[0] and "/20" in progress[0]
    done = [int(l.split(":")[1].split("/")[0]) for l in progress]
    assert done == sorted(done) and done[0] > 0
  # A summary per AutoAttack stage, robust counts non-increasing, the last = result.
  summary = [l for l in lines if l.startswith("autoattack ") and "(" in l and "ETA" not in l]
  counts = [int(l.split("robust ")[1].split("/")[0]) for l in summary]
  assert len(counts) == 4 and counts == sorted(counts, reverse=True)
  assert counts[-1] >= outs["autoattack"].correct.sum()
  # The attacks ran only on clean-correct points: the others are left at x.
  wrong = ~outs["clean"].correct
  for a in ("pgd20", "cw"):
    np.testing.assert_array_equal(outs[a].x_adv[wrong], x[wrong])
    assert not outs[a].correct[wrong].any()
    assert "attacking the 17/20 clean-correct points" in text


def test_hyperplane_projection_equals_the_sorted_exact_solution_on_images():
  """The bisection + exact-piece solve equals a float64 sort-based solution on
  image-like rows (many pixels at 0 or 1, so zero room is common)."""
  rng = np.random.default_rng(3)
  b_, d = 16, 300
  p = rng.uniform(size=(b_, d))
  p[:, :80] = np.round(p[:, :80])
  w = rng.normal(size=(b_, d))
  off = np.sum(w * p, -1) + rng.normal(size=b_) * rng.choice([1e-3, 0.3, 3., 300.], b_)
  got = np.asarray(fab.linf_hyperplane_projection(
      jnp.asarray(p, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(off, jnp.float32)))
  c = off - np.sum(w * p, -1)
  s = np.sign(c[:, None] * w)
  room = np.where(s > 0, 1. - p, p)
  a = np.where(s != 0, np.abs(w), 0.)
  want = np.zeros_like(p)
  for i in range(b_):   # reference: walk the sorted breakpoints of g(r)
    order = np.argsort(room[i])
    u, ai = room[i][order], a[i][order]
    filled, slope, r = 0., ai.sum(), u[-1]
    prev = 0.
    for k in range(d):
      gain = slope * (u[k] - prev)
      if filled + gain >= abs(c[i]):
        r = prev + (abs(c[i]) - filled) / slope
        break
      filled += gain
      slope -= ai[k]
      prev = u[k]
    want[i] = s[i] * np.minimum(r, room[i])
  feasible = np.sum(a * room, -1) >= np.abs(c)
  assert 0 < feasible.sum() < b_
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_skipping_broken_points_gives_the_robust_set_of_every_stage_on_all_points():
  """Standard AutoAttack with its queue (each stage only on still-robust points) vs
  every stage run on every point for every target, robust = clean ∧ all stages. On a
  linear model both must also equal the closed form (outcomes do not depend on the
  random starts there, so the two schedules' different batches cannot matter)."""
  shape, classes, eps = (4, 4, 3), 10, 0.03
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  dim = int(np.prod(shape))
  w = np.asarray(jax.random.normal(k1, (dim, classes)))
  b = np.asarray(jax.random.normal(k2, (classes,)))
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w + b
  x = np.asarray(jax.random.uniform(k3, (20,) + shape, minval=0.3, maxval=0.7))
  y = np.array(jnp.argmax(logits_fn(x), -1)).astype(np.int32)
  y[:2] = (y[:2] + 1) % classes
  aa = autoattack.AutoAttack(logits_fn, autoattack.AutoAttackConfig(
      epsilon=eps, batch_size=8, fab_iterations=100, square_queries=100))
  lines = []
  res = aa.run(x, y, log=lines.append)
  # Every stage on all 20 points, all 9 targets, no skipping.
  from uatmc_jax.longtail.attacks import apgd, square
  key = jax.random.PRNGKey(7)
  clean = np.asarray(jnp.argmax(logits_fn(x), -1)) == y
  apgd_t = jax.jit(lambda r: apgd.apgd_targeted_attack(logits_fn, x, y, epsilon=eps,
                                                       target_rank=r, key=key).robust)
  fab_t = jax.jit(lambda r: fab.fab_targeted_attack(logits_fn, x, y, target_rank=r).distance)
  every = clean.copy()
  every &= np.asarray(jax.jit(lambda: apgd.apgd_attack(logits_fn, x, y, epsilon=eps,
                                                       key=key).robust)())
  for rank in range(2, 11):
    every &= np.asarray(apgd_t(rank)) & (np.asarray(fab_t(rank)) > eps)
  every &= np.asarray(jax.jit(lambda: square.square_attack(
      logits_fn, x, y, epsilon=eps, key=key, num_queries=100).robust)())
  np.testing.assert_array_equal(res.robust, every)
  # Closed form: the worst logit margin over the box ∩ ball.
  xf = x.reshape(len(x), -1)
  lo, hi = np.maximum(xf - eps, 0.), np.minimum(xf + eps, 1.)
  diff = w[:, y].T[:, :, None] - w[None]
  m = (np.where(diff > 0, lo[:, :, None], hi[:, :, None]) * diff).sum(1) + (b[y][:, None] - b[None])
  m[np.arange(len(y)), y] = np.inf
  np.testing.assert_array_equal(res.robust, clean & (m.min(1) > 0))
  assert 0 < res.robust.sum() < clean.sum()
  # The later stages saw only the survivors: their runs never exceed robust x targets.
  first = [l for l in lines if l.startswith("autoattack apgd-t:") and "ETA" in l][0]
  assert int(first.split("/")[1].split(" ")[0]) == 9 * res.robust_after["apgd-ce"]
