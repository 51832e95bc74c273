"""Per-epoch diagnostics of what MCAT's two terms do in training (METHODS.md B.4, B.5).

MCAT adds two terms to adversarial training: λ_man·d_My inside the attack (MS-PGD) and
λ_geom·L_ETF in the outer loss. When MCAT lands within a seed's spread of PGD-AT, the
numbers below say whether each term acted at all. ``LongTailTrainer.fit`` writes them
for every run (``info["diagnostics"]``, ``<workdir>/diagnostics.json`` and the
TensorBoard tags ``diag/<group>/<name>``), one entry per epoch:

``inner`` (the training attack's numbers: by default on the monitor batch below, once per
epoch; with ``diagnostics_in_step`` from every training step, averaged over the epoch's
steps, computed inside the jitted step with no extra host sync):
  * ``ce`` (``kl`` for TRADES / RoBal): the mean attack head loss at the final x'
    (BatchNorm in inference mode, as in the attack);
  * MS-PGD epochs only (``attack == "ms_pgd"``): ``manifold_term`` = mean λ_man·d_My at
    the final x'; ``grad_norm_ce`` / ``grad_norm_manifold``: mean per-example L2 norms
    of ∇_δ CE and ∇_δ λ_man·d_My over the PGD steps; ``grad_ratio_mean`` /
    ``grad_ratio_median``: mean / median over steps and examples of the per-example
    ratio ‖∇_δ λ_man·d_My‖₂ / ‖∇_δ CE‖₂ (the median reported beside the mean because
    an example whose CE is saturated has a tiny denominator); ``sign_flip_share``: the
    share of pixel coordinates where the manifold term flips the sign of the CE
    gradient, i.e. where the sign step of MS-PGD differs from the step plain PGD would
    take at the same point (the quantity that decides whether x' moves differently).
  Keys for the manifold term are absent (not zero) in plain-PGD epochs: the method
  has no manifold term, or MCAT is still in its manifold warm-up.

On a fixed monitor batch (``monitor_batch``: ``diagnostics_batch_size`` training images,
the same ones every epoch, seeded by the run's seed), once per epoch on the current
model:
  * ``ms_pgd_vs_pgd`` (methods with a manifold term only; also during the warm-up,
    where it says what MS-PGD would change): MS-PGD and plain PGD run from the same
    random start; ``linf`` / ``l2``: mean ‖x'_MS − x'_PGD‖∞ / ‖·‖₂ per example;
    ``pred_differs``: share of points whose predicted label differs between the two
    x'; ``adv_acc_ms_pgd`` / ``adv_acc_pgd``: accuracy at each x';
  * ``outer`` (at the method's training x' on the monitor batch, BatchNorm in training
    mode as in the step, updated statistics discarded): ``base_loss`` (CE for MCAT and
    PGD-AT) and ``grad_norm_w_base`` = ‖∇_W base_loss‖_F; methods with an ETF term
    also ``etf_term`` = λ_geom·L_ETF(W), ``grad_norm_w_etf`` = ‖∇_W λ_geom·L_ETF‖_F and
    ``grad_ratio_w`` = their ratio (etf / base);
  * ``geometry`` (every method; ``evaluation.geometry``, B.5): ``etf_distance`` of W,
    ``nc1`` and ``equiangularity`` of the clean monitor features, and Theorem 1's
    margin bound at plain PGD's x' (``theta_min``, ``margin_bound``,
    ``lipschitz_estimate``, ``adv_margin_mean``, ``share_above_bound``). NC1 from a
    64-image batch is a small-sample estimate: compare it across epochs and methods of
    the same monitor size, not with full-test-set values.

Cost: the monitor adds two attacks and one outer gradient on ``diagnostics_batch_size``
images per epoch (about 1 s per ``preset=cpu_small`` epoch on a 2-core CPU, 1–2 % of it);
the training step is the plain one. With ``diagnostics_in_step`` an MS-PGD step does one
more backward pass per PGD step (the manifold term's gradient, through the same forward)
and one forward at the final x' (+34 % per MS-PGD step, +19 % per plain-PGD step at
cpu_small shapes, loaded 2-core CPU). ``diagnostics=False`` turns all of it off.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.core.parallel import multihost
from uatmc_jax.core.parallel import precision
from uatmc_jax.longtail import etf
from uatmc_jax.longtail import manifold as manifold_lib
from uatmc_jax.longtail.attacks import linf
from uatmc_jax.longtail.data.image_pipeline import to_float
from uatmc_jax.longtail.evaluation import geometry
from uatmc_jax.longtail.models import image_classifiers as ic

_TINY = 1e-12


def _per_example_norm(g: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=-1))


def _start(x, key, *, epsilon, random_start):
  """The start of ``linf.pgd_attack`` (same draws for the same key)."""
  if not isinstance(random_start, str):
    random_start = "uniform" if random_start else None
  if random_start is None:
    return x
  return linf.RANDOM_STARTS[random_start](key, x, epsilon, 0., 1.)


def ms_pgd_with_diagnostics(*, features_fn: Callable, head_loss_fn: Callable,
                            labels: jax.Array, manifold_params: manifold_lib.ManifoldParams,
                            manifold_weight, latent_steps: int, latent_step_size: float,
                            x: jax.Array, epsilon, step_size, num_steps: int,
                            key: jax.Array | None, random_start) -> tuple[jax.Array, dict]:
  """MS-PGD (``attacks.manifold_pgd``) that also measures its two terms (B.4).

  The step direction is sign(∇_δ [CE − λ_man·d_My]) as in ``linf.pgd_attack`` on
  ``manifold_pgd.manifold_constrained_loss``: one forward through φ, the head-level
  gradient c = ∂(CE − λ·d)/∂φ, one backward of c through φ (the step) and one more of
  ∂(λ·d)/∂φ (the manifold term's input gradient); ∇_δ CE is their sum.

  Returns:
    x_adv (B, ...) (stop-gradient) and scalars: ``ce``, ``manifold_term``,
    ``grad_norm_ce``, ``grad_norm_manifold``, ``grad_ratio_mean``,
    ``grad_ratio_median``, ``sign_flip_share`` (see the module docstring).
  """
  weight = jnp.asarray(manifold_weight, jnp.float32)

  def terms(phi):
    distance = manifold_lib.manifold_distance_from_features(
        manifold_params, phi, labels, num_steps=latent_steps, step_size=latent_step_size)
    return head_loss_fn(phi), weight * distance

  def head_cotangents(phi):
    (head, man), pullback = jax.vjp(terms, phi)
    ones = jnp.ones_like(head)
    # As autodiff of Σ(head − man) forms it: the two cotangents summed at φ.
    c_total = pullback((ones, -ones))[0]
    c_man = pullback((jnp.zeros_like(head), ones))[0]
    return c_total, c_man

  batch = x.shape[0]
  steps = max(num_steps, 1)

  def body(t, carry):
    x_cur, ratios, norms, flips = carry
    phi, pullback = jax.vjp(features_fn, x_cur)
    c_total, c_man = head_cotangents(phi)
    g_total = pullback(c_total)[0]
    g_man = pullback(c_man)[0]
    g_ce = g_total + g_man
    n_ce, n_man = _per_example_norm(g_ce), _per_example_norm(g_man)
    ratios = ratios.at[t].set(n_man / jnp.maximum(n_ce, _TINY))
    norms = norms + jnp.stack([jnp.mean(n_ce), jnp.mean(n_man)])
    flips = flips + jnp.mean((jnp.sign(g_total) != jnp.sign(g_ce)).astype(jnp.float32))
    x_next = linf.linf_project(linf.sign_gradient_step(x_cur, g_total, step_size), x,
                               epsilon)
    return x_next, ratios, norms, flips

  init = (_start(x, key, epsilon=epsilon, random_start=random_start),
          jnp.zeros((steps, batch), jnp.float32), jnp.zeros((2,), jnp.float32),
          jnp.zeros((), jnp.float32))
  x_adv, ratios, norms, flips = jax.lax.fori_loop(0, num_steps, body, init)
  x_adv = jax.lax.stop_gradient(x_adv)
  head, man = terms(features_fn(x_adv))
  aux = {"ce": jnp.mean(head), "manifold_term": jnp.mean(man)}
  if num_steps:  # no PGD step, no step gradients to report
    n = jnp.float32(num_steps)
    aux.update(grad_norm_ce=norms[0] / n, grad_norm_manifold=norms[1] / n,
               grad_ratio_mean=jnp.mean(ratios), grad_ratio_median=jnp.median(ratios),
               sign_flip_share=flips / n)
  return x_adv, jax.lax.stop_gradient(aux)


def inner_attack(trainer, state: dict, x, y, key, *,
                 attack_with_manifold: bool) -> tuple[jax.Array, dict]:
  """``trainer.adversarial_examples`` plus the "inner" scalars of the module docstring:
  the head loss at x' under its ``inner_loss`` name (``ce`` / ``kl``) and, with MS-PGD,
  ``ms_pgd_with_diagnostics``'s terms. Pure (runs inside the jitted step)."""
  cfg, method = trainer.config, trainer.method
  feats, head_loss = trainer.attack_objective(state, x, y)
  if not attack_with_manifold:
    x_adv = trainer.adversarial_examples(state, x, y, key, attack_with_manifold=False)
    return x_adv, {method.inner_loss: jnp.mean(head_loss(feats(x_adv)))}
  x_adv, aux = ms_pgd_with_diagnostics(
      features_fn=feats, head_loss_fn=head_loss, labels=y,
      manifold_params=manifold_lib.ManifoldParams(*state["manifold"]["params"]),
      manifold_weight=method.manifold_weight, latent_steps=cfg.latent_steps,
      latent_step_size=cfg.latent_step_size, x=x, epsilon=cfg.epsilon,
      step_size=cfg.attack_step_size, num_steps=cfg.attack_steps, key=key,
      random_start=method.attack_start)
  aux[method.inner_loss] = aux.pop("ce")
  return x_adv, aux


def monitor_batch(images: np.ndarray, labels: np.ndarray, *, size: int, num_classes: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A fixed, class-spread subset of the training set: ``size`` indices drawn
  round-robin over the classes (each class's images in a seeded order), so tail
  classes are represented as far as they have images. Returns (images, labels)."""
  labels = np.asarray(labels)
  rng = np.random.default_rng([seed, 1729])
  per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  order = []
  depth = 0
  while len(order) < min(size, len(labels)):
    row = [p[depth] for p in per_class if depth < len(p)]
    order.extend(row[:size - len(order)])
    depth += 1
  idx = np.sort(np.asarray(order, np.int64))
  return images[idx], labels[idx]


def ms_pgd_vs_pgd(*, x, y, x_ms, x_pgd, pred_ms, pred_pgd) -> dict:
  """(b): mean L∞ / L2 distance between the two x', share of differing predictions,
  accuracy at each. All (B, ...) device arrays; returns scalars."""
  diff = jnp.reshape(x_ms - x_pgd, (x.shape[0], -1))
  return {"linf": jnp.mean(jnp.max(jnp.abs(diff), -1)),
          "l2": jnp.mean(jnp.sqrt(jnp.sum(diff ** 2, -1))),
          "pred_differs": jnp.mean((pred_ms != pred_pgd).astype(jnp.float32)),
          "adv_acc_ms_pgd": jnp.mean((pred_ms == y).astype(jnp.float32)),
          "adv_acc_pgd": jnp.mean((pred_pgd == y).astype(jnp.float32))}


def geometry_numbers(*, weight, labels, clean_features, adv_features, clean_inputs,
                     adv_inputs, epsilon: float, num_classes: int) -> dict:
  """(c) geometry block from host arrays, with ``evaluation.geometry`` (B.5)."""
  labels = np.asarray(labels)
  bound = geometry.margin_bound(weight, labels, clean_features, adv_features,
                                clean_inputs, adv_inputs, epsilon)
  present = np.unique(labels).size
  return {"etf_distance": geometry.etf_distance(weight),
          "nc1": geometry.nc1(clean_features, labels, num_classes) if present > 1 else None,
          "equiangularity": (geometry.equiangularity(clean_features, labels, num_classes)
                             if present > 2 else None),
          "theta_min": bound["theta_min"], "margin_bound": bound["bound"],
          "lipschitz_estimate": bound["lipschitz_estimate"],
          "adv_margin_mean": bound["adversarial_margin"]["mean"],
          "share_above_bound": bound["share_adversarial_margin_above_bound"]}


def flatten(entry: dict) -> dict[str, float]:
  """``{"inner": {"ce": v}, ...}`` -> ``{"diag/inner/ce": v, ...}`` (TensorBoard tags;
  None values dropped)."""
  out = {}
  for group, values in entry.items():
    if isinstance(values, dict):
      out.update({f"diag/{group}/{k}": v for k, v in values.items() if v is not None})
  return out


def monitor_outputs(trainer, state: dict, x: jax.Array, y: jax.Array, key: jax.Array, *,
                    attack_with_manifold: bool) -> tuple[dict, dict]:
  """(b) and (c) on the monitor batch for ``trainer`` (a ``LongTailTrainer``); pure,
  jitted by the trainer once per ``attack_with_manifold``.

  Returns ``(groups, geometry_inputs)``: ``groups`` maps ``inner`` (the training
  attack's numbers on this batch), ``ms_pgd_vs_pgd`` (manifold methods only) and
  ``outer`` to scalars; ``geometry_inputs`` holds W, the clean and
  plain-PGD features and x' for ``geometry_numbers`` on the host.
  """
  method = trainer.method
  params, stats = state["params"], state["batch_stats"]

  def predict(xa):
    return jnp.argmax(trainer.inference_logits(params, stats, xa), -1)

  # the training attack with its "inner" numbers (x' is the attack's own, bitwise)
  x_train, inner = inner_attack(trainer, state, x, y, key,
                                attack_with_manifold=attack_with_manifold)
  groups = {"inner": inner}
  x_pgd = x_train if not attack_with_manifold else trainer.adversarial_examples(
      state, x, y, key, attack_with_manifold=False)
  if method.uses_manifold:
    x_ms = x_train if attack_with_manifold else trainer.adversarial_examples(
        state, x, y, key, attack_with_manifold=True)
    groups["ms_pgd_vs_pgd"] = ms_pgd_vs_pgd(x=x, y=y, x_ms=x_ms, x_pgd=x_pgd,
                                            pred_ms=predict(x_ms), pred_pgd=predict(x_pgd))

  def base_loss(p):
    _, (_, parts, _) = trainer.outer_objective(p, stats, x, x_train, y)
    return parts["base_loss"]

  base, grads = jax.value_and_grad(base_loss)(params)
  weight = ic.classifier_weight_of(trainer.graphdef, params, stats)
  grad_w = ic.classifier_weight_of(trainer.graphdef, grads, stats)
  outer = {"base_loss": base, "grad_norm_w_base": jnp.linalg.norm(grad_w)}
  if method.etf_weight:
    term, grad_etf = jax.value_and_grad(
        lambda w: method.etf_weight * etf.etf_gram_penalty(w))(weight)
    outer.update(etf_term=term, grad_norm_w_etf=jnp.linalg.norm(grad_etf))
    outer["grad_ratio_w"] = outer["grad_norm_w_etf"] / jnp.maximum(
        outer["grad_norm_w_base"], _TINY)
  groups["outer"] = outer
  geometry_inputs = {"weight": weight, "adv_inputs": x_pgd,
                     "clean_features": trainer.features_eval(params, stats, x),
                     "adv_features": trainer.features_eval(params, stats, x_pgd)}
  return jax.lax.stop_gradient(groups), jax.lax.stop_gradient(geometry_inputs)


class Monitor(NamedTuple):
  """The fixed diagnostics batch: host ``images`` (float, [0, 1]) and ``labels``, and
  ``device``, this process's slice of ``{"image", "label"}`` on the mesh."""
  images: np.ndarray
  labels: np.ndarray
  device: dict


def make_monitor(trainer, images: np.ndarray, labels: np.ndarray) -> Monitor:
  """``monitor_batch`` of the training set for ``trainer``: ``diagnostics_batch_size``
  images (rounded down to a multiple of the data-axis size), seeded by the run's seed.

  Raises:
    ConfigError: fewer training images than data-axis devices.
  """
  devices = mesh_lib.data_axis_size(trainer.mesh)
  size = min(trainer.config.diagnostics_batch_size, len(labels)) // devices * devices
  if size < 1:
    raise ConfigError(f"diagnostics_batch_size: the monitor batch needs at least one "
                      f"image per data-axis device ({devices}); the training set has "
                      f"{len(labels)} images")
  images, labels = monitor_batch(images, labels, size=size,
                                 num_classes=trainer.num_classes, seed=trainer.config.seed)
  images, labels = to_float(images), labels.astype(np.int32)
  local = size // jax.process_count()
  lo = jax.process_index() * local
  device = mesh_lib.shard_batch({"image": images[lo:lo + local],
                                 "label": labels[lo:lo + local]}, trainer.mesh)
  return Monitor(images, labels, device)


def monitor_key(seed: int) -> jax.Array:
  """The per-run key of the monitor attacks' common random start (same every epoch)."""
  return jax.random.fold_in(jax.random.key(seed), 0x6d6f6e)


def epoch_diagnostics(trainer, state: dict, monitor: Monitor, *, attack_with_manifold: bool,
                      inner: dict | None = None) -> dict:
  """One epoch's entry: ``attack`` ("ms_pgd" | "pgd"), ``inner`` (``inner`` when given:
  the epoch means of the training steps' scalars; else the monitor batch's),
  ``inner_source`` ("training steps" | "monitor batch"), and from the monitor batch
  ``ms_pgd_vs_pgd`` (manifold methods), ``outer`` and ``geometry`` (module docstring).
  One host transfer."""
  with precision.evaluation_precision():
    groups, geo = multihost.to_host(trainer.monitor_fn(attack_with_manifold)(
        state, monitor.device["image"], monitor.device["label"],
        monitor_key(trainer.config.seed)))
  entry = {"attack": "ms_pgd" if attack_with_manifold else "pgd"}
  entry.update({name: {k: float(v) for k, v in values.items()}
                for name, values in groups.items()})
  if inner is not None:
    entry["inner"] = dict(inner)
  entry["inner_source"] = "training steps" if inner is not None else "monitor batch"
  entry["geometry"] = geometry_numbers(
      weight=geo["weight"], labels=monitor.labels, clean_features=geo["clean_features"],
      adv_features=geo["adv_features"], clean_inputs=monitor.images,
      adv_inputs=geo["adv_inputs"], epsilon=trainer.config.epsilon,
      num_classes=trainer.num_classes)
  return entry
