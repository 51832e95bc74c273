"""Image classifiers for long-tailed adversarial training (METHODS.md B.2), Flax NNX.

Every model here is ``f(x) = W φ(x) (+ b)``: a feature extractor ``φ`` (the
penultimate features) and a classifier head ``W``, exposed separately because MCAT
(B.4) needs both — the manifold distance acts on ``φ`` and the ETF term on ``W``.

Public API of every model (``ImageClassifier`` subclasses):

* ``model.features(x, train=None) -> φ``: ``x`` is ``(B, H, W, 3)`` float in
  ``[0, 1]`` (NHWC), ``φ`` is ``(B, model.feature_dim)`` float32
  (512 for ResNet-18 / PreAct ResNet-18, 640 for WRN-34-10).
* ``model.classify(phi) -> logits``: ``(B, num_classes)`` float32.
* ``model(x, train=None) == model.classify(model.features(x, train))``.
* ``model.classifier_weight``: the head's weight as ``(C, d_f)`` (rows = classes),
  a differentiable view of the parameter (for the ETF Gram penalty of B.4).
* ``model.classifier_bias``: ``(C,)`` or ``None``.
* ``model.num_classes``, ``model.feature_dim``.

BatchNorm mode. ``train=None`` (default) follows the module attribute, i.e. NNX's
``model.train()`` / ``model.eval()``; ``train=True`` normalises with batch statistics
and updates the running averages; ``train=False`` uses the running averages and
leaves them untouched. Attacks (PGD inside adversarial training, evaluation attacks)
must call the model with ``train=False`` (or on ``model.eval()`` /
``nnx.view(model, use_running_average=True)``) so the adversary sees the inference
network and the BN statistics are not polluted by adversarial batches.

Pure-function pattern for jitted train steps (BN statistics are ``nnx.BatchStat``
variables, parameters are ``nnx.Param``)::

    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    # (split_classifier also puts a WRN's dropout RNG state with the batch stats)

    def logits_fn(params, batch_stats, x, train):
      m = nnx.merge(graphdef, params, batch_stats, copy=True)  # fresh Variables
      out = m(x, train=train)
      return out, nnx.state(m, nnx.BatchStat)     # updated stats when train=True

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
      # inner attack: BN in inference mode, stats unchanged
      x_adv = pgd(lambda xa: logits_fn(params, batch_stats, xa, False)[0], x, y)
      def loss_fn(p):
        logits, new_stats = logits_fn(p, batch_stats, x_adv, True)
        return cross_entropy(logits, y), new_stats
      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      ...
      return new_params, new_stats, opt_state

``apply_features`` / ``apply_logits`` / ``apply_classify`` below wrap exactly this
pattern (``copy=True`` gives fresh Variables in the current trace, so the merge also
works inside ``jax.grad`` nested in ``jax.jit`` with closed-over batch stats);
``classifier_weight_of(graphdef, params, batch_stats)`` reads ``W`` from a parameter
pytree. ``nnx.jit`` on the module itself also works (NNX propagates the BN updates).

Mixed precision: ``dtype=jnp.bfloat16`` computes convolutions / matmuls in bfloat16
while parameters (``param_dtype``) and BN statistics stay float32; ``features`` and
``classify`` always return float32.

Build by name with ``build_classifier(name, num_classes, rngs, **kw)``; names:
``resnet18``, ``preact_resnet18``, ``wrn34_10`` (any ``wrn`` via ``depth=``,
``widen_factor=``), ``reduced_resnet`` (CIFAR-stem ResNet, width 16, one block per
stage: 128-d features, for CPU runs) and ``small_cnn``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.longtail.models import conv_ops, pooling

# PyTorch's BatchNorm momentum 0.1 (the reference code's) = Flax momentum 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# He-normal with fan_out, as torchvision / the CIFAR AT reference code initialise convs.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

Dtype = Any


def _bn(features: int, dtype: Dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                       param_dtype=jnp.float32, rngs=rngs)


def _conv(in_f: int, out_f: int, kernel: int, stride: int, dtype: Dtype,
          rngs: nnx.Rngs) -> nnx.Conv:
  # Explicit symmetric padding (k//2) = PyTorch's padding=1 for 3x3, 0 for 1x1;
  # 'SAME' would pad asymmetrically for stride 2.
  # On CPU the convolution's input gradient is rewritten so that XLA keeps it on its fast
  # path inside the attacks' loops (conv_ops; 4.8x faster PGD-10 loop, docs/results/performance.md).
  pad = kernel // 2
  conv_fn = (conv_ops.conv_general_dilated if jax.default_backend() == "cpu"
             else jax.lax.conv_general_dilated)
  return nnx.Conv(in_f, out_f, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                  param_dtype=jnp.float32, kernel_init=_conv_init, rngs=rngs,
                  conv_general_dilated=conv_fn)


def _use_running_average(train: bool | None) -> bool | None:
  return None if train is None else not train


class ImageClassifier(nnx.Module):
  """Base class: ``f(x) = classify(features(x))`` with a separable head.

  Subclasses set ``self.dtype``, build their layers in ``__init__``, call
  ``_init_head`` and define ``_features(x, train) -> (B, d_f)``;
  this class owns the head (linear, optional bias; or cosine with a fixed scale) and
  the optional input standardisation (kept inside the model so that attacks operate
  on ``[0, 1]`` pixels).
  """

  def _init_head(self, feature_dim: int, num_classes: int, *, use_bias: bool,
                 head: str, cosine_scale: float, input_mean: Sequence[float] | None,
                 input_std: Sequence[float] | None, rngs: nnx.Rngs) -> None:
    if head not in ("linear", "cosine"):
      raise ConfigError(f"classifier head: expected 'linear' or 'cosine', got {head!r}")
    self.num_classes = num_classes
    self.feature_dim = feature_dim
    self.head = head
    self.cosine_scale = float(cosine_scale)
    # Head in float32: logits feed softmax / margins, and W feeds the ETF Gram term.
    self.classifier = nnx.Linear(feature_dim, num_classes,
                                 use_bias=use_bias and head == "linear",
                                 param_dtype=jnp.float32, rngs=rngs)
    if (input_mean is None) != (input_std is None):
      raise ConfigError("input_mean and input_std must be given together")
    self.input_mean = None if input_mean is None else tuple(float(v) for v in input_mean)
    self.input_std = None if input_std is None else tuple(float(v) for v in input_std)

  # --- head -------------------------------------------------------------------------
  @property
  def classifier_weight(self) -> jax.Array:
    """The classifier weight ``W`` as ``(C, d_f)`` (rows are class vectors)."""
    return self.classifier.kernel[...].T

  @property
  def classifier_bias(self) -> jax.Array | None:
    return None if self.classifier.bias is None else self.classifier.bias[...]

  def classify(self, phi: jax.Array) -> jax.Array:
    """Logits ``(B, C)`` float32 from features ``phi`` ``(B, d_f)``.

    Linear head: ``φ Wᵀ + b``. Cosine head (RoBal-style):
    ``s · cos(φ, W_c)`` with ``s = cosine_scale``.
    """
    chex.assert_shape(phi, (None, self.feature_dim))
    phi = phi.astype(jnp.float32)
    if self.head == "cosine":
      w = self.classifier_weight
      wn = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
      pn = phi / jnp.maximum(jnp.linalg.norm(phi, axis=-1, keepdims=True), 1e-12)
      return self.cosine_scale * pn @ wn.T
    return self.classifier(phi)

  # --- features ---------------------------------------------------------------------
  def _standardise(self, x: jax.Array) -> jax.Array:
    if self.input_mean is None:
      return x
    mean = jnp.asarray(self.input_mean, x.dtype)
    std = jnp.asarray(self.input_std, x.dtype)
    return (x - mean) / std

  def features(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Penultimate features ``φ(x)``: ``(B, H, W, 3)`` in [0,1] -> ``(B, d_f)`` f32."""
    chex.assert_rank(x, 4)
    x = self._standardise(x.astype(jnp.float32))
    phi = self._features(x.astype(self.dtype), train).astype(jnp.float32)
    chex.assert_shape(phi, (x.shape[0], self.feature_dim))
    return phi

  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    return self.classify(self.features(x, train))


