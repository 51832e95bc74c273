"""The softplus surrogate of the promotion objective (attacks/objective.py, attackers.py)."""
from __future__ import annotations

import dataclasses
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attack_fixtures import make_surface
from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys.attacks import alignment as alignment_lib
from uatmc_jax.recsys.attacks.attackers import PromotionAttack, pgd_attack
from uatmc_jax.recsys.attacks.context import build_context
from uatmc_jax.recsys.attacks.objective import promotion_per_user_loss
from uatmc_jax.recsys.attacks.runner import PromotionAttackRunner
from uatmc_jax.recsys.attacks.views import target_view


def test_softplus_tends_to_relu_within_tau_log2():
  key = jax.random.key(0)
  s = 3 * jax.random.normal(key, (200,))
  others = -jnp.sort(-jax.random.normal(jax.random.fold_in(key, 1), (200, 5)), axis=1)
  relu = promotion_per_user_loss(s, others, 1.0)
  gaps = []
  for tau in (1.0, 0.1, 0.01, 0.001):
    soft = promotion_per_user_loss(s, others, 1.0, "softplus", tau)
    gap = np.asarray(soft - relu)
    assert np.all(gap >= -1e-6) and np.all(gap <= tau * np.log(2) + 1e-6)
    gaps.append(gap.max())
  assert gaps[-1] < 1e-3 and gaps == sorted(gaps, reverse=True)
  # exactly τ·log 2 at the hinge's kink (x = 0)
  np.testing.assert_allclose(
      promotion_per_user_loss(jnp.array([0.0]), jnp.array([[2.0, 1.0]]), 1.0, "softplus", 0.3),
      [0.3 * np.log(2)], rtol=1e-6)


def test_surrogate_options_and_errors():
  plain = pgd_attack(0.1)
  assert plain.surrogate == "relu"
  soft = pgd_attack(0.1, surrogate="softplus", temperature=0.05)
  assert soft.margin == 1.0 and (soft.surrogate, soft.temperature) == ("softplus", 0.05)
  assert soft != plain and hash(soft) != hash(plain)  # distinct compiled programs
  again = dataclasses.replace(soft, epsilon=0.2)  # the runner's budget-free copy
  assert (again.surrogate, again.temperature) == ("softplus", 0.05)
  assert pickle.loads(pickle.dumps(soft)) == soft
  # x = 0 − 1 + 1 = 0: the softplus value at the kink
  s, others = jnp.array([0.0]), jnp.array([[2.0, 1.0]])
  np.testing.assert_allclose(
      promotion_per_user_loss(s, others, soft.margin, soft.surrogate, soft.temperature),
      [0.05 * np.log1p(np.exp(0.0 / 0.05))], rtol=1e-6)
  with pytest.raises(ConfigError, match="surrogate"):
    PromotionAttack(surrogate="hinge")
  with pytest.raises(ConfigError, match="temperature"):
    PromotionAttack(surrogate="softplus", temperature=0.0)


def _loss_fn(surface, ctx, target, k, attack):
  view = target_view(surface, surface.params, surface.attack_table, surface.projected_table,
                     ctx, jnp.asarray(target), k)

  def per_user(delta):
    s, others = view.scores_fn(delta)
    return promotion_per_user_loss(s, others, attack.margin, attack.surrogate,
                                   attack.temperature)
  return per_user


def test_cosine_reward_gradient_is_zero_for_relu_and_not_for_softplus():
  # The linear fixture is VBPR-MLP in the projected space: scores linear in x̂.
  surface = make_surface(jax.random.key(3))
  k = 5
  ctx = build_context(surface, np.arange(12), k=k)
  delta = {m: 0.05 * jax.random.normal(jax.random.key(i), (5,))
           for i, m in enumerate(surface.modalities)}
  checked = 0
  for target in (2, 7, 19):
    norms = {}
    for name, attack in (("relu", pgd_attack(0.1, k=k)),
                         ("softplus", pgd_attack(0.1, k=k, surrogate="softplus",
                                                 temperature=0.5))):
      f = _loss_fn(surface, ctx, target, k, attack)
      objective = alignment_lib.cosine_reward_objective(f, 1.0)

      def reward(d, objective=objective, f=f):  # λ · cos(∇_a L, ∇_b L) alone
        return objective(d) - jnp.mean(f(d))
      grads = jax.grad(reward)(delta)
      first = jax.grad(lambda d, f=f: jnp.mean(f(d)))(delta)
      norms[name] = (float(sum(jnp.sum(g * g) for g in grads.values())),
                     float(sum(jnp.sum(g * g) for g in first.values())))
    if norms["relu"][1] == 0:  # no active anchor: nothing to compare
      continue
    checked += 1
    assert norms["relu"][0] == 0.0
    assert norms["softplus"][0] > 1e-8
  assert checked >= 1


