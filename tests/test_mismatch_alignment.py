"""Mismatch diagnostics (A.5) and aligned ascent directions (A.6)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attack_fixtures import make_raw_surface, make_surface
from uatmc_jax.core import errors
from uatmc_jax.recsys.attacks import alignment, mismatch, user_groups
from uatmc_jax.recsys.attacks.attackers import pgd_attack
from uatmc_jax.recsys.attacks.context import build_context
from uatmc_jax.recsys.attacks.objective import promotion_per_user_loss
from uatmc_jax.recsys.attacks.runner import PromotionAttackRunner
from uatmc_jax.recsys.attacks.views import target_view


def _loss_fn(surface, anchors, target, k, margin):
  ctx = build_context(surface, anchors, k=k)
  view = target_view(surface, surface.params, surface.attack_table,
                                surface.projected_table, ctx, jnp.asarray(target), k)

  def per_user(delta):
    s, others = view.scores_fn(delta)
    return promotion_per_user_loss(s, others, margin)

  return per_user


def _planted_surface(nonlinear=False):
  """Group A (users 0-3) sees items only through modality a, group B only through b."""
  n_users, n_items, d = 8, 16, 5
  key = jax.random.key(0)
  base = make_surface(key, n_users=n_users, n_items=n_items, dims=(("a", d), ("b", d)))
  u = np.zeros((n_users, 4), np.float32)
  rng = np.random.default_rng(0)
  u[:4, :2] = rng.uniform(0.5, 1.5, (4, 2))
  u[4:, 2:] = rng.uniform(0.5, 1.5, (4, 2))
  w_a = np.zeros((d, 4), np.float32)
  w_a[:, :2] = rng.normal(size=(d, 2))
  w_b = np.zeros((d, 4), np.float32)
  w_b[:, 2:] = rng.normal(size=(d, 2))
  e = np.asarray(base.params["E"]).copy()
  e[3] = 30.0  # target 3 sits on top of every user's list: the hinge is active everywhere
  params = {"U": jnp.asarray(u), "E": jnp.asarray(e), "W": {"a": jnp.asarray(w_a),
                                                           "b": jnp.asarray(w_b)}}
  return make_surface(key, n_users=n_users, n_items=n_items, dims=(("a", d), ("b", d)),
                      params=params, table=base.attack_table, nonlinear=nonlinear)


def test_per_group_gradients_sum_to_full_gradient():
  surface = make_surface(jax.random.key(1), nonlinear=True)
  anchors = np.arange(12)
  per_user = _loss_fn(surface, anchors, 5, 4, 3.0)
  groups = user_groups.one_hot_groups(np.arange(12) % 3)
  delta = {m: 0.2 * jnp.ones(5) for m in surface.modalities}
  _, gg = jax.jit(mismatch.per_group_gradients, static_argnums=0)(per_user, delta, groups)
  full = jax.grad(lambda d: jnp.mean(per_user(d)))(delta)
  for m in surface.modalities:
    assert gg[m].shape == (3, 5)
    np.testing.assert_allclose(np.asarray(gg[m].sum(0)), np.asarray(full[m]), rtol=1e-5,
                               atol=1e-7)
  # Each group's gradient is the gradient of its own users' share of the loss.
  g1 = jax.grad(lambda d: jnp.sum(per_user(d) * groups[:, 1]) / 12)(delta)
  np.testing.assert_allclose(np.asarray(gg["a"][1]), np.asarray(g1["a"]), rtol=1e-5, atol=1e-7)


def test_planted_two_group_mismatch_is_detected():
  surface = _planted_surface()
  per_user = _loss_fn(surface, np.arange(8), 3, 4, 1.0)
  groups = user_groups.one_hot_groups(np.arange(8) // 4)
  zero = {m: jnp.zeros(5) for m in surface.modalities}
  diag = jax.jit(mismatch.mismatch_diagnostics, static_argnums=0)(per_user, zero, groups)
  np.testing.assert_allclose(np.asarray(diag.shares), [[1, 0], [0, 1]], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(diag.dominant), [0, 1])
  assert bool(diag.dominant_differs)
  assert int(diag.active_users) == 8
  # Gains: modality a moves only group A's scores and b only group B's.
  jac = jax.jacobian(per_user)(zero)
  full = jax.grad(lambda d: jnp.mean(per_user(d)))(zero)
  a = np.asarray(jac["a"] @ jnp.sign(full["a"]))
  b = np.asarray(jac["b"] @ jnp.sign(full["b"]))
  assert np.all(a[4:] == 0) and np.all(b[:4] == 0)
  np.testing.assert_allclose(float(diag.gain_correlation[0]), np.corrcoef(a, b)[0, 1],
                             rtol=1e-5)
  ga, gb = np.asarray(full["a"]), np.asarray(full["b"])
  np.testing.assert_allclose(float(diag.cosine[0]),
                             ga @ gb / np.linalg.norm(ga) / np.linalg.norm(gb), rtol=1e-5)


def test_gains_at_delta_use_the_attackers_step():
  """A.5 gains at δ ≠ 0 are a_u = ∇_{δ^a} ℓ_u · δ^a with the attacker's δ (hand case).

  ℓ_u = C_a[u]·δ^a + C_b[u]·δ^b: the sign steps are (1, 1) in both modalities, giving
  gains a = (1, 1, 2), b = (1, 1, 2) (correlation 1); the attacker's δ^a = (.5, −.5),
  δ^b = (.2, 0) gives a = (.5, −.5, 0), b = (0, .2, .4): cov −.1, var .5 and .08,
  correlation −.1 / √(.5 · .08) = −0.5.
  """
  c_a = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  c_b = jnp.array([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])

  def per_user(d):
    return c_a @ d["a"] + c_b @ d["b"]

  delta = {"a": jnp.array([0.5, -0.5]), "b": jnp.array([0.2, 0.0])}
  groups = user_groups.one_hot_groups(np.array([0, 1, 1]))
  diag = mismatch.mismatch_diagnostics(per_user, delta, groups, gain_step=delta)
  np.testing.assert_allclose(float(diag.gain_correlation[0]), -0.5, rtol=1e-6)
  assert int(diag.active_users) == 3
  sign_step = mismatch.mismatch_diagnostics(per_user, delta, groups)
  np.testing.assert_allclose(float(sign_step.gain_correlation[0]), 1.0, rtol=1e-6)


def test_runner_gains_after_attack_are_those_of_its_delta():
  surface = make_surface(jax.random.key(5), nonlinear=True)
  anchors, k, tgts = np.arange(12), 5, [2, 7]
  ctx = build_context(surface, anchors, k=k)
  groups = user_groups.one_hot_groups(np.arange(12) % 2)
  out = PromotionAttackRunner(surface, chunk_size=2).run(
      pgd_attack(0.3, k=k, margin=10.0), ctx, tgts, groups)
  for i, t in enumerate(tgts):
    per_user = _loss_fn(surface, anchors, t, k, 10.0)
    delta = {m: jnp.asarray(out["delta"][m][i]) for m in surface.modalities}
    jac = jax.jacobian(per_user)(delta)
    a, b = (np.asarray(jac[m] @ delta[m], np.float64) for m in ("a", "b"))
    active = (a != 0) | (b != 0)
    assert active.sum() >= 3
    np.testing.assert_allclose(out["mismatch_at_delta"].gain_correlation[i][0],
                               np.corrcoef(a[active], b[active])[0, 1], rtol=1e-4)


def test_runner_reports_planted_mismatch_for_every_target():
  surface = _planted_surface()
  ctx = build_context(surface, np.arange(8), k=4)
  groups = user_groups.one_hot_groups(np.arange(8) // 4)
  runner = PromotionAttackRunner(surface, chunk_size=4)
  out = runner.run(pgd_attack(0.1, k=4, alignment="shared_groups"), ctx, [3, 3],
                   groups)
  assert out["mismatch"].dominant_differs.tolist() == [True, True]
  assert out["mismatch"].shares.shape == (2, 2, 2)
  assert out["hit_after"].shape == (2, 4)


def test_cosine_reward_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    base = make_surface(jax.random.key(2), nonlinear=True)
    p = jax.tree.map(lambda x: x.astype(jnp.float64), base.params)
    p["E"] = p["E"].at[4].set(20.0)  # target on top: smooth (tanh) in δ everywhere nearby
    surface = make_surface(jax.random.key(2), nonlinear=True, params=p,
                           table={m: x.astype(jnp.float64) for m, x in base.attack_table.items()})
    per_user = _loss_fn(surface, np.arange(12), 4, 3, 1.0)
    objective = jax.jit(alignment.cosine_reward_objective(per_user, align_weight=2.0))
    delta = {m: 0.3 * jax.random.normal(jax.random.key(7 + i), (5,), jnp.float64)
             for i, m in enumerate(surface.modalities)}
    grad = jax.jit(jax.grad(objective))(delta)
    naive = jax.grad(lambda d: jnp.mean(per_user(d)))(delta)
    # The second-order term is really there (the direction differs from the naive one).
    assert max(float(jnp.abs(grad[m] - naive[m]).max()) for m in delta) > 1e-3
    h = 1e-5
    for m in surface.modalities:
      basis = h * jnp.eye(5, dtype=jnp.float64)
      fd = jax.vmap(lambda e: (objective(dict(delta, **{m: delta[m] + e}))
                               - objective(dict(delta, **{m: delta[m] - e}))) / (2 * h))(basis)
      np.testing.assert_allclose(np.asarray(grad[m]), np.asarray(fd), rtol=1e-5, atol=1e-8)


def test_cosine_reward_is_inert_on_a_linear_score():
  """Piecewise-linear L (linear score) has zero Hessian: the reward cannot steer."""
  surface = make_surface(jax.random.key(3))
  per_user = _loss_fn(surface, np.arange(12), 4, 3, 5.0)
  delta = {m: 0.1 * jnp.ones(5) for m in surface.modalities}
  kw = dict(group_weights=None, group_temperature=0.1)
  aligned = alignment.cosine_direction(per_user, delta, align_weight=10.0, **kw)
  naive = alignment.naive_direction(per_user, delta, align_weight=10.0, **kw)
  for m in delta:
    np.testing.assert_allclose(np.asarray(aligned[m]), np.asarray(naive[m]), atol=1e-6)


def test_pcgrad_combine_hand_case():
  g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
  # g1' = g1 + 0.5 g2 = (0.5, 0.5); g2' = g2 + g1 = (0, 1).
  np.testing.assert_allclose(np.asarray(alignment.pcgrad_combine(g)), [0.5, 1.5], atol=1e-6)
  # No conflict: plain sum.
  g = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  np.testing.assert_allclose(np.asarray(alignment.pcgrad_combine(g)), [2.0, 1.0], atol=1e-6)


def test_shared_group_weights_focus_on_the_jointly_served_group():
  # Modality a: group 0 share 0.8, group 1 0.2; modality b: 0.3 / 0.7 -> mean 0.55 / 0.45.
  gg = {"a": jnp.array([[0.8, 0.0], [0.2, 0.0]]), "b": jnp.array([[0.0, 0.3], [0.0, 0.7]])}
  alpha = alignment.shared_group_weights(gg, temperature=1e-3)
  np.testing.assert_allclose(np.asarray(alpha), [1.0, 0.0], atol=1e-6)
  alpha = alignment.shared_group_weights(gg, temperature=1e6)
  np.testing.assert_allclose(np.asarray(alpha), [0.5, 0.5], atol=1e-6)


def test_unknown_alignment_is_a_config_error():
  from uatmc_jax.core import errors
  with pytest.raises(errors.ConfigError, match="alignment"):
    pgd_attack(0.1, alignment="bogus")


def test_kmeans_recovers_separated_blobs():
  rng = np.random.default_rng(0)
  pts = np.concatenate([rng.normal(0, 0.1, (20, 3)), rng.normal(5, 0.1, (30, 3))])
  _, assign = user_groups.kmeans(jax.random.key(0), jnp.asarray(pts, jnp.float32), k=2)
  assign = np.asarray(assign)
  assert len(set(assign[:20])) == 1 and len(set(assign[20:])) == 1
  assert assign[0] != assign[20]


def test_raw_feature_attack_aligns_in_the_projected_space():
  """Raw widths differ (7 vs 3): the cosine is taken on ∇_{x̂} L (shared 5-d space)."""
  # Non-linear in x̂ (tanh inside the item vector): with a score linear in x̂ (VBPR-MLP's
  # fusion) ∇_x̂ L is piecewise constant in δ and the reward has zero gradient a.e.
  surface = make_raw_surface(jax.random.key(4), nonlinear=True)
  ctx = build_context(surface, np.arange(12), k=3)
  runner = PromotionAttackRunner(surface, chunk_size=2)
  out = runner.run(pgd_attack(0.2, k=3, alignment="cosine", align_weight=5.0,
                                        margin=50.0), ctx, [2, 6])
  assert out["delta"]["a"].shape == (2, 7) and out["delta"]["b"].shape == (2, 3)
  assert np.all(np.isfinite(out["mismatch"].cosine))
  # The projected-space gradient the cosine uses is the gradient w.r.t. x̂ (by hand).
  view = target_view(surface, surface.params, surface.attack_table,
                                surface.projected_table, ctx, jnp.asarray(2), 3)
  loss = lambda d, e=None: promotion_per_user_loss(*view.scores_fn(d, e), 50.0)
  eta0 = {m: jnp.zeros(5) for m in surface.modalities}
  zero = {"a": jnp.zeros(7), "b": jnp.zeros(3)}
  g = alignment.shared_space_gradient(loss, zero, alignment.Probe(loss, eta0))
  users = surface.params["U"]
  for m in surface.modalities:
    slope = 1 - jnp.tanh(surface.projected_table[m][2]) ** 2
    np.testing.assert_allclose(np.asarray(g[m]),
                               np.asarray(slope * (surface.params["W"][m] @ users.mean(0))),
                               rtol=1e-4, atol=1e-6)
  # And the reward steers (second order through the tanh lift): aligned != naive.
  kw = dict(group_weights=None, group_temperature=0.1, probe=alignment.Probe(loss, eta0))
  d = {"a": 0.1 * jnp.ones(7), "b": -0.1 * jnp.ones(3)}
  aligned = alignment.cosine_direction(loss, d, align_weight=5.0, **kw)
  naive = alignment.naive_direction(loss, d, align_weight=5.0, **kw)
  assert max(float(jnp.abs(aligned[m] - naive[m]).max()) for m in d) > 1e-4


def _raw_linear_score_problem():
  """Score linear in x̂ (VBPR-MLP's fusion), non-linear lift x̂ = tanh(x A), float64."""
  rng = np.random.default_rng(11)
  dims, p, n = {"a": 7, "b": 3}, 5, 6
  lift_mats = {m: jnp.asarray(rng.normal(size=(d, p)) / np.sqrt(d)) for m, d in dims.items()}
  x = {m: jnp.asarray(rng.normal(size=d)) for m, d in dims.items()}
  w = {m: jnp.asarray(rng.normal(size=(p, 4))) for m in dims}
  users = jnp.asarray(rng.uniform(0.5, 1.5, size=(n, 4)))

  def lift(delta):
    return {m: jnp.tanh((x[m] + delta[m]) @ lift_mats[m]) for m in delta}

  def probe_loss(delta, eta=None):
    xh = lift(delta)
    if eta:
      xh = {m: xh[m] + eta[m] for m in xh}
    item = sum(xh[m] @ w[m] for m in xh)
    return jax.nn.relu(users @ item + 50.0)  # margin 50: every hinge active

  loss = lambda delta: probe_loss(delta)
  eta0 = {m: jnp.zeros(p, users.dtype) for m in dims}
  delta = {m: jnp.asarray(0.2 * rng.normal(size=d)) for m, d in dims.items()}
  return loss, alignment.Probe(probe_loss, eta0, lift), delta


def test_pushforward_cosine_steers_a_raw_attack_where_the_probe_cosine_is_inert():
  with jax.enable_x64(True):
    loss, probe, delta = _raw_linear_score_problem()
    kw = dict(group_weights=None, group_temperature=0.1, align_weight=5.0, probe=probe)
    naive = alignment.naive_direction(loss, delta, **kw)
    probe_cos = alignment.cosine_direction(loss, delta, **kw)
    pushed = alignment.cosine_pushforward_direction(loss, delta, **kw)
    for m in delta:  # ∇_x̂ L does not depend on δ: the probe-space reward has no gradient
      np.testing.assert_allclose(np.asarray(probe_cos[m]), np.asarray(naive[m]), atol=1e-12)
    assert max(float(jnp.abs(pushed[m] - naive[m]).max()) for m in delta) > 1e-3
    # v^m = J_m ∇_{δ^m} L = J_m J_m^T ∇_{x̂^m} L, by hand (J_m = A_m^T diag(1 - x̂²)).
    g_hat = alignment.shared_space_gradient(loss, delta, probe)
    moved = alignment.pushforward_gradient(loss, delta, probe)
    for m in delta:
      jac = jax.jacfwd(lambda d: probe.lift(dict(delta, **{m: d}))[m])(delta[m])  # (p, d)
      np.testing.assert_allclose(np.asarray(moved[m]), np.asarray(jac @ jac.T @ g_hat[m]),
                                 rtol=1e-10, atol=1e-12)
    # The second-order gradient of J matches central finite differences.
    objective = alignment.pushforward_cosine_objective(loss, 5.0, probe)
    grad = jax.grad(objective)(delta)
    h = 1e-6
    for m in delta:
      basis = h * jnp.eye(delta[m].shape[0], dtype=jnp.float64)
      fd = jax.vmap(lambda e: (objective(dict(delta, **{m: delta[m] + e}))
                               - objective(dict(delta, **{m: delta[m] - e}))) / (2 * h))(basis)
      np.testing.assert_allclose(np.asarray(grad[m]), np.asarray(fd), rtol=1e-6, atol=1e-9)


def test_pushforward_cosine_in_the_runner():
  """Raw space, linear score in x̂: pushforward PGD differs from naive PGD, the probe
  cosine does not; in the projected space pushforward is the paper's cosine."""
  surface = make_raw_surface(jax.random.key(4))
  ctx = build_context(surface, np.arange(12), k=3)
  runner = PromotionAttackRunner(surface, chunk_size=2, with_mismatch=False)
  run = lambda name: runner.run(pgd_attack(0.3, k=3, alignment=name,
                                                     align_weight=5.0, margin=50.0),
                                ctx, [2, 6])["delta"]
  naive, probe_cos, pushed = run("none"), run("cosine"), run("cosine_pushforward")
  for m in surface.modalities:
    np.testing.assert_array_equal(np.asarray(probe_cos[m]), np.asarray(naive[m]))
  assert any(np.any(np.asarray(pushed[m]) != np.asarray(naive[m])) for m in surface.modalities)
  flat = make_surface(jax.random.key(5), nonlinear=True)
  ctx = build_context(flat, np.arange(12), k=3)
  runner = PromotionAttackRunner(flat, chunk_size=2, with_mismatch=False)
  a, b = (runner.run(pgd_attack(0.2, k=3, alignment=n, align_weight=5.0,
                                          margin=50.0), ctx, [2, 6])["delta"]
          for n in ("cosine", "cosine_pushforward"))
  for m in flat.modalities:
    np.testing.assert_allclose(np.asarray(a[m]), np.asarray(b[m]), atol=1e-6)


def test_pushforward_cosine_without_a_lift_is_a_config_error():
  loss, probe, delta = _raw_linear_score_problem()
  with pytest.raises(errors.ConfigError, match="cosine_pushforward.*lift"):
    alignment.cosine_pushforward_direction(loss, delta, group_weights=None, align_weight=1.0,
                                           group_temperature=0.1,
                                           probe=probe._replace(lift=None))


def _assert_diagnostics_equal(a, b):
  for field, x, y in zip(mismatch.MismatchDiagnostics._fields, a, b):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=field)


