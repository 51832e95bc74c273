"""ID tables split over the mesh ``model`` axis at real catalogue sizes (docs/scale.md).

Amazon Baby's 19,445 users x 7,050 items (and MMGCN's 26,495 ID-table rows) do not
divide by 8 devices: the tables are padded to a multiple of the model axis, created on
their shardings (parameters and Adam moments), and training and evaluation give the
numbers of the unpadded model on one device. Tiny embeddings and hand-built
interactions keep it fast; no real data is read.
"""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.core.parallel import sharding_rules
from uatmc_jax.recsys.data.interactions import InteractionData
from uatmc_jax.recsys.models.registry import (build_recommender, build_sharded_recommender,
                                              sharded_recommender_init)
from uatmc_jax.recsys.train_job import _build
from uatmc_jax.recsys.trainer import RecsysTrainer

BABY = (19_445, 7_050)
EMB = 4
MODEL_CONFIG = {"embedding_dim": EMB, "num_layers": 1}
TRAIN = dict(batch_size=2048, epochs=1, patience=5, seed=5, eval_batch_size=2048, log=False,
             ks=(5, 20), learning_rate=1e-2)


def hand_data(n_users, n_items, per_user=5, seed=0):
  """Every user: 3 train, 1 valid, 1 test item (distinct), two 4-d modalities."""
  rng = np.random.default_rng(seed)
  start = rng.integers(0, n_items, n_users)
  items = (start[:, None] + 7 * np.arange(per_user)[None, :]) % n_items
  users = np.broadcast_to(np.arange(n_users)[:, None], items.shape)
  pairs = np.stack([users, items], -1).astype(np.int32)
  feats = {m: rng.standard_normal((n_items, 4)).astype(np.float32) for m in ("image", "text")}
  return InteractionData("hand", n_users, n_items, pairs[:, :3].reshape(-1, 2),
                         pairs[:, 3], pairs[:, 4], feats)


@pytest.fixture(scope="module")
def baby():
  return hand_data(*BABY)


def table_rows(name, n_users, n_items):
  """{path: real rows} of the model's ID tables."""
  if name == "mmgcn":
    return {"id_embedding": n_users + n_items, "preferences/image": n_users,
            "preferences/text": n_users}
  return {"user_embedding": n_users, "item_embedding": n_items}


