"""conv_ops.conv_general_dilated: same values and gradients as lax.conv_general_dilated."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx
from jax import lax

from uatmc_jax.longtail.models import conv_ops
from uatmc_jax.longtail.models import image_classifiers as ic

DN = ("NHWC", "HWIO", "NHWC")


def _both(x, w, strides, padding, **kw):
  ref = lambda x_, w_: lax.conv_general_dilated(x_, w_, strides, padding, dimension_numbers=DN,
                                                **kw)
  new = lambda x_, w_: conv_ops.conv_general_dilated(x_, w_, strides, padding,
                                                     dimension_numbers=DN, **kw)
  return ref, new


def _input_gradient_is_matmul(x, w, strides, padding, **kw):
  """Whether the input gradient of conv_ops' convolution is a matmul: the gradient's
  program then has a dot and one convolution (the forward's), not two."""
  f = lambda a: jnp.sum(jnp.tanh(conv_ops.conv_general_dilated(
      a, w, strides, padding, dimension_numbers=DN, **kw)))
  names = [e.primitive.name for e in jax.make_jaxpr(jax.grad(f))(x).jaxpr.eqns]
  return "dot_general" in names and names.count("conv_general_dilated") == 1


class ConvOpsTest(parameterized.TestCase):

  @parameterized.parameters(
      # (H, W, k, stride, padding): CIFAR 3x3 convs, ResNet downsampling 3x3/s2 and
      # 1x1/s2 shortcuts, a 7x7/s2 stem, odd sizes, asymmetric and string padding.
      (8, 8, 3, 1, ((1, 1), (1, 1))),
      (9, 7, 3, 2, ((1, 1), (1, 1))),
      (8, 8, 1, 2, ((0, 0), (0, 0))),
      (11, 11, 7, 2, ((3, 3), (3, 3))),
      (10, 9, 3, 2, ((0, 1), (1, 0))),
      (8, 8, 3, 1, "SAME"),
      (9, 9, 3, 2, "VALID"),
  )
  def test_values_and_gradients_match_lax(self, h, w, k, s, padding):
    # 4 input features: the few-channel path (im2col input tangent); 6: the general one.
    for cin in (4, 6):
      self._check_values_and_gradients(h, w, k, s, padding, cin)

  def _check_values_and_gradients(self, h, w, k, s, padding, cin):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, h, w, cin))
    wt = jax.random.normal(kw, (k, k, cin, 5))
    ref, new = _both(x, wt, (s, s), padding)
    # the few-channel input gradient is a matmul (module doc); the general one a convolution
    self.assertEqual(_input_gradient_is_matmul(x, wt, (s, s), padding),
                     cin <= conv_ops.FEW_INPUT_CHANNELS)
    y_ref, vjp_ref = jax.vjp(ref, x, wt)
    y_new, vjp_new = jax.vjp(new, x, wt)
    chex.assert_trees_all_close(y_new, y_ref, atol=1e-5, rtol=1e-5)
    g = jax.random.normal(kg, y_ref.shape)
    dx_ref, dw_ref = vjp_ref(g)
    dx_new, dw_new = vjp_new(g)
    chex.assert_trees_all_close(dx_new, dx_ref, atol=1e-4, rtol=1e-5)
    chex.assert_trees_all_close(dw_new, dw_ref, atol=1e-4, rtol=1e-5)
    # The rewritten path is the one taken (its custom_vjp in the jaxpr), so this test
    # checks the rewrite and not the fallback.
    self.assertIn("name=_conv_nhwc", str(jax.make_jaxpr(new)(x, wt)))

  def test_input_gradient_matches_finite_differences(self):
    x = jax.random.normal(jax.random.key(1), (1, 5, 5, 2), jnp.float32)
    wt = jax.random.normal(jax.random.key(2), (3, 3, 2, 3))
    f = lambda x_: jnp.sum(jnp.sin(conv_ops.conv_general_dilated(
        x_, wt, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN)))
    g = jax.grad(f)(x)
    eps = 1e-3
    e = np.zeros(x.shape, np.float32)
    for idx in [(0, 0, 0, 0), (0, 2, 3, 1), (0, 4, 4, 0)]:
      e[:] = 0
      e[idx] = eps
      fd = (f(x + e) - f(x - e)) / (2 * eps)
      np.testing.assert_allclose(g[idx], fd, rtol=2e-2, atol=2e-3)

  def test_second_order_gradient_matches_lax(self):
    x = jax.random.normal(jax.random.key(3), (2, 6, 6, 3))
    wt = jax.random.normal(jax.random.key(4), (3, 3, 3, 4))
    ref, new = _both(x, wt, (1, 1), ((1, 1), (1, 1)))
    # gradient of the input-gradient norm w.r.t. the kernel (a gradient-penalty shape)
    pen = lambda conv: lambda w_: jnp.sum(jax.grad(
        lambda x_: jnp.sum(jnp.tanh(conv(x_, w_))))(x) ** 2)
    chex.assert_trees_all_close(jax.grad(pen(new))(wt), jax.grad(pen(ref))(wt),
                                atol=1e-3, rtol=1e-4)

  def test_unsupported_cases_fall_back_to_lax(self):
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 4))
    wt = jax.random.normal(jax.random.key(6), (3, 3, 2, 4))
    kw = dict(dimension_numbers=DN, feature_group_count=2, rhs_dilation=(2, 2))
    ref = lax.conv_general_dilated(x, wt, (1, 1), ((2, 2), (2, 2)), **kw)
    new = conv_ops.conv_general_dilated(x, wt, (1, 1), ((2, 2), (2, 2)), **kw)
    chex.assert_trees_all_close(new, ref)
    self.assertNotIn("name=_conv_nhwc", str(jax.make_jaxpr(
        lambda a: conv_ops.conv_general_dilated(a, wt, (1, 1), ((2, 2), (2, 2)), **kw))(x)))

  def test_bfloat16_gradient_dtypes(self):
    x = jax.random.normal(jax.random.key(7), (2, 6, 6, 3)).astype(jnp.bfloat16)
    wt = jax.random.normal(jax.random.key(8), (3, 3, 3, 4)).astype(jnp.bfloat16)
    ref, new = _both(x, wt, (1, 1), ((1, 1), (1, 1)))
    dx_ref, dw_ref = jax.grad(lambda a, b: jnp.sum(ref(a, b).astype(jnp.float32)), (0, 1))(x, wt)
    dx, dw = jax.grad(lambda a, b: jnp.sum(new(a, b).astype(jnp.float32)), (0, 1))(x, wt)
    self.assertEqual((dx.dtype, dw.dtype), (jnp.bfloat16, jnp.bfloat16))
    chex.assert_trees_all_close(dx.astype(jnp.float32), dx_ref.astype(jnp.float32),
                                atol=0.1, rtol=0.05)

  @pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rewrite is CPU-only")
  def test_models_use_the_rewrite_on_cpu_and_attack_gradients_match(self):
    model = ic.build_classifier("small_cnn", 10, nnx.Rngs(0), widths=(4, 8))
    graphdef, params, stats = ic.split_classifier(model)
    x = jax.random.uniform(jax.random.key(9), (1, 16, 16, 3))

    def loss(z, gd):
      return jnp.sum(ic.apply_logits(gd, params, stats, z, train=False)[0] ** 2)

    self.assertIn("name=_conv_nhwc", str(jax.make_jaxpr(lambda z: loss(z, graphdef))(x)))
    # the same model with JAX's own convolution rule gives the same input gradient
    model_ref = ic.build_classifier("small_cnn", 10, nnx.Rngs(0), widths=(4, 8))
    for _, conv in nnx.iter_graph(model_ref):
      if isinstance(conv, nnx.Conv):
        conv.conv_general_dilated = lax.conv_general_dilated
    graphdef_ref = ic.split_classifier(model_ref)[0]
    self.assertNotIn("name=_conv_nhwc", str(jax.make_jaxpr(lambda z: loss(z, graphdef_ref))(x)))
    chex.assert_trees_all_close(jax.grad(loss)(x, graphdef), jax.grad(loss)(x, graphdef_ref),
                                atol=1e-4, rtol=1e-4)


  @parameterized.parameters(
      (8, 8, 3, 1, ((1, 1), (1, 1))),
      (9, 7, 3, 2, ((1, 1), (1, 1))),
      (8, 8, 1, 2, ((0, 0), (0, 0))),
      (10, 9, 3, 2, ((0, 1), (1, 0))),
  )
  def test_forward_mode_matches_lax(self, h, w, k, s, padding):
    # jax.jvp in the input, the kernel and both (was: "can't apply forward-mode autodiff
    # (jvp) to a custom_vjp function"); the rewritten path must be the one taken.
    keys = jax.random.split(jax.random.key(11), 4)
    x = jax.random.normal(keys[0], (2, h, w, 3))
    wt = jax.random.normal(keys[1], (k, k, 3, 4))
    dx = jax.random.normal(keys[2], x.shape)
    dw = jax.random.normal(keys[3], wt.shape)
    ref, new = _both(x, wt, (s, s), padding)
    self.assertIn("name=_conv_nhwc", str(jax.make_jaxpr(new)(x, wt)))
    for tangents in ((dx, jnp.zeros_like(wt)), (jnp.zeros_like(x), dw), (dx, dw)):
      y_ref, t_ref = jax.jvp(ref, (x, wt), tangents)
      y_new, t_new = jax.jvp(new, (x, wt), tangents)
      chex.assert_trees_all_close(y_new, y_ref, atol=1e-5, rtol=1e-5)
      chex.assert_trees_all_close(t_new, t_ref, atol=1e-4, rtol=1e-5)
    # the input tangent alone (the kernel a constant): a symbolic-zero kernel tangent
    t_x = jax.jvp(lambda a: new(a, wt), (x,), (dx,))[1]
    chex.assert_trees_all_close(t_x, jax.jvp(lambda a: ref(a, wt), (x,), (dx,))[1],
                                atol=1e-4, rtol=1e-5)

  def test_jacfwd_equals_jacrev(self):
    x = jax.random.normal(jax.random.key(12), (1, 5, 5, 2))
    wt = jax.random.normal(jax.random.key(13), (3, 3, 2, 2))
    f = lambda a: jnp.tanh(conv_ops.conv_general_dilated(
        a, wt, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN)).ravel()
    chex.assert_trees_all_close(jax.jacfwd(f)(x), jax.jacrev(f)(x), atol=1e-5, rtol=1e-5)

  def test_reverse_mode_input_gradient_is_a_plain_hwio_convolution(self):
    # The fast path of the module doc: the input gradient's convolution must carry the
    # standard kernel spec (HWIO) with input dilation = stride, not JAX's swapped-spec
    # transpose (the slow path inside loops).
    # (8 input features: the general rewrite; the few-channel path has its own test below)
    x = jax.random.normal(jax.random.key(14), (2, 8, 8, 8))
    wt = jax.random.normal(jax.random.key(15), (3, 3, 8, 4))
    f = lambda a: jnp.sum(conv_ops.conv_general_dilated(
        a, wt, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(f))(x)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    dilated = [e for e in convs if tuple(e.params["lhs_dilation"]) == (2, 2)]
    self.assertLen(dilated, 1)
    self.assertEqual(tuple(dilated[0].params["dimension_numbers"].rhs_spec), (3, 2, 0, 1))

  @pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rewrite is CPU-only")
  def test_forward_mode_through_small_cnn_and_resnet_block(self):
    def with_lax(module):
      for _, conv in nnx.iter_graph(module):
        if isinstance(conv, nnx.Conv):
          conv.conv_general_dilated = lax.conv_general_dilated
      return module

    cnn = ic.build_classifier("small_cnn", 5, nnx.Rngs(0), widths=(4, 8))
    cnn_ref = with_lax(ic.build_classifier("small_cnn", 5, nnx.Rngs(0), widths=(4, 8)))
    # a downsampling block: 3x3/s2 convs and the 1x1/s2 conv shortcut
    block = ic.BasicBlock(3, 6, 2, jnp.float32, nnx.Rngs(1))
    block_ref = with_lax(ic.BasicBlock(3, 6, 2, jnp.float32, nnx.Rngs(1)))
    x = jax.random.uniform(jax.random.key(16), (2, 8, 8, 3))
    v = jax.random.normal(jax.random.key(17), x.shape)
    for name, fn, fn_ref in (
        ("cnn", lambda z: cnn(z, train=False), lambda z: cnn_ref(z, train=False)),
        ("block", lambda z: block(z, train=False), lambda z: block_ref(z, train=False))):
      self.assertIn("name=_conv_nhwc", str(jax.make_jaxpr(fn)(x)), name)
      y, t = jax.jvp(fn, (x,), (v,))
      y_ref, t_ref = jax.jvp(fn_ref, (x,), (v,))
      chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)
      chex.assert_trees_all_close(t, t_ref, atol=1e-4, rtol=1e-4)
      # Central differences (float32). A ReLU kink inside [x - eps v, x + eps v] breaks
      # the difference quotient, so compare where two step sizes agree (smooth there),
      # and require that to be nearly every output.
      fd = [(fn(x + e * v) - fn(x - e * v)) / (2 * e) for e in (1e-3, 5e-4)]
      tol = 2e-3 * float(jnp.max(jnp.abs(t))) + 2e-4
      smooth = np.abs(np.asarray(fd[0] - fd[1])) < tol
      self.assertGreater(smooth.mean(), 0.9, name)
      np.testing.assert_allclose(np.asarray(t)[smooth], np.asarray(fd[1])[smooth], atol=tol,
                                 err_msg=name)
      # and the reverse mode is unchanged: <J v, u> == <v, J^T u>
      u = jax.random.normal(jax.random.key(18), y.shape)
      vjp = jax.vjp(fn, x)[1](u)[0]
      np.testing.assert_allclose(jnp.vdot(t, u), jnp.vdot(v, vjp), rtol=1e-4)


