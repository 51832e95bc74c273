"""How strong is UAT-MC's inner maximisation, with and without alignment (METHODS.md A.6-A.7).

A.7's defence trains on BPR(x̂ + δ) with δ from one normalised ascent step of
J = L_adv + λ_align · mean_i cos(g_i^v, g_i^t) at δ = 0; the paper's argument is that
the alignment term makes this inner maximisation stronger, so robust training sees a
worse case. This module measures that claim directly, on the same batches, keys and
budgets for both variants:

* ``one_step``: the defence's own perturbation (``defences.uat_mc.uat_mc_perturbation``),
  with the configured λ_align ("align") and with λ_align = 0 ("no_align");
* ``pgd<k>``: a k-step inner maximisation of the same objective J (each step at the
  current iterate: the cosine reward is re-evaluated at δ_j), per item row an L2-normalised
  step of size ``step_scale`` · ε_i^m / k, projected onto the defence's budget set
  {||δ_i^m||₂ ≤ ε_i^m, |δ_i^m| ≤ ε_i^m elementwise} (ε_i^m = ε·||x̂_i^m||; the one-step
  perturbation lies on that ball's surface), only the rows the defence perturbs.

Per batch it reports the clean BPR, the adversarial BPR of every variant (the increase
is the difference), the mean over perturbed rows (with a non-zero vector) of the cosine between the modalities'
perturbations (mean over modality pairs), the same cosine of the clean gradients, and
the per-modality cosine between the aligned and the unaligned perturbation. Everything
is one jitted function of stacked batches (``jax.lax.map`` over the leading axis).
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys.defences import batch_slots as bs
from uatmc_jax.recsys.defences import uat_mc

Features = Mapping[str, jax.Array]
VARIANTS = ("align", "no_align")


def ascent_direction(loss_of_delta, delta: Features, rows: jax.Array,
                     align_weight: float) -> dict[str, jax.Array]:
  """∇_δ J at δ, J = L(δ) + λ_align · mean_{rows} cos(∇_{δ^v} L, ∇_{δ^t} L) (A.6/A.7).

  ``rows``: float (S,) weights of the rows the cosine averages over. λ_align = 0: ∇L.
  """
  if not align_weight:
    return jax.grad(loss_of_delta)(dict(delta))

  def objective(d):
    value, grads = jax.value_and_grad(loss_of_delta)(d)
    modalities = tuple(grads)
    return value + align_weight * uat_mc.mean_pairwise_cosine(
        [grads[m] for m in modalities], rows)

  return jax.grad(objective)(dict(delta))


def project_budget(delta: Features, budget: Features) -> dict[str, jax.Array]:
  """Per row onto {||δ_i||₂ ≤ ε_i} ∩ {|δ_i| ≤ ε_i elementwise}.

  The L2 ball lies inside the L∞ box of the same radius, so the clip is a no-op kept to
  state the defence's set exactly (``uat_mc_perturbation`` clips the same way)."""
  out = {}
  for m, d in delta.items():
    b = budget[m]
    norm = bs.row_norm(d)
    scale = jnp.where(norm > b, b / jnp.maximum(norm, 1e-30), 1.0)
    out[m] = jnp.clip(d * scale, -b, b)
  return out


def pgd_perturbation(loss_of_delta, projected: Features, rows: jax.Array, *,
                     epsilon: float, align_weight: float, steps: int,
                     step_scale: float) -> dict[str, jax.Array]:
  """k-step inner maximisation of J in the defence's budget set (module docstring).

  Args:
    loss_of_delta: δ {m: (S, p_m)} -> scalar adversarial BPR of the batch.
    projected: clean projected features of the slots (budgets ε_i^m = ε·||x̂_i^m||).
    rows: float (S,) 1 on the rows to perturb (and to average the cosine over).
    steps, step_scale: k and the step size step_scale · ε_i^m / k.
  """
  mask = rows[:, None]
  budget = {m: epsilon * bs.row_norm(x) for m, x in projected.items()}

  def body(_, delta):
    direction = ascent_direction(loss_of_delta, delta, rows, align_weight)
    moved = {m: delta[m] + (step_scale / steps) * budget[m] *
             bs.safe_row_normalize(direction[m]) * mask for m in delta}
    return project_budget(moved, budget)

  delta0 = {m: jnp.zeros_like(x) for m, x in projected.items()}
  return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, body, delta0))


