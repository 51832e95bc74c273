"""Image classifiers (METHODS.md B.2): shapes, φ/W split, BatchNorm modes, pure pattern."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.longtail.models import image_classifiers as ic
from uatmc_jax.longtail.models import pooling


def _n_params(model_or_state):
  state = (model_or_state if isinstance(model_or_state, nnx.State)
           else nnx.state(model_or_state, nnx.Param))
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))


def _rngs(seed):
  # 'rbg' keys: the same initialisers, ~3x cheaper to compile eagerly on CPU than
  # threefry (model building dominated this file's time).
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _small(**kw):
  """Small CNN, 7 classes, widths (8, 16): one set of shapes for every behaviour test,
  so eager op compilations are shared."""
  kw.setdefault("widths", (8, 16))
  return ic.build_classifier("small_cnn", 7, _rngs(1), **kw)


def _x(b=2, hw=16, seed=0):
  return jax.random.uniform(jax.random.key(seed), (b, hw, hw, 3))


def _zero_filled(name, **kw):
  """The real model graph with constant parameters, built without running the
  (slow, eager) random initialisers: ``nnx.eval_shape`` then fill."""
  abstract = nnx.eval_shape(lambda: ic.build_classifier(name, 10, nnx.Rngs(0), **kw))
  g, state = nnx.split(abstract)
  return nnx.merge(g, jax.tree.map(lambda a: jnp.full(a.shape, 0.01, a.dtype), state))


@pytest.mark.parametrize("name,d_f", [("small_cnn", 128), ("reduced_resnet", 128),
                                      ("resnet18", 512), ("preact_resnet18", 512)])
def test_output_shapes(name, d_f):
  model = _zero_filled(name)  # the real graph; values do not matter for shapes
  assert model.feature_dim == d_f and model.num_classes == 10
  assert model.classifier_weight.shape == (10, d_f)
  g, p, s = ic.split_classifier(model)
  fn = jax.jit(lambda p, s, x: (ic.apply_logits(g, p, s, x, train=False)[0],
                                ic.apply_features(g, p, s, x, train=False)[0]))
  logits, phi = fn(p, s, _x())
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert phi.shape == (2, d_f) and phi.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_resnet18_cifar_stem_and_parameter_count():
  model = nnx.eval_shape(lambda: ic.build_classifier("resnet18", 10, nnx.Rngs(0)))
  assert model.stem_conv.kernel.shape == (3, 3, 3, 64)  # 3x3 stem, not 7x7
  assert tuple(model.stem_conv.strides) == (1, 1)       # stride 1, and no max-pool
  # The standard CIFAR ResNet-18 (torchvision-style blocks, 10 classes) has
  # 11,173,962 parameters.
  assert _n_params(nnx.state(model, nnx.Param)) == 11_173_962


def test_wrn34_10_shapes_via_eval_shape():
  def build_and_run():
    model = ic.build_classifier("wrn34_10", 10, nnx.Rngs(0))
    x = jnp.zeros((2, 32, 32, 3))
    return model(x, train=False), model.features(x, train=False), nnx.state(model, nnx.Param)
  logits, phi, params = jax.eval_shape(build_and_run)
  assert logits.shape == (2, 10) and phi.shape == (2, 640)
  assert _n_params(params) == 46_160_474  # WRN-34-10 on CIFAR-10 (46.16M)


def test_features_classify_consistency_and_weight_view():
  model = _small()
  model.eval()
  x = _x(3)
  phi = model.features(x)
  w, b = model.classifier_weight, model.classifier_bias
  assert w.shape == (7, 16) and b.shape == (7,)
  np.testing.assert_allclose(model.classify(phi), phi @ w.T + b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model(x), model.classify(phi), rtol=1e-6, atol=1e-6)
  nb = _small(use_bias=False)
  assert nb.classifier_bias is None


def test_cosine_head():
  model = _small(head="cosine", cosine_scale=10.0)
  phi = jax.random.normal(jax.random.key(3), (4, 16))
  w = model.classifier_weight
  cos = (phi / jnp.linalg.norm(phi, axis=1, keepdims=True)) @ (
      w / jnp.linalg.norm(w, axis=1, keepdims=True)).T
  np.testing.assert_allclose(model.classify(phi), 10.0 * cos, rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match="head"):
    _small(head="arcface")


def test_batchnorm_train_vs_inference_mode():
  model = _small()
  x = _x(8, 8) * 3.0 + 1.0
  stats0 = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  out_eval = model(x, train=False)
  jax.tree.map(np.testing.assert_array_equal, stats0,
               jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)))
  out_train = model(x, train=True)
  stats1 = nnx.state(model, nnx.BatchStat)
  mean0 = np.asarray(stats1["bns"][0]["mean"][...])
  assert np.abs(mean0).max() > 1e-3  # running mean moved towards the batch mean
  assert not np.allclose(out_eval, out_train)
  # model.eval() and nnx.view(...) both mean train=False.
  ref = model(x, train=False)
  view = nnx.view(model, use_running_average=True)
  np.testing.assert_allclose(view(x), ref, rtol=1e-6)
  model.eval()
  np.testing.assert_allclose(model(x), ref, rtol=1e-6)


def test_pure_pattern_matches_stateful_updates_and_differentiates():
  model = _small()
  x = _x(6, 8, seed=4)
  g, p, s = ic.split_classifier(model)

  @jax.jit
  def step(p, s, x):
    def loss(p):
      logits, new_s = ic.apply_logits(g, p, s, x, train=True)
      return jnp.sum(logits ** 2), new_s
    (l, new_s), grads = jax.value_and_grad(loss, has_aux=True)(p)
    return l, new_s, grads

  l, new_s, grads = step(p, s, x)
  eager_logits = model(x, train=True)  # stateful NNX call updates the module
  np.testing.assert_allclose(l, jnp.sum(eager_logits ** 2), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_s, nnx.state(model, nnx.BatchStat))
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(grads))
  # W is differentiable through classifier_weight_of: d/dW sum(W^2) = 2W.
  gw = jax.grad(lambda p: jnp.sum(ic.classifier_weight_of(g, p, s) ** 2))(p)
  np.testing.assert_allclose(gw["classifier"]["kernel"][...],
                             2 * p["classifier"]["kernel"][...], rtol=1e-6)
  # Inference-mode apply returns the stats unchanged.
  _, same_s = ic.apply_logits(g, p, s, x, train=False)
  jax.tree.map(np.testing.assert_array_equal, same_s, s)


def test_bfloat16_compute_float32_params():
  f32 = _small()
  bf16 = _small(dtype="bfloat16")
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  x = _x(4, 8)
  out16, out32 = bf16(x, train=False), f32(x, train=False)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, rtol=0.05, atol=0.05)
  assert not np.array_equal(np.asarray(out16), np.asarray(out32))  # really bf16


def test_input_standardisation_inside_model():
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  plain = _small()
  standard = _small(input_mean=mean, input_std=std)
  x = _x(2, 8)
  np.testing.assert_allclose(standard(x, train=False),
                             plain((x - jnp.array(mean)) / jnp.array(std), train=False),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match="together"):
    _small(input_mean=mean)


def test_wrn_with_dropout_splits_and_applies_purely():
  # Shapes only (jax.eval_shape): building and compiling a WRN costs ~40 s here.
  def run():
    model = ic.build_classifier("wrn34_10", 5, nnx.Rngs(0, dropout=1), depth=10,
                                widen_factor=1, dropout=0.5)
    g, p, s = ic.split_classifier(model)  # dropout RNG state travels with batch_stats
    out, new_s = ic.apply_logits(g, p, s, jnp.zeros((2, 8, 8, 3)), train=True)
    return out, s, new_s
  out, s, new_s = jax.eval_shape(run)
  assert out.shape == (2, 5)
  assert jax.tree.structure(s) == jax.tree.structure(new_s)
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(s)]
  assert any("dropout" in k for k in paths) and any("mean" in k for k in paths)


def test_registry_errors():
  with pytest.raises(ConfigError, match="unknown classifier 'resnet50'"):
    ic.build_classifier("resnet50", 10, nnx.Rngs(0))
  with pytest.raises(ConfigError, match="small_cnn"):
    ic.build_classifier("small_cnn", 10, nnx.Rngs(0), depth=3)
  with pytest.raises(ConfigError, match="6n\\+4"):
    ic.build_classifier("wrn34_10", 10, nnx.Rngs(0), depth=33)
  with pytest.raises(ConfigError, match="num_classes"):
    ic.build_classifier("small_cnn", 1, nnx.Rngs(0))


def test_max_pool_2x2_matches_nnx_max_pool_values_and_tie_free_gradients():
  # Continuous random input: no ties inside a 2x2 window (almost surely), so the
  # reduce-max gradient and select-and-scatter's must agree exactly.
  x = jax.random.normal(jax.random.key(3), (2, 6, 8, 5))
  ref = lambda v: nnx.max_pool(v, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(pooling.max_pool_2x2(x), ref(x))
  w = jax.random.normal(jax.random.key(4), (2, 3, 4, 5))
  g_new = jax.grad(lambda v: jnp.sum(pooling.max_pool_2x2(v) * w))(x)
  g_ref = jax.grad(lambda v: jnp.sum(ref(v) * w))(x)
  np.testing.assert_array_equal(g_new, g_ref)
  # Exactly one nonzero per window: the gradient really routes to the argmax.
  assert int(jnp.sum(g_new != 0)) == w.size
  # Odd sizes fall back to nnx.max_pool (VALID: the last row/column is dropped).
  x_odd = jax.random.normal(jax.random.key(5), (1, 5, 7, 2))
  np.testing.assert_array_equal(pooling.max_pool_2x2(x_odd), ref(x_odd))
  assert pooling.max_pool_2x2(x_odd).shape == (1, 2, 3, 2)
  # With ties (quantised input, all-zero windows) the gradient still equals
  # select-and-scatter's: all of it goes to the first maximal element of the window.
  x_tie = jnp.round(jax.random.uniform(jax.random.key(6), (2, 6, 8, 5)) * 2) / 2
  x_tie = x_tie.at[0, :2, :2, 0].set(0.0)
  np.testing.assert_array_equal(pooling.max_pool_2x2(x_tie), ref(x_tie))
  g_tie = jax.grad(lambda v: jnp.sum(pooling.max_pool_2x2(v) * w))(x_tie)
  g_tie_ref = jax.grad(lambda v: jnp.sum(ref(v) * w))(x_tie)
  np.testing.assert_array_equal(g_tie, g_tie_ref)
  assert int(jnp.sum(g_tie != 0)) == w.size
  np.testing.assert_array_equal(g_tie[0, :2, :2, 0], jnp.array([[w[0, 0, 0, 0], 0.0], [0.0, 0.0]]))


# --- blocks against hand-written references (lax.conv + the layer parameters) ---------
_DN = ("NHWC", "HWIO", "NHWC")


def _ref_conv(conv, x, stride):
  k = conv.kernel[...]
  pad = k.shape[0] // 2
  return jax.lax.conv_general_dilated(x, k, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=_DN,
                                      precision=jax.lax.Precision.HIGHEST)


def _ref_bn(bn, x):
  # inference mode: running statistics
  return ((x - bn.mean[...]) / jnp.sqrt(bn.var[...] + ic.BN_EPSILON) * bn.scale[...]
          + bn.bias[...])


def _randomise(module, seed):
  """Random BN statistics / affine parameters (so a wrong BN or a dropped branch shows)."""
  g, state = nnx.split(module)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = []
  for k, leaf in zip(keys, leaves):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      leaf = 0.5 + jax.random.uniform(k, leaf.shape) if leaf.ndim == 1 else leaf
    new.append(leaf)
  return nnx.merge(g, jax.tree.unflatten(tree, new))


@pytest.mark.parametrize("in_f,out_f,stride", [(4, 4, 1), (4, 6, 2)])
def test_basic_block_matches_hand_written_reference(in_f, out_f, stride):
  block = _randomise(ic.BasicBlock(in_f, out_f, stride, jnp.float32, _rngs(2)), 3)
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, in_f))
  h = jax.nn.relu(_ref_bn(block.bn1, _ref_conv(block.conv1, x, stride)))
  h = _ref_bn(block.bn2, _ref_conv(block.conv2, h, 1))
  sc = x if stride == 1 and in_f == out_f else _ref_bn(
      block.shortcut_bn, _ref_conv(block.shortcut_conv, x, stride))
  ref = jax.nn.relu(h + sc)
  out = block(x, train=False)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  # the shortcut really contributes (the reference without it is far off)
  assert np.abs(np.asarray(jax.nn.relu(h) - out)).max() > 0.1


@pytest.mark.parametrize("in_f,out_f,stride", [(4, 4, 1), (4, 6, 2)])
def test_preact_block_matches_hand_written_reference(in_f, out_f, stride):
  block = _randomise(ic.PreActBlock(in_f, out_f, stride, jnp.float32, _rngs(5)), 6)
  x = jax.random.normal(jax.random.key(7), (2, 8, 8, in_f))
  a = jax.nn.relu(_ref_bn(block.bn1, x))
  sc = x if stride == 1 and in_f == out_f else _ref_conv(block.shortcut_conv, a, stride)
  h = jax.nn.relu(_ref_bn(block.bn2, _ref_conv(block.conv1, a, stride)))
  ref = _ref_conv(block.conv2, h, 1) + sc
  np.testing.assert_allclose(block(x, train=False), ref, rtol=1e-4, atol=1e-4)


def test_wrn_dropout_acts_in_train_mode_only():
  kw = dict(depth=10, widen_factor=1)
  with_dropout = ic.build_classifier("wrn34_10", 5, nnx.Rngs(0, dropout=1), dropout=0.5,
                                     **kw)
  plain = ic.build_classifier("wrn34_10", 5, nnx.Rngs(0, dropout=1), **kw)
  # the same weights and statistics in both
  nnx.update(plain, nnx.state(with_dropout, nnx.Param))
  g, p, s = ic.split_classifier(with_dropout)
  g0, p0, s0 = ic.split_classifier(plain)
  x = _x(4, 8, seed=8)
  run = jax.jit(lambda g, p, s, x, train: ic.apply_logits(g, p, s, x, train=train),
                static_argnums=(0, 4))
  # eval mode: deterministic, and exactly the dropout-free network
  e1, _ = run(g, p, s, x, False)
  e2, _ = run(g, p, s, x, False)
  e0, _ = run(g0, p0, s0, x, False)
  np.testing.assert_array_equal(e1, e2)
  np.testing.assert_allclose(e1, e0, rtol=1e-6, atol=1e-6)
  # train mode: differs from the dropout-free network (same batch statistics), and two
  # calls with the advanced RNG state differ from each other
  t1, s1 = run(g, p, s, x, True)
  t2, _ = run(g, p, s1, x, True)
  t0, _ = run(g0, p0, s0, x, True)
  assert np.abs(np.asarray(t1 - t0)).max() > 1e-3
  assert np.abs(np.asarray(t1 - t2)).max() > 1e-3
