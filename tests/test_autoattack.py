"""AutoAttack orchestration and the robust-accuracy evaluator (METHODS.md B.5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uatmc_jax.longtail.attacks import autoattack
from uatmc_jax.longtail.attacks import square
from uatmc_jax.longtail.evaluation import robust_accuracy

from image_attack_fixtures import N_CLASSES, SHAPE, tiny_mlp


def _linear(seed=0, n=20):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  dim = int(np.prod(SHAPE))
  w = jax.random.normal(k1, (dim, N_CLASSES))
  b = jax.random.normal(k2, (N_CLASSES,))
  x = np.asarray(jax.random.uniform(k3, (n,) + SHAPE, minval=0.3, maxval=0.7))
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w + b
  y = np.array(jnp.argmax(logits_fn(x), -1))
  y[:2] = (y[:2] + 1) % N_CLASSES  # two clean errors
  return np.asarray(w), np.asarray(b), logits_fn, x, y


def _linear_worst_margin(w, b, x, y, eps):
  """Closed form in the box [0, 1]: min over the box ∩ ball of z_y − z_j, min over j."""
  xf = x.reshape(len(x), -1)
  lo, hi = np.maximum(xf - eps, 0.), np.minimum(xf + eps, 1.)
  diff = w[:, y].T[:, :, None] - w[None]                               # (N, D, C)
  worst = np.where(diff > 0, lo[:, :, None], hi[:, :, None]) * diff
  m = worst.sum(1) + (b[y][:, None] - b[None])
  m[np.arange(len(y)), y] = np.inf
  return m.min(1)


@pytest.fixture(scope="module")
def linear_aa():
  w, b, logits_fn, x, y = _linear()
  aa = autoattack.AutoAttack(logits_fn, autoattack.AutoAttackConfig(
      epsilon=0.03, version="apgd", batch_size=8, seed=0))
  return w, b, x, y, aa


def test_apgd_suite_matches_closed_form_and_eps_sweep(linear_aa):
  w, b, x, y, aa = linear_aa
  clean = np.asarray(aa.predict(x)) == y
  previous = None
  for eps in (0.0, 0.01, 0.03, 0.06, 1.0):
    res = aa.run(x, y, epsilon=eps)
    expected = clean & (_linear_worst_margin(w, b, x, y, eps) > 0)
    np.testing.assert_array_equal(res.robust, expected)
    np.testing.assert_array_equal(res.clean_correct, clean)
    dist = np.abs(res.x_adv - x).reshape(len(x), -1).max(1)
    assert np.all(dist <= eps + 1e-6) and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    if eps == 0.0:
      np.testing.assert_array_equal(res.robust, clean)
    if previous is not None:
      assert np.all(res.robust <= previous)  # non-increasing in ε
    previous = res.robust
  assert not previous.any()  # ε = 1: the whole box, nothing is robust
  # The sweep is non-trivial: some but not all points are robust at 0.03.
  r = aa.run(x, y, epsilon=0.03).robust
  assert 0 < r.sum() < clean.sum()
  # Five budgets, several batch counts and nine target ranks: one trace per stage.
  assert aa.trace_counts == {"apgd-ce": 1, "apgd-t": 1}


def _mlp(seed=1):
  return tiny_mlp(seed, 20)


def test_standard_autoattack_is_at_least_as_strong_as_pgd20_and_apgd_subset():
  logits_fn, x, y = _mlp()
  config = robust_accuracy.RobustEvalConfig(
      epsilon=0.02, step_size=0.005, batch_size=8, square_queries=200,
      apgd_iterations=100, fab_iterations=100)
  evaluator = robust_accuracy.RobustEvaluator(logits_fn, config)
  counts = np.array([400, 300, 200, 150, 90, 60, 40, 25, 12, 8])
  blocks, outcomes = robust_accuracy.evaluate_robustness(
      logits_fn, x, y, counts, ("clean", "pgd20", "cw", "autoattack_apgd", "autoattack"),
      evaluator=evaluator)
  for name, block in blocks.items():
    assert set(block) >= {"per_class", "overall", "balanced", "many", "medium", "few",
                          "tail", "seconds"}
    dist = np.abs(outcomes[name].x_adv - x).reshape(len(x), -1).max(1)
    assert np.all(dist <= 0.02 + 1e-6), name
    assert outcomes[name].x_adv.min() >= 0 and outcomes[name].x_adv.max() <= 1
    assert np.all(outcomes[name].correct <= outcomes["clean"].correct), name
  assert blocks["clean"]["overall"] == pytest.approx(17 / 20)
  aa, aa_apgd = outcomes["autoattack"].correct, outcomes["autoattack_apgd"].correct
  assert blocks["autoattack"]["overall"] <= blocks["pgd20"]["overall"]
  assert blocks["autoattack"]["overall"] <= blocks["cw"]["overall"]
  assert np.all(aa <= aa_apgd)  # same seeds: standard = apgd suite + FAB-T + Square
  assert blocks["pgd20"]["overall"] < blocks["clean"]["overall"]  # the attack bites
  assert aa.sum() > 0  # and the budget leaves something to defend
  # Non-robust examples returned by AutoAttack really are misclassified.
  pred = np.asarray(jnp.argmax(logits_fn(outcomes["autoattack"].x_adv), -1))
  fooled = outcomes["clean"].correct & ~aa
  assert np.all(pred[fooled] != y[fooled])
  assert evaluator.autoattack.trace_counts == {"apgd-ce": 1, "apgd-t": 1, "fab-t": 1,
                                               "square": 1}


def test_unknown_version_and_attack_are_rejected():
  with pytest.raises(ValueError, match="unknown AutoAttack version"):
    autoattack.AutoAttack(lambda z: z.reshape(len(z), -1), autoattack.AutoAttackConfig(version="rand"))
  ev = robust_accuracy.RobustEvaluator(lambda z: z.reshape(len(z), -1))
  with pytest.raises(ValueError, match="unknown attack"):
    ev.run("fgsm", np.zeros((1, 2, 2, 1)), np.zeros(1, int))


def _square_window_sides(attack, x):
  """Runs `attack(logits_fn)` with a model Square can never fool and returns, per
  query in order, the side of the window it changed (max over the batch).

  The logits ignore the input, so no candidate is ever accepted: every query is the
  stripe start plus one window, and the window's rows are exactly the rows that
  differ from the start.
  """
  seen = []

  def logits_fn(z):
    jax.debug.callback(lambda a: seen.append(np.asarray(a)), z, ordered=True)
    return jnp.zeros((z.shape[0], 3), z.dtype).at[:, 0].set(5.)

  attack(logits_fn)
  deltas = [d for d in (s - x for s in seen) if np.abs(d).max() > 0]  # drop predictions
  start = deltas[0]
  assert np.all(start == start[:, :1])  # vertical stripes: all rows alike
  changed_rows = [np.any(d != start, axis=(2, 3)).sum(1).max() for d in deltas[1:]]
  return np.array(changed_rows)


def test_autoattack_square_uses_the_raw_iteration_p_schedule(monkeypatch):
  """AutoAttack builds Square with resc_schedule=False: p halves after iterations 10
  and 50 whatever the budget; standalone Square keeps the rescaled default."""
  queries, eps = 200, 0.1
  x = np.full((4, 8, 8, 3), 0.5, np.float32)
  y = np.zeros(4, np.int32)
  side = lambda p: min(round(np.sqrt(p * 64)), 7)  # round(√(p·H·W)), at most H − 1
  monkeypatch.setitem(autoattack.SUITES, "square_only", ("square",))
  config = autoattack.AutoAttackConfig(epsilon=eps, version="square_only", batch_size=4,
                                       square_queries=queries)
  sides = _square_window_sides(
      lambda f: autoattack.AutoAttack(f, config).run(x, y), x)
  # iterations 0-10: p = 0.8, 11-50: 0.4, 51-198: 0.2 (the loop makes queries − 1).
  expected = [side(.8)] * 11 + [side(.4)] * 40 + [side(.2)] * 148
  np.testing.assert_array_equal(sides, expected)
  assert expected[:3] == [7, 7, 7] and expected[-1] == 4
  # Standalone default: iteration i looks up floor(50·i): 0 → .8, 1 → .4, 2-4 → .2,
  # 5-10 → .1, 11-20 → .05, then p ≤ .025 (side 1).
  sides = _square_window_sides(
      lambda f: square.square_attack(f, jnp.asarray(x), jnp.asarray(y), epsilon=eps,
                                     key=jax.random.PRNGKey(0), num_queries=queries), x)
  expected = ([side(.8), side(.4)] + [side(.2)] * 3 + [side(.1)] * 6 + [side(.05)] * 10
              + [1] * 178)
  np.testing.assert_array_equal(sides, expected)
