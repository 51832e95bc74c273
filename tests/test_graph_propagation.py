"""The fast MMGCN forward  against independent dense-adjacency references.

* ``symmetric_propagate`` (CSR product with Âᵀ = Â rules) vs Â @ x in numpy: values,
  VJPs, JVPs (in x and in the edge weights), vmaps (of x, of the VJP, of the graph).
* ``MMGCN.encode`` / ``encode_rows`` / the BPR loss vs a dense re-implementation written
  from the layer equations (jnp, D^{-1/2} A D^{-1/2} as a dense matrix, conv applied
  before aggregating as in the paper): values and the gradient of every parameter.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uatmc_jax.recsys.models import base as base
from uatmc_jax.recsys.models.graph_propagation import (is_symmetric, segment_propagate,
                                                symmetric_propagate)
from uatmc_jax.recsys import losses as losses
from uatmc_jax.recsys.models.mmgcn import MMGCN, bipartite_edges

N_USERS, N_ITEMS = 6, 9
DIMS = {"audio": 5, "image": 7}


def tiny_train(seed=0):
  """Random user–item pairs; user 5 and item 8 get no edge (isolated nodes)."""
  rng = np.random.default_rng(seed)
  pairs = np.stack([rng.integers(0, N_USERS - 1, 30), rng.integers(0, N_ITEMS - 1, 30)], 1)
  return np.unique(pairs, axis=0).astype(np.int32)


def dense_adjacency(train, n_users, n_items):
  """D^{-1/2} A D^{-1/2} of the undirected bipartite graph, written from its definition."""
  n = n_users + n_items
  a = np.zeros((n, n))
  for u, i in train:
    a[u, n_users + i] = a[n_users + i, u] = 1.0
  deg = a.sum(1)
  inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1.0)), 0.0)
  return inv[:, None] * a * inv[None, :]


def graph():
  train = tiny_train()
  dst, src, w = bipartite_edges(train, N_USERS, N_ITEMS)
  return train, (jnp.asarray(dst), jnp.asarray(src), jnp.asarray(w)), dense_adjacency(
      train, N_USERS, N_ITEMS)


def test_edge_list_is_symmetric_and_the_check_rejects_one_direction():
  _, (dst, src, w), _ = graph()
  assert is_symmetric(dst, src, w)
  assert not is_symmetric(dst[:-1], src[:-1], w[:-1])
  assert not is_symmetric(dst, src, np.asarray(w) * np.linspace(1, 2, len(w)))


@pytest.mark.parametrize("shape", [(15,), (15, 3), (15, 2, 4)])
def test_propagate_equals_dense_product(shape):
  _, (dst, src, w), a_hat = graph()
  x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  want = np.einsum("ij,j...->i...", a_hat, x)
  for f in (symmetric_propagate, segment_propagate):
    np.testing.assert_allclose(jax.jit(f)(jnp.asarray(x), dst, src, w), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(symmetric_propagate(jnp.asarray(x), dst, src, w), want,
                             rtol=1e-5, atol=1e-6)  # eager (impl rule)


def test_propagate_vjp_jvp_and_weight_tangent_equal_dense():
  _, (dst, src, w), a_hat = graph()
  rng = np.random.default_rng(2)
  x, g, t = (rng.standard_normal((15, 3)).astype(np.float32) for _ in range(3))
  t_w = rng.standard_normal(w.shape).astype(np.float32)
  f = lambda x, w: symmetric_propagate(x, dst, src, w)
  _, vjp = jax.vjp(lambda x: f(x, w), jnp.asarray(x))
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0], a_hat.T @ g, rtol=1e-5, atol=1e-6)
  _, t_y = jax.jvp(f, (jnp.asarray(x), w), (jnp.asarray(t), jnp.asarray(t_w)))
  t_adj = np.zeros((15, 15))
  np.add.at(t_adj, (np.asarray(dst), np.asarray(src)), t_w)
  np.testing.assert_allclose(t_y, a_hat @ t + t_adj @ x, rtol=1e-5, atol=1e-5)
  # reverse over reverse (the second derivative of a quadratic form is 2 Â)
  hvp = jax.grad(lambda x: jnp.vdot(jax.grad(lambda z: jnp.sum(z * f(z, w)))(x), t))(
      jnp.asarray(x))
  np.testing.assert_allclose(hvp, 2 * a_hat @ t, rtol=1e-5, atol=1e-5)
  # reverse mode in the weights goes through the JVP's segment-sum term
  gw = jax.grad(lambda w: jnp.sum(f(jnp.asarray(x), w) * g))(w)
  np.testing.assert_allclose(gw, np.sum(g[np.asarray(dst)] * x[np.asarray(src)], 1),
                             rtol=1e-5, atol=1e-5)


def test_propagate_vmaps_over_x_cotangents_and_graphs():
  _, (dst, src, w), a_hat = graph()
  xs = np.random.default_rng(3).standard_normal((4, 15, 3)).astype(np.float32)
  want = np.einsum("ij,bjk->bik", a_hat, xs)
  for axis in (0, 2):
    got = jax.vmap(lambda x: symmetric_propagate(x, dst, src, w), in_axes=axis, out_axes=axis)(
        jnp.moveaxis(jnp.asarray(xs), 0, axis))
    np.testing.assert_allclose(jnp.moveaxis(got, axis, 0), want, rtol=1e-5, atol=1e-6)
  _, vjp = jax.vjp(lambda x: symmetric_propagate(x, dst, src, w), jnp.asarray(xs[0]))
  np.testing.assert_allclose(jax.vmap(vjp)(jnp.asarray(xs))[0], want, rtol=1e-5, atol=1e-6)
  scales = jnp.asarray([1.0, 2.0, 0.5, -1.0])
  got = jax.vmap(lambda s: symmetric_propagate(jnp.asarray(xs[0]), dst, src, s * w))(scales)
  np.testing.assert_allclose(got, np.asarray(scales)[:, None, None] * (a_hat @ xs[0]),
                             rtol=1e-5, atol=1e-5)


# -- the model ---------------------------------------------------------------------------

def tiny_model(num_layers=2, seed=0):
  train = tiny_train()
  model = MMGCN(N_USERS, N_ITEMS, DIMS, train, embedding_dim=4, num_layers=num_layers,
                rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 10)
  feats = {m: jnp.asarray(rng.standard_normal((N_ITEMS, d)), jnp.float32)
           for m, d in DIMS.items()}
  return model, feats, jnp.asarray(dense_adjacency(train, N_USERS, N_ITEMS), jnp.float32)


def reference_nodes(params, feats, a_hat, num_layers):
  """All node vectors from the paper's equations with a dense Â (independent of the model code).

  x_0 = normalize([P^m ; X^m W_p + b_p]); per layer h = lrelu(Â (x W_conv)),
  x̃ = lrelu(x W_self + b_self) + e_id, x = lrelu([h ; x̃] W_g + b_g); nodes =
  [e_id ; x^{m_1} ; x^{m_2}] (modalities sorted).
  """
  lrelu = lambda v: jnp.where(v >= 0, v, 0.01 * v)
  e = params["id_embedding"]
  out = [e]
  for m in sorted(DIMS):
    proj = feats[m] @ params["feature_proj"][m]["kernel"] + params["feature_proj"][m]["bias"]
    x = jnp.concatenate([params["preferences"][m], proj], 0)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    for l in range(num_layers):
      layer = params["branches"][m][l]
      h = lrelu(a_hat @ (x @ layer["conv"]["kernel"]))
      s = lrelu(x @ layer["self_linear"]["kernel"] + layer["self_linear"]["bias"]) + e
      g = layer["combine"]
      x = lrelu(h @ g["kernel"][:4] + s @ g["kernel"][4:] + g["bias"])
    out.append(x)
  return jnp.concatenate(out, 1)


def plain_params(model):
  """The parameter arrays as a nested dict of plain arrays (for the reference)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_fn(graphdef, rest):
  def f(params):
    return nnx.merge(graphdef, params, rest)
  return f


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_encode_and_encode_rows_equal_the_dense_reference(num_layers):
  model, feats, a_hat = tiny_model(num_layers)
  want = reference_nodes(plain_params(model), feats, a_hat, num_layers)
  users, items = nnx.jit(lambda m, f: m.encode(m.project(f)))(model, feats)
  np.testing.assert_allclose(users, want[:N_USERS], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(items, want[N_USERS:], rtol=1e-5, atol=1e-6)
  u_ids = jnp.asarray([5, 0, 0, 3])  # an isolated user and a duplicate
  i_ids = jnp.asarray([8, 2, 2, 7, 0])  # an isolated item and a duplicate
  u, i = nnx.jit(lambda m, f: m.encode_rows(m.project(f), u_ids, i_ids))(model, feats)
  np.testing.assert_allclose(u, want[np.asarray(u_ids)], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(i, want[N_USERS + np.asarray(i_ids)], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.item_vectors(model.project(feats), i_ids),
                             want[N_USERS + np.asarray(i_ids)], rtol=1e-5, atol=1e-6)


def test_bpr_objective_gradients_equal_the_dense_reference():
  """Every parameter's gradient of the training loss (BPR + EmbLoss through encode_rows)."""
  model, feats, a_hat = tiny_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = {"users": jnp.asarray([0, 1, 1, 4, 5]), "pos": jnp.asarray([1, 2, 2, 0, 3]),
           "neg": jnp.asarray([8, 4, 6, 6, 2]), "mask": jnp.asarray([1, 1, 1, 1, 0.0])}
  objective = losses.make_bpr_objective({"reg_weight": 0.1})

  def fast(p):
    return objective(nnx.merge(graphdef, p, rest), batch, feats, jax.random.key(0))[0]

  def reference(p):
    nodes = reference_nodes(nnx.to_pure_dict(p), feats, a_hat, 2)
    u = nodes[batch["users"]]
    pos, neg = nodes[N_USERS + batch["pos"]], nodes[N_USERS + batch["neg"]]
    return (losses.bpr_loss(jnp.sum(u * pos, 1), jnp.sum(u * neg, 1), batch["mask"])
            + 0.1 * losses.emb_loss(u, pos, neg, mask=batch["mask"]))

  got_loss, got = jax.jit(jax.value_and_grad(fast))(params)
  want_loss, want = jax.jit(jax.value_and_grad(reference))(params)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  flat_got = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(got))[0]
  flat_want = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(want))[0]
  assert [k for k, _ in flat_got] == [k for k, _ in flat_want] and len(flat_got) == 27
  for (path, g), (_, r) in zip(flat_got, flat_want):
    np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  assert sum(float(jnp.max(jnp.abs(r))) > 0 for _, r in flat_want) == len(flat_want)