def leaves_by_path(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {sharding_rules.path_string(p): x for p, x in flat}


def padded(n, multiple=8):
  return -(-n // multiple) * multiple


@pytest.mark.parametrize("name", ["vbpr", "vbpr_mlp", "mmgcn"])
def test_every_id_table_and_its_adam_moments_split_over_model(baby, name):
  config = {"model": name, "model_config": MODEL_CONFIG, "train": TRAIN, "mesh_data": 1,
            "mesh_model": 8}
  trainer = _build(config, baby, None)
  params = leaves_by_path(trainer.params)
  moments = leaves_by_path(trainer.opt_state)
  reference = leaves_by_path(nnx.state(build_recommender(name, baby, MODEL_CONFIG,
                                                         nnx.Rngs(TRAIN["seed"])), nnx.Param))
  devices = set(trainer.mesh.devices.flat)
  for table, n in table_rows(name, *BABY).items():
    path = f"{table}/value"
    rows = padded(n)
    width = params[path].shape[1]
    arrays = {"param": params[path], "mu": moments[f"0/mu/{path}"],
              "nu": moments[f"0/nu/{path}"]}
    for what, x in arrays.items():
      assert x.shape == (rows, width), (table, what, x.shape)
      assert x.sharding.spec == P("model"), (table, what, x.sharding.spec)
      shards = x.addressable_shards
      assert {s.device for s in shards} == devices
      assert {s.data.shape for s in shards} == {(rows // 8, width)}, (table, what)
    # real rows are the unpadded model's values; padding rows are zero
    value = np.asarray(params[path])
    np.testing.assert_array_equal(value[:n], np.asarray(reference[path]))
    np.testing.assert_array_equal(value[n:], 0.0)


def _device0_bytes(tree, device):
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


def test_start_up_memory_of_device_0_is_one_shard(baby):
  mesh = mesh_lib.make_mesh(1, 8)
  n_users, n_items = BABY
  full_tables = 4 * (n_users * 2 * EMB + n_items * EMB)  # float32, unpadded
  shard = 4 * (padded(n_users) * 2 * EMB + padded(n_items) * EMB) // 8
  # the init program: per-device outputs are one shard of each table plus the small
  # replicated leaves
  graphdef, init, shardings = sharded_recommender_init("vbpr_mlp", baby, MODEL_CONFIG, 0, mesh)
  abstract = jax.eval_shape(init)
  small = sum(x.size * x.dtype.itemsize for path, x in leaves_by_path(abstract).items()
              if "embedding" not in path)
  n_leaves = len(jax.tree.leaves(abstract))
  analysis = init.lower().compile().memory_analysis()
  # (+ one 8-byte pointer per output of the result tuple)
  assert shard + small <= analysis.output_size_in_bytes <= shard + small + 8 * n_leaves
  # temporaries: a few shard-sized buffers of the random draw (bits, truncation), never
  # a whole table: device 0's start-up peak stays below one unsharded copy
  assert analysis.temp_size_in_bytes < 4 * shard
  assert analysis.output_size_in_bytes + analysis.temp_size_in_bytes < full_tables
  # live buffers on device 0 after start-up: parameters and both Adam moments
  model = nnx.merge(graphdef, init())
  trainer = RecsysTrainer(model, baby, TRAIN, mesh=mesh)
  device0 = mesh.devices.flat[0]
  tables = lambda t: {k: v for k, v in leaves_by_path(t).items() if "embedding" in k}
  assert _device0_bytes(tables(trainer.params), device0) == shard
  assert _device0_bytes(tables(trainer.opt_state), device0) == 2 * shard
  # all of device 0's start-up state (tables, moments, small replicated leaves) is less
  # than one unsharded copy of the tables alone
  everything = _device0_bytes((trainer.params, trainer.opt_state, trainer.rest), device0)
  assert everything < full_tables
  # the Adam init program creates its moments sharded too
  opt_init = jax.jit(trainer.tx.init, out_shardings=jax.tree.map(
      lambda x: x.sharding, trainer.opt_state))
  opt_analysis = opt_init.lower(trainer.params).compile().memory_analysis()
  # (+ Adam's int32 step count and the tuple's pointers)
  assert opt_analysis.output_size_in_bytes <= 2 * shard + 2 * small + 4 + 8 * (2 * n_leaves + 1)
  assert opt_analysis.temp_size_in_bytes < shard


def _one_epoch(trainer):
  stats = trainer.train_epoch(0)
  return stats, trainer.evaluate("valid"), trainer.evaluate("test")


@pytest.mark.parametrize("name, sizes", [("vbpr_mlp", BABY), ("vbpr", BABY),
                                         ("mmgcn", (1_001, 501))])
def test_padded_sharded_epoch_equals_unpadded_one_device(baby, name, sizes):
  data = baby if sizes == BABY else hand_data(*sizes)
  config = dict(TRAIN, batch_size=2048 if sizes == BABY else 512)
  one = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  ref_model = build_recommender(name, data, MODEL_CONFIG, nnx.Rngs(config["seed"]))
  initial = leaves_by_path(jax.device_get(nnx.state(ref_model, nnx.Param)))
  ref = RecsysTrainer(ref_model, data, config, mesh=one)
  ref_stats, ref_valid, ref_test = _one_epoch(ref)

  mesh = mesh_lib.make_mesh(1, 8)
  model = build_sharded_recommender(name, data, MODEL_CONFIG, config["seed"], mesh)
  trainer = RecsysTrainer(model, data, config, mesh=mesh)
  stats, valid, test = _one_epoch(trainer)

  assert set(stats) == set(ref_stats)
  for k in stats:
    np.testing.assert_allclose(stats[k], ref_stats[k], rtol=1e-5, err_msg=k)
  for got, want in ((valid, ref_valid), (test, ref_test)):
    assert list(got) == list(want)
    for k in got:  # one rank flip of a near-tie changes a mean by ~1/n_users
      np.testing.assert_allclose(got[k], want[k], atol=3.0 / data.n_users, err_msg=k)
  assert ref_valid["recall@20"] > 0  # metrics are not trivially zero
  # parameters after 1 epoch of Adam (whose normalised step amplifies float-order
  # differences of near-zero gradients to ~1e-5)
  params = leaves_by_path(jax.device_get(trainer.params))
  ref_params = leaves_by_path(jax.device_get(ref.params))
  moments = leaves_by_path(jax.device_get(trainer.opt_state))
  for path, x in params.items():
    want = ref_params[path]
    if x.shape != want.shape:  # a padded table: real rows trained alike, padding untouched
      n = want.shape[0]
      np.testing.assert_allclose(x[:n], want, atol=1e-4, rtol=1e-3, err_msg=path)
      np.testing.assert_array_equal(x[n:], 0.0)
      for m in ("mu", "nu"):
        np.testing.assert_array_equal(moments[f"0/{m}/{path}"][n:], 0.0)
    else:
      np.testing.assert_allclose(x, want, atol=1e-4, rtol=1e-3, err_msg=path)
  # the epoch moved the tables far beyond the tolerance (the comparison is not vacuous)
  table = "id_embedding/value" if name == "mmgcn" else "user_embedding/value"
  assert np.max(np.abs(ref_params[table] - initial[table])) > 1e-2
  # the user/item vectors cover the real rows only
  users, items = trainer.vectors()
  assert users.shape[0] == data.n_users and items.shape[0] == data.n_items


def test_unsplittable_table_request_raises_naming_path_shape_and_spec(baby):
  mesh = mesh_lib.make_mesh(1, 8)
  model = build_recommender("vbpr", baby, MODEL_CONFIG, nnx.Rngs(0))  # unpadded tables
  # leaves in tree order: item_embedding (7,050 rows) comes first
  with pytest.raises(ConfigError, match=r"item_embedding/value of shape \(7050, 4\) cannot "
                                        r"be split as P\('model',\) over mesh"):
    RecsysTrainer(model, baby, TRAIN, mesh=mesh)
  # a rule asking for more dimensions than the leaf has
  params = nnx.state(model, nnx.Param)
  with pytest.raises(ConfigError, match=r"item_linear/bias/value of shape \(4,\) cannot be "
                                        r"split as P\(None, 'model'\)"):
    sharding_rules.partition_specs(params, (("item_linear/bias", "None,model"),), mesh)


def test_model_axis_one_keeps_unpadded_tables_and_values():
  data = hand_data(1_001, 501)
  config = {"model": "vbpr_mlp", "model_config": MODEL_CONFIG, "train": TRAIN,
            "mesh_model": 1}
  trainer = _build(config, data, None)
  ref = nnx.state(build_recommender("vbpr_mlp", data, MODEL_CONFIG, nnx.Rngs(TRAIN["seed"])),
                  nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.params),
               jax.device_get(ref))
  assert trainer.params["user_embedding"][...].shape == (1_001, 2 * EMB)
