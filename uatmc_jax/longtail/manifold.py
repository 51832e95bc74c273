"""Class-conditional feature manifolds and the manifold distance of MCAT (METHODS.md B.4).

For each class y a generator G_y: R^{d_z} -> R^{d_f} (MLP d_z -> 1024 -> 1024 -> d_f,
ReLU, linear output) models the clean penultimate features φ of class y, and

    d_My(φ) = min_z ||φ − G_y(z)||²                                          (B.4)

is approximated by ``num_steps`` (T_z) gradient steps on z from an initial z0.

How the generators are fitted (a deliberate deviation from the reference code): the
reference regresses *random* z onto *random* features of the class, so the best
generator ignores z and outputs the class mean, and d_My degenerates into the distance
to the class mean. Here G_y is the decoder of a per-class autoencoder: an encoder
E_y: R^{d_f} -> R^{d_z} (MLP d_f -> 1024 -> d_z) gives z0 = E_y(φ) and both are fitted
on the clean features of class y by reconstruction ||φ − G_y(E_y(φ))||², so z indexes
positions on the class's feature set (tests check held-out reconstruction error is far
below the distance to the class mean). The latent steps then refine z0.

Vectorisation: the C classes' parameters are stacked on a leading axis and every layer
is a grouped matmul (``jax.lax.ragged_dot``) over the batch sorted by label: each
example meets only its own class's weights, with no Python loop over classes and no
(B, C) blow-up on accelerators.

Gradient: by the envelope theorem ∇_φ d_My(φ) = 2(φ − G_y(z*)) at the minimiser z*.
``manifold_distance`` holds z* fixed with ``stop_gradient``, so ``jax.grad`` returns
exactly that expression (and reaches the attack: the reference computed it under
no-grad, so λ_man never influenced its adversary).
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

Layers = list  # [{"w": (C, in, out), "b": (C, out)}, ...]


class ManifoldParams(NamedTuple):
  """Stacked per-class encoder and generator parameters (leading axis = class)."""
  encoder: Layers
  generator: Layers


class ManifoldFitState(NamedTuple):
  """Manifold parameters and the state of the optimiser that fits them."""
  params: ManifoldParams
  opt_state: optax.OptState


def _init_layers(key: jax.Array, num_classes: int, widths: list[int]) -> Layers:
  layers = []
  for k, (n_in, n_out) in zip(jax.random.split(key, len(widths) - 1), zip(widths[:-1], widths[1:])):
    w = jax.random.normal(k, (num_classes, n_in, n_out), jnp.float32) * jnp.sqrt(2.0 / n_in)
    layers.append({"w": w, "b": jnp.zeros((num_classes, n_out), jnp.float32)})
  return layers


def init_manifold_params(key: jax.Array, *, num_classes: int, feature_dim: int,
                         latent_dim: int = 128, hidden_dim: int = 1024) -> ManifoldParams:
  """He-initialised encoders (d_f -> h -> d_z) and generators (d_z -> h -> h -> d_f)."""
  k_enc, k_gen = jax.random.split(key)
  return ManifoldParams(
      encoder=_init_layers(k_enc, num_classes, [feature_dim, hidden_dim, latent_dim]),
      generator=_init_layers(k_gen, num_classes, [latent_dim, hidden_dim, hidden_dim, feature_dim]))


def per_class_mlp(layers: Layers, inputs: chex.Array, labels: chex.Array) -> jax.Array:
  """Applies class ``labels[b]``'s MLP to ``inputs[b]`` (ReLU hidden, linear output).

  Args:
    layers: stacked parameters, ``w`` (C, in, out) and ``b`` (C, out) per layer.
    inputs: (B, in).
    labels: (B,) int in [0, C).

  Returns:
    (B, out).
  """
  num_classes = layers[0]["w"].shape[0]
  chex.assert_rank(inputs, 2)
  chex.assert_shape(labels, (inputs.shape[0],))
  order = jnp.argsort(labels)
  sorted_labels = labels[order]
  group_sizes = jnp.bincount(labels, length=num_classes).astype(jnp.int32)
  h = inputs[order]
  for i, layer in enumerate(layers):
    h = jax.lax.ragged_dot(h, layer["w"], group_sizes) + layer["b"][sorted_labels]
    if i < len(layers) - 1:
      h = jax.nn.relu(h)
  return jnp.zeros_like(h).at[order].set(h)


def generate(generator: Layers, z: chex.Array, labels: chex.Array) -> jax.Array:
  """G_y(z) per example: z (B, d_z), labels (B,) -> (B, d_f)."""
  return per_class_mlp(generator, z, labels)


def encode(encoder: Layers, features: chex.Array, labels: chex.Array) -> jax.Array:
  """E_y(φ) per example, the initial latent code: (B, d_f) -> (B, d_z)."""
  return per_class_mlp(encoder, features, labels)


def latent_descent(generator: Layers, features: chex.Array, labels: chex.Array,
                   z0: chex.Array, *, num_steps: int, step_size: float) -> jax.Array:
  """z_{t+1} = z_t − η ∇_z ||φ − G_y(z_t)||², ``num_steps`` (T_z) times (lax.fori_loop)."""
  features = jax.lax.stop_gradient(features)

  def total_residual(z):
    return jnp.sum((features - generate(generator, z, labels)) ** 2)

  grad_z = jax.grad(total_residual)  # rows are independent: grad of the sum is per-example

  def body(_, z):
    return z - step_size * grad_z(z)

  return jax.lax.fori_loop(0, num_steps, body, jax.lax.stop_gradient(z0))


def manifold_distance(features: chex.Array, labels: chex.Array, generator: Layers,
                      z0: chex.Array, *, num_steps: int, step_size: float) -> jax.Array:
  """d_My(φ) ≈ ||φ − G_y(z*)||² with z* from T_z latent steps (B.4). Returns (B,).

  z* (and the generator) are held fixed, so ∇_φ = 2(φ − G_y(z*)) exactly (envelope
  theorem); the gradient flows to φ and from there into the attack.
  """
  chex.assert_rank([features, z0], 2)
  chex.assert_equal_shape_prefix([features, z0, labels], 1)
  z_star = jax.lax.stop_gradient(latent_descent(
      generator, features, labels, z0, num_steps=num_steps, step_size=step_size))
  target = jax.lax.stop_gradient(generate(generator, z_star, labels))
  return jnp.sum((features - target) ** 2, axis=-1)


def manifold_distance_from_features(params: ManifoldParams, features: chex.Array,
                                    labels: chex.Array, *, num_steps: int,
                                    step_size: float) -> jax.Array:
  """d_My(φ) with z0 = E_y(φ) (encoder initialisation, held fixed). Returns (B,)."""
  z0 = jax.lax.stop_gradient(encode(params.encoder, features, labels))
  return manifold_distance(features, labels, params.generator, z0,
                           num_steps=num_steps, step_size=step_size)


def reconstruction_loss(params: ManifoldParams, features: chex.Array,
                        labels: chex.Array) -> jax.Array:
  """Mean over the batch of ||φ − G_y(E_y(φ))||² (autoencoder fit of B.4). Scalar."""
  features = jax.lax.stop_gradient(features)
  recon = generate(params.generator, encode(params.encoder, features, labels), labels)
  return jnp.mean(jnp.sum((features - recon) ** 2, axis=-1))


def manifold_optimizer(learning_rate: float = 1e-3) -> optax.GradientTransformation:
  return optax.adam(learning_rate)


def init_manifold_fit(key: jax.Array, *, num_classes: int, feature_dim: int,
                      latent_dim: int = 128, hidden_dim: int = 1024,
                      learning_rate: float = 1e-3) -> ManifoldFitState:
  params = init_manifold_params(key, num_classes=num_classes, feature_dim=feature_dim,
                                latent_dim=latent_dim, hidden_dim=hidden_dim)
  return ManifoldFitState(params, manifold_optimizer(learning_rate).init(params))


def manifold_fit_steps(state: ManifoldFitState, features: chex.Array, labels: chex.Array,
                       *, num_steps: int, learning_rate: float = 1e-3) -> tuple[ManifoldFitState, jax.Array]:
  """``num_steps`` Adam steps of the reconstruction loss on one batch of clean features.

  Used both for the warm-up fit and for the per-step refresh of B.4. Returns the new
  state and the loss before the last step.
  """
  opt = manifold_optimizer(learning_rate)

  def body(_, carry):
    st, _ = carry
    loss, grads = jax.value_and_grad(reconstruction_loss)(st.params, features, labels)
    updates, opt_state = opt.update(grads, st.opt_state, st.params)
    return ManifoldFitState(optax.apply_updates(st.params, updates), opt_state), loss

  return jax.lax.fori_loop(0, num_steps, body, (state, jnp.zeros((), jnp.float32)))