def test_runner_reuses_the_clean_diagnostics_of_an_equal_objective_only():
  surface = make_surface(jax.random.key(5), nonlinear=True)
  anchors, k, tgts = np.arange(12), 5, np.array([7, 11, 2])
  ctx = build_context(surface, anchors, k=k)
  groups = user_groups.one_hot_groups(np.arange(12) % 3)
  said = []
  runner = PromotionAttackRunner(surface, chunk_size=2, log=said.append)
  first = runner.run(pgd_attack(0.3, k=k), ctx, tgts, groups)
  # Another attacker with the same objective (K, hinge, modalities), the targets in
  # another order: δ = 0 diagnostics taken from the first, each in its target's row.
  aligned = pgd_attack(0.2, k=k, steps=3, alignment="cosine")
  second = runner.run(aligned, ctx, tgts[::-1], groups)
  assert sum("reused" in line for line in said) == 1
  fresh = PromotionAttackRunner(surface, chunk_size=2).run(aligned, ctx, tgts[::-1], groups)
  _assert_diagnostics_equal(second["mismatch"], fresh["mismatch"])
  _assert_diagnostics_equal(second["mismatch_at_delta"], fresh["mismatch_at_delta"])
  assert not np.allclose(second["mismatch_at_delta"].gain_correlation,
                         first["mismatch_at_delta"].gain_correlation[::-1])
  # Not reused: another hinge margin, a target not attacked before, other groups.
  margin10 = pgd_attack(0.3, k=k, margin=10.0)
  third = runner.run(margin10, ctx, tgts, groups)
  _assert_diagnostics_equal(
      third["mismatch"],
      PromotionAttackRunner(surface, chunk_size=2).run(margin10, ctx, tgts, groups)["mismatch"])
  runner.run(pgd_attack(0.3, k=k), ctx, np.array([2, 3]), groups)
  runner.run(pgd_attack(0.3, k=k), ctx, tgts, user_groups.one_hot_groups(np.arange(12) // 4))
  assert sum("reused" in line for line in said) == 1