# ---------------------------------------------------------------------------------
# ResNet-18 with the CIFAR stem
# ---------------------------------------------------------------------------------
class BasicBlock(nnx.Module):
  """Post-activation residual block (two 3x3 convs), as in He et al. 2016a."""

  def __init__(self, in_f: int, out_f: int, stride: int, dtype: Dtype, rngs: nnx.Rngs):
    self.conv1 = _conv(in_f, out_f, 3, stride, dtype, rngs)
    self.bn1 = _bn(out_f, dtype, rngs)
    self.conv2 = _conv(out_f, out_f, 3, 1, dtype, rngs)
    self.bn2 = _bn(out_f, dtype, rngs)
    if stride != 1 or in_f != out_f:
      self.shortcut_conv = _conv(in_f, out_f, 1, stride, dtype, rngs)
      self.shortcut_bn = _bn(out_f, dtype, rngs)
    else:
      self.shortcut_conv = None
      self.shortcut_bn = None

  def __call__(self, x, train):
    ura = _use_running_average(train)
    h = jax.nn.relu(self.bn1(self.conv1(x), ura))
    h = self.bn2(self.conv2(h), ura)
    sc = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x), ura)
    return jax.nn.relu(h + sc)


def _residual_stages(make_block, in_features: int, widths: Sequence[int],
                     counts: Sequence[int]) -> tuple[nnx.List, int]:
  """Stacks residual stages: stage s has ``counts[s]`` blocks of width ``widths[s]``;
  the first block of every stage but the first downsamples (stride 2).

  ``make_block(in_f, out_f, stride)`` builds one block. Returns (blocks, out width).
  """
  blocks = []
  in_f = in_features
  for stage, (out_f, n) in enumerate(zip(widths, counts)):
    for i in range(n):
      blocks.append(make_block(in_f, out_f, 2 if (stage > 0 and i == 0) else 1))
      in_f = out_f
  return nnx.List(blocks), in_f