def _nonzero(rows: jax.Array, *vectors: Features) -> jax.Array:
  """``rows`` restricted to the rows where every given vector is non-zero in every modality
  (a row whose gradient cancels, e.g. an item that is a user's positive and negative, has
  no direction and would enter a cosine as 0)."""
  for v in vectors:
    for x in v.values():
      rows = rows * jnp.any(x != 0, axis=-1).astype(rows.dtype)
  return rows


def _pair_cosine(a: Features, rows: jax.Array) -> jax.Array:
  """Mean over the rows with a non-zero vector of the mean pairwise modality cosine."""
  modalities = tuple(a)
  return uat_mc.mean_pairwise_cosine([a[m] for m in modalities], _nonzero(rows, a))


def _agreement(a: Features, b: Features, rows: jax.Array) -> jax.Array:
  """Mean over modalities and rows (both non-zero) of cos(a_i^m, b_i^m)."""
  rows = _nonzero(rows, a, b)
  per = [jnp.sum(jnp.sum(bs.safe_row_normalize(a[m]) * bs.safe_row_normalize(b[m]), -1)
                 * rows) / jnp.maximum(jnp.sum(rows), 1.0) for m in a]
  return sum(per) / len(per)


def inner_max_batch(model, features: Features, batch: Mapping[str, jax.Array], *,
                    epsilon: float, align_weight: float, pgd_steps: Sequence[int] = (5, 10),
                    step_scale: float = 2.5,
                    graph_items: str = "with_gradient") -> dict[str, jax.Array]:
  """The inner-maximisation measures of one trainer batch (scalars; module docstring).

  Returns keys ``clean``; ``adv/<method>/<variant>`` and ``delta_cos/<method>/<variant>``
  for method in (one_step, pgd<k>...) and variant in VARIANTS; ``grad_cos`` (clean
  gradients); ``agreement/<method>`` (cos of the aligned and unaligned δ per modality).
  """
  uat_mc.check_alignment_space(model, align_weight)
  slots = bs.slots_for(model, batch)
  projected = jax.lax.stop_gradient(model.project(bs.slot_features(model, features, slots)))
  given = bs.perturbed_rows(model, slots, graph_items)

  def adv_loss(perturbed):
    return bs.slot_bpr(*bs.slot_vectors(model, perturbed, slots), slots)

  def loss_of_delta(delta):  # δ acts on the perturbed rows only
    m = rows[:, None]
    return adv_loss({k: projected[k] + delta[k] * m for k in projected})

  zeros = {m: jnp.zeros_like(x) for m, x in projected.items()}
  clean_grad = jax.grad(lambda d: adv_loss({k: projected[k] + d[k] for k in projected}))(zeros)
  rows = (bs.rows_with_gradient(clean_grad) if given is None else given).astype(jnp.float32)
  clean = adv_loss(projected)
  out = {"clean": clean, "grad_cos": _pair_cosine(clean_grad, rows)}
  deltas = {}
  for variant, lam in (("align", align_weight), ("no_align", 0.0)):
    deltas[("one_step", variant)] = uat_mc.uat_mc_perturbation(
        adv_loss, projected, given, epsilon=epsilon, align_weight=lam)
    for k in pgd_steps:
      deltas[(f"pgd{k}", variant)] = pgd_perturbation(
          loss_of_delta, projected, rows, epsilon=epsilon, align_weight=lam, steps=k,
          step_scale=step_scale)
  for (method, variant), delta in deltas.items():
    out[f"adv/{method}/{variant}"] = adv_loss({m: projected[m] + delta[m] for m in projected})
    out[f"delta_cos/{method}/{variant}"] = _pair_cosine(delta, rows)
  for method in ["one_step"] + [f"pgd{k}" for k in pgd_steps]:
    out[f"agreement/{method}"] = _agreement(deltas[(method, "align")],
                                            deltas[(method, "no_align")], rows)
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "epsilon", "align_weight",
                                             "pgd_steps", "step_scale", "graph_items"))