def test_forward_mode_and_vmap_through_encode_equal_the_reference():
  """The attacks take jvp (mismatch gains) and vmap over targets through encode."""
  model, feats, a_hat = tiny_model()
  params = plain_params(model)
  proj = model.project(feats)
  rng = np.random.default_rng(4)
  tangent = {m: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) for m, p in proj.items()}

  def fast(p):
    return jnp.concatenate(model.encode(p), 0)

  def reference(p):
    # the reference takes raw features; feed the projected table through identity maps
    ident = {m: {"kernel": jnp.eye(4), "bias": jnp.zeros(4)} for m in DIMS}
    return reference_nodes(dict(params, feature_proj=ident), p, a_hat, 2)

  _, t_fast = jax.jvp(fast, (proj,), (tangent,))
  _, t_ref = jax.jvp(reference, (proj,), (tangent,))
  np.testing.assert_allclose(t_fast, t_ref, rtol=1e-4, atol=1e-6)
  deltas = {m: jnp.asarray(rng.standard_normal((3,) + p.shape), jnp.float32)
            for m, p in proj.items()}
  batched = jax.jit(jax.vmap(lambda d: fast({m: proj[m] + d[m] for m in proj})))(deltas)
  for k in range(3):
    one = reference({m: proj[m] + deltas[m][k] for m in proj})
    np.testing.assert_allclose(batched[k], one, rtol=1e-4, atol=1e-6)


def test_layer_call_is_the_plain_aggregation_of_the_paper():
  """MMGCNLayer.__call__ (kept for callers with their own edge lists) equals one dense layer."""
  model, _, a_hat = tiny_model()
  train = tiny_train()
  dst, src, w = (jnp.asarray(a) for a in bipartite_edges(train, N_USERS, N_ITEMS))
  layer = model.branches["audio"][0]
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((15, 4)), jnp.float32)
  e = model.id_embedding[...]
  lrelu = lambda v: jnp.where(v >= 0, v, 0.01 * v)
  p = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  s = lrelu(x @ p["self_linear"]["kernel"] + p["self_linear"]["bias"]) + e
  want = lrelu(jnp.concatenate([lrelu(a_hat @ (x @ p["conv"]["kernel"])), s], 1)
               @ p["combine"]["kernel"] + p["combine"]["bias"])
  np.testing.assert_allclose(layer(x, e, dst, src, w, 15), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layer.output(layer.conv(a_hat @ x), x, e), want, rtol=1e-5,
                             atol=1e-6)
