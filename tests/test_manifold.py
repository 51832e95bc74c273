"""Manifold models, manifold distance and MS-PGD (METHODS.md B.4)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from uatmc_jax.longtail import manifold as ml
from uatmc_jax.longtail.attacks import linf
from uatmc_jax.longtail.attacks import manifold_pgd


def _tiny_generator(seed=0, num_classes=2, latent_dim=1, feature_dim=2, hidden=16):
  params = ml.init_manifold_params(jax.random.key(seed), num_classes=num_classes,
                                   feature_dim=feature_dim, latent_dim=latent_dim,
                                   hidden_dim=hidden)
  return params


def test_per_class_mlp_uses_each_examples_class_weights():
  p = _tiny_generator(num_classes=3, latent_dim=2, feature_dim=3)
  z = jax.random.normal(jax.random.key(1), (7, 2))
  y = jnp.array([2, 0, 1, 2, 0, 0, 1])
  out = jax.jit(ml.generate)(p.generator, z, y)

  def single(zi, c):
    h = zi
    for i, l in enumerate(p.generator):
      h = h @ l["w"][c] + l["b"][c]
      h = jnp.maximum(h, 0) if i < len(p.generator) - 1 else h
    return h

  single = jax.jit(single)
  ref = np.stack([single(z[i], y[i]) for i in range(7)])
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@jax.jit
def _grid_min(gen, phi, label, grid):
  """Brute-force min_z ||φ − G_y(z)||² over a dense 1-d latent grid (one example)."""
  g = ml.generate(gen, grid[:, None], jnp.full((grid.shape[0],), label))
  d = jnp.sum((phi[None] - g) ** 2, -1)
  i = jnp.argmin(d)
  return d[i], grid[i]


def test_manifold_distance_and_gradient_match_brute_force_latent_search():
  p = _tiny_generator(seed=3)
  # random biases: kinks of the ReLU generator spread over the latent line
  gen = [dict(w=l["w"], b=0.5 * jax.random.normal(jax.random.key(20 + i), l["b"].shape))
         for i, l in enumerate(p.generator)]
  grid = jnp.linspace(-4., 4., 40001)
  phis = jax.random.normal(jax.random.key(4), (4, 2))
  labels = jnp.array([0, 1, 0, 1])
  # z0 near the global minimiser (coarse grid), then many small latent steps.
  coarse = jnp.linspace(-4., 4., 41)
  z0 = jnp.stack([_grid_min(gen, phis[i], labels[i], coarse)[1] for i in range(4)])[:, None]
  dist_fn = lambda ph: ml.manifold_distance(ph, labels, gen, z0, num_steps=2000,
                                            step_size=0.002)
  dist, grad = jax.jit(lambda ph: (dist_fn(ph), jax.grad(lambda q: jnp.sum(dist_fn(q)))(ph)))(phis)
  h = 1e-2
  for i in range(4):
    brute, z_star = _grid_min(gen, phis[i], labels[i], grid)
    np.testing.assert_allclose(dist[i], brute, rtol=2e-3, atol=1e-5)
    # envelope theorem: ∇φ = 2(φ − G_y(z*))
    g_star = ml.generate(gen, z_star[None, None], labels[i:i + 1])[0]
    np.testing.assert_allclose(grad[i], 2 * (phis[i] - g_star), rtol=1e-2, atol=2e-2)
    # central finite differences of the brute-force minimum
    for j in range(2):
      e = jnp.zeros(2).at[j].set(h)
      fd = (_grid_min(gen, phis[i] + e, labels[i], grid)[0]
            - _grid_min(gen, phis[i] - e, labels[i], grid)[0]) / (2 * h)
      np.testing.assert_allclose(grad[i, j], fd, rtol=2e-2, atol=2e-2)


def test_latent_steps_decrease_distance_and_zero_steps_is_decoder_distance():
  p = _tiny_generator(seed=5, latent_dim=2, feature_dim=3)
  phi = jax.random.normal(jax.random.key(6), (8, 3))
  y = jnp.arange(8) % 2
  z0 = jax.random.normal(jax.random.key(7), (8, 2))
  d0 = ml.manifold_distance(phi, y, p.generator, z0, num_steps=0, step_size=0.01)
  np.testing.assert_allclose(d0, jnp.sum((phi - ml.generate(p.generator, z0, y)) ** 2, -1),
                             rtol=1e-6)
  d5 = ml.manifold_distance(phi, y, p.generator, z0, num_steps=5, step_size=0.01)
  assert np.all(np.asarray(d5) <= np.asarray(d0) + 1e-6) and float(jnp.sum(d0 - d5)) > 0


def _curved_class_features(key, n, feature_dim, offset):
  """Features on a 2-d curved sheet (a nonlinear manifold) per class, plus small noise."""
  k1, k2, k3 = jax.random.split(key, 3)
  t = jax.random.uniform(k1, (n, 2), minval=-2., maxval=2.)
  basis = jax.random.normal(jax.random.key(offset), (4, feature_dim))
  s = jnp.concatenate([jnp.sin(1.5 * t), jnp.cos(1.5 * t)], -1)
  return s @ basis + offset + 0.01 * jax.random.normal(k3, (n, feature_dim))


def test_autoencoder_fit_does_not_collapse_to_the_class_mean():
  d_f, n = 12, 128
  feats = [_curved_class_features(jax.random.key(10 + c), 2 * n, d_f, c) for c in range(2)]
  train_x = jnp.concatenate([f[:n] for f in feats])
  test_x = jnp.concatenate([f[n:] for f in feats])
  labels = jnp.repeat(jnp.arange(2), n)
  state = ml.init_manifold_fit(jax.random.key(0), num_classes=2, feature_dim=d_f,
                               latent_dim=4, hidden_dim=64, learning_rate=3e-3)
  fit = jax.jit(lambda s: ml.manifold_fit_steps(s, train_x, labels, num_steps=400,
                                                learning_rate=3e-3)[0])
  state = fit(state)
  dist = ml.manifold_distance_from_features(state.params, test_x, labels, num_steps=5,
                                            step_size=0.01)
  means = jnp.stack([f[:n].mean(0) for f in feats])
  to_mean = jnp.sum((test_x - means[labels]) ** 2, -1)
  # held-out features are reconstructed far better than by their class mean
  assert float(dist.mean()) < 0.1 * float(to_mean.mean()), (dist.mean(), to_mean.mean())
  # contrast: the reference's regression of random z onto random features collapses
  gen_only = ml.init_manifold_params(jax.random.key(1), num_classes=2, feature_dim=d_f,
                                     latent_dim=4, hidden_dim=64).generator
  opt = optax.adam(3e-3)

  def ref_step(i, carry):
    g, s = carry
    z = jax.random.normal(jax.random.fold_in(jax.random.key(2), i), (2 * n, 4))
    loss = lambda g: jnp.mean(jnp.sum((train_x - ml.generate(g, z, labels)) ** 2, -1))
    u, s = opt.update(jax.grad(loss)(g), s, g)
    return optax.apply_updates(g, u), s

  gen_only, _ = jax.jit(lambda g: jax.lax.fori_loop(0, 400, ref_step, (g, opt.init(g))))(gen_only)
  outs = ml.generate(gen_only, jax.random.normal(jax.random.key(3), (2 * n, 4)), labels)
  spread = jnp.mean(jnp.sum((outs - means[labels]) ** 2, -1))
  assert float(spread) < 0.1 * float(to_mean.mean())  # ~ the class mean for every z


def _tiny_classifier():
  k1, k2 = jax.random.split(jax.random.key(7))
  a = jax.random.normal(k1, (4 * 4 * 3, 6)) * 0.3
  w = jax.random.normal(k2, (6, 3))
  features_fn = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ a)
  return features_fn, w


def _ce_head(w, y):
  return lambda phi: optax.softmax_cross_entropy_with_integer_labels(phi @ w, y)


def test_ms_pgd_zero_weight_equals_pgd_and_weight_changes_the_example():
  features_fn, w = _tiny_classifier()
  x = jax.random.uniform(jax.random.key(8), (5, 4, 4, 3))
  y = jnp.array([0, 1, 2, 1, 0])
  mp = ml.init_manifold_params(jax.random.key(9), num_classes=3, feature_dim=6,
                               latent_dim=2, hidden_dim=16)
  kw = dict(epsilon=8 / 255, step_size=2 / 255, num_steps=10, key=jax.random.key(11))
  plain = linf.pgd_attack(lambda xa: _ce_head(w, y)(features_fn(xa)), x, **kw)
  attack = jax.jit(lambda lam: manifold_pgd.ms_pgd_attack(
      features_fn=features_fn, head_loss_fn=_ce_head(w, y), x=x, labels=y,
      manifold_params=mp, manifold_weight=lam, latent_steps=5, latent_step_size=0.01, **kw))
  np.testing.assert_array_equal(attack(0.0), plain)
  for lam in (1.0, 10.0):
    x_adv = attack(lam)
    assert float(jnp.abs(x_adv - plain).max()) > 1e-3
    assert float(jnp.abs(x_adv - x).max()) <= 8 / 255 + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  # a large λ_man pulls the adversarial features closer to the manifold than plain PGD
  dist = lambda xa: ml.manifold_distance_from_features(mp, features_fn(xa), y, num_steps=5,
                                                       step_size=0.01).mean()
  assert float(dist(attack(10.0))) < float(dist(plain))