def _check_stages(name: str, stage_blocks: Sequence[int], width: int) -> None:
  """ConfigError unless a CIFAR ResNet gets 4 positive stage sizes and a positive width."""
  if len(stage_blocks) != 4 or min(stage_blocks) < 1 or width < 1:
    raise ConfigError(f"{name}: stage_blocks must be 4 positive ints and width >= 1, "
                      f"got stage_blocks={tuple(stage_blocks)}, width={width}")


class ResNet(ImageClassifier):
  """ResNet with the CIFAR stem: 3x3 conv (stride 1), no max-pool (METHODS.md B.2).

  ``stage_blocks=(2, 2, 2, 2)``, ``width=64`` is ResNet-18 (``d_f = 8 * width = 512``).
  Smaller ``width`` / ``stage_blocks`` give the "reduced ResNet" for CPU runs.
  """

  def __init__(self, num_classes: int, *, rngs: nnx.Rngs, width: int = 64,
               stage_blocks: Sequence[int] = (2, 2, 2, 2), dtype: Dtype = jnp.float32,
               use_bias: bool = True, head: str = "linear", cosine_scale: float = 16.0,
               input_mean=None, input_std=None):
    _check_stages("resnet", stage_blocks, width)
    self.dtype = dtype
    self.stem_conv = _conv(3, width, 3, 1, dtype, rngs)
    self.stem_bn = _bn(width, dtype, rngs)
    self.blocks, in_f = _residual_stages(
        lambda i, o, st: BasicBlock(i, o, st, dtype, rngs), width,
        [width * 2 ** s for s in range(4)], stage_blocks)
    self._init_head(in_f, num_classes, use_bias=use_bias, head=head,
                    cosine_scale=cosine_scale, input_mean=input_mean,
                    input_std=input_std, rngs=rngs)

  def _features(self, x, train):
    ura = _use_running_average(train)
    h = jax.nn.relu(self.stem_bn(self.stem_conv(x), ura))
    for block in self.blocks:
      h = block(h, train)
    return jnp.mean(h, axis=(1, 2))


