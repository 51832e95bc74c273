"""The promotion attack and graph propagation at scale: layouts, lowerings, precision.

* anchors must be distinct (a repeated id gave the graph path a wrong row);
* MMGCN refuses an asymmetric graph (the propagation's backward pass assumes Âᵀ = Â);
* the top-k context layout gives the dense layout's numbers, and its compiled program
  stays small at 1M users × 100k items (memory_analysis, abstract shapes, 8 devices);
* the GPU/TPU lowering of the propagation (chunked segment sums) equals a dense
  reference, has no (edges × columns) temporary, and MMGCN training steps and attack
  chunks export for cuda and tpu;
* the attack programs carry full float32 matmul precision.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attack_fixtures import make_surface
from uatmc_jax.core import errors
from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.recsys import losses
from uatmc_jax.recsys.attacks import context as context_lib
from uatmc_jax.recsys.attacks.attackers import fgsm_attack, pgd_attack
from uatmc_jax.recsys.attacks.context import build_context
from uatmc_jax.recsys.attacks.runner import PromotionAttackRunner
from uatmc_jax.recsys.attacks.surface import surface_from_recommender
from uatmc_jax.recsys.models import graph_propagation as gp
from uatmc_jax.recsys.models import mmgcn as mmgcn_lib
from uatmc_jax.recsys.models.mmgcn import MMGCN, bipartite_edges

SDS = jax.ShapeDtypeStruct


def _random_pairs(n_users, n_items, n, seed):
  rng = np.random.default_rng(seed)
  pairs = np.stack([rng.integers(0, n_users, n), rng.integers(0, n_items, n)], 1)
  return np.unique(pairs, axis=0).astype(np.int32)


def _mmgcn_surface(n_users=16, n_items=40, seed=0):
  train = _random_pairs(n_users, n_items, 90, seed)
  dims = {"a": 6, "b": 4}
  model = MMGCN(n_users, n_items, dims, train, embedding_dim=8, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(1)
  feats = {m: rng.standard_normal((n_items, d)).astype(np.float32) for m, d in dims.items()}
  return model, surface_from_recommender(model, feats, space="projected"), train, feats


# ---------------------------------------------------------------------------------
# Anchors.


def test_repeated_anchor_ids_are_refused():
  surface = make_surface(jax.random.key(0))
  with pytest.raises(errors.ConfigError, match=r"2 id\(s\) repeat.*\[3, 5\]"):
    build_context(surface, np.array([0, 3, 5, 3, 7, 5, 5]), k=3)
  _, graph_surface, _, _ = _mmgcn_surface()
  with pytest.raises(errors.ConfigError, match=r"1 id\(s\) repeat"):
    build_context(graph_surface, np.array([1, 2, 2]), k=3)
  with pytest.raises(errors.ConfigError, match="user ids in"):
    build_context(surface, np.array([0, 12]), k=3)  # 12 users: ids 0..11


# ---------------------------------------------------------------------------------
# The propagation's contract and dtypes.


def test_mmgcn_refuses_an_asymmetric_graph(monkeypatch):
  train = _random_pairs(6, 9, 20, 0)
  dst, src, w = bipartite_edges(train, 6, 9)
  bad = w.copy()
  bad[0] *= 2.0  # one direction of one edge reweighted
  monkeypatch.setattr(mmgcn_lib, "bipartite_edges", lambda *a: (dst, src, bad))
  with pytest.raises(errors.ConfigError, match="not symmetric"):
    MMGCN(6, 9, {"a": 3}, train, embedding_dim=4, rngs=nnx.Rngs(0))
  monkeypatch.setattr(mmgcn_lib, "bipartite_edges", lambda *a: (dst[1:], src[1:], w[1:]))
  with pytest.raises(errors.ConfigError, match="not symmetric"):
    MMGCN(6, 9, {"a": 3}, train, embedding_dim=4, rngs=nnx.Rngs(0))


def _dense(dst, src, w, n):
  a = np.zeros((n, n))
  np.add.at(a, (np.asarray(dst), np.asarray(src)), np.asarray(w, np.float64))
  return a


def test_batched_graph_keeps_bfloat16():
  train = _random_pairs(6, 9, 20, 0)
  dst, src, w = bipartite_edges(train, 6, 9)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((15, 4)), jnp.bfloat16)
  ws = jnp.stack([jnp.asarray(w), 2 * jnp.asarray(w)])
  f = jax.vmap(lambda wi: gp.symmetric_propagate(x, dst, src, wi))
  assert jax.eval_shape(f, ws).dtype == jnp.bfloat16
  out = f(ws)
  assert out.dtype == jnp.bfloat16
  a = _dense(dst, src, w, 15)
  ref = np.stack([a @ np.asarray(x, np.float64), 2 * a @ np.asarray(x, np.float64)])
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------
# The GPU/TPU lowering: chunked sorted segment sums.


@pytest.mark.parametrize("chunk_elements", [1, 7, 60, 1 << 20])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_propagation_equals_dense_reference(chunk_elements, dtype):
  train = _random_pairs(30, 20, 300, 0)
  dst, src, w = bipartite_edges(train, 30, 20)
  x = np.random.default_rng(1).standard_normal((50, 3, 4)).astype(np.float32)
  fn = jax.jit(lambda *a: gp.chunked_propagate(*a, chunk_elements=chunk_elements))
  out = fn(w, dst, src, jnp.asarray(x, dtype))
  assert out.dtype == dtype and out.shape == x.shape
  ref = np.einsum("ij,jkl->ikl", _dense(dst, src, w, 50), np.asarray(jnp.asarray(x, dtype),
                                                                       np.float64))
  tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: only the final rounding
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=tol, atol=tol)
  # Gradient (transpose = Â again) through the primitive, evaluated on this lowering.
  g = jax.grad(lambda v: jnp.sum(jnp.sin(fn(w, dst, src, v))))(jnp.asarray(x))
  g_ref = np.einsum("ij,ikl->jkl", _dense(dst, src, w, 50),
                    np.cos(np.einsum("ij,jkl->ikl", _dense(dst, src, w, 50), x)))
  np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-4, atol=1e-5)


# 100M edges of a 2M-node graph, 192 columns (MMGCN: 3 branches × 64): per-edge messages
# would be 100M × 192 × 4 B = 71.5 GiB. The chunked form's temporaries are a few
# (chunk × cols) blocks (64 MiB each; 130 MiB measured on CPU), its float32 accumulator
# being the output itself (1.4 GiB; a bfloat16 input adds a float32 accumulator).
BIG_EDGES, BIG_NODES, BIG_COLS = 100_000_000, 2_000_000, 192
CHUNKED_TEMP_BOUND = 8 * gp.CHUNK_ELEMENTS * 4  # 512 MiB


def test_chunked_propagation_memory_is_bounded_at_100m_edges():
  fn = jax.jit(gp.chunked_propagate)
  compiled = fn.lower(SDS((BIG_EDGES,), jnp.float32), SDS((BIG_EDGES,), jnp.int32),
                      SDS((BIG_EDGES,), jnp.int32),
                      SDS((BIG_NODES, BIG_COLS), jnp.float32)).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= CHUNKED_TEMP_BOUND, temp
  assert temp < BIG_EDGES * BIG_COLS * 4 / 20  # far below one message per edge


def _mmgcn_train_step(model):
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  feats = {m: jnp.ones((model.n_items, d), jnp.float32) for m, d in (("a", 6), ("b", 4))}
  batch = {"users": jnp.array([0, 1, 2], jnp.int32), "pos": jnp.array([3, 4, 5], jnp.int32),
           "neg": jnp.array([6, 7, 8], jnp.int32), "mask": jnp.ones(3, jnp.float32)}

  def step(state, batch, feats):
    def loss(s):
      return losses.bpr_objective(nnx.merge(graphdef, s, rest), batch, feats,
                                  jax.random.key(0),
                                  reg_weight=1e-4)[0]
    return jax.value_and_grad(loss)(state)

  return step, (state, batch, feats)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_mmgcn_training_step_exports_with_the_chunked_lowering(platform, monkeypatch):
  model, _, train, _ = _mmgcn_surface()
  n_edges = int(model.edge_dst[...].shape[0])
  step, args = _mmgcn_train_step(model)
  # 64 elements per chunk: 4 edges x 16 columns (2 modalities x 8) per message block.
  monkeypatch.setattr(gp, "CHUNK_ELEMENTS", 64)
  exported = jax.export.export(jax.jit(step), platforms=[platform])(*args)
  text = exported.mlir_module()
  assert "stablehlo.while" in text
  assert re.search(r"tensor<4x16xf32>", text)
  # No per-edge message block (E x columns) on this platform: BCSR @ dense gathers one.
  assert not re.search(rf"tensor<{n_edges}x16x(f32|bf16)>", text)
  assert "cusparse" not in text.lower()
  # The CPU lowering is the CSR kernel (no loop over edge chunks).
  cpu = jax.jit(step).lower(*args).as_text()  # the CPU kernel: a CSR custom call
  assert "cpu_csr_sparse_dense" in cpu and "cpu_csr_sparse_dense" not in text


def _attack_args(runner, surface, ctx):
  s = surface
  n_a = int(ctx.anchors.shape[0])
  return (s.params, s.attack_table, s.projected_table, ctx, jnp.ones((n_a, 1), jnp.float32),
          jnp.asarray(0.05, jnp.float32), None,
          jnp.zeros(runner.chunk_size, jnp.int32))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_attack_chunk_functions_export(platform):
  surface = make_surface(jax.random.key(1), n_users=12, n_items=30)
  for dense in (True, False):
    ctx = build_context(surface, np.arange(6), k=3, dense=dense,
                        train_pairs=_random_pairs(12, 30, 40, 1))
    runner = PromotionAttackRunner(surface, chunk_size=2)
    fn = runner.chunk_function(pgd_attack(0.05, k=3))
    jax.export.export(fn, platforms=[platform])(*_attack_args(runner, surface, ctx))
  _, graph_surface, _, _ = _mmgcn_surface()
  ctx = build_context(graph_surface, np.arange(6), k=3)
  runner = PromotionAttackRunner(graph_surface, chunk_size=1, graph_path="full",
                                 with_mismatch=False)
  fn = runner.chunk_function(pgd_attack(0.05, k=3))
  text = jax.export.export(fn, platforms=[platform])(
      *_attack_args(runner, graph_surface, ctx)).mlir_module()
  assert "stablehlo.while" in text


# ---------------------------------------------------------------------------------
# Full float32 precision in the attack programs.


def _dots_are_highest(text):
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert dots
  return all("precision = [HIGHEST, HIGHEST]" in line for line in dots)


def test_attack_programs_carry_highest_precision():
  surface = make_surface(jax.random.key(1), n_users=12, n_items=30)
  ctx = build_context(surface, np.arange(6), k=3)
  runner = PromotionAttackRunner(surface, chunk_size=2)
  fn = runner.chunk_function(pgd_attack(0.05, k=3))
  assert _dots_are_highest(fn.lower(*_attack_args(runner, surface, ctx)).as_text())
  av, iv = jnp.ones((6, 4)), jnp.ones((30, 4))
  dense = context_lib._context_arrays.lower(av, iv, jnp.zeros((1, 1), bool), k=3,
                                            masked=False)
  assert _dots_are_highest(dense.as_text())
  topk = context_lib.topk_context_program(k=3, width=0).lower(av, iv, None)
  assert _dots_are_highest(topk.as_text())


# ---------------------------------------------------------------------------------
# The top-k context layout.


def _equal_results(a, b, keys_close=("loss_before", "loss_after", "mismatch",
                                     "mismatch_at_delta", "delta")):
  assert set(a) == set(b)
  for key in a:
    if key == "seconds":
      continue
    if key in keys_close:
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                   a[key], b[key])
    else:  # ranks, hits, exactness, targets: identical
      jax.tree.map(np.testing.assert_array_equal, a[key], b[key])


def test_topk_layout_equals_dense_layout_on_a_row_wise_model():
  n_users, n_items, k = 40, 60, 4
  surface = make_surface(jax.random.key(7), n_users=n_users, n_items=n_items, nonlinear=True)
  train = _random_pairs(n_users, n_items, 200, 3)
  anchors = np.random.default_rng(0).choice(n_users, 13, replace=False)
  dense = build_context(surface, anchors, k=k, train_pairs=train, dense=True)
  top = build_context(surface, anchors, k=k, train_pairs=train, dense=False)
  sharded = build_context(surface, anchors, k=k, train_pairs=train, dense=False,
                          mesh=mesh_lib.make_mesh(8, 1))  # 13 anchors over 8 devices
  assert top.scores is None and top.sorted_scores is None and top.train_mask is None
  for ctx in (top, sharded):
    np.testing.assert_allclose(ctx.topk_values, dense.topk_values, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ctx.topk_indices, dense.topk_indices)
  # Counting against recomputed rows equals the sorted rows, masked or not.
  s = jnp.asarray(np.random.default_rng(1).standard_normal(13), jnp.float32)
  for v in (s, jnp.full(13, -jnp.inf)):
    for exclude in (jnp.array([60]), jnp.array([3, 17, 60]), dense.topk_indices[0]):
      for masked in (False, True):
        got = context_lib.count_clean_above(top, v, exclude, masked=masked)
        np.testing.assert_array_equal(
            got, context_lib.count_clean_above(dense, v, exclude, masked=masked))
        if masked or not np.isneginf(v[0]):
          continue  # -inf: every item outside exclude is above
        assert np.all(np.asarray(got) == n_items - np.sum(np.asarray(exclude) < n_items))
  targets = [0, 5, 17, 33, 59, int(dense.topk_indices[0, 0])]
  for attack in (pgd_attack(0.5, k=k), fgsm_attack(0.5, k=k)):
    outs = [PromotionAttackRunner(surface, chunk_size=4).run(attack, c, targets)
            for c in (dense, top)]
    _equal_results(*outs)
    assert np.any(outs[0]["masked_rank_before"] != outs[0]["rank_before"])


def test_topk_layout_equals_dense_layout_on_the_local_graph_path():
  _, surface, train, _ = _mmgcn_surface()
  anchors = np.array([0, 2, 4, 6, 8, 10, 3, 13, 15])
  dense = build_context(surface, anchors, k=5, train_pairs=train, dense=True)
  top = build_context(surface, anchors, k=5, train_pairs=train, dense=False)
  np.testing.assert_array_equal(top.desc_indices, dense.desc_indices)
  np.testing.assert_allclose(top.desc_values, dense.desc_values, rtol=1e-6, atol=1e-6)
  targets = [0, 7, 21, 39]
  attack = pgd_attack(0.3, k=5)
  outs = [PromotionAttackRunner(surface, chunk_size=4, with_mismatch=False,
                                active_cap=3).run(attack, c, targets) for c in (dense, top)]
  _equal_results(*outs)


# 1M users x 100k items, 40 % anchors, MMGCN width 192, a train degree cap of 256.
SCALE_USERS, SCALE_ITEMS, SCALE_WIDTH, SCALE_DEGREE = 1_000_000, 100_000, 192, 256
CONTEXT_BUDGET_PER_DEVICE = 512 * 2**20  # arguments + outputs + temporaries, 8 devices


def test_topk_context_program_memory_at_1m_users_100k_items():
  n_a = int(0.4 * SCALE_USERS)
  mesh = mesh_lib.make_mesh(8, 1)
  program = context_lib.topk_context_program(k=50, width=0, mesh=mesh)
  compiled = program.lower(SDS((n_a, SCALE_WIDTH), jnp.float32),
                           SDS((SCALE_ITEMS, SCALE_WIDTH), jnp.float32),
                           SDS((n_a, SCALE_DEGREE), jnp.int32)).compile()
  mem = compiled.memory_analysis()
  total = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
           + mem.output_size_in_bytes)
  assert total <= CONTEXT_BUDGET_PER_DEVICE, total
  # The dense layout would hold three (anchors x items) float32 matrices: 447 GiB.
  assert total < 3 * n_a * SCALE_ITEMS * 4 / 8 / 100


def test_topk_layout_built_and_attacked_on_a_mesh_equals_dense_on_one_device():
  surface = make_surface(jax.random.key(4), n_users=20, n_items=25)
  train = _random_pairs(20, 25, 60, 5)
  anchors = np.arange(0, 20, 2)
  mesh = mesh_lib.make_mesh(4, 2)
  dense = build_context(surface, anchors, k=4, train_pairs=train, dense=True)
  top = build_context(surface, anchors, k=4, train_pairs=train, dense=False, mesh=mesh)
  tgts = np.array([1, 3, 4, 8, 13, 21, 24])
  attack = pgd_attack(0.2, k=4)
  plain = PromotionAttackRunner(surface, chunk_size=3, with_mismatch=False).run(
      attack, dense, tgts)
  out = PromotionAttackRunner(surface, chunk_size=1, with_mismatch=False,
                              mesh=mesh).run(attack, top, tgts)
  _equal_results(plain, out)


def test_chunked_path_logs_progress_and_its_results_do_not_depend_on_it():
  surface = make_surface(jax.random.key(5), n_users=20, n_items=25)
  ctx = build_context(surface, np.arange(0, 20, 2), k=4,
                      train_pairs=_random_pairs(20, 25, 60, 6), dense=True)
  tgts = np.array([1, 3, 4, 8, 13, 21, 24])
  attack = pgd_attack(0.2, k=4)
  lines = []
  logged = PromotionAttackRunner(surface, chunk_size=3, with_mismatch=False,
                                 log=lines.append, log_every_seconds=0.0).run(attack, ctx, tgts)
  # Three chunks of 3 (the last padded): a line after each, the last one at 7/7.
  assert [re.search(r"(\d+)/7 targets", l).group(1) for l in lines] == ["3", "6", "7"]
  assert lines[0].startswith("pgd ε=0.2: ") and "targets/s after the first chunk" in lines[-1]
  quiet = PromotionAttackRunner(surface, chunk_size=3, with_mismatch=False).run(
      attack, ctx, tgts)
  _equal_results(logged, quiet)
  # A long interval logs only the end of the run.
  few = []
  PromotionAttackRunner(surface, chunk_size=3, with_mismatch=False, log=few.append,
                        log_every_seconds=1e9).run(attack, ctx, tgts)
  assert len(few) == 1 and "7/7 targets" in few[0]
