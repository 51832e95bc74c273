"""Promotion attacks (METHODS.md A.4): objective, exact threshold, FGSM/PGD optima, metrics."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attack_fixtures import brute_force_scores, make_surface
from uatmc_jax.core.memory import memory_map_usage
from uatmc_jax.recsys.attacks.attackers import fgsm_attack, pgd_attack
from uatmc_jax.recsys.attacks.context import build_context
from uatmc_jax.recsys.attacks.objective import (kth_score_with_target, others_threshold_columns,
                                                others_topk_without_target, promotion_objective,
                                                promotion_per_user_loss)
from uatmc_jax.recsys.attacks import targets as targets_lib
from uatmc_jax.recsys.attacks.runner import PromotionAttackRunner
from uatmc_jax.recsys.attacks.views import target_view


def test_kth_score_with_target_equals_full_sort():
  rng = np.random.default_rng(0)
  for trial in range(200):
    n_other, k = rng.integers(2, 12), None
    k = int(rng.integers(1, n_other + 1))
    # Few distinct values so that ties are frequent.
    others = rng.integers(0, 6, size=(4, n_other)).astype(np.float32)
    s_t = rng.integers(-1, 7, size=(4,)).astype(np.float32) + (trial % 2) * 0.5
    top = -np.sort(-others, axis=1)[:, :k]
    got = kth_score_with_target(jnp.asarray(s_t), jnp.asarray(top))
    full = -np.sort(-np.concatenate([others, s_t[:, None]], axis=1), axis=1)
    np.testing.assert_array_equal(np.asarray(got), full[:, k - 1])


def test_others_topk_without_target_matches_recomputation():
  rng = np.random.default_rng(1)
  n_items, k = 15, 4
  scores = rng.normal(size=(6, n_items)).astype(np.float32)
  vals, idx = jax.lax.top_k(jnp.asarray(scores), k + 1)
  for t in range(n_items):
    got = others_topk_without_target(vals, idx, jnp.asarray(t), k)
    expect = -np.sort(-np.delete(scores, t, axis=1), axis=1)[:, :k]
    np.testing.assert_array_equal(np.asarray(got), expect)
    pair = others_threshold_columns(vals, idx, jnp.asarray(t), k)
    np.testing.assert_array_equal(np.asarray(pair), expect[:, -2:])


def _per_user_brute(surface, anchors, target, delta, k, margin):
  s = brute_force_scores(surface, target, delta)[anchors]
  kth = -jnp.sort(-s, axis=1)[:, k - 1]
  return jax.nn.relu(s[:, target] - kth + margin)


@pytest.mark.parametrize("is_graph", [False, True])
def test_view_loss_equals_full_sort_loss(is_graph):
  surface = make_surface(jax.random.key(0), is_graph=is_graph)
  anchors = np.array([0, 2, 3, 5, 7, 11])
  k = 5
  ctx = build_context(surface, anchors, k=k)

  @jax.jit
  def both(t, delta):
    view = target_view(surface, surface.params, surface.attack_table,
                                  surface.projected_table, ctx, t, k)
    s, others = view.scores_fn(delta)
    return (promotion_per_user_loss(s, others, 1.0),
            _per_user_brute(surface, anchors, t, delta, k, 1.0))

  for t in (0, 9, 17):
    for scale in (0.0, 0.7, 3.0):
      delta = {m: scale * jax.random.normal(jax.random.key(t + 1), (5,))
               for m in surface.modalities}
      got, expect = both(jnp.asarray(t), delta)
      np.testing.assert_allclose(np.asarray(got), np.asarray(expect), rtol=1e-5, atol=1e-5)


def test_objective_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    surface = make_surface(jax.random.key(3), nonlinear=True)
    surface = make_surface(jax.random.key(3), nonlinear=True,
                           params=jax.tree.map(lambda x: x.astype(jnp.float64), surface.params),
                           table={m: x.astype(jnp.float64) for m, x in surface.attack_table.items()})
    anchors = np.arange(12)
    k = 4
    ctx = build_context(surface, anchors, k=k)
    t = jnp.asarray(6)
    view = target_view(surface, surface.params, surface.attack_table,
                                  surface.projected_table, ctx, t, k)

    @jax.jit
    def loss(delta):
      s, others = view.scores_fn(delta)
      return promotion_objective(s, others, 2.0)

    delta = {m: 0.3 * jax.random.normal(jax.random.key(9), (5,), jnp.float64)
             for m in surface.modalities}
    grad = jax.grad(loss)(delta)
    assert any(float(jnp.abs(g).max()) > 1e-3 for g in grad.values())
    h = 1e-6
    for m in surface.modalities:
      basis = h * jnp.eye(5, dtype=jnp.float64)
      fd = jax.vmap(lambda e: (loss(dict(delta, **{m: delta[m] + e}))
                               - loss(dict(delta, **{m: delta[m] - e}))) / (2 * h))(basis)
      np.testing.assert_allclose(np.asarray(grad[m]), np.asarray(fd), rtol=1e-5, atol=1e-8)


def _top_target_surface(key, regime):
  """Linear model where the loss is linear in δ inside the budget (closed-form optimum)."""
  surface = make_surface(key, n_users=10, n_items=20)
  p = dict(surface.params)
  p["U"] = jnp.abs(p["U"]) + 0.5  # all users like direction (1, 1, 1, 1)
  sign = 1.0 if regime == "top" else -1.0
  p["E"] = p["E"].at[7].set(sign * 50.0)  # target 7 far above / below everybody's top-K
  return make_surface(key, n_users=10, n_items=20, params=p, table=surface.attack_table)


@pytest.mark.parametrize("regime", ["top", "below"])
def test_fgsm_and_pgd_reach_closed_form_optimum(regime):
  surface = _top_target_surface(jax.random.key(5), regime)
  anchors = np.arange(10)
  k = 3
  ctx = build_context(surface, anchors, k=k)
  runner = PromotionAttackRunner(surface, chunk_size=2, with_mismatch=False)
  mean_user = surface.params["U"].mean(0)
  # Below the threshold the hinge is active only with a big margin.
  margin = 1.0 if regime == "top" else 1e4
  eps = 0.05
  for attack in (fgsm_attack(eps, k=k, margin=margin),
                 pgd_attack(eps, k=k, margin=margin)):
    out = runner.run(attack, ctx, [7])
    for m in surface.modalities:
      direction = surface.params["W"][m] @ mean_user  # ∂L/∂δ^m, constant
      eps_m = eps * np.linalg.norm(surface.attack_table[m][7]) if attack.method == "fgsm" else eps
      np.testing.assert_allclose(out["delta"][m][0], eps_m * np.sign(direction), rtol=1e-6)
    # The optimum's objective gain equals ε_m ||c^m||_1 summed over modalities.
    assert out["loss_after"][0] > out["loss_before"][0]


def test_projection_keeps_every_perturbation_in_budget():
  surface = make_surface(jax.random.key(11), n_items=40)
  ctx = build_context(surface, np.arange(12), k=5)
  runner = PromotionAttackRunner(surface, chunk_size=8, with_mismatch=False)
  tgts = np.arange(0, 40, 3)
  for eps in (0.3, 0.05):  # budgets are arguments: the second reuses the compiled code
    out = runner.run(pgd_attack(eps, k=5, step_scale=3.0), ctx, tgts)
    for m in surface.modalities:
      assert np.abs(out["delta"][m]).max() <= eps * (1 + 1e-6)
      assert np.abs(out["delta"][m]).max() >= eps * (1 - 1e-6)  # the ball is reached
    out = runner.run(fgsm_attack(eps, k=5), ctx, tgts)
    for m in surface.modalities:
      bound = eps * np.linalg.norm(np.asarray(surface.attack_table[m])[tgts], axis=1)
      assert np.all(np.abs(out["delta"][m]).max(axis=1) <= bound * (1 + 1e-6))
      # FGSM's sign step lands on the relative ball itself (at this ε, not the last one).
      np.testing.assert_allclose(np.abs(out["delta"][m]).max(axis=1), bound, rtol=1e-5)
  # One compiled function per attacker (PGD, FGSM), shared by both budgets.
  assert sorted(runner.trace_counts.values()) == [1, 1]


def test_single_modal_attack_leaves_other_modality_alone():
  surface = make_surface(jax.random.key(2))
  clean_a = np.asarray(surface.attack_table["a"]).copy()
  anchors, k, tgts = np.arange(12), 5, [1, 2, 3]
  ctx = build_context(surface, anchors, k=k)
  runner = PromotionAttackRunner(surface, chunk_size=4, with_mismatch=False)
  margin = 10.0  # every anchor's hinge is active: the gradients are non-zero
  out = runner.run(pgd_attack(0.1, k=k, margin=margin, modalities=("b",)), ctx, tgts)
  both = runner.run(pgd_attack(0.1, k=k, margin=margin), ctx, tgts)
  assert set(out["delta"]) == {"b"}
  # The features of "a" are untouched and the attacked model saw δ^a = 0 exactly: the
  # reported loss after the attack is the full-sort loss with only δ^b applied ...
  np.testing.assert_array_equal(np.asarray(surface.attack_table["a"]), clean_a)
  for i, t in enumerate(tgts):
    d_b = out["delta"]["b"][i]
    assert np.abs(d_b).max() > 0
    only_b = _per_user_brute(surface, anchors, t, {"b": d_b}, k, margin)
    np.testing.assert_allclose(out["loss_after"][i], float(jnp.mean(only_b)), rtol=1e-5)
    # ... and not the loss with a non-zero δ^a (as a two-modality attack uses).
    with_a = _per_user_brute(surface, anchors, t, {"a": both["delta"]["a"][i], "b": d_b},
                             k, margin)
    assert abs(float(jnp.mean(with_a)) - float(out["loss_after"][i])) > 1e-4


def test_results_independent_of_chunk_size_and_no_recompiles():
  surface = make_surface(jax.random.key(4), n_items=25)
  ctx = build_context(surface, np.arange(0, 12, 2), k=4,
                                train_pairs=np.array([[0, 1], [2, 3], [4, 5], [6, 1]]))
  tgts = np.array([1, 3, 4, 8, 13, 21, 24])
  attack = pgd_attack(0.2, k=4)
  outs = []
  for chunk in (3, 8):
    runner = PromotionAttackRunner(surface, chunk_size=chunk,
                                             with_mismatch=False)
    outs.append(runner.run(attack, ctx, tgts))
    runner.run(attack, ctx, tgts[::-1])  # same compiled function, never retraced
    ctx2 = build_context(surface, np.arange(1, 12, 2), k=4,
                                   train_pairs=np.array([[1, 2]]))
    runner.run(attack, ctx2, tgts)  # another anchor set of the same size (a seed)
    assert list(runner.trace_counts.values()) == [1]
  a, b = outs
  for key in ("hit_before", "hit_after", "rank_before", "rank_after", "masked_hit_after",
              "masked_rank_after", "loss_after"):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6),
               a["delta"], b["delta"])


@pytest.mark.parametrize("is_graph", [False, True])
def test_ranks_and_hits_match_brute_force(is_graph):
  surface = make_surface(jax.random.key(8), n_items=25, is_graph=is_graph)
  anchors = np.array([1, 4, 5, 9])
  train = np.array([[1, 3], [4, 3], [5, 10], [9, 0], [9, 3], [2, 3]])
  ctx = build_context(surface, anchors, k=4, train_pairs=train)
  ks = (1, 3, 10)
  runner = PromotionAttackRunner(surface, chunk_size=4, ks=ks,
                                           with_mismatch=False)
  tgts = np.array([3, 10, 17])
  out = runner.run(pgd_attack(0.5, k=4), ctx, tgts)
  mask = np.zeros((12, 25), bool)
  mask[train[:, 0], train[:, 1]] = True
  for i, t in enumerate(tgts):
    for tag, delta in (("before", {}), ("after", {m: out["delta"][m][i] for m in out["delta"]})):
      s = np.asarray(brute_force_scores(surface, t, delta))[anchors]
      for masked in (False, True):
        sm = np.where(mask[anchors], -np.inf, s) if masked else s
        others = np.delete(sm, t, axis=1)
        ranks = (others > sm[:, t:t + 1]).sum(1)
        pre = "masked_" if masked else ""
        np.testing.assert_allclose(out[f"{pre}rank_{tag}"][i], ranks.mean(), rtol=1e-6)
        np.testing.assert_allclose(out[f"{pre}hit_{tag}"][i],
                                   [(ranks < k).mean() for k in ks], rtol=1e-6)


def test_graph_and_row_wise_paths_agree():
  kw = dict(n_items=22)
  flat = make_surface(jax.random.key(6), **kw)
  graph = make_surface(jax.random.key(6), is_graph=True, **kw)
  anchors = np.arange(0, 12, 3)
  tgts = [2, 5, 19]
  res = []
  for s in (flat, graph):
    ctx = build_context(s, anchors, k=3)
    runner = PromotionAttackRunner(s, chunk_size=2, with_mismatch=False)
    res.append(runner.run(pgd_attack(0.3, k=3), ctx, tgts))
  np.testing.assert_allclose(res[0]["rank_after"], res[1]["rank_after"], rtol=1e-5)
  np.testing.assert_allclose(res[0]["loss_after"], res[1]["loss_after"], rtol=1e-5)


def test_target_sets_and_anchors_are_seeded_and_correct():
  pop = np.array([0, 9, 3, 50, 1, 7, 2, 30, 6, 5])
  hot = targets_lib.select_targets("hot", 2, pop, 0)
  np.testing.assert_array_equal(hot, [3, 7])
  cold = targets_lib.select_targets("cold", 4, pop, 1)
  assert np.all(pop[cold] <= 5) and len(set(cold)) == 4
  r1 = targets_lib.select_targets("random", 5, pop, 3)
  np.testing.assert_array_equal(r1, targets_lib.select_targets("random", 5, pop, 3))
  a = targets_lib.select_anchors(1000, 0.4, 2)
  assert len(a) == 400 and len(np.unique(a)) == 400
  np.testing.assert_array_equal(a, targets_lib.select_anchors(1000, 0.4, 2))


def test_cosine_alignment_and_cosine_need_a_shared_projected_space():
  """A model without a shared projected space (VBPR) refuses the cosine reward and
  reports NaN cross-modal cosines, although its two widths are equal (5/5 here)."""
  import dataclasses
  from uatmc_jax.core import errors
  surface = make_surface(jax.random.key(3))
  flat = dataclasses.replace(surface, shared_space=False)
  ctx = build_context(flat, np.arange(12), k=5)
  runner = PromotionAttackRunner(flat, chunk_size=2)
  with pytest.raises(errors.ConfigError, match="shared projected space"):
    runner.run(pgd_attack(0.1, k=5, alignment="cosine"), ctx, [1, 2])
  out = runner.run(pgd_attack(0.1, k=5), ctx, [1, 2])
  assert np.all(np.isnan(out["mismatch"].cosine))
  shared = PromotionAttackRunner(surface, chunk_size=2).run(
      pgd_attack(0.1, k=5), build_context(surface, np.arange(12), k=5),
      [1, 2])
  assert np.all(np.isfinite(shared["mismatch"].cosine))


def test_surface_takes_shared_space_from_the_model():
  from flax import nnx
  from uatmc_jax.recsys.attacks.surface import surface_from_recommender
  from uatmc_jax.recsys.data.interactions import InteractionData
  from uatmc_jax.recsys.models.registry import build_recommender
  rng = np.random.default_rng(0)
  pairs = np.unique(np.stack([rng.integers(0, 6, 30), rng.integers(0, 9, 30)], 1), axis=0)
  feats = {m: rng.standard_normal((9, 8)).astype(np.float32) for m in ("a", "b")}  # 8 / 8
  data = InteractionData("t", 6, 9, pairs[:-4], pairs[-4:-2], pairs[-2:], feats)
  for name, shared in (("vbpr", False), ("vbpr_mlp", True)):
    model = build_recommender(name, data, {"embedding_dim": 4}, nnx.Rngs(0))
    assert surface_from_recommender(model, feats).shared_space is shared, name
  from uatmc_jax.recsys.attacks import protocol
  assert "pgd_aligned" not in protocol.attacker_names(("a", "b"), shared_space=False)


def test_attack_config_and_attacker_names():
  from uatmc_jax.recsys.attacks import protocol
  from experiments.configs import attack as attack_config
  from uatmc_jax.core import errors
  cfg = attack_config.get_config("targets=7,seeds=2,epsilon=0.05;0.1,attack=pgd_aligned")
  assert cfg.seeds == [1, 2] and cfg.epsilons == [0.05, 0.1] and cfg.attacks == ["pgd_aligned"]
  assert attack_config.get_config("runlocal=True,seeds=5").seeds == [1]
  mods = ("audio", "image")
  make = lambda n: protocol.make_attacker(n, 0.1, cfg, mods)
  assert make("pgd_aligned").alignment == "cosine"
  assert make("pgd_shared_groups").alignment == "shared_groups"
  assert make("fgsm").budget == "relative" and make("fgsm").margin == 10.0
  assert make("pgd").budget == "absolute" and make("pgd").margin == 1.0
  assert make("pgd_image").modalities == ("image",)
  assert set(protocol.attacker_names(mods)) >= {"fgsm", "pgd", "pgd_aligned", "pgd_audio"}
  with pytest.raises(errors.ConfigError, match="attack"):
    make("pgd_video")


def test_attack_outputs_say_which_user_grouping_was_used(tmp_path, capsys):
  from flax import nnx
  from uatmc_jax.recsys import attack_eval
  from experiments.configs import attack as attack_config
  from uatmc_jax.recsys.data import mmrec
  from uatmc_jax.recsys.data.synthetic import SyntheticConfig, write_synthetic
  from uatmc_jax.recsys.models.registry import build_recommender
  folder = write_synthetic(tmp_path / "syn", SyntheticConfig(
      n_users=40, n_items=30, mean_interactions=8, name="tiny"))
  cfg = attack_config.get_config("targets=2,seeds=1,attack=pgd,k=3,anchor_share=0.5")
  for planted in (True, False):
    if not planted:  # the same folder under the undocumented name: k-means, with a warning
      (folder / "user_groups.npy").rename(folder / "groups.npy")
      with pytest.warns(UserWarning, match="groups.npy"):
        data = mmrec.load_mmrec(folder)
    else:
      data = mmrec.load_mmrec(folder)
    model = build_recommender("vbpr_mlp", data, {"embedding_dim": 4}, nnx.Rngs(0))
    results, _, _ = attack_eval.run_attacks(cfg, model, data)
    expect = (f"planted from {folder / 'user_groups.npy'}" if planted
              else f"k-means k={cfg.n_groups} on anchor user vectors")
    assert results["protocol"]["groups"] == expect
    out = tmp_path / f"out_{planted}"
    out.mkdir()
    attack_eval.write_outputs(str(out), results, cfg, data.name, "VBPRMLP")
    assert expect in (out / "attack_results.md").read_text()
    assert expect in capsys.readouterr().out


def test_runner_drops_compiled_programs_near_the_memory_map_limit():
  """Near vm.max_map_count the runner drops its programs and rebuilds them: same numbers."""
  surface = make_surface(jax.random.key(4), n_items=25)
  ctx = build_context(surface, np.arange(0, 12, 2), k=4)
  tgts = np.array([1, 3, 4, 8, 13])
  attack = pgd_attack(0.2, k=4)
  plain = PromotionAttackRunner(surface, chunk_size=3, with_mismatch=False)
  ref = plain.run(attack, ctx, tgts)
  lines = []
  tight = PromotionAttackRunner(surface, chunk_size=3, with_mismatch=False,
                                log=lines.append, log_every_seconds=1e9)
  tight.map_usage_fn = lambda: 0.9
  for _ in range(2):
    out = tight.run(attack, ctx, tgts)
    for key in ("hit_after", "rank_after", "loss_after"):
      np.testing.assert_allclose(out[key], ref[key], rtol=1e-6, atol=1e-6)
  # One release per run, logged before that run's one progress line (at its end).
  assert tight.releases == 2
  assert ["vm.max_map_count" in line for line in lines] == [True, False, True, False]
  assert "5/5 targets" in lines[1] and "5/5 targets" in lines[3]
  assert list(tight.trace_counts.values()) == [1]  # rebuilt once after the last drop
  assert plain.releases == 0  # this process is far from its limit
  usage = memory_map_usage()
  assert usage is None or 0 < usage < 1


def test_context_of_a_model_trained_on_a_multi_device_mesh():
  """``protocol.local_copy`` of a model whose parameters live on the 8-device mesh is a
  one-device copy with the same values, and the A.4 context builds from it (the sharded
  parameters went into the context's top-k and aborted inside XLA:CPU)."""
  from flax import nnx
  from uatmc_jax.core.parallel.mesh import make_mesh
  from uatmc_jax.recsys.attacks import protocol
  from uatmc_jax.recsys.attacks.surface import surface_from_recommender
  from uatmc_jax.recsys.data.synthetic import SyntheticConfig, make_synthetic
  from uatmc_jax.recsys.models.registry import build_recommender
  from uatmc_jax.recsys.trainer import RecsysTrainer
  data = make_synthetic(SyntheticConfig(n_users=40, n_items=32, mean_interactions=8,
                                        name="tiny"))
  model = build_recommender("vbpr_mlp", data, {"embedding_dim": 8}, nnx.Rngs(0))
  trainer = RecsysTrainer(model, data, {"log": False, "batch_size": 16}, mesh=make_mesh())
  trainer.train_epoch(0)
  trained = trainer.model
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(nnx.state(trained)))
  local = protocol.local_copy(trained)
  for a, b in zip(jax.tree.leaves(nnx.state(local)), jax.tree.leaves(nnx.state(trained))):
    assert len(a.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert protocol.local_copy(local) is local  # already on one device: returned as it is
  surface = surface_from_recommender(local, data.features, space="projected")
  ctx = build_context(surface, np.arange(0, 40, 2), k=5, train_pairs=data.train)
  users, items = local.encode(local.project(data.features))
  scores = np.asarray(users)[np.arange(0, 40, 2)] @ np.asarray(items).T
  np.testing.assert_allclose(np.asarray(ctx.scores), scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ctx.topk_values), -np.sort(-scores, axis=1)[:, :6],
                             rtol=1e-5, atol=1e-5)