class FewChannelConvTest(parameterized.TestCase):
  """The few-input-channel path (RGB stems): values, gradients and directional
  derivatives equal lax.conv_general_dilated's on the shapes the models use."""

  @parameterized.parameters(
      # (C_in, H, W, k, stride, padding, C_out): the CIFAR stems (3x3/s1, pad 1, 16 and
      # 64 features), a 3x3/s2 and 1x1/s2 downsampling, a 7x7/s2 ImageNet-style stem,
      # asymmetric and string padding, 1 and 4 input channels, odd sizes.
      (3, 32, 32, 3, 1, ((1, 1), (1, 1)), 16),
      (3, 16, 16, 3, 1, ((1, 1), (1, 1)), 64),
      (3, 9, 7, 3, 2, ((1, 1), (1, 1)), 8),
      (3, 8, 8, 1, 2, ((0, 0), (0, 0)), 8),
      (3, 11, 11, 7, 2, ((3, 3), (3, 3)), 8),
      (3, 10, 9, 3, 2, ((0, 1), (1, 0)), 8),
      (1, 8, 8, 3, 1, "SAME", 4),
      (4, 9, 9, 3, 2, "VALID", 4),
  )
  def test_values_gradients_and_jvp_match_lax(self, cin, h, w, k, s, padding, cout):
    keys = jax.random.split(jax.random.key(20), 5)
    x = jax.random.uniform(keys[0], (4, h, w, cin))
    wt = jax.random.normal(keys[1], (k, k, cin, cout)) * 0.3
    ref, new = _both(x, wt, (s, s), padding)
    self.assertTrue(_input_gradient_is_matmul(x, wt, (s, s), padding))  # few-channel path
    self.assertIn("name=_conv_nhwc", str(jax.make_jaxpr(new)(x, wt)))
    y_ref, vjp_ref = jax.vjp(ref, x, wt)
    y_new, vjp_new = jax.vjp(new, x, wt)
    chex.assert_trees_all_close(y_new, y_ref, atol=1e-5, rtol=1e-5)
    g = jax.random.normal(keys[2], y_ref.shape)
    for a, b in zip(vjp_new(g), vjp_ref(g)):  # input gradient, kernel gradient
      chex.assert_trees_all_close(a, b, atol=1e-4, rtol=1e-5)
    dx = jax.random.normal(keys[3], x.shape)
    dw = jax.random.normal(keys[4], wt.shape)
    for tangents in ((dx, jnp.zeros_like(wt)), (jnp.zeros_like(x), dw), (dx, dw)):
      t_new = jax.jvp(new, (x, wt), tangents)[1]
      t_ref = jax.jvp(ref, (x, wt), tangents)[1]
      chex.assert_trees_all_close(t_new, t_ref, atol=1e-4, rtol=1e-5)

  def test_input_gradient_is_a_matmul_not_a_convolution(self):
    # The input gradient of the few-channel path is the transposed im2col (a matmul, then
    # pads and adds); a convolution there would be the slow path this avoids.
    x = jax.random.uniform(jax.random.key(21), (2, 8, 8, 3))
    wt = jax.random.normal(jax.random.key(22), (3, 3, 3, 16))
    f = lambda a: jnp.sum(jnp.tanh(conv_ops.conv_general_dilated(
        a, wt, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)))
    self.assertTrue(_input_gradient_is_matmul(x, wt, (1, 1), ((1, 1), (1, 1))))
    ref = lambda a: jnp.sum(jnp.tanh(lax.conv_general_dilated(
        a, wt, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)))
    chex.assert_trees_all_close(jax.grad(f)(x), jax.grad(ref)(x), atol=1e-5, rtol=1e-5)

  def test_pgd_loop_and_second_order_match_lax(self):
    # Input gradients inside a lax.fori_loop (the attacks' shape), and the gradient of
    # an input-gradient norm w.r.t. the kernel (forward-over-reverse through the rule).
    x0 = jax.random.uniform(jax.random.key(23), (4, 12, 12, 3))
    wt = jax.random.normal(jax.random.key(24), (3, 3, 3, 8))
    tgt = jax.random.normal(jax.random.key(25), (4, 12, 12, 8))

    def attack(conv):
      def body(_, xa):
        gx = jax.grad(lambda z: jnp.sum(jnp.tanh(conv(z, wt)) * tgt))(xa)
        return jnp.clip(xa + 0.01 * jnp.sign(gx), 0.0, 1.0)
      return jax.jit(lambda a: lax.fori_loop(0, 4, body, a))(x0)

    ref, new = _both(x0, wt, (1, 1), ((1, 1), (1, 1)))
    chex.assert_trees_all_close(attack(new), attack(ref), atol=1e-6)
    pen = lambda conv: lambda w_: jnp.sum(jax.grad(
        lambda z: jnp.sum(jnp.tanh(conv(z, w_)) * tgt))(x0) ** 2)
    chex.assert_trees_all_close(jax.grad(pen(new))(wt), jax.grad(pen(ref))(wt),
                                atol=1e-3, rtol=1e-4)
    chex.assert_trees_all_close(jax.jacfwd(pen(new))(wt), jax.jacfwd(pen(ref))(wt),
                                atol=1e-3, rtol=1e-4)

  def test_vmap_and_sharded_batch_match_lax(self):
    x = jax.random.uniform(jax.random.key(26), (3, 8, 6, 6, 3))
    wt = jax.random.normal(jax.random.key(27), (3, 3, 3, 4))
    ref, new = _both(x[0], wt, (1, 1), ((1, 1), (1, 1)))
    grad = lambda conv: jax.grad(lambda a: jnp.sum(conv(a, wt) ** 2))
    chex.assert_trees_all_close(jax.vmap(lambda a: new(a, wt))(x),
                                jax.vmap(lambda a: ref(a, wt))(x), atol=1e-5)
    chex.assert_trees_all_close(jax.vmap(grad(new))(x), jax.vmap(grad(ref))(x), atol=1e-4)
    # per-example kernels too
    ws = jax.random.normal(jax.random.key(28), (3, 3, 3, 3, 4))
    chex.assert_trees_all_close(jax.vmap(new)(x, ws), jax.vmap(ref)(x, ws), atol=1e-5)
    # the batch sharded over every device of a 1-D mesh
    devices = np.array(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("data",))
    rows = jax.random.uniform(jax.random.key(31), (2 * len(devices), 6, 6, 3))
    xb = jax.device_put(rows, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    y = jax.jit(lambda a: new(a, wt))(xb)
    self.assertGreater(len(devices), 1)  # conftest's fake CPU devices
    self.assertEqual(y.sharding.spec[0], "data")
    chex.assert_trees_all_close(y, ref(np.asarray(xb), wt), atol=1e-5)
    chex.assert_trees_all_close(jax.jit(grad(new))(xb), grad(ref)(np.asarray(xb)), atol=1e-4)

  def test_disabled_path_and_bfloat16_use_the_general_rewrite(self):
    x = jax.random.uniform(jax.random.key(29), (2, 6, 6, 3))
    wt = jax.random.normal(jax.random.key(30), (3, 3, 3, 4))
    pads = ((1, 1), (1, 1))
    self.assertFalse(_input_gradient_is_matmul(x, wt, (1, 1), pads, few_input_channels=0))
    self.assertFalse(_input_gradient_is_matmul(x.astype(jnp.bfloat16), wt.astype(jnp.bfloat16),
                                               (1, 1), pads))
    # the module default, read at trace time
    old = conv_ops.FEW_INPUT_CHANNELS
    try:
      conv_ops.FEW_INPUT_CHANNELS = 2
      self.assertFalse(_input_gradient_is_matmul(x, wt, (1, 1), pads))
      self.assertTrue(_input_gradient_is_matmul(x[..., :2], wt[:, :, :2], (1, 1), pads))
    finally:
      conv_ops.FEW_INPUT_CHANNELS = old
    ref, _ = _both(x, wt, (1, 1), pads)
    off = lambda a: conv_ops.conv_general_dilated(a, wt, (1, 1), pads, dimension_numbers=DN,
                                                  few_input_channels=0)
    chex.assert_trees_all_close(jax.grad(lambda a: jnp.sum(off(a) ** 2))(x),
                                jax.grad(lambda a: jnp.sum(ref(a, wt) ** 2))(x), atol=1e-4)


if __name__ == "__main__":
  from absl.testing import absltest
  absltest.main()