# ---------------------------------------------------------------------------------
# Pre-activation ResNet-18 and Wide ResNet (pre-activation blocks)
# ---------------------------------------------------------------------------------
class PreActBlock(nnx.Module):
  """Pre-activation block (He et al. 2016b): BN-ReLU-conv-BN-ReLU-conv + shortcut.

  When the shape changes, the shortcut is a 1x1 conv of the *pre-activated* input
  (as in the PreAct-ResNet / WRN reference implementations). ``dropout`` (WRN) sits
  between the two convs and is active only when ``train`` is true and an rng is set.
  """

  def __init__(self, in_f: int, out_f: int, stride: int, dtype: Dtype, rngs: nnx.Rngs,
               dropout: float = 0.0):
    self.bn1 = _bn(in_f, dtype, rngs)
    self.conv1 = _conv(in_f, out_f, 3, stride, dtype, rngs)
    self.bn2 = _bn(out_f, dtype, rngs)
    self.conv2 = _conv(out_f, out_f, 3, 1, dtype, rngs)
    self.shortcut_conv = (_conv(in_f, out_f, 1, stride, dtype, rngs)
                          if (stride != 1 or in_f != out_f) else None)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def __call__(self, x, train):
    ura = _use_running_average(train)
    a = jax.nn.relu(self.bn1(x, ura))
    sc = x if self.shortcut_conv is None else self.shortcut_conv(a)
    h = self.conv1(a)
    h = jax.nn.relu(self.bn2(h, ura))
    if self.dropout is not None:
      h = self.dropout(h, deterministic=None if train is None else not train)
    h = self.conv2(h)
    return h + sc


class PreActResNet(ImageClassifier):
  """Pre-activation ResNet with the CIFAR stem; defaults = PreAct ResNet-18 (512-d)."""

  def __init__(self, num_classes: int, *, rngs: nnx.Rngs, width: int = 64,
               stage_blocks: Sequence[int] = (2, 2, 2, 2), dtype: Dtype = jnp.float32,
               use_bias: bool = True, head: str = "linear", cosine_scale: float = 16.0,
               input_mean=None, input_std=None):
    _check_stages("preact_resnet", stage_blocks, width)
    self.dtype = dtype
    self.stem_conv = _conv(3, width, 3, 1, dtype, rngs)
    self.blocks, in_f = _residual_stages(
        lambda i, o, st: PreActBlock(i, o, st, dtype, rngs), width,
        [width * 2 ** s for s in range(4)], stage_blocks)
    self.final_bn = _bn(in_f, dtype, rngs)
    self._init_head(in_f, num_classes, use_bias=use_bias, head=head,
                    cosine_scale=cosine_scale, input_mean=input_mean,
                    input_std=input_std, rngs=rngs)

  def _features(self, x, train):
    # Pre-activation trunk: the last block's output still needs BN + ReLU.
    h = self.stem_conv(x)
    for block in self.blocks:
      h = block(h, train)
    h = jax.nn.relu(self.final_bn(h, _use_running_average(train)))
    return jnp.mean(h, axis=(1, 2))


