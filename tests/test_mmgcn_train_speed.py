"""The two-table MMGCN forward (``bipartite_propagate``, ``MMGCN.split_forward``) against
independent references.

* ``bipartite_propagate`` vs the dense blocks of Â = [[0, B], [Bᵀ, 0]] in numpy: values
  (eager, jit, any trailing shape), VJP (= the product again), JVP in the tables and in
  the edge weights, reverse-over-reverse, vmaps (of either table, of the VJP, of the
  graph), and the GPU/TPU lowering (chunked, rectangular blocks) run on CPU.
* ``MMGCN.encode`` / ``encode_rows`` / the BPR loss and every parameter's gradient vs
  the one-table forward it replaces (``MMGCN._forward``: users and items in one array,
  modalities side by side, ``symmetric_propagate``) and vs a dense-Â re-implementation
  of the layer equations; padded tables (``row_multiple``) give the same numbers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uatmc_jax.recsys import losses
from uatmc_jax.recsys.models import graph_propagation as gp
from uatmc_jax.recsys.models.mmgcn import MMGCN, NodeForwardEncoder, bipartite_edges

N_USERS, N_ITEMS = 7, 10
DIMS = {"audio": 5, "image": 3}


def tiny_train(seed=0):
  """Random pairs; user 6 and item 9 get no edge (isolated nodes), user 0 many edges."""
  rng = np.random.default_rng(seed)
  pairs = np.stack([rng.integers(0, N_USERS - 1, 35), rng.integers(0, N_ITEMS - 1, 35)], 1)
  pairs = np.concatenate([pairs, np.stack([np.zeros(9, int), np.arange(9)], 1)])
  return np.unique(pairs, axis=0).astype(np.int32)


def dense_blocks(train):
  """B (U × I) of Â = D^{-1/2} A D^{-1/2} = [[0, B], [Bᵀ, 0]], from the definition."""
  a = np.zeros((N_USERS, N_ITEMS))
  a[train[:, 0], train[:, 1]] = 1.0
  du, di = a.sum(1), a.sum(0)
  inv = lambda d: np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1.0)), 0.0)
  return inv(du)[:, None] * a * inv(di)[None, :]


def graph(train=None):
  train = tiny_train() if train is None else train
  dst, src, w = bipartite_edges(train, N_USERS, N_ITEMS)
  n_user_edges = int(np.searchsorted(dst, N_USERS))
  g = gp.bipartite_graph(jnp.asarray(dst), jnp.asarray(src), jnp.asarray(w), N_USERS,
                         N_ITEMS, n_user_edges)
  return g, dense_blocks(train)


def rand(rng, shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("tail", [(), (3,), (2, 4)])
def test_bipartite_propagate_equals_the_dense_blocks(tail):
  g, b = graph()
  rng = np.random.default_rng(1)
  xu, xi = rand(rng, (N_USERS,) + tail), rand(rng, (N_ITEMS,) + tail)
  want_u = np.einsum("ij,j...->i...", b, np.asarray(xi))
  want_i = np.einsum("ji,j...->i...", b, np.asarray(xu))
  for f in (jax.jit(gp.bipartite_propagate), gp.bipartite_propagate,  # jit and eager
            jax.jit(gp.bipartite_segment_propagate)):
    yu, yi = f(xu, xi, g)
    np.testing.assert_allclose(yu, want_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yi, want_i, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(yu)[N_USERS - 1] == 0) and np.all(np.asarray(yi)[N_ITEMS - 1] == 0)


def test_bipartite_propagate_different_column_counts_and_bad_shapes():
  g, b = graph()
  rng = np.random.default_rng(2)
  xu, xi = rand(rng, (N_USERS, 2)), rand(rng, (N_ITEMS, 5))
  yu, yi = jax.jit(gp.bipartite_propagate)(xu, xi, g)
  assert yu.shape == (N_USERS, 5) and yi.shape == (N_ITEMS, 2)
  np.testing.assert_allclose(yu, b @ np.asarray(xi), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="rows"):
    gp.bipartite_propagate(xi, xu, g)


def test_bipartite_propagate_vjp_jvp_and_weight_tangents_equal_dense():
  g, b = graph()
  rng = np.random.default_rng(3)
  xu, xi, cu, ci, tu, ti = (rand(rng, (n, 3)) for n in (N_USERS, N_ITEMS) * 3)
  f = lambda xu, xi: gp.bipartite_propagate(xu, xi, g)
  _, vjp = jax.vjp(f, xu, xi)
  du, di = vjp((cu, ci))
  # <B xi, cu> + <Bᵀ xu, ci>: d/dxu = B ci, d/dxi = Bᵀ cu
  np.testing.assert_allclose(du, b @ np.asarray(ci), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(di, b.T @ np.asarray(cu), rtol=1e-5, atol=1e-6)
  # one output's cotangent only (the other a symbolic zero)
  du, di = jax.grad(lambda xu, xi: jnp.sum(f(xu, xi)[0] * cu), argnums=(0, 1))(xu, xi)
  np.testing.assert_allclose(du, 0 * b @ np.asarray(ci), atol=0)
  np.testing.assert_allclose(di, b.T @ np.asarray(cu), rtol=1e-5, atol=1e-6)
  # forward mode, with one tangent symbolically zero
  _, (t_u, t_i) = jax.jvp(lambda xi: f(xu, xi), (xi,), (ti,))
  np.testing.assert_allclose(t_u, b @ np.asarray(ti), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t_i, 0 * np.asarray(t_i), atol=0)
  _, (t_u, t_i) = jax.jvp(f, (xu, xi), (tu, ti))
  np.testing.assert_allclose(t_i, b.T @ np.asarray(tu), rtol=1e-5, atol=1e-6)
  # reverse over reverse: the Hessian of <P(x), x> is 2 P
  q = lambda xu, xi: sum(jnp.vdot(y, x) for y, x in zip(f(xu, xi), (xu, xi)))
  hvp = jax.grad(lambda xu, xi: jnp.vdot(jax.grad(q, argnums=(0, 1))(xu, xi)[0], tu),
                 argnums=1)(xu, xi)
  np.testing.assert_allclose(hvp, 2 * b.T @ np.asarray(tu), rtol=1e-5, atol=1e-5)
  # the edge weights' tangent (through the plain form)
  t_wu, t_wi = rand(rng, g.weight_u.shape), rand(rng, g.weight_i.shape)
  h = lambda wu, wi: gp.bipartite_propagate(xu, xi, g._replace(weight_u=wu, weight_i=wi))
  _, (t_u, t_i) = jax.jvp(h, (g.weight_u, g.weight_i), (t_wu, t_wi))
  tb_u = np.zeros((N_USERS, N_ITEMS))
  np.add.at(tb_u, (np.asarray(g.rows_u), np.asarray(g.cols_u)), np.asarray(t_wu))
  tb_i = np.zeros((N_ITEMS, N_USERS))
  np.add.at(tb_i, (np.asarray(g.rows_i), np.asarray(g.cols_i)), np.asarray(t_wi))
  np.testing.assert_allclose(t_u, tb_u @ np.asarray(xi), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(t_i, tb_i @ np.asarray(xu), rtol=1e-5, atol=1e-5)


def test_bipartite_propagate_vmaps_over_tables_cotangents_and_graphs():
  g, b = graph()
  rng = np.random.default_rng(4)
  xus, xis = rand(rng, (4, N_USERS, 3)), rand(rng, (4, N_ITEMS, 3))
  want_u = np.einsum("ij,bjk->bik", b, np.asarray(xis))
  want_i = np.einsum("ji,bjk->bik", b, np.asarray(xus))
  f = lambda xu, xi: gp.bipartite_propagate(xu, xi, g)
  yu, yi = jax.jit(jax.vmap(f))(xus, xis)
  np.testing.assert_allclose(yu, want_u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(yi, want_i, rtol=1e-5, atol=1e-6)
  yu, yi = jax.vmap(f, in_axes=(None, 2), out_axes=2)(xus[0], jnp.moveaxis(xis, 0, 2))
  np.testing.assert_allclose(jnp.moveaxis(yu, 2, 0), want_u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.moveaxis(yi, 2, 0), np.broadcast_to(want_i[0], want_i.shape),
                             rtol=1e-5, atol=1e-6)
  _, vjp = jax.vjp(f, xus[0], xis[0])
  du, di = jax.vmap(vjp)((xus, xis))  # cotangent (c_U, c_I) -> (B c_I, Bᵀ c_U)
  np.testing.assert_allclose(du, want_u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(di, want_i, rtol=1e-5, atol=1e-6)
  scales = jnp.asarray([1.0, 2.0, -0.5])
  yu, yi = jax.vmap(lambda s: gp.bipartite_propagate(
      xus[0], xis[0], g._replace(weight_u=s * g.weight_u, weight_i=s * g.weight_i)))(scales)
  np.testing.assert_allclose(yu, np.asarray(scales)[:, None, None] * want_u[0], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(yi, np.asarray(scales)[:, None, None] * want_i[0], rtol=1e-5,
                             atol=1e-5)


def test_chunked_lowering_of_the_rectangular_blocks_equals_dense():
  """The GPU/TPU lowering (chunked segment sums, rectangular blocks), run on CPU with
  chunks smaller than the edge list."""
  g, b = graph()
  rng = np.random.default_rng(5)
  xu, xi = rand(rng, (N_USERS, 3)), rand(rng, (N_ITEMS, 3))
  for chunk in (3 * 4, 3 * 7, 1 << 20):
    yu = gp.chunked_propagate(g.weight_u, g.rows_u, g.cols_u, xi, chunk_elements=chunk,
                              num_rows=N_USERS)
    yi = gp.chunked_propagate(g.weight_i, g.rows_i, g.cols_i, xu, chunk_elements=chunk,
                              num_rows=N_ITEMS)
    np.testing.assert_allclose(yu, b @ np.asarray(xi), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yi, b.T @ np.asarray(xu), rtol=1e-5, atol=1e-6)
  yu, yi = gp._bipartite_chunked(*g, xu, xi)
  np.testing.assert_allclose(yu, b @ np.asarray(xi), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(yi, b.T @ np.asarray(xu), rtol=1e-5, atol=1e-6)


# -- the model ---------------------------------------------------------------------------

class OneTable(MMGCN):
  """The forward the two-table one replaces: ``MMGCN._forward`` (one (N, ·) node table)."""
  encode = NodeForwardEncoder.encode
  encode_rows = NodeForwardEncoder.encode_rows


def tiny(cls=MMGCN, num_layers=2, row_multiple=1, seed=0):
  model = cls(N_USERS, N_ITEMS, DIMS, tiny_train(), embedding_dim=4, num_layers=num_layers,
              row_multiple=row_multiple, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 10)
  feats = {m: rand(rng, (N_ITEMS, d)) for m, d in DIMS.items()}
  return model, feats


def dense_reference_nodes(model, feats):
  """[e_id ; x^{m_1} ; x^{m_2}] of all nodes from the layer equations with a dense Â."""
  b = dense_blocks(tiny_train())
  a_hat = jnp.asarray(np.block([[np.zeros((N_USERS, N_USERS)), b],
                                [b.T, np.zeros((N_ITEMS, N_ITEMS))]]), jnp.float32)
  lrelu = lambda v: jnp.where(v >= 0, v, 0.01 * v)
  e = model.id_table()
  out = [e]
  for m in model.modalities:
    proj = model.project(feats)[m]
    x = jnp.concatenate([model.preference_table(m), proj], 0)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    for layer in model.branches[m]:
      h = lrelu(a_hat @ (x @ layer.conv.kernel[...]))
      s = lrelu(x @ layer.self_linear.kernel[...] + layer.self_linear.bias[...]) + e
      x = lrelu(jnp.concatenate([h, s], 1) @ layer.combine.kernel[...] + layer.combine.bias[...])
    out.append(x)
  return jnp.concatenate(out, 1)


@pytest.mark.parametrize("num_layers,row_multiple", [(0, 1), (1, 1), (2, 1), (3, 1), (2, 4)])
def test_split_forward_equals_the_one_table_forward_and_the_dense_reference(num_layers,
                                                                            row_multiple):
  model, feats = tiny(num_layers=num_layers, row_multiple=row_multiple)
  old, _ = tiny(OneTable, num_layers=num_layers, row_multiple=row_multiple)
  want = dense_reference_nodes(model, feats)
  users, items = nnx.jit(lambda m, f: m.encode(m.project(f)))(model, feats)
  old_u, old_i = nnx.jit(lambda m, f: m.encode(m.project(f)))(old, feats)
  np.testing.assert_allclose(users, old_u, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(items, old_i, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(jnp.concatenate([users, items]), want, rtol=1e-5, atol=1e-6)
  u_ids, i_ids = jnp.asarray([6, 0, 0, 3]), jnp.asarray([9, 2, 2, 7, 0])
  u, i = nnx.jit(lambda m, f: m.encode_rows(m.project(f), u_ids, i_ids))(model, feats)
  np.testing.assert_allclose(u, want[np.asarray(u_ids)], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(i, want[N_USERS + np.asarray(i_ids)], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.item_vectors(model.project(feats), i_ids),
                             want[N_USERS + np.asarray(i_ids)], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model._forward(model.project(feats)), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="both"):
    model.split_forward(model.project(feats), u_ids, None)


@pytest.mark.parametrize("row_multiple", [1, 4])
def test_bpr_gradients_of_every_parameter_equal_the_one_table_forward(row_multiple):
  """The training step's loss and gradients: the two-table forward vs the one it replaces."""
  model, feats = tiny(row_multiple=row_multiple)
  old, _ = tiny(OneTable, row_multiple=row_multiple)
  batch = {"users": jnp.asarray([0, 1, 1, 4, 5, 0]), "pos": jnp.asarray([1, 2, 2, 0, 3, 8]),
           "neg": jnp.asarray([9, 4, 6, 6, 2, 5]), "mask": jnp.asarray([1, 1, 1, 1, 1, 0.0])}
  objective = losses.make_bpr_objective({"reg_weight": 0.1})

  def loss_and_grads(m):
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    f = lambda p: objective(nnx.merge(graphdef, p, rest), batch, feats, jax.random.key(0))[0]
    loss, grads = jax.jit(jax.value_and_grad(f))(params)
    return loss, jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]

  got_loss, got = loss_and_grads(model)
  want_loss, want = loss_and_grads(old)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  assert [k for k, _ in got] == [k for k, _ in want] and len(got) == 27
  for (path, g), (_, r) in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  assert all(float(jnp.max(jnp.abs(r))) > 0 for _, r in want)
