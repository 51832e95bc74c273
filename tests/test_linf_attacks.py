"""L∞ attack pieces, PGD/CW, APGD, FAB-T and Square against closed forms (METHODS.md B.5).

On a linear classifier z = W·vec(x) + b, with the ε-ball inside the box, the worst
margin against class j is m_j − ε·||w_y − w_j||₁ and the minimal L∞ distance to the
boundary with j is m_j / ||w_y − w_j||₁ (m_j = z_y − z_j).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uatmc_jax.longtail.attacks import apgd
from uatmc_jax.longtail.attacks import attack_losses
from uatmc_jax.longtail.attacks import fab
from uatmc_jax.longtail.attacks import linf
from uatmc_jax.longtail.attacks import pgd_attacks
from uatmc_jax.longtail.attacks import square

EPS = 0.03


def make_linear(n_classes=10, batch=32, shape=(4, 4, 3), seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  dim = int(np.prod(shape))
  w = jax.random.normal(k1, (dim, n_classes))
  b = jax.random.normal(k2, (n_classes,))
  # Inputs in [0.3, 0.7]: the ε-balls used below never touch the [0, 1] box.
  x = jax.random.uniform(k3, (batch,) + shape, minval=0.3, maxval=0.7)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w + b
  y = jnp.argmax(logits_fn(x), -1)
  return w, logits_fn, x, y


def closed_form(w, logits_fn, x, y, eps):
  """(worst margin per pair (B, C) with +inf at y, worst margin (B,), min distance (B,))."""
  z = logits_fn(x)
  gap = jnp.take_along_axis(z, y[:, None], 1) - z
  l1 = jnp.abs(w[:, y].T[:, :, None] - w[None]).sum(1)
  is_y = jax.nn.one_hot(y, z.shape[-1], dtype=bool)
  pair = jnp.where(is_y, jnp.inf, gap - eps * l1)
  dist = jnp.where(is_y, jnp.inf, gap / jnp.where(is_y, 1., l1))
  return pair, pair.min(1), dist.min(1)


def margin(logits_fn, x, y):
  return -attack_losses.cw_margin_loss(logits_fn(x), y)


@pytest.fixture(scope="module")
def linear():
  return make_linear()


def test_project_keeps_ball_and_box_and_is_idempotent():
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(8, 3, 3, 2)).astype(np.float32)
  x_far = (x + 0.5 * rng.normal(size=x.shape)).astype(np.float32)
  p = np.asarray(linf.linf_project(x_far, x, 0.1))
  assert np.abs(p - x).max() <= 0.1 + 1e-6
  assert p.min() >= 0. and p.max() <= 1.
  np.testing.assert_allclose(linf.linf_project(p, x, 0.1), p)
  inside = np.asarray(linf.linf_random_init(jax.random.PRNGKey(2), x, 0.1))
  assert np.abs(inside - x).max() <= 0.1 + 1e-6
  np.testing.assert_allclose(linf.linf_project(inside, x, 0.1), inside)
  # Coordinates that moved hit a face of the ball or of the box.
  moved = p != x_far
  on_face = np.isclose(np.abs(p - x), 0.1, atol=1e-6) | np.isclose(p, 0.) | np.isclose(p, 1.)
  assert np.all(on_face[moved])


@pytest.mark.parametrize("start", ["uniform", "gaussian", True, False])
def test_pgd_random_starts_have_their_distributions(start):
  """0 steps returns the start: uniform on [−ε, ε] (Madry) or 0.001·N(0, 1) (TRADES /
  MART official code), checked by a Kolmogorov–Smirnov distance to the exact CDF."""
  eps = 0.03
  x = jnp.full((64, 8, 8, 3), 0.5)  # far from the box
  x_adv = linf.pgd_attack(lambda z: jnp.zeros(z.shape[0]), x, epsilon=eps, step_size=0.01,
                          num_steps=0, key=jax.random.PRNGKey(3), random_start=start)
  d = np.sort(np.asarray(x_adv - x, np.float64).ravel())
  if start is False:
    np.testing.assert_array_equal(d, 0.)
    return
  if start == "gaussian":
    cdf = 0.5 * (1. + np.vectorize(math.erf)(d / (1e-3 * math.sqrt(2.))))
  else:
    cdf = (d + eps) / (2. * eps)
  ecdf = np.arange(1, d.size + 1) / d.size
  assert np.abs(ecdf - cdf).max() < 0.02  # n = 12 288: KS 1% critical value 0.015


def test_pgd_rejects_an_unknown_start():
  with pytest.raises(ValueError, match="random_start must be"):
    linf.pgd_attack(lambda z: jnp.zeros(z.shape[0]), jnp.zeros((1, 2)), epsilon=0.1,
                    step_size=0.1, num_steps=0, key=jax.random.PRNGKey(0),
                    random_start="normal")


def test_losses_match_hand_computed_values():
  z = jnp.array([[3., 1., 2., 0.], [0., 5., 1., 4.]])
  y = jnp.array([2, 1])
  np.testing.assert_allclose(attack_losses.cw_margin_loss(z, y), [1., -1.])
  np.testing.assert_allclose(
      attack_losses.cross_entropy_loss(z, y),
      jax.nn.logsumexp(z, -1) - jnp.array([2., 5.]), rtol=1e-6)
  # DLR: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3).
  np.testing.assert_allclose(attack_losses.dlr_loss(z, y),
                             [-(2. - 3.) / (3. - 1.), -(5. - 4.) / (5. - 1.)], rtol=1e-6)
  # Targeted DLR: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2), targets 0 and 3.
  t = jnp.array([0, 3])
  np.testing.assert_allclose(attack_losses.targeted_dlr_loss(z, y, t),
                             [-(2. - 3.) / (3. - 0.5), -(5. - 4.) / (5. - 0.5)], rtol=1e-6)
  # DLR is invariant to positive scaling and shifting of the logits.
  np.testing.assert_allclose(attack_losses.dlr_loss(3. * z + 7., y),
                             attack_losses.dlr_loss(z, y), rtol=1e-5)


def test_pgd_targeted_margin_reaches_closed_form(linear):
  w, logits_fn, x, y = linear
  pair, _, _ = closed_form(w, logits_fn, x, y, EPS)

  @jax.jit
  def attack(targets):
    loss = lambda xa: attack_losses.targeted_margin_loss(logits_fn(xa), y, targets)
    xa = linf.pgd_attack(loss, x, epsilon=EPS, step_size=EPS / 4, num_steps=10,
                         key=jax.random.PRNGKey(0))
    z = logits_fn(xa)
    return (jnp.take_along_axis(z, y[:, None], 1) - jnp.take_along_axis(z, targets[:, None], 1))[:, 0]

  for j in range(10):
    targets = jnp.full_like(y, j)
    got = attack(targets)
    expected = pair[:, j]
    keep = np.asarray(y != j)
    np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(expected)[keep],
                               rtol=1e-4, atol=1e-4)


def test_cw_fools_exactly_the_non_robust_points(linear):
  w, logits_fn, x, y = linear
  _, worst, _ = closed_form(w, logits_fn, x, y, EPS)
  xa = jax.jit(functools.partial(pgd_attacks.cw_attack, logits_fn, epsilon=EPS))(
      x, y, key=jax.random.PRNGKey(3))
  assert float(jnp.abs(xa - x).max()) <= EPS + 1e-6
  m = margin(logits_fn, xa, y)
  assert np.all(np.asarray(m) >= np.asarray(worst) - 1e-4)  # never beats the optimum
  np.testing.assert_array_equal(np.asarray(m > 0), np.asarray(worst > 0))
  assert 0 < int((worst > 0).sum()) < len(y)  # the test has both kinds of points


def _formula_checkpoints(n):
  p = [0., 0.22]
  while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
  return sorted({int(np.ceil(round(q * n, 6))) for q in p})


def test_apgd_checkpoints_follow_the_formula():
  assert apgd.apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
  for n in (100, 37, 250, 1000):
    assert apgd.apgd_checkpoints(n) == _formula_checkpoints(n), n


def test_apgd_ce_on_two_classes_reaches_closed_form_margin():
  # With 2 classes CE is monotone in the margin, so APGD-CE's best point must be the
  # closed-form worst case; its misclassified points must be exactly the non-robust.
  w, logits_fn, x, y = make_linear(n_classes=2, batch=32, seed=4)
  _, worst, _ = closed_form(w, logits_fn, x, y, EPS)
  res = jax.jit(lambda x, y: apgd.apgd_attack(logits_fn, x, y, epsilon=EPS,
                                              key=jax.random.PRNGKey(0),
                                              early_stop=False))(x, y)
  np.testing.assert_allclose(margin(logits_fn, res.x_best, y), worst, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(res.robust), np.asarray(worst > 0))
  assert float(jnp.abs(res.x_adv - x).max()) <= EPS + 1e-6
  assert 0 < int(res.robust.sum()) < len(y)


def test_apgd_targeted_fools_exactly_the_non_robust_points(linear):
  w, logits_fn, x, y = linear
  _, worst, _ = closed_form(w, logits_fn, x, y, EPS)
  run = jax.jit(lambda rank: apgd.apgd_targeted_attack(
      logits_fn, x, y, epsilon=EPS, target_rank=rank, key=jax.random.PRNGKey(1)))
  robust = np.ones(len(y), bool)
  for rank in range(2, 11):
    res = run(rank)
    robust &= np.asarray(res.robust)
    assert float(jnp.abs(res.x_adv - x).max()) <= EPS + 1e-6
    fooled = ~np.asarray(res.robust)
    assert np.all(np.asarray(jnp.argmax(logits_fn(res.x_adv), -1) != y)[fooled])
  np.testing.assert_array_equal(robust, np.asarray(worst > 0))


def test_hyperplane_projection_is_minimal_and_feasible():
  key = jax.random.PRNGKey(5)
  k1, k2, k3 = jax.random.split(key, 3)
  p = jax.random.uniform(k1, (64, 12))
  w = jax.random.normal(k2, (64, 12))
  b = jnp.sum(w * p, -1) + 3. * jax.random.normal(k3, (64,))
  d = fab.linf_hyperplane_projection(p, w, b)
  q = p + d
  assert float(q.min()) >= -1e-6 and float(q.max()) <= 1. + 1e-6
  # Feasible rows land on the hyperplane; their radius is the smallest r for which the
  # box-clipped corner reaches it (found here by bisection).
  p, w, b, d, q = (np.asarray(a, np.float64) for a in (p, w, b, d, q))
  c = b - np.sum(w * p, -1)
  s = np.sign(c[:, None] * w)
  room = np.where(s > 0, 1. - p, p)
  reach = lambda r: np.sum(np.abs(w) * np.minimum(r[:, None], room), -1)
  f = reach(np.ones(64)) >= np.abs(c)
  lo, hi = np.zeros(64), np.ones(64)
  for _ in range(60):
    mid = (lo + hi) / 2
    ok = reach(mid) >= np.abs(c)
    lo, hi = np.where(ok, lo, mid), np.where(ok, mid, hi)
  assert 10 < f.sum() < 64  # both cases occur
  np.testing.assert_allclose(np.sum(w * q, -1)[f], b[f], atol=1e-4)
  np.testing.assert_allclose(np.abs(d).max(-1)[f], hi[f], atol=1e-5)
  # Infeasible rows go to the farthest box corner in the right direction.
  np.testing.assert_allclose(d[~f], (s * room)[~f], atol=1e-6)


def test_fab_targeted_finds_the_minimal_distance(linear):
  w, logits_fn, x, y = linear
  _, _, dmin = closed_form(w, logits_fn, x, y, EPS)
  run = jax.jit(lambda rank: fab.fab_targeted_attack(logits_fn, x, y, target_rank=rank))
  best = np.full(len(y), np.inf)
  for rank in range(2, 11):
    res = run(rank)
    dist = np.asarray(res.distance)
    found = np.isfinite(dist)
    # Each reported distance is that of a misclassified point.
    assert np.all(np.asarray(jnp.argmax(logits_fn(res.x_adv), -1) != y)[found])
    np.testing.assert_allclose(
        np.abs(np.asarray(res.x_adv - x)).reshape(len(y), -1).max(1)[found], dist[found],
        rtol=1e-5)
    best = np.minimum(best, dist)
  dmin = np.asarray(dmin)
  assert np.all(best >= dmin * (1 - 1e-4))      # nothing beats the minimum
  np.testing.assert_allclose(best, dmin, rtol=0.02)  # and FAB-T gets within 2%


def test_square_fools_exactly_the_non_robust_points():
  w, logits_fn, x, y = make_linear(batch=16, seed=2)
  _, worst, _ = closed_form(w, logits_fn, x, y, EPS)
  res = jax.jit(lambda x, y: square.square_attack(
      logits_fn, x, y, epsilon=EPS, key=jax.random.PRNGKey(0), num_queries=1000))(x, y)
  assert float(jnp.abs(res.x_adv - x).max()) <= EPS + 1e-6
  m = np.asarray(res.margin)
  np.testing.assert_allclose(m, margin(logits_fn, res.x_adv, y), rtol=1e-5, atol=1e-5)
  assert np.all(m >= np.asarray(worst) - 1e-4)
  np.testing.assert_array_equal(np.asarray(res.robust), np.asarray(worst > 0))
  assert 0 < int(res.robust.sum()) < len(y)
  # On robust points random search gets close to the worst case (loose: 0.25 logits).
  r = np.asarray(worst > 0)
  assert np.all(m[r] - np.asarray(worst)[r] < 0.25)


# The authors' p_selection, written out: (iteration, p / p_init) at both ends of
# every piece (p halves after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000).
_RAW_P_TABLE = [(0, 1), (10, 1), (11, 1 / 2), (50, 1 / 2), (51, 1 / 4), (200, 1 / 4),
                (201, 1 / 8), (500, 1 / 8), (501, 1 / 16), (1000, 1 / 16),
                (1001, 1 / 32), (2000, 1 / 32), (2001, 1 / 64), (4000, 1 / 64),
                (4001, 1 / 128), (6000, 1 / 128), (6001, 1 / 256), (8000, 1 / 256),
                (8001, 1 / 512), (9999, 1 / 512)]
# Rescaled to 5000 queries: iteration i is looked up at floor(2i).
_RESCALED_5000_P_TABLE = [(0, 1), (5, 1), (6, 1 / 2), (25, 1 / 2), (26, 1 / 4),
                          (100, 1 / 4), (101, 1 / 8), (250, 1 / 8), (251, 1 / 16),
                          (500, 1 / 16), (501, 1 / 32), (1000, 1 / 32), (1001, 1 / 64),
                          (2000, 1 / 64), (2001, 1 / 128), (3000, 1 / 128),
                          (3001, 1 / 256), (4000, 1 / 256), (4001, 1 / 512),
                          (4999, 1 / 512)]


@pytest.mark.parametrize("rescale,num_queries,table", [
    (False, 10000, _RAW_P_TABLE),
    (False, 5000, [r for r in _RAW_P_TABLE if r[0] < 5000]),  # AutoAttack's setting
    (False, 200, [r for r in _RAW_P_TABLE if r[0] < 200]),    # raw: budget-independent
    (True, 10000, _RAW_P_TABLE),                              # rescaling by 1 is a no-op
    (True, 5000, _RESCALED_5000_P_TABLE),
])
def test_square_p_schedule_matches_the_authors_table(rescale, num_queries, table):
  its = np.array([i for i, _ in table])
  p = jax.jit(lambda i: square.square_p_schedule(i, num_queries, 0.8, rescale))(its)
  np.testing.assert_allclose(np.asarray(p), 0.8 * np.array([r for _, r in table]),
                             rtol=1e-6)
  # the default is the authors' standalone one (rescaled)
  if rescale:
    np.testing.assert_allclose(square.square_p_schedule(its, num_queries, 0.8), p)