def _inner_max_batches(graphdef, state, features, batches, *, epsilon, align_weight,
                       pgd_steps, step_scale, graph_items):
  model = nnx.merge(graphdef, state)
  return jax.lax.map(
      lambda batch: inner_max_batch(model, features, batch, epsilon=epsilon,
                                    align_weight=align_weight, pgd_steps=pgd_steps,
                                    step_scale=step_scale, graph_items=graph_items),
      batches)


def inner_max_over_batches(model, features: Features, batches: Mapping[str, jax.Array], *,
                           epsilon: float, align_weight: float,
                           pgd_steps: Sequence[int] = (5, 10), step_scale: float = 2.5,
                           graph_items: str = "with_gradient") -> dict[str, jax.Array]:
  """``inner_max_batch`` on every batch (leading axis of ``batches``), one jitted call.

  Returns the same keys with (n_batches,) values.
  """
  if not epsilon > 0:
    raise ConfigError(f"inner-max epsilon must be > 0, got {epsilon}")
  if any(int(k) < 1 for k in pgd_steps) or not step_scale > 0:
    raise ConfigError(f"pgd_steps must be >= 1 and step_scale > 0, got {pgd_steps}, "
                      f"{step_scale}")
  graphdef, state = nnx.split(model)
  return _inner_max_batches(graphdef, state, dict(features), dict(batches),
                            epsilon=float(epsilon), align_weight=float(align_weight),
                            pgd_steps=tuple(int(k) for k in pgd_steps),
                            step_scale=float(step_scale), graph_items=graph_items)


def paired_interval(diff: np.ndarray, z: float = 1.96) -> dict[str, float]:
  """Mean and normal-approximation 95% interval of a per-batch paired difference."""
  diff = np.asarray(diff, np.float64)
  n = diff.size
  mean = float(diff.mean())
  half = float(z * diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
  return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(n)}


def summarize(per_batch: Mapping[str, np.ndarray]) -> dict:
  """Table rows per method: increase over clean per variant, the paired align − no_align
  difference of the increase (mean and 95% interval over batches), δ cosines."""
  per_batch = {k: np.asarray(v, np.float64) for k, v in per_batch.items()}
  clean = per_batch["clean"]
  methods = sorted({k.split("/")[1] for k in per_batch if k.startswith("adv/")},
                   key=lambda m: (m != "one_step", len(m), m))
  table = {"n_batches": int(clean.size), "clean_bpr": float(clean.mean()),
           "grad_cos": float(per_batch["grad_cos"].mean()), "methods": {}}
  for method in methods:
    row = {}
    for variant in VARIANTS:
      inc = per_batch[f"adv/{method}/{variant}"] - clean
      row[f"increase_{variant}"] = paired_interval(inc)
      row[f"delta_cos_{variant}"] = float(per_batch[f"delta_cos/{method}/{variant}"].mean())
    diff = per_batch[f"adv/{method}/align"] - per_batch[f"adv/{method}/no_align"]
    row["align_minus_no_align"] = paired_interval(diff)
    row["agreement"] = float(per_batch[f"agreement/{method}"].mean())
    table["methods"][method] = row
  return table


def markdown_table(table: Mapping) -> str:
  """The summary as a Markdown table (increase = adversarial BPR − clean BPR)."""
  lines = [f"clean BPR {table['clean_bpr']:.5f} over {table['n_batches']} batches; "
           f"clean cos(g^a, g^b) {table['grad_cos']:.4f}", "",
           "| inner max | increase, align | increase, no align | align − no align "
           "[95% CI] | cos(δ) align | cos(δ) no align | cos(δ_align, δ_no_align) |",
           "|---|---|---|---|---|---|---|"]
  for method, row in table["methods"].items():
    d = row["align_minus_no_align"]
    lines.append(
        f"| {method} | {row['increase_align']['mean']:.6f} | "
        f"{row['increase_no_align']['mean']:.6f} | {d['mean']:+.2e} "
        f"[{d['lo']:+.2e}, {d['hi']:+.2e}] | {row['delta_cos_align']:.4f} | "
        f"{row['delta_cos_no_align']:.4f} | {row['agreement']:.4f} |")
  return "\n".join(lines)
