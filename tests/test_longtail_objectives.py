"""Long-tail classification losses and the ETF penalty against closed forms (B.3, B.4)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from uatmc_jax.longtail import etf
from uatmc_jax.longtail import losses as cl


def _logits(seed, b=6, c=5):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (b, c)) * 2.0, jax.random.randint(k2, (b,), 0, c)


def _np_ce(z, y):
  z = np.asarray(z, np.float64)
  lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
  return lse - z[np.arange(len(y)), np.asarray(y)]


def test_cross_entropy_matches_numpy():
  z, y = _logits(0)
  np.testing.assert_allclose(cl.softmax_cross_entropy(logits=z, labels=y), _np_ce(z, y),
                             rtol=1e-5)


def test_balanced_softmax_equals_ce_with_log_prior_shifted_logits():
  z, y = _logits(1)
  counts = jnp.array([500., 120., 40., 9., 5.])
  bsl = cl.balanced_softmax_cross_entropy(logits=z, labels=y, class_counts=counts)
  # log π and log n differ by a constant per row, which the softmax ignores.
  shifted = z + cl.log_prior(counts)[None]
  np.testing.assert_allclose(bsl, _np_ce(shifted, y), rtol=1e-5, atol=1e-6)
  # and it really differs from plain CE under imbalance
  assert np.abs(np.asarray(bsl) - _np_ce(z, y)).max() > 0.1


def test_kl_and_trades_closed_form():
  z, y = _logits(2)
  z2, _ = _logits(3)
  p, q = jax.nn.softmax(z), jax.nn.softmax(z2)
  kl = np.sum(p * (np.log(p) - np.log(q)), 1)
  np.testing.assert_allclose(cl.kl_divergence(p_logits=z, q_logits=z2), kl, rtol=1e-5)
  np.testing.assert_allclose(cl.kl_divergence(p_logits=z, q_logits=z), 0.0, atol=1e-6)
  np.testing.assert_allclose(cl.trades_loss(clean_logits=z, adv_logits=z2, labels=y, beta=6.),
                             _np_ce(z, y) + 6. * kl, rtol=1e-5)
  # TRADES inner loss: gradient only through the adversarial side
  g = jax.grad(lambda a: cl.trades_attack_loss(clean_logits=a, adv_logits=z2).sum())(z)
  np.testing.assert_allclose(g, 0.0)


def test_mart_closed_form():
  z, y = _logits(4)
  z2, _ = _logits(5)
  pa, pc = np.asarray(jax.nn.softmax(z2), np.float64), np.asarray(jax.nn.softmax(z), np.float64)
  yy = np.asarray(y)
  expected = []
  for i in range(len(yy)):
    wrong = np.delete(pa[i], yy[i]).max()
    bce = -np.log(pa[i, yy[i]]) - np.log(1 - wrong)
    kl = np.sum(pc[i] * (np.log(pc[i]) - np.log(pa[i])))
    expected.append(bce + 6. * kl * (1 - pc[i, yy[i]]))
  np.testing.assert_allclose(cl.mart_loss(clean_logits=z, adv_logits=z2, labels=y, beta=6.),
                             expected, rtol=1e-4)


def test_robal_pieces():
  kf, kw = jax.random.split(jax.random.key(6))
  feats, w = jax.random.normal(kf, (4, 7)), jax.random.normal(kw, (3, 7))
  cos = cl.cosine_similarities(features=feats, weight=w)
  f = np.asarray(feats) / np.linalg.norm(feats, axis=1, keepdims=True)
  wn = np.asarray(w) / np.linalg.norm(w, axis=1, keepdims=True)
  np.testing.assert_allclose(cos, f @ wn.T, rtol=1e-5, atol=1e-6)
  counts = jnp.array([100., 10., 1.])
  m = cl.class_aware_margins(counts, max_margin=0.5)
  np.testing.assert_allclose(m, 0.5 * (1. / np.array([100., 10., 1.])) ** 0.25, rtol=1e-6)
  y = jnp.array([0, 1, 2, 2])
  logits = cl.robal_train_logits(cosine=cos, labels=y, class_counts=counts, scale=10.,
                                 max_margin=0.5, tau_b=1.)
  logpi = np.log(np.array([100., 10., 1.]) / 111.)
  exp = 10. * np.asarray(cos) + logpi[None]
  exp[np.arange(4), np.asarray(y)] -= 10. * np.asarray(m)[np.asarray(y)]
  np.testing.assert_allclose(logits, exp, rtol=1e-5, atol=1e-5)
  inf = cl.robal_inference_logits(cosine=cos, class_counts=counts, scale=10., tau_p=1.)
  np.testing.assert_allclose(inf, 10. * np.asarray(cos) - logpi[None], rtol=1e-5, atol=1e-5)
  loss = cl.robal_loss(clean_cosine=cos, adv_cosine=cos, labels=y, class_counts=counts,
                       scale=10., max_margin=0.5, tau_b=1., beta=6.)
  np.testing.assert_allclose(loss, _np_ce(exp, y), rtol=1e-5, atol=1e-6)  # KL(x||x) = 0


@pytest.mark.parametrize("c,d", [(2, 2), (10, 10), (10, 64), (100, 128)])
def test_etf_penalty_zero_at_simplex_etf(c, d):
  m = etf.simplex_etf(c, d, key=jax.random.key(c + d))
  np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, rtol=1e-5)
  assert float(etf.etf_gram_penalty(m)) < 1e-10
  # invariant to row scaling and to rotations
  assert float(etf.etf_gram_penalty(m * jnp.arange(1, c + 1)[:, None])) < 1e-10


def test_etf_penalty_positive_elsewhere():
  c = 10
  t = etf.simplex_etf_gram(c)
  assert t[0, 0] == 1.0 and np.isclose(float(t[0, 1]), -1 / 9)
  w = jax.random.normal(jax.random.key(0), (c, 32))
  assert float(etf.etf_gram_penalty(w)) > 1e-3
  # orthogonal rows are not an ETF either: penalty = (C^2-C)/C^2 * (1/(C-1))^2
  orth = jnp.eye(c, 32)
  np.testing.assert_allclose(etf.etf_gram_penalty(orth), (c * c - c) / c**2 / (c - 1) ** 2,
                             rtol=1e-5)
  # gradient descent on the penalty reaches the ETF (the term pushes towards it)
  opt = optax.adam(0.05)

  def step(_, carry):
    w, s = carry
    u, s = opt.update(jax.grad(etf.etf_gram_penalty)(w), s)
    return optax.apply_updates(w, u), s

  w, _ = jax.jit(lambda w: jax.lax.fori_loop(0, 150, step, (w, opt.init(w))))(w)
  assert float(etf.etf_gram_penalty(w)) < 1e-5
