"""Recommenders (METHODS.md A.2) and the recsys losses: shapes, closed forms, gradients."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uatmc_jax.recsys import losses as losses
from uatmc_jax.recsys.data.interactions import InteractionData
from uatmc_jax.recsys.models import base as base
from uatmc_jax.recsys.models.mmgcn import MMGCN, bipartite_edges
from uatmc_jax.recsys.models.registry import build_recommender
from uatmc_jax.recsys.models.vbpr_mlp import projection_hidden


def tiny_data(n_users=7, n_items=11, dims=(("image", 12), ("audio", 5)), seed=0):
  rng = np.random.default_rng(seed)
  pairs = np.unique(np.stack([rng.integers(0, n_users, 40), rng.integers(0, n_items, 40)], 1),
                    axis=0).astype(np.int32)
  feats = {m: rng.standard_normal((n_items, d)).astype(np.float32) for m, d in sorted(dims)}
  return InteractionData("tiny", n_users, n_items, pairs[:-6], pairs[-6:-3], pairs[-3:], feats)


def jfeats(data):
  return {m: jnp.asarray(x) for m, x in data.features.items()}


@nnx.jit
def project_and_encode(model, feats):
  proj = model.project(feats)
  return proj, model.encode(proj)


@pytest.mark.parametrize("name,width", [("vbpr", 128), ("vbpr_mlp", 128), ("mmgcn", 192)])
def test_shapes_and_row_wise_projection(name, width):
  data = tiny_data()
  model = build_recommender(name, data, {}, nnx.Rngs(0))
  assert model.modalities == ("audio", "image")
  feats = jfeats(data)
  proj, (users, items) = project_and_encode(model, feats)
  chex.assert_shape(users, (7, width))
  chex.assert_shape(items, (11, width))
  ids = jnp.array([3, 0, 9])
  sub = model.project(base.gather_rows(feats, ids))
  for m in model.modalities:
    np.testing.assert_allclose(sub[m], proj[m][ids], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.item_vectors(proj, jnp.arange(11))[ids],
                             items[ids], rtol=1e-5, atol=1e-6)
  if not model.is_graph:
    np.testing.assert_allclose(model.item_vectors(sub, ids), items[ids], rtol=1e-5, atol=1e-6)


def test_vbpr_item_vector_is_id_and_linear_of_concat():
  data = tiny_data()
  model = build_recommender("vbpr", data, {}, nnx.Rngs(1))
  feats = jfeats(data)
  items = model.item_vectors(model.project(feats), jnp.arange(11))
  concat = np.concatenate([data.features["audio"], data.features["image"]], 1)  # sorted order
  w, b = np.asarray(model.item_linear.kernel[...]), np.asarray(model.item_linear.bias[...])
  np.testing.assert_allclose(items[:, 64:], concat @ w + b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(items[:, :64], model.item_embedding[...], rtol=0, atol=0)


def test_vbpr_item_bias_adds_beta_to_the_dot_product():
  data = tiny_data()
  plain = build_recommender("vbpr", data, {}, nnx.Rngs(1))
  biased = build_recommender("vbpr", data, {"item_bias": True}, nnx.Rngs(1))
  beta = jnp.linspace(-1.0, 2.0, 11)[:, None]
  biased.item_bias[...] = beta
  feats = jfeats(data)
  users, items = biased.encode(biased.project(feats))
  users0, items0 = plain.encode(plain.project(feats))
  chex.assert_shape(users, (7, 129))
  chex.assert_shape(items, (11, 129))
  np.testing.assert_array_equal(users[:, -1], np.ones(7))
  # Same seed, same draws: the non-bias part equals the MMRec model's.
  np.testing.assert_allclose(users[:, :128], users0, rtol=0, atol=0)
  np.testing.assert_allclose(users @ items.T, users0 @ items0.T + beta.T, rtol=1e-5, atol=1e-5)


def test_vbpr_item_bias_learns_planted_popularity():
  """Users pick items by popularity alone (features are noise): beta_i must rank the items
  by that popularity."""
  from uatmc_jax.recsys.trainer import RecsysTrainer
  rng = np.random.default_rng(0)
  n_users, n_items = 300, 40
  pop = 1.0 / np.arange(1, n_items + 1) ** 1.2
  pairs = np.unique(np.concatenate(
      [np.stack([np.full(6, u), rng.choice(n_items, 6, replace=False, p=pop / pop.sum())], 1)
       for u in range(n_users)]), axis=0).astype(np.int32)
  feats = {"image": rng.standard_normal((n_items, 8)).astype(np.float32)}
  data = InteractionData("pop", n_users, n_items, pairs, pairs[:5], pairs[5:10], feats)
  model = build_recommender("vbpr", data, {"item_bias": True, "embedding_dim": 4},
                            nnx.Rngs(0))
  trainer = RecsysTrainer(model, data, dict(epochs=40, patience=40, batch_size=256,
                                            learning_rate=2e-2, reg_weight=1.0, log=False))
  for epoch in range(40):
    trainer.train_epoch(epoch)
  beta = np.asarray(trainer.model.item_bias[...])[:, 0]
  counts = np.bincount(pairs[:, 1], minlength=n_items)
  rank = lambda x: np.argsort(np.argsort(x))
  spearman = np.corrcoef(rank(beta), rank(counts))[0, 1]
  assert spearman > 0.8, spearman


def test_vbpr_mlp_projection_is_unit_norm_and_width_rule():
  assert projection_hidden(4096, 1024) == (1024, 256)
  assert projection_hidden(384, 1024) == (256,)
  data = tiny_data(dims=(("image", 2048), ("text", 16)))
  model = build_recommender("vbpr_mlp", data, {}, nnx.Rngs(0))
  assert len(model.projectors["image"].hidden) == 2 and len(model.projectors["text"].hidden) == 1
  proj = model.project(jfeats(data))
  for m in model.modalities:
    chex.assert_shape(proj[m], (11, 64))
    np.testing.assert_allclose(jnp.linalg.norm(proj[m], axis=1), 1.0, rtol=1e-5)


def test_three_modalities_pairwise_info_nce():
  data = tiny_data(dims=(("a", 4), ("b", 6), ("c", 3)))
  model = build_recommender("vbpr_mlp", data, {"align_weight": 0.5}, nnx.Rngs(0))
  proj = model.project(jfeats(data))
  ids = jnp.arange(11)
  t = model.temperature()
  views = [proj[m] for m in ("a", "b", "c")]
  nce = base.unit_info_nce
  expect = 0.5 * (nce(views[0], views[1], t, ids) + nce(views[0], views[2], t, ids)
                  + nce(views[1], views[2], t, ids)) / 3
  np.testing.assert_allclose(model.auxiliary_loss(proj, ids), expect, rtol=1e-6)


def test_info_nce_closed_form_and_duplicates():
  a = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  b = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  # logits = I/τ: each row's CE = log(e^{1/τ} + 1) − 1/τ.
  tau = 0.5
  expect = math.log(math.exp(2.0) + 1.0) - 2.0
  np.testing.assert_allclose(losses.info_nce(a, b, tau), expect, rtol=1e-6)
  # Two rows of the same item: the duplicate is not a negative, so each CE is 0.
  np.testing.assert_allclose(losses.info_nce(a, b, tau, jnp.array([3, 3])), 0.0, atol=1e-6)


@pytest.mark.parametrize("nce", [base.info_nce, base.unit_info_nce])
def test_info_nce_ignores_padding_rows(nce):
  """Padding rows (copies of row 0, mask 0, as the trainer's short last batch) change
  neither the rows averaged nor the negatives: the value is that of the real rows."""
  rng = np.random.default_rng(0)
  a = base.l2_normalize(jnp.asarray(rng.standard_normal((5, 4)), jnp.float32))
  b = base.l2_normalize(jnp.asarray(rng.standard_normal((5, 4)), jnp.float32))
  ids = jnp.array([4, 7, 4, 9, 2])  # a duplicated id among the real rows
  pad = jnp.array([0, 0, 0])
  a_pad, b_pad = jnp.concatenate([a, a[pad]]), jnp.concatenate([b, b[pad]])
  ids_pad = jnp.concatenate([ids, ids[pad]])
  mask = jnp.array([1.0] * 5 + [0.0] * 3)
  clean = nce(a, b, 0.3, ids)
  np.testing.assert_allclose(nce(a_pad, b_pad, 0.3, ids_pad, mask=mask), clean, rtol=1e-6)
  np.testing.assert_allclose(nce(a_pad, b_pad, 0.3, None, mask=mask), nce(a, b, 0.3),
                             rtol=1e-6)
  # Unmasked, the padding does change it (the defect the mask removes).
  assert abs(float(nce(a_pad, b_pad, 0.3, ids_pad)) - float(clean)) > 1e-3
  g_pad = jax.grad(lambda x: nce(x, b_pad, 0.3, ids_pad, mask=mask))(a_pad)
  np.testing.assert_allclose(g_pad[:5], jax.grad(lambda x: nce(x, b, 0.3, ids))(a),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("defence", ["vanilla", "apr", "amr"])
def test_padded_batch_loss_equals_unpadded(defence):
  """The whole training loss of a batch padded with copies of row 0 (mask 0) equals the
  loss of the real rows alone, InfoNCE included (VBPR-MLP, InfoNCE weight 1)."""
  from uatmc_jax.recsys.defences import make_defence_loss
  data = tiny_data()
  model = build_recommender("vbpr_mlp", data, {"align_weight": 1.0}, nnx.Rngs(0))
  users, pos, neg = jnp.array([0, 1, 2, 3]), jnp.array([1, 2, 3, 4]), jnp.array([5, 6, 7, 8])
  pad = jnp.zeros(4, jnp.int32)
  padded = {"users": jnp.concatenate([users, users[pad]]),
            "pos": jnp.concatenate([pos, pos[pad]]), "neg": jnp.concatenate([neg, neg[pad]]),
            "mask": jnp.array([1.0] * 4 + [0.0] * 4)}
  loss_fn = make_defence_loss(defence, {"reg_weight": 0.01})
  loss, aux = loss_fn(model, {"users": users, "pos": pos, "neg": neg}, jfeats(data), None)
  loss_pad, aux_pad = loss_fn(model, padded, jfeats(data), None)
  assert float(aux["aux"]) > 0.1
  np.testing.assert_allclose(aux_pad["aux"], aux["aux"], rtol=1e-5)
  np.testing.assert_allclose(loss_pad, loss, rtol=1e-5)


def test_bpr_and_emb_loss_closed_forms():
  pos, neg = jnp.array([2.0, 0.0, -1.0]), jnp.array([0.0, 0.0, 1.0])
  expect = -np.mean(np.log(1e-10 + 1 / (1 + np.exp(-np.array([2.0, 0.0, -2.0])))))
  np.testing.assert_allclose(losses.bpr_loss(pos, neg), expect, rtol=1e-6)
  mask = jnp.array([1.0, 1.0, 0.0])
  np.testing.assert_allclose(losses.bpr_loss(pos, neg, mask),
                             -np.mean(np.log(1e-10 + 1 / (1 + np.exp(-np.array([2.0, 0.0]))))),
                             rtol=1e-6)
  u = jnp.array([[3.0, 4.0], [0.0, 0.0]])          # Frobenius norm 5
  v = jnp.array([[1.0, 0.0], [0.0, 1.0]])          # sqrt(2)
  np.testing.assert_allclose(losses.emb_loss(u, v), (5 + math.sqrt(2)) / 2, rtol=1e-6)
  np.testing.assert_allclose(losses.emb_loss(u, v, mask=jnp.array([1.0, 0.0])), (5 + 1) / 1,
                             rtol=1e-6)


def test_bpr_objective_gradient_matches_finite_differences():
  jax.config.update("jax_enable_x64", True)
  try:
    data = tiny_data()
    model = build_recommender("vbpr_mlp", data, {}, nnx.Rngs(0))
    feats = {m: jnp.asarray(x, jnp.float64) for m, x in data.features.items()}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    batch = {"users": jnp.array([0, 1, 2, 3]), "pos": jnp.array([1, 2, 3, 4]),
             "neg": jnp.array([5, 6, 7, 8]), "mask": jnp.ones(4)}
    loss_fn = losses.make_bpr_objective({"reg_weight": 0.01})

    def f(p):
      return loss_fn(nnx.merge(graphdef, p, rest), batch, feats, jax.random.key(0))[0]

    f = jax.jit(f)
    grads = jax.jit(jax.grad(f))(params)
    rng = np.random.default_rng(0)
    direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), params)
    h = 1e-6
    plus = jax.tree.map(lambda p, d: p + h * d, params, direction)
    minus = jax.tree.map(lambda p, d: p - h * d, params, direction)
    fd = (f(plus) - f(minus)) / (2 * h)
    analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)
  finally:
    jax.config.update("jax_enable_x64", False)


def test_mmgcn_message_passing_equals_dense_adjacency():
  data = tiny_data()
  dst, src, w = bipartite_edges(data.train, data.n_users, data.n_items)
  n = data.n_users + data.n_items
  adj = np.zeros((n, n))
  pairs = np.unique(data.train, axis=0)
  adj[pairs[:, 0], pairs[:, 1] + data.n_users] = 1
  adj = adj + adj.T
  deg = adj.sum(1)
  inv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1)), 0)
  a_hat = inv[:, None] * adj * inv[None, :]
  x = np.random.default_rng(0).standard_normal((n, 3))
  sparse = jax.ops.segment_sum(jnp.asarray(x)[src] * w[:, None], dst, num_segments=n)
  np.testing.assert_allclose(sparse, a_hat @ x, rtol=1e-5, atol=1e-6)


def test_mmgcn_score_is_sum_of_modality_dots_plus_id():
  data = tiny_data()
  model = build_recommender("mmgcn", data, {"embedding_dim": 8}, nnx.Rngs(0))
  _, (users, items) = project_and_encode(model, jfeats(data))
  parts = [users[:, k * 8:(k + 1) * 8] @ items[:, k * 8:(k + 1) * 8].T for k in range(3)]
  np.testing.assert_allclose(users @ items.T, sum(parts), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(users[:, :8], model.id_embedding[...][:7], atol=0)
  # An independent dense MMGCN (float64): dense D^-1/2 A D^-1/2 and the layers by hand.
  n_u, n_i = data.n_users, data.n_items
  adj = np.zeros((n_u + n_i, n_u + n_i))
  for u, i in data.train:
    adj[u, n_u + i] = adj[n_u + i, u] = 1.0
  deg = adj.sum(1)
  inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1)), 0.0)
  a_hat = inv[:, None] * adj * inv[None, :]
  p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
  leaky = lambda x: np.where(x > 0, x, 0.01 * x)  # noqa: E731
  ids = p(model.id_embedding)
  branches = [ids]
  for m in model.modalities:
    proj = data.features[m] @ p(model.feature_proj[m].kernel) + p(model.feature_proj[m].bias)
    x = np.concatenate([p(model.preferences[m]), proj])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    for layer in model.branches[m]:
      h = leaky(a_hat @ x @ p(layer.conv.kernel))
      x_self = leaky(x @ p(layer.self_linear.kernel) + p(layer.self_linear.bias)) + ids
      x = leaky(np.concatenate([h, x_self], 1) @ p(layer.combine.kernel)
                + p(layer.combine.bias))
    branches.append(x)
  nodes = np.concatenate(branches, 1)
  np.testing.assert_allclose(users, nodes[:n_u], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(items, nodes[n_u:], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(users @ items.T, nodes[:n_u] @ nodes[n_u:].T, rtol=1e-4,
                             atol=1e-5)


def test_gradient_wrt_projected_perturbation_flows():
  data = tiny_data()
  for name in ("vbpr_mlp", "mmgcn"):
    model = build_recommender(name, data, {}, nnx.Rngs(0))
    proj = model.project(jfeats(data))

    def score(delta):
      users, items = model.encode({m: proj[m] + delta[m] for m in proj})
      return jnp.sum(users[0] * items[3])

    g = jax.jit(jax.grad(score))({m: jnp.zeros_like(p) for m, p in proj.items()})
    for m in model.modalities:
      assert float(jnp.abs(g[m][3]).sum()) > 0
      if name == "vbpr_mlp":  # only the target row matters for a non-graph model
        assert float(jnp.abs(g[m][4]).sum()) == 0


def test_unit_info_nce_equals_masked_info_nce_with_duplicates():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 12, 40))          # many duplicated items
  table_a = base.l2_normalize(jnp.asarray(rng.standard_normal((12, 5)), jnp.float32))
  table_b = base.l2_normalize(jnp.asarray(rng.standard_normal((12, 5)), jnp.float32))
  a, b = table_a[ids], table_b[ids]                    # duplicate ids -> identical rows
  assert int(base.duplicate_counts(ids).max()) > 1
  for tau in (0.05, 1.0 / base.UNIT_LOGIT_BOUND):
    f = jax.jit(jax.value_and_grad(lambda x, y, g: g(x, y, tau, ids), argnums=(0, 1)),
                static_argnums=2)
    (v1, g1), (v0, g0) = f(a, b, base.unit_info_nce), f(a, b, base.info_nce)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for x, y in zip(g1, g0):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_vbpr_mlp_default_info_nce_weight_is_the_protocol_default():
  """One InfoNCE default: building VBPR-MLP without a weight gives the weight the
  train_recsys / uatmc protocol uses on real data (1.0), as the docstrings say."""
  from experiments.configs import recsys as recsys_config
  data = tiny_data()
  protocol = recsys_config.default_model_align_weight("../shared/data/tiktok")
  assert build_recommender("vbpr_mlp", data, {}, nnx.Rngs(0)).align_weight == protocol
  cfg = recsys_config.get_config("model=vbpr_mlp,dataset=../shared/data/tiktok")
  assert cfg.model_config["align_weight"] == protocol


@pytest.mark.parametrize("name", ["vbpr", "vbpr_mlp", "mmgcn"])
def test_padded_id_tables_give_the_unpadded_model(name):
  """row_multiple pads the ID tables with zero rows after the real ones; vectors, scores,
  the BPR objective and its gradient on the real rows are those of the unpadded model."""
  data = tiny_data()  # 7 users, 11 items (18 MMGCN nodes): none a multiple of 8
  plain = build_recommender(name, data, {"embedding_dim": 8}, nnx.Rngs(4))
  padded = build_recommender(name, data, {"embedding_dim": 8}, nnx.Rngs(4), row_multiple=8)
  tables = ({"id_embedding": 18, "preferences": 7} if name == "mmgcn"
            else {"user_embedding": 7, "item_embedding": 11})
  flat = {sharding_path(p): x for p, x in
          jax.tree_util.tree_flatten_with_path(nnx.state(padded, nnx.Param))[0]}
  ref = {sharding_path(p): x for p, x in
         jax.tree_util.tree_flatten_with_path(nnx.state(plain, nnx.Param))[0]}
  n_padded = 0
  for path, x in flat.items():
    rows = next((n for t, n in tables.items() if path.startswith(t)), None)
    if rows is None:
      np.testing.assert_array_equal(x, ref[path], err_msg=path)
      continue
    n_padded += 1
    assert x.shape[0] == -(-rows // 8) * 8, path
    np.testing.assert_array_equal(x[:rows], ref[path], err_msg=path)
    np.testing.assert_array_equal(x[rows:], 0.0, err_msg=path)
  assert n_padded == len(data.features) + 1 if name == "mmgcn" else n_padded == 2
  feats = jfeats(data)
  (_, (u0, i0)), (_, (u1, i1)) = project_and_encode(plain, feats), project_and_encode(padded,
                                                                                        feats)
  assert u1.shape == u0.shape == (7, u0.shape[1]) and i1.shape == i0.shape
  np.testing.assert_allclose(u1, u0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(i1, i0, rtol=1e-6, atol=1e-6)
  batch = {"users": jnp.array([0, 6, 3]), "pos": jnp.array([10, 2, 5]),
           "neg": jnp.array([1, 9, 0]), "mask": jnp.ones(3)}

  def objective(model):
    return losses.bpr_objective(model, batch, feats, jax.random.key(0), reg_weight=0.1)[0]

  l0, g0 = nnx.value_and_grad(objective)(plain)
  l1, g1 = nnx.value_and_grad(objective)(padded)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  g1 = {sharding_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(g1)[0]}
  g0 = {sharding_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(g0)[0]}
  for path, g in g1.items():
    rows = g0[path].shape[0] if g0[path].ndim else None
    if rows is not None and g.shape != g0[path].shape:
      np.testing.assert_allclose(g[:rows], g0[path], rtol=1e-5, atol=1e-7, err_msg=path)
      np.testing.assert_array_equal(g[rows:], 0.0, err_msg=path)  # padding never trains
    else:
      np.testing.assert_allclose(g, g0[path], rtol=1e-5, atol=1e-7, err_msg=path)


def sharding_path(path):
  from uatmc_jax.core.parallel.sharding_rules import path_string
  return path_string(path)
