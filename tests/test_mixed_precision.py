"""compute_dtype="bfloat16" in both trainers: bf16 compute, float32 state, a loss within a
stated gap of float32's; float16 refused."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.core.parallel import precision
from uatmc_jax.longtail import methods as lm
from uatmc_jax.longtail import trainer as lt
from uatmc_jax.longtail.data.image_pipeline import TrainPipeline
from uatmc_jax.longtail.train_config import LongTailTrainConfig
from uatmc_jax.recsys.data.interactions import InteractionData
from uatmc_jax.recsys.losses import make_bpr_objective
from uatmc_jax.recsys.models.registry import build_recommender
from uatmc_jax.recsys.trainer import RecsysTrainer


def _floating_dtypes(tree):
  return {x.dtype for x in jax.tree.leaves(tree)
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)}


def _tiny_interactions(n_users=16, n_items=12, seed=0):
  rng = np.random.default_rng(seed)
  users = np.repeat(np.arange(n_users), 5)
  items = rng.integers(0, n_items, users.size)
  pairs = np.unique(np.stack([users, items], 1), axis=0).astype(np.int32)
  label = rng.choice(3, size=len(pairs), p=[0.7, 0.15, 0.15])
  feats = {"image": rng.standard_normal((n_items, 6)).astype(np.float32),
           "text": rng.standard_normal((n_items, 4)).astype(np.float32)}
  return InteractionData("tiny", n_users, n_items, pairs[label == 0], pairs[label == 1],
                         pairs[label == 2], feats)


def test_recsys_trainer_bfloat16_computes_in_bf16_and_keeps_float32_state():
  data = _tiny_interactions()
  seen = []
  bpr = make_bpr_objective({"reg_weight": 1e-3})

  def recording_loss(model, batch, features, key):
    seen.append((model.user_embedding[...].dtype, features["image"].dtype))
    return bpr(model, batch, features, key)

  model = build_recommender("vbpr_mlp", data, {"embedding_dim": 8}, nnx.Rngs(0))
  trainer = RecsysTrainer(model, data, dict(batch_size=16, epochs=1, log=False, ks=(5,),
                                            eval_batch_size=8, compute_dtype="bfloat16"),
                          mesh=mesh_lib.make_mesh(2, 1, devices=jax.devices()[:2]),
                          loss_fn=recording_loss)
  stats = trainer.train_epoch(0)
  bf16 = jnp.dtype(jnp.bfloat16)
  assert seen and set(seen) == {(bf16, bf16)}
  assert np.isfinite(stats["loss"]) and stats["loss"] > 0
  assert _floating_dtypes(trainer.params) == {jnp.dtype(jnp.float32)}
  assert _floating_dtypes(trainer.opt_state) == {jnp.dtype(jnp.float32)}
  metrics = trainer.evaluate("valid")  # serving stays float32
  assert all(np.isfinite(v) for v in metrics.values())
  # ... and the bf16 epoch's loss is float32's within BF16_LOSS_RTOL (same weights, data)
  ref = RecsysTrainer(build_recommender("vbpr_mlp", data, {"embedding_dim": 8}, nnx.Rngs(0)),
                      data, dict(batch_size=16, epochs=1, log=False, ks=(5,),
                                 eval_batch_size=8, compute_dtype="float32"),
                      mesh=mesh_lib.make_mesh(2, 1, devices=jax.devices()[:2]),
                      loss_fn=bpr)
  np.testing.assert_allclose(stats["loss"], ref.train_epoch(0)["loss"], rtol=BF16_LOSS_RTOL)


def test_mixed_precision_loss_is_identity_for_float32():
  fn = lambda model, batch, features, key: (jnp.zeros(()), {})
  assert precision.mixed_precision_loss(fn, precision.Policy.from_name("float32")) is fn


def test_longtail_trainer_bfloat16_step_keeps_float32_params_stats_and_optimiser():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), [8, 5, 3]).astype(np.int32)
  images = rng.integers(0, 256, (labels.size, 8, 8, 3)).astype(np.uint8)
  pipe = TrainPipeline(images, labels, batch_size=8, seed=0, prefetch=0)
  config = LongTailTrainConfig(model="small_cnn", model_kwargs={"widths": (4, 8)},
                               num_epochs=1, batch_size=8, attack_steps=1,
                               compute_dtype="bfloat16")
  trainer = lt.LongTailTrainer(config, lm.resolve_method("trades"), num_classes=3,
                               class_counts=np.bincount(labels),
                               steps_per_epoch=pipe.steps_per_epoch,
                               mesh=mesh_lib.make_mesh(2, 1, devices=jax.devices()[:2]))
  assert trainer.build_model(jax.random.key(0)).dtype == jnp.bfloat16
  state = trainer.init_state()
  batch = mesh_lib.shard_batch(next(iter(pipe.epoch(0))), trainer.mesh)
  # the convolutions really ran in bf16: the (float32) features are bf16-representable
  phi = np.asarray(trainer.features_eval(state["params"], state["batch_stats"], batch["image"]))
  assert np.abs(phi).max() > 0
  np.testing.assert_array_equal(phi, phi.astype(jnp.bfloat16).astype(np.float32))
  state, metrics = trainer.train_step(state, batch, jax.random.key(1),
                                      flags=trainer.step_flags(0))
  assert np.isfinite(float(metrics["loss"]))
  for part in ("params", "batch_stats", "opt_state"):
    assert _floating_dtypes(state[part]) == {jnp.dtype(jnp.float32)}, part


def test_float16_is_refused_naming_compute_dtype():
  from uatmc_jax.core.errors import ConfigError
  with pytest.raises(ConfigError, match=r"compute_dtype='float16'.*bfloat16.*float32"):
    precision.Policy.from_name("float16")
  data = _tiny_interactions()
  model = build_recommender("vbpr", data, {"embedding_dim": 4}, nnx.Rngs(0))
  with pytest.raises(ConfigError, match="compute_dtype"):
    RecsysTrainer(model, data, dict(batch_size=16, log=False, compute_dtype="float16"),
                  mesh=mesh_lib.make_mesh(devices=jax.devices()[:1]))


# One bf16 training step against float32 from the same initial weights: the epoch's mean
# loss agrees within BF16_LOSS_RTOL (bf16 keeps 8 mantissa bits, ~0.4% per rounding;
# a scalar BPR/EmbLoss sum of a few hundred terms lands well inside 3%), and every
# parameter moves the same way (Adam's first step is lr·sign(g) up to eps, so the
# updated parameters agree to within lr wherever the float32 gradient is not tiny).
BF16_LOSS_RTOL = 3e-2


def _one_step(model_name, loss, compute_dtype, data):
  model = build_recommender(model_name, data, {"embedding_dim": 8}, nnx.Rngs(0))
  config = dict(batch_size=len(data.train) + (-len(data.train)) % 2, epochs=1, log=False,
                ks=(5,), eval_batch_size=8, compute_dtype=compute_dtype, loss=loss,
                reg_weight=1e-2, learning_rate=1e-2, seed=1)
  trainer = RecsysTrainer(model, data, config,
                          mesh=mesh_lib.make_mesh(devices=jax.devices()[:1]))
  start = jax.tree.map(np.asarray, trainer.params)
  stats = trainer.train_epoch(0)
  return stats, start, jax.tree.map(np.asarray, trainer.params)


@pytest.mark.parametrize("model_name,loss", [
    ("vbpr", "bpr"), ("vbpr_mlp", "bpr"), ("mmgcn", "bpr"),
    ("vbpr_mlp", "vanilla"), ("vbpr_mlp", "apr"), ("vbpr_mlp", "amr"),
    ("vbpr_mlp", "uat_mc_no_align"), ("vbpr_mlp", "uat_mc"), ("mmgcn", "uat_mc")])
def test_one_bf16_training_step_is_finite_and_close_to_float32(model_name, loss):
  data = _tiny_interactions()
  f32, start32, after32 = _one_step(model_name, loss, "float32", data)
  bf16, start16, after16 = _one_step(model_name, loss, "bfloat16", data)
  jax.tree.map(np.testing.assert_array_equal, start16, start32)  # same initial weights
  assert set(bf16) == set(f32)
  for k in f32:
    assert np.isfinite(bf16[k]), (k, bf16)
  np.testing.assert_allclose(bf16["loss"], f32["loss"], rtol=BF16_LOSS_RTOL)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after16))
  moved32 = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, after32, start32))
  moved16 = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, after16, start16))
  # the same parameters train, and by steps of at most lr (Adam's first step)
  for a, b in zip(moved32, moved16):
    assert (np.abs(a) > 0).any() == (np.abs(b) > 0).any()
    assert np.abs(b).max() <= 1e-2 * (1 + 1e-3)
