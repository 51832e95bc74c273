"""Scale-out pieces: config-driven table sharding, mixed precision, FLOPs/MFU, host moves.

The 2-process run of the trainers is in ``test_multihost.py``; here everything runs in
one process on the 8 faked CPU devices of ``conftest.py``.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.core.parallel import multihost, precision, sharding_rules, throughput
from uatmc_jax.recsys.losses import bpr_objective
from uatmc_jax.recsys.models.mmgcn import MMGCN
from uatmc_jax.recsys.models.vbpr_mlp import VBPRMLP

RULES = sharding_rules.RECSYS_TABLE_RULES
DIMS = {"image": 12, "text": 6}


def _model(n_users=16, n_items=8, seed=0):
  return VBPRMLP(n_users, n_items, DIMS, embedding_dim=8, rngs=nnx.Rngs(seed))


def _batch(n_users=16, n_items=8, b=8, seed=1):
  rng = np.random.default_rng(seed)
  return {"users": jnp.asarray(rng.integers(0, n_users, b), jnp.int32),
          "pos": jnp.asarray(rng.integers(0, n_items, b), jnp.int32),
          "neg": jnp.asarray(rng.integers(0, n_items, b), jnp.int32),
          "mask": jnp.ones((b,), jnp.float32)}


def _features(n_items=8, seed=2):
  rng = np.random.default_rng(seed)
  return {m: jnp.asarray(rng.standard_normal((n_items, d)), jnp.float32) for m, d in DIMS.items()}


# --- sharding rules --------------------------------------------------------------------
def test_rules_shard_tables_and_their_adam_moments_only():
  mesh = mesh_lib.make_mesh(2, 4)
  params = nnx.state(_model(), nnx.Param)
  tree = {"params": params, "opt": optax.adam(1e-3).init(params)}
  rows = {path: spec for path, _, spec in
          sharding_rules.describe(tree, sharding_rules.tree_shardings(tree, mesh, RULES))}
  table = str(P("model"))
  for path, spec in rows.items():
    is_table = "user_embedding" in path or "item_embedding" in path
    assert spec == (table if is_table else str(P())), (path, spec)
  # params + Adam mu + nu for each of the two tables
  assert sum(spec == table for spec in rows.values()) == 6


def test_mmgcn_preference_vectors_match_the_default_rules():
  train = np.array([[0, 0], [1, 1], [2, 3], [3, 2]], np.int32)
  model = MMGCN(4, 4, {"a": 3, "b": 5}, train, embedding_dim=4, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  specs = sharding_rules.partition_specs(state, RULES, mesh_lib.make_mesh(4, 2))
  flat = {sharding_rules.path_string(p): s for p, s in
          jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]}
  assert flat["preferences/a/value"] == P("model")
  assert flat["id_embedding/value"] == P("model")
  assert flat["edge_dst/value"] == P()  # integer graph buffers stay replicated


def test_indivisible_table_is_an_error_and_a_padded_one_splits():
  mesh = mesh_lib.make_mesh(2, 4)
  params = nnx.state(_model(n_users=10), nnx.Param)  # 10 rows do not split over 4
  with pytest.raises(ConfigError, match=r"user_embedding/value of shape \(10, 16\) cannot "
                                        r"be split as P\('model',\) over mesh"):
    sharding_rules.partition_specs(params, RULES, mesh)
  # the same model with its tables padded to a multiple of the model axis splits
  padded = nnx.state(VBPRMLP(10, 8, DIMS, embedding_dim=8, row_multiple=4,
                             rngs=nnx.Rngs(0)), nnx.Param)
  specs = sharding_rules.partition_specs(padded, RULES, mesh)
  assert padded["user_embedding"][...].shape == (12, 16)
  assert specs["user_embedding"].get_value() == P("model")
  assert specs["item_embedding"].get_value() == P("model")


@pytest.mark.parametrize("rules, match", [
    ((("(", "model,None"),), "bad regex"),
    ((("embedding",),), "expected \\(regex, spec\\)"),
    ((("embedding", "experts,None"),), "names axis 'experts'"),
])
def test_bad_rules_raise_config_errors(rules, match):
  params = nnx.state(_model(), nnx.Param)
  with pytest.raises(ConfigError, match=match):
    sharding_rules.partition_specs(params, rules, mesh_lib.make_mesh(2, 4))


def test_parse_spec_forms():
  assert sharding_rules.parse_spec("model,None") == P("model")
  assert sharding_rules.parse_spec(("data", None)) == P("data")
  assert sharding_rules.parse_spec((None, "model")) == P(None, "model")
  assert sharding_rules.parse_spec("") == P()


def _train_step(graphdef, tx):
  def step(params, opt_state, rest, batch, features):
    def loss_fn(p):
      return bpr_objective(nnx.merge(graphdef, p, rest), batch, features,
                           jax.random.key(0), reg_weight=1e-3)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def test_model_sharded_step_equals_replicated_step_and_keeps_tables_split():
  graphdef, params, rest = nnx.split(_model(), nnx.Param, ...)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  batch, features = _batch(), _features()
  step = jax.jit(_train_step(graphdef, tx))
  ref_params, ref_opt, ref_loss = step(params, opt_state, rest, batch, features)

  mesh = mesh_lib.make_mesh(2, 4)
  state = sharding_rules.shard_tree({"p": params, "o": opt_state}, mesh, RULES)
  sh_batch = mesh_lib.shard_batch(jax.device_get(batch), mesh)
  args = (state["p"], state["o"], mesh_lib.replicate(rest, mesh), sh_batch,
          mesh_lib.replicate(features, mesh))
  new_params, new_opt, loss = step(*args)
  chex.assert_trees_all_close(jax.device_get(new_params), jax.device_get(ref_params),
                              atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(jax.device_get(new_opt), jax.device_get(ref_opt),
                              atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  table = new_params["user_embedding"][...]
  assert table.sharding.is_equivalent_to(NamedSharding(mesh, P("model", None)), 2)
  assert {s.data.shape for s in table.addressable_shards} == {(4, 16)}  # 16 rows / 4

  # the compiler's per-device argument bytes shrink when the tables are split
  def arg_bytes(mesh_, rules):
    st = sharding_rules.tree_shardings({"p": params, "o": opt_state}, mesh_, rules)
    abstract = sharding_rules.abstract_tree({"p": params, "o": opt_state}, st)
    rep = NamedSharding(mesh_, P())
    compiled = step.lower(abstract["p"], abstract["o"],
                          sharding_rules.abstract_tree(rest, jax.tree.map(lambda _: rep, rest)),
                          jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                              x.shape, x.dtype, sharding=mesh_lib.data_sharding(mesh_)), batch),
                          jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                      sharding=rep), features)
                          ).compile()
    return compiled.memory_analysis().argument_size_in_bytes

  big = dict(n_users=4096, n_items=1024)
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: _model(**big)), nnx.Param, ...)
  opt_state = jax.eval_shape(tx.init, params)
  step = jax.jit(_train_step(graphdef, tx))
  batch = jax.eval_shape(lambda: _batch(**big))
  features = jax.eval_shape(lambda: _features(big["n_items"]))
  table_bytes = 3 * 4 * (4096 * 16 + 1024 * 8)  # params + 2 Adam moments, float32
  replicated = arg_bytes(mesh_lib.make_mesh(8, 1), ())
  sharded = arg_bytes(mesh_lib.make_mesh(1, 8), RULES)
  assert replicated - sharded == pytest.approx(table_bytes * 7 / 8, rel=0.02)


def test_sharded_init_equals_unsharded_values():
  mesh = mesh_lib.make_mesh(2, 4)
  create = lambda: nnx.state(_model(seed=3), nnx.Param)
  sharded = sharding_rules.sharded_init(create, mesh, RULES)
  chex.assert_trees_all_equal(jax.device_get(sharded), jax.device_get(create()))
  assert sharded["item_embedding"][...].sharding.is_equivalent_to(
      NamedSharding(mesh, P("model", None)), 2)


# --- mixed precision ------------------------------------------------------------------
def test_bfloat16_policy_keeps_float32_params_and_grads_and_a_finite_loss():
  policy = precision.Policy.from_name("bfloat16")
  graphdef, params, rest = nnx.split(_model(), nnx.Param, ...)
  batch, features = _batch(), _features()
  seen = {}

  def loss_fn(p, policy_):
    model = nnx.merge(graphdef, policy_.cast_to_compute(p), policy_.cast_to_compute(rest))
    seen["table"] = model.user_embedding[...].dtype
    loss, _ = bpr_objective(model, batch, policy_.cast_to_compute(features),
                            jax.random.key(0), reg_weight=1e-3)
    return policy_.cast_to_output(loss)

  value_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
  loss, grads = value_and_grad(params, policy)
  assert seen["table"] == jnp.bfloat16
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  ref_loss, ref_grads = value_and_grad(params, precision.Policy.from_name(None))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=3e-2)
  # bf16 gradients point the same way as float32 ones
  g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)])
  r = np.concatenate([np.ravel(x) for x in jax.tree.leaves(ref_grads)])
  assert g @ r / np.linalg.norm(g) / np.linalg.norm(r) > 0.99
  # (the trainers' Adam states under this policy: tests/test_mixed_precision.py)


def test_cast_floating_leaves_integers_alone_and_rejects_unknown_dtypes():
  tree = {"ids": jnp.arange(3, dtype=jnp.int32), "x": jnp.ones(2, jnp.float32), "s": 1}
  out = precision.cast_floating(tree, jnp.bfloat16)
  assert out["ids"].dtype == jnp.int32 and out["x"].dtype == jnp.bfloat16 and out["s"] == 1
  assert precision.Policy.from_name("float32").cast_to_compute(tree) is tree
  with pytest.raises(ConfigError, match="compute_dtype"):
    precision.Policy.from_name("float64")


# --- FLOPs and MFU ----------------------------------------------------------------------
def test_flops_of_a_matmul_is_two_mnk():
  m, k, n = 32, 64, 16
  flops = throughput.flops_of(jax.jit(jnp.matmul), jnp.ones((m, k)), jnp.ones((k, n)))
  assert flops == pytest.approx(2 * m * k * n, rel=1e-3)
  abstract = jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32)
  assert throughput.flops_of(jnp.matmul, *abstract) == flops


class _FakeDevice:
  def __init__(self, kind, platform="gpu"):
    self.device_kind, self.platform = kind, platform


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12), ("NVIDIA A100-SXM4-40GB", "float32", 19.5e12),
    ("TPU v4", "bfloat16", 275e12), ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5p", "bfloat16", 459e12), ("Some New Chip", "bfloat16", None)])
def test_peak_flops_table(kind, dtype, peak):
  assert throughput.peak_flops(_FakeDevice(kind), dtype) == peak


def test_cpu_peak_comes_from_the_environment(monkeypatch):
  cpu = _FakeDevice("cpu", platform="cpu")
  monkeypatch.delenv(throughput.CPU_PEAK_ENV, raising=False)
  assert throughput.peak_flops(cpu) is None
  monkeypatch.setenv(throughput.CPU_PEAK_ENV, "2.5e11")
  assert throughput.peak_flops(cpu) == 2.5e11


def test_mfu_and_measurement_line():
  assert throughput.mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)
  assert throughput.mfu(None, 0.5, 4e12) is None
  t = throughput.Throughput(items_per_second=100.0, seconds_per_call=0.5, flops_per_call=1e12,
                            peak_flops=4e12)
  assert t.achieved_flops == 2e12 and "MFU 50.00%" in t.line()
  x = jnp.ones((64, 64))
  meas = throughput.measure(jax.jit(lambda a: a @ a), x, items_per_call=64, repeats=2,
                            peak=1e12)
  assert meas.flops_per_call == pytest.approx(2 * 64 ** 3, rel=1e-3)
  assert meas.items_per_second > 0 and 0 < meas.mfu < 1


# --- host <-> global moves (single process: must equal the plain versions) -----------
def test_single_process_host_moves_are_the_plain_ones():
  mesh = mesh_lib.make_mesh(4, 2)
  x = np.arange(48, dtype=np.float32).reshape(8, 6)
  g = multihost.put_global(x, mesh_lib.data_sharding(mesh))
  assert g.sharding == mesh_lib.data_sharding(mesh)
  np.testing.assert_array_equal(multihost.to_host(g), x)
  np.testing.assert_array_equal(multihost.gather_process_local(x), x)
  r = multihost.put_replicated({"a": x}, mesh)["a"]
  assert r.sharding.is_fully_replicated
  box, contiguous = multihost._local_box(mesh_lib.data_sharding(mesh), x.shape)
  assert contiguous and box == (slice(0, 8), slice(0, 6))


def test_flops_of_counts_a_loop_body_once_as_documented():
  x = jnp.ones((16, 16))
  one = throughput.flops_of(lambda a: a @ a, x)
  ten = throughput.flops_of(
      lambda a: jax.lax.scan(lambda b, _: (b @ a, None), a, None, length=10)[0], x)
  assert ten == pytest.approx(one, rel=0.01)


# ----------------------------------------------------------------------------------
# Attack launchers on a mesh (one process here; tests/test_multihost.py runs two).


def _leaves_close(a, b, tol=1e-6):
  fa = jax.tree_util.tree_leaves_with_path(a)
  fb = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (p, x), (_, y) in zip(fa, fb):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=tol, atol=tol, err_msg=jax.tree_util.keystr(p))


@pytest.mark.parametrize("is_graph", [False, True])
def test_promotion_runner_on_a_mesh_equals_one_device(is_graph):
  import sys
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
  from attack_fixtures import make_surface
  from uatmc_jax.recsys.attacks.attackers import pgd_attack
  from uatmc_jax.recsys.attacks.context import build_context
  from uatmc_jax.recsys.attacks.runner import PromotionAttackRunner

  surface = make_surface(jax.random.key(4), n_items=25, is_graph=is_graph)
  ctx = build_context(surface, np.arange(0, 12, 2), k=4,
                                train_pairs=np.array([[0, 1], [2, 3], [4, 5], [6, 1]]))
  tgts = np.array([1, 3, 4, 8, 13, 21, 24])
  groups = np.eye(2, dtype=np.float32)[np.arange(6) % 2]
  attack = pgd_attack(0.2, k=4, alignment="cosine")
  plain = PromotionAttackRunner(surface, chunk_size=3).run(attack, ctx, tgts, groups)
  runner = PromotionAttackRunner(surface, chunk_size=1,
                                           mesh=mesh_lib.make_mesh(4, 2))
  assert runner.targets_per_chunk == 8  # one target per device, both mesh axes
  out = runner.run(attack, ctx, tgts, groups)
  runner.run(attack, ctx, tgts[::-1], groups)
  assert list(runner.trace_counts.values()) == [1] and runner.local_targets == 16
  del plain["seconds"], out["seconds"]
  _leaves_close(out, plain)
  # a one-device mesh in one process takes the plain path
  assert PromotionAttackRunner(
      surface, mesh=mesh_lib.make_mesh(devices=jax.devices()[:1])).mesh is None


def test_robust_evaluator_on_a_mesh_equals_one_device():
  from uatmc_jax.longtail.evaluation import robust_accuracy

  rng = np.random.default_rng(5)
  proj = jnp.asarray(rng.standard_normal((48, 6)) / 7, jnp.float32)
  head = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
  logits_fn = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ proj * 4) @ head.T
  images = rng.uniform(0, 1, (11, 4, 4, 3)).astype(np.float32)
  labels = np.asarray(jnp.argmax(logits_fn(images), -1)).astype(np.int32)
  labels[8:] = (labels[8:] + 1) % 3
  cfg = robust_accuracy.RobustEvalConfig(epsilon=4 / 255, step_size=2 / 255, pgd_steps=3,
                                         cw_steps=3, apgd_iterations=4, batch_size=8)
  plain = robust_accuracy.RobustEvaluator(logits_fn, cfg)
  sharded = robust_accuracy.RobustEvaluator(logits_fn, cfg, mesh=mesh_lib.make_mesh(4, 2))
  flipped = 0
  for attack in ("clean", "pgd20", "cw", "autoattack_apgd"):
    a, b = plain.run(attack, images, labels), sharded.run(attack, images, labels)
    np.testing.assert_array_equal(a.correct, b.correct, err_msg=attack)
    np.testing.assert_allclose(a.x_adv, b.x_adv, rtol=0, atol=1e-6, err_msg=attack)
    flipped += int((~b.correct & ~np.isclose(b.x_adv, images).all((1, 2, 3))).sum())
  assert flipped > 0  # the attacks found adversarial examples (not a vacuous check)
  assert sharded.local_rows > 0 and plain.local_rows == 0
  with pytest.raises(ValueError, match="divisible"):
    robust_accuracy.RobustEvaluator(logits_fn, robust_accuracy.RobustEvalConfig(batch_size=6),
                                    mesh=mesh_lib.make_mesh(4, 1))


# --- data-parallel training on several CPU devices, as a user launches it -----------------

def _train_recsys_subprocess(workdir, n_devices):
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
  config = ("experiments/configs/recsys.py:model=vbpr_mlp,dataset=synthetic,epochs=2,"
            "embedding_dim=16,batch_size=1024")
  out = subprocess.run([sys.executable, "-m", "experiments.train_recsys", f"--config={config}",
                        f"--workdir={workdir}", "--compilation_cache_dir="], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
  # XLA's own fatal lines (e.g. a collective rendezvous timeout) come before Python's
  # traceback: both are shown
  xla_lines = [line for line in out.stderr.splitlines() if ".cc:" in line][:10]
  assert out.returncode == 0, "\n".join(xla_lines + [out.stderr[-3000:]])
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_train_recsys_on_two_cpu_devices_equals_one_device(tmp_path):
  """The launcher's data-parallel path on two forced host devices (batch columns split
  over the data axis, gradient all-reduce) ends with one device's losses and metrics."""
  one = _train_recsys_subprocess(str(tmp_path / "one"), 1)
  two = _train_recsys_subprocess(str(tmp_path / "two"), 2)
  assert one["epochs_run"] == two["epochs_run"] == 2
  np.testing.assert_allclose([h["loss"] for h in two["history"]],
                             [h["loss"] for h in one["history"]], rtol=1e-5)
  for split in ("valid", "test"):
    for k, v in one[split].items():
      np.testing.assert_allclose(two[split][k], v, rtol=1e-4, atol=1e-5, err_msg=(split, k))