class WideResNet(PreActResNet):
  """Wide ResNet WRN-depth-k (Zagoruyko & Komodakis 2016); defaults = WRN-34-10.

  ``(depth - 4) / 6`` pre-activation blocks per group, group widths
  ``16k, 32k, 64k`` with strides 1, 2, 2; ``d_f = 64k`` (640 for WRN-34-10).
  """

  def __init__(self, num_classes: int, *, rngs: nnx.Rngs, depth: int = 34,
               widen_factor: int = 10, dropout: float = 0.0, dtype: Dtype = jnp.float32,
               use_bias: bool = True, head: str = "linear", cosine_scale: float = 16.0,
               input_mean=None, input_std=None):
    if depth < 10 or (depth - 4) % 6 or widen_factor < 1:
      raise ConfigError(f"wrn: depth must be 6n+4 (>= 10) and widen_factor >= 1, got "
                        f"depth={depth}, widen_factor={widen_factor}")
    self.dtype = dtype
    n = (depth - 4) // 6
    widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    self.stem_conv = _conv(3, 16, 3, 1, dtype, rngs)
    self.blocks, in_f = _residual_stages(
        lambda i, o, st: PreActBlock(i, o, st, dtype, rngs, dropout=dropout), 16, widths,
        (n, n, n))
    self.final_bn = _bn(in_f, dtype, rngs)
    self._init_head(in_f, num_classes, use_bias=use_bias, head=head,
                    cosine_scale=cosine_scale, input_mean=input_mean,
                    input_std=input_std, rngs=rngs)

  # _features: the pre-activation trunk of PreActResNet (same stem/blocks/final BN layout).


# ---------------------------------------------------------------------------------
# Small CNN for CPU runs
# ---------------------------------------------------------------------------------
class SmallCNN(ImageClassifier):
  """A small VGG-style CNN for fast CPU checks (METHODS.md B.2, "small CNN").

  For each width in ``widths``: conv3x3-BN-ReLU, then a 2x2 max-pool; then global
  average pooling, so ``d_f = widths[-1]`` (128 by default). About 0.1M parameters
  and ~13 MFLOP per 32x32 image with the defaults.
  """

  def __init__(self, num_classes: int, *, rngs: nnx.Rngs,
               widths: Sequence[int] = (32, 64, 128), dtype: Dtype = jnp.float32,
               use_bias: bool = True, head: str = "linear", cosine_scale: float = 16.0,
               input_mean=None, input_std=None):
    if not widths or min(widths) < 1:
      raise ConfigError(f"small_cnn: widths must be positive ints, got {tuple(widths)}")
    self.dtype = dtype
    convs, bns = [], []
    in_f = 3
    for w in widths:
      convs.append(_conv(in_f, w, 3, 1, dtype, rngs))
      bns.append(_bn(w, dtype, rngs))
      in_f = w
    self.convs = nnx.List(convs)
    self.bns = nnx.List(bns)
    self._init_head(in_f, num_classes, use_bias=use_bias, head=head,
                    cosine_scale=cosine_scale, input_mean=input_mean,
                    input_std=input_std, rngs=rngs)

  def _features(self, x, train):
    ura = _use_running_average(train)
    h = x
    for conv, bn in zip(self.convs, self.bns):
      h = jax.nn.relu(bn(conv(h), ura))
      h = pooling.max_pool_2x2(h)
    return jnp.mean(h, axis=(1, 2))


# ---------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------
def _resnet18(num_classes, rngs, **kw):
  return ResNet(num_classes, rngs=rngs, **kw)


def _reduced_resnet(num_classes, rngs, **kw):
  kw.setdefault("width", 16)
  kw.setdefault("stage_blocks", (1, 1, 1, 1))
  return ResNet(num_classes, rngs=rngs, **kw)


def _preact_resnet18(num_classes, rngs, **kw):
  return PreActResNet(num_classes, rngs=rngs, **kw)


def _wrn34_10(num_classes, rngs, **kw):
  return WideResNet(num_classes, rngs=rngs, **kw)


def _small_cnn(num_classes, rngs, **kw):
  return SmallCNN(num_classes, rngs=rngs, **kw)


CLASSIFIERS: dict[str, Callable[..., ImageClassifier]] = {
    "resnet18": _resnet18,
    "reduced_resnet": _reduced_resnet,
    "preact_resnet18": _preact_resnet18,
    "wrn34_10": _wrn34_10,
    "small_cnn": _small_cnn,
}


