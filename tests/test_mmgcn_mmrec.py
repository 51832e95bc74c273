"""MMRec's MMGCN architecture (``mmgcn_mmrec``) against a dense numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys.data.interactions import InteractionData
from uatmc_jax.recsys.models.mmgcn_mmrec import MMGCNMMRec
from uatmc_jax.recsys.models.registry import MODEL_CLASSES, RECOMMENDERS, build_recommender

N_USERS, N_ITEMS = 5, 7
DIMS = {"audio": 5, "image": 3}
D, LATENT = 4, 6
# Degrees differ (user 0 has 4 items, user 3 one), item 6 and user 4 have no edge, and
# (1, 2) is listed twice (counted once): a symmetric normalisation or a plain sum would
# give other values than the mean.
TRAIN = np.array([(0, 0), (0, 1), (0, 2), (0, 5), (1, 0), (1, 2), (1, 2), (2, 3), (2, 0),
                  (3, 4)])


def _features(seed=1):
  rng = np.random.default_rng(seed)
  return {m: rng.standard_normal((N_ITEMS, d)).astype(np.float32) for m, d in DIMS.items()}


def _model(seed=0, **kw):
  return MMGCNMMRec(N_USERS, N_ITEMS, DIMS, TRAIN, embedding_dim=D, latent_modality="image",
                    latent_dim=LATENT, rngs=nnx.Rngs(seed), **kw)


def _params(model):
  """Every parameter as float64 numpy, by name."""
  lin = lambda l: (np.asarray(l.kernel[...], np.float64),
                   None if l.bias is None else np.asarray(l.bias[...], np.float64))
  p = {"ids": np.asarray(model.id_embedding[...], np.float64),
       "pref": {m: np.asarray(model.preferences[m][...], np.float64) for m in DIMS},
       "proj": {m: lin(model.feature_proj[m]) for m in model.feature_proj},
       "layers": {m: [(lin(l.conv)[0], lin(l.self_linear), lin(l.combine))
                      for l in model.branches[m]] for m in DIMS}}
  return p


def _dense_mean_matrix():
  n = N_USERS + N_ITEMS
  a = np.zeros((n, n))
  for u, i in TRAIN:
    a[u, N_USERS + i] = a[N_USERS + i, u] = 1.0
  deg = a.sum(1, keepdims=True)
  return np.divide(a, deg, out=np.zeros_like(a), where=deg > 0)


def _lrelu(x):
  return np.where(x > 0, x, 0.01 * x)


def reference_nodes(p, feats):
  """Dense numpy MMRec MMGCN: x0 = normalize([P; f(x)]); 3 layers; mean over modalities."""
  mean = _dense_mean_matrix()
  outs = []
  for m in sorted(DIMS):
    f = np.asarray(feats[m], np.float64)
    if m in p["proj"]:
      w, b = p["proj"][m]
      f = f @ w + b
    x = np.concatenate([p["pref"][m], f], 0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    for conv, (wl, bl), (wg, bg) in p["layers"][m]:
      h = _lrelu(mean @ (x @ conv))
      x_hat = _lrelu(x @ wl + bl) + p["ids"]
      x = _lrelu(np.concatenate([h, x_hat], 1) @ wg + bg)
    outs.append(x)
  return sum(outs) / len(outs)


def test_parameter_shapes_are_mmrecs_widths():
  model = _model()
  # Image: projected 3 -> LATENT, first layer at LATENT; audio: first layer at raw 5.
  assert model.feature_proj["image"].kernel[...].shape == (3, LATENT)
  assert set(model.feature_proj) == {"image"}
  assert model.preferences["image"][...].shape == (N_USERS, LATENT)
  assert model.preferences["audio"][...].shape == (N_USERS, 5)
  for m, w in (("image", LATENT), ("audio", 5)):
    layers = model.branches[m]
    assert len(layers) == 3
    assert layers[0].conv.kernel[...].shape == (w, w)
    assert layers[0].conv.bias is None
    assert layers[0].self_linear.kernel[...].shape == (w, D)
    assert layers[0].combine.kernel[...].shape == (w + D, D)
    for layer in layers[1:]:
      assert layer.conv.kernel[...].shape == (D, D)
      assert layer.self_linear.kernel[...].shape == (D, D)
      assert layer.combine.kernel[...].shape == (2 * D, D)
  users, items = model.encode(model.project(_features()))
  assert users.shape == (N_USERS, D) and items.shape == (N_ITEMS, D)


def test_forward_equals_dense_reference():
  model = _model()
  feats = _features()
  nodes = reference_nodes(_params(model), feats)
  users, items = model.encode(model.project(feats))
  np.testing.assert_allclose(users, nodes[:N_USERS], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(items, nodes[N_USERS:], rtol=1e-5, atol=1e-6)
  # The batch-rows forward is those rows of the full one.
  u_ids, i_ids = jnp.array([3, 0, 3]), jnp.array([6, 2, 0, 5])
  u, i = model.encode_rows(model.project(feats), u_ids, i_ids)
  np.testing.assert_allclose(u, nodes[np.asarray(u_ids)], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(i, nodes[N_USERS + np.asarray(i_ids)], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.item_vectors(model.project(feats), i_ids),
                             nodes[N_USERS + np.asarray(i_ids)], rtol=1e-5, atol=1e-6)


def test_forward_differs_from_symmetric_normalisation():
  """The reference is sensitive to the aggregation: with Â instead of the mean it differs."""
  model = _model()
  feats = _features()
  users, _ = model.encode(model.project(feats))
  mean = _dense_mean_matrix()
  deg = (mean > 0).sum(1)
  sym = np.where(mean > 0, 1.0 / np.sqrt(np.outer(np.maximum(deg, 1), np.maximum(deg, 1))),
                 0.0)
  import unittest.mock as mock
  with mock.patch(f"{__name__}._dense_mean_matrix", return_value=sym):
    other = reference_nodes(_params(model), feats)
  assert np.abs(np.asarray(users) - other[:N_USERS]).max() > 1e-3


def _scalar_loss(model, feats, weights):
  users, items = model.encode(model.project(feats))
  return jnp.sum(users * weights[:N_USERS]) + jnp.sum(items * weights[N_USERS:])


@pytest.mark.parametrize("leaf", ["conv0_image", "pref_audio", "ids", "proj_image",
                                  "combine2_audio"])
def test_gradient_matches_finite_differences_of_reference(leaf):
  model = _model()
  feats = _features()
  weights = np.random.default_rng(2).standard_normal((N_USERS + N_ITEMS, D))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def f(params):
    return _scalar_loss(nnx.merge(graphdef, params, rest), feats, jnp.asarray(weights,
                                                                                jnp.float32))

  grads = nnx.merge(graphdef, jax.grad(f)(params), rest)
  getters = {
      "conv0_image": (lambda m: m.branches["image"][0].conv.kernel,
                      lambda p: p["layers"]["image"][0][0]),
      "pref_audio": (lambda m: m.preferences["audio"], lambda p: p["pref"]["audio"]),
      "ids": (lambda m: m.id_embedding, lambda p: p["ids"]),
      "proj_image": (lambda m: m.feature_proj["image"].kernel, lambda p: p["proj"]["image"][0]),
      "combine2_audio": (lambda m: m.branches["audio"][2].combine.kernel,
                         lambda p: p["layers"]["audio"][2][2][0]),
  }
  get_model, get_ref = getters[leaf]
  g = np.asarray(get_model(grads)[...])
  rng = np.random.default_rng(3)
  checked = 0
  for _ in range(6):
    idx = tuple(int(rng.integers(0, s)) for s in g.shape)
    vals = []
    for sign in (1.0, -1.0):
      p = _params(model)
      get_ref(p)[idx] += sign * 1e-6
      vals.append(np.sum(reference_nodes(p, feats) * weights))
    fd = (vals[0] - vals[1]) / 2e-6
    np.testing.assert_allclose(g[idx], fd, rtol=2e-3, atol=2e-5, err_msg=f"{leaf}{idx}")
    checked += abs(fd) > 1e-4
  assert checked > 0  # not only zero derivatives


def _data(dims=None):
  dims = dims or {"audio": 128, "image": 9}
  rng = np.random.default_rng(0)
  feats = {m: rng.standard_normal((N_ITEMS, d)).astype(np.float32)
           for m, d in sorted(dims.items())}
  train = np.unique(TRAIN, axis=0).astype(np.int32)
  return InteractionData("tiny", N_USERS, N_ITEMS, train, train[:2], train[2:4], feats)


def test_registry_builds_mmrec_widths_and_rejects_bad_config():
  assert "mmgcn_mmrec" in RECOMMENDERS and MODEL_CLASSES["mmgcn_mmrec"] is MMGCNMMRec
  data = _data()
  model = build_recommender("mmgcn_mmrec", data, {"num_layers": 2}, nnx.Rngs(0))
  assert isinstance(model, MMGCNMMRec) and model.is_graph
  assert not model.shared_projected_space
  # MMRec's widths: image 9 -> 256, first layer 256; audio first layer on raw 128; then 64.
  assert model.feature_proj["image"].kernel[...].shape == (9, 256)
  assert model.branches["image"][0].combine.kernel[...].shape == (256 + 64, 64)
  assert model.branches["audio"][0].conv.kernel[...].shape == (128, 128)
  assert model.branches["audio"][0].combine.kernel[...].shape == (128 + 64, 64)
  assert len(model.branches["audio"]) == 3  # MMRec's fixed depth, num_layers not read
  assert model.branches["image"][2].combine.kernel[...].shape == (128, 64)
  raw = build_recommender("mmgcn_mmrec", data, {"latent_modality": "none"}, nnx.Rngs(0))
  assert len(raw.feature_proj) == 0
  assert raw.branches["image"][0].conv.kernel[...].shape == (9, 9)
  with pytest.raises(ConfigError, match="latent_modality 'visual'.*audio.*image"):
    build_recommender("mmgcn_mmrec", data, {"latent_modality": "visual"}, nnx.Rngs(0))
  with pytest.raises(ConfigError, match="latent_dim must be an integer >= 1"):
    build_recommender("mmgcn_mmrec", data, {"latent_dim": 0}, nnx.Rngs(0))
  with pytest.raises(ConfigError, match="num_layers must be >= 1"):
    MMGCNMMRec(N_USERS, N_ITEMS, DIMS, TRAIN, num_layers=0, rngs=nnx.Rngs(0))


def test_recsys_config_exposes_the_variant():
  from experiments.configs import recsys as recsys_config
  cfg = recsys_config.get_config("model=mmgcn_mmrec,dataset=synthetic")
  assert cfg.model == "mmgcn_mmrec"
  assert cfg.model_config["latent_modality"] == "image"
  assert cfg.model_config["latent_dim"] == 256
  assert cfg.train["reg_weight"] == recsys_config.default_reg_weight("mmgcn", "synthetic")


def test_trains_evaluates_and_is_attacked_on_the_full_path():
  from uatmc_jax.core.parallel.mesh import make_mesh
  from uatmc_jax.recsys.attacks.attackers import pgd_attack
  from uatmc_jax.recsys.attacks.context import build_context
  from uatmc_jax.recsys.attacks.runner import PromotionAttackRunner
  from uatmc_jax.recsys.attacks.surface import surface_from_recommender
  from uatmc_jax.recsys.trainer import RecsysTrainer
  data = _data({"audio": 5, "image": 3})
  model = build_recommender("mmgcn_mmrec", data, {"embedding_dim": 8, "latent_dim": 6},
                            nnx.Rngs(0))
  trainer = RecsysTrainer(model, data, {"log": False, "batch_size": 8, "learning_rate": 0.05},
                          mesh=make_mesh())
  losses = [trainer.train_epoch(e)["loss"] for e in range(8)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  metrics = trainer.evaluate("test")
  assert all(np.isfinite(v) for v in jax.tree.leaves(metrics))
  # The trained state lives on the trainer's 8-device mesh; the attack runs on one device
  # (host copies of the values).
  graphdef, state = nnx.split(trainer.model)
  trained = nnx.merge(graphdef, jax.tree.map(jnp.asarray, jax.device_get(state)))
  surface = surface_from_recommender(trained, data.features, space="projected")
  assert surface.is_graph and surface.graph is None  # full re-encode path
  ctx = build_context(surface, np.arange(N_USERS), k=3, train_pairs=data.train)
  runner = PromotionAttackRunner(surface, chunk_size=2, with_mismatch=False)
  assert not runner.uses_local_graph_path
  targets = [6, 1, 4]
  out = runner.run(pgd_attack(0.5, k=3), ctx, targets)
  assert np.all(np.isfinite(out["loss_after"]))
  # The reported ranks after the attack are those of the model re-encoded with the
  # perturbed projected row (the graph moves every node's vector, not only the target's).
  projected = trained.project(data.features)
  moved = 0.0
  for j, t in enumerate(targets):
    delta = {m: np.asarray(out["delta"][m][j]) for m in projected}
    moved = max(moved, max(np.abs(d).max() for d in delta.values()))
    table = {m: projected[m].at[t].add(delta[m]) for m in projected}
    users, items = trained.encode(table)
    scores = np.asarray(users) @ np.asarray(items).T
    above = (scores > scores[:, [t]]).sum(1)
    np.testing.assert_allclose(out["rank_after"][j], above.mean(), atol=1e-6)
  assert moved > 0  # the comparison is not of unperturbed models only


def test_sharded_build_pads_and_splits_the_tables_and_trains_like_the_unsharded():
  from jax.sharding import PartitionSpec as P

  from uatmc_jax.recsys.train_job import _build
  data = _data({"audio": 5, "image": 3})
  cfg = {"embedding_dim": 8, "latent_dim": 6}
  train = {"seed": 0, "batch_size": 8, "log": False, "learning_rate": 0.05}
  sharded = _build({"model": "mmgcn_mmrec", "model_config": cfg, "train": train,
                    "mesh_data": 1, "mesh_model": 8}, data, None)
  plain = _build({"model": "mmgcn_mmrec", "model_config": cfg, "train": train,
                  "mesh_data": 8, "mesh_model": 1}, data, None)
  ref = build_recommender("mmgcn_mmrec", data, cfg, nnx.Rngs(0))
  for path, n, width in ((("id_embedding",), N_USERS + N_ITEMS, 8),
                         (("preferences", "image"), N_USERS, 6),
                         (("preferences", "audio"), N_USERS, 5)):
    leaf = sharded.params
    expected = nnx.state(ref, nnx.Param)
    for k in path:
      leaf, expected = leaf[k], expected[k]
    x = leaf[...]
    assert x.shape == (-(-n // 8) * 8, width) and x.sharding.spec == P("model")
    np.testing.assert_array_equal(np.asarray(x)[:n], np.asarray(expected[...]))
    np.testing.assert_array_equal(np.asarray(x)[n:], 0.0)
  a, b = sharded.train_epoch(0), plain.train_epoch(0)
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