def test_aligned_attack_is_inert_with_relu_and_not_with_softplus():
  surface = make_surface(jax.random.key(4), n_items=25)
  ctx = build_context(surface, np.arange(0, 12, 2), k=4)
  targets = np.array([1, 3, 4, 8, 13, 21, 24])
  runner = PromotionAttackRunner(surface, chunk_size=8, with_mismatch=False)
  out = {}
  for sur in ("relu", "softplus"):
    for align in ("none", "cosine"):
      attack = pgd_attack(0.2, k=4, alignment=align, align_weight=5.0, surrogate=sur,
                          temperature=0.5)
      out[sur, align] = runner.run(attack, ctx, targets)
  flat = lambda r: np.concatenate([np.asarray(r["delta"][m]) for m in surface.modalities], 1)
  np.testing.assert_array_equal(flat(out["relu", "none"]), flat(out["relu", "cosine"]))
  assert np.abs(flat(out["softplus", "none"]) - flat(out["softplus", "cosine"])).max() > 0
  # Hit@K before attack is computed from scores: the surrogate does not touch it.
  np.testing.assert_array_equal(out["relu", "none"]["hit_before"],
                                out["softplus", "none"]["hit_before"])
  # ... while the reported objective is the surrogate's (≥ the hinge's).
  assert np.all(out["softplus", "none"]["loss_before"]
                >= out["relu", "none"]["loss_before"] - 1e-6)


def test_softplus_is_refused_on_the_exact_local_graph_path():
  """The local MMGCN path skips anchors whose hinge is provably zero; a smooth surrogate
  is never zero, so the runner refuses it there (graph_path='full' serves it)."""
  from uatmc_jax.recsys.attacks.views import LocalGraphSpec
  surface = make_surface(jax.random.key(5))
  runner = PromotionAttackRunner(surface, chunk_size=4, with_mismatch=False)
  with pytest.raises(ConfigError, match="graph_path='full'"):
    runner.chunk_function(pgd_attack(0.1, surrogate="softplus"), LocalGraphSpec(None, 4))
  runner.chunk_function(pgd_attack(0.1), LocalGraphSpec(None, 4))  # ReLU: accepted


def test_attack_launcher_config_passes_and_records_the_surrogate(tmp_path):
  """attack.py's surrogate / temperature reach every attacker and the results' protocol."""
  from flax import nnx
  from experiments.configs import attack as attack_config
  from uatmc_jax.recsys import attack_eval
  from uatmc_jax.recsys.attacks import protocol
  from uatmc_jax.recsys.data import mmrec
  from uatmc_jax.recsys.data.synthetic import SyntheticConfig, write_synthetic
  from uatmc_jax.recsys.models.registry import build_recommender
  mods = ("audio", "image")
  assert attack_config.get_config("").surrogate == "relu"
  cfg = attack_config.get_config("targets=2,seeds=1,attack=pgd+pgd_aligned,k=3,"
                                 "anchor_share=0.5,surrogate=softplus,temperature=0.05")
  for name in protocol.attacker_names(mods):
    a = protocol.make_attacker(name, 0.1, cfg, mods)
    assert (a.surrogate, a.temperature) == ("softplus", 0.05), name
  with pytest.raises(ConfigError, match="surrogate"):
    protocol.make_attacker("pgd", 0.1, attack_config.get_config("surrogate=hinge"), mods)
  data = mmrec.load_mmrec(write_synthetic(tmp_path / "syn", SyntheticConfig(
      n_users=40, n_items=30, mean_interactions=8, name="tiny")))
  model = build_recommender("vbpr_mlp", data, {"embedding_dim": 4}, nnx.Rngs(0))
  results, runs, _ = attack_eval.run_attacks(cfg, model, data)
  assert results["protocol"]["surrogate"] == "softplus"
  assert results["protocol"]["temperature"] == 0.05
  relu = attack_config.get_config("targets=2,seeds=1,attack=pgd,k=3,anchor_share=0.5")
  assert "temperature" not in attack_eval.run_attacks(relu, model, data)[0]["protocol"]