def build_classifier(name: str, num_classes: int, rngs: nnx.Rngs,
                     **kwargs) -> ImageClassifier:
  """Builds a classifier by registry name.

  Args:
    name: one of ``CLASSIFIERS`` (``resnet18``, ``reduced_resnet``,
      ``preact_resnet18``, ``wrn34_10``, ``small_cnn``).
    num_classes: C.
    rngs: ``nnx.Rngs`` for parameter initialisation (``params`` stream; WRN dropout
      uses ``dropout``).
    **kwargs: model options: ``dtype`` (compute dtype, e.g. ``jnp.bfloat16``),
      ``use_bias``, ``head`` (``linear`` | ``cosine``), ``cosine_scale``,
      ``input_mean`` / ``input_std`` (standardisation inside the model); ResNets:
      ``width``, ``stage_blocks``; WRN: ``depth``, ``widen_factor``, ``dropout``;
      small CNN: ``widths``.

  Raises:
    ConfigError: unknown name or invalid option.
  """
  if name not in CLASSIFIERS:
    raise ConfigError(f"model: unknown classifier {name!r}; expected one of "
                      f"{sorted(CLASSIFIERS)}")
  if num_classes < 2:
    raise ConfigError(f"model: num_classes must be >= 2, got {num_classes}")
  if isinstance(kwargs.get("dtype"), str):
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  try:
    return CLASSIFIERS[name](num_classes, rngs, **kwargs)
  except TypeError as e:  # an option this model does not take
    raise ConfigError(f"model {name!r}: {e}") from e


# ---------------------------------------------------------------------------------
# Pure functions over (graphdef, params, batch_stats) for jitted steps
# ---------------------------------------------------------------------------------
# The non-parameter state a train step carries: BN running statistics, plus the
# dropout RNG stream of a WRN built with dropout > 0.
MUTABLE_STATE = (nnx.BatchStat, nnx.RngState)


def split_classifier(model: ImageClassifier):
  """``(graphdef, params, batch_stats)``: ``nnx.split(model, nnx.Param, MUTABLE_STATE)``.

  ``batch_stats`` holds the BN running averages (and, for a WRN with dropout, the
  dropout RNG state); pass it back in and keep the updated copy the ``apply_*``
  functions return.
  """
  return nnx.split(model, nnx.Param, MUTABLE_STATE)


def apply_features(graphdef, params, batch_stats, x: jax.Array, *, train: bool):
  """Pure ``φ(x)``. Returns ``(phi (B, d_f), new_batch_stats)``.

  With ``train=False`` BN uses the running statistics and ``new_batch_stats`` equals
  ``batch_stats``; with ``train=True`` it holds the updated running averages.
  """
  model = nnx.merge(graphdef, params, batch_stats, copy=True)
  phi = model.features(x, train=train)
  return phi, nnx.state(model, MUTABLE_STATE)


def apply_logits(graphdef, params, batch_stats, x: jax.Array, *, train: bool):
  """Pure ``f(x)``. Returns ``(logits (B, C), new_batch_stats)`` (see ``apply_features``)."""
  model = nnx.merge(graphdef, params, batch_stats, copy=True)
  logits = model(x, train=train)
  return logits, nnx.state(model, MUTABLE_STATE)


def apply_classify(graphdef, params, batch_stats, phi: jax.Array) -> jax.Array:
  """Pure head: logits ``(B, C)`` from features ``phi`` ``(B, d_f)``."""
  return nnx.merge(graphdef, params, batch_stats, copy=True).classify(phi)


def classifier_weight_of(graphdef, params, batch_stats) -> jax.Array:
  """``W`` as ``(C, d_f)`` from a parameter pytree (differentiable in ``params``)."""
  return nnx.merge(graphdef, params, batch_stats, copy=True).classifier_weight
