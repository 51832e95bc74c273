"""Auto-PGD (APGD) in the L∞ norm, with the original step-size schedule.

METHODS.md B.5; Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020, Algorithm 1.

The schedule follows the paper and the authors' code, not the 10-step shortcut of a
popular port:
  * N = 100 iterations, initial step η = 2ε (per example), momentum α = 0.75
    (α = 1, i.e. a plain projected sign step, on the first iteration):
      z = P(x_k + η·sign(∇f(x_k))),
      x_{k+1} = P(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1})).
  * Checkpoints w_j = ⌈p_j·N⌉ with p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)  (`apgd_checkpoints`).
  * At checkpoint w_j, for each example independently, the step is halved and the
    iterate restarts from the best point found so far (its gradient too) when
      (1) the loss rose in at most ρ = 75% of the steps since w_{j−1}, or
      (2) the step was not halved at w_{j−1} and the best loss did not improve
          since w_{j−1}.
    Condition (2) is off at the first checkpoint (as in the authors' code).
  * The random start is x + ε·t/||t||∞ with t uniform in [−1, 1]^d (the authors'
    choice: the farthest coordinate sits on the sphere), clipped to the box.

Deviation, stated: the authors' oscillation count at the first checkpoint compares
f(x^(1)) with an uninitialised buffer (0); here it compares with f(x^(0)) as the
paper's formula says.

Everything is per example and vectorised over the batch; the loop is `lax.while_loop`
(it stops early once every example is misclassified, which changes nothing in the
adversarial examples returned). Jit it by closing over `logits_fn`/`loss_fn`.
"""

import math
from typing import Callable, List, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.longtail.attacks import attack_losses
from uatmc_jax.longtail.attacks import linf

LogitsFn = Callable[[jax.Array], jax.Array]
# (logits (B, C), labels (B,)) -> per-example loss (B,) to maximise.
LogitsLossFn = Callable[[jax.Array, jax.Array], jax.Array]


def apgd_checkpoint_fractions(p1: float = 0.22, decrement: float = 0.03,
                              min_interval: float = 0.06) -> List[float]:
  """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), all ≤ 1."""
  fractions = [0.0, p1]
  while True:
    nxt = fractions[-1] + max(fractions[-1] - fractions[-2] - decrement, min_interval)
    if nxt > 1.0 + 1e-12:
      return fractions
    fractions.append(nxt)


def apgd_checkpoints(num_iterations: int = 100) -> List[int]:
  """Iteration counts w_j = ⌈p_j·N⌉ at which APGD checks its step size (w_0 = 0).

  For N = 100: [0, 22, 41, 57, 70, 80, 87, 93, 99]. A small tolerance removes the
  floating-point noise in p_j·N (0.22·100 = 22.000000000000004).
  """
  if num_iterations < 1:
    raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
  out = []
  for p in apgd_checkpoint_fractions():
    w = int(math.ceil(p * num_iterations - 1e-9))
    if w <= num_iterations and (not out or w > out[-1]):
      out.append(w)
  return out


class APGDResult(NamedTuple):
  """Outputs of one APGD run on a batch.

  x_adv: (B, ...) a misclassified point found for each example that was fooled at
    any iteration, else the start point (like the authors' `x_best_adv`).
  robust: (B,) bool, True where no iterate (nor the start) was misclassified.
  x_best: (B, ...) the iterate with the highest loss.
  loss_best: (B,) that loss.
  """
  x_adv: jax.Array
  robust: jax.Array
  x_best: jax.Array
  loss_best: jax.Array


class _State(NamedTuple):
  i: jax.Array
  x_cur: jax.Array
  x_prev: jax.Array
  grad: jax.Array
  loss_prev: jax.Array
  x_best: jax.Array
  grad_best: jax.Array
  loss_best: jax.Array
  x_adv: jax.Array
  robust: jax.Array
  step: jax.Array
  n_increases: jax.Array
  reduced_last: jax.Array
  loss_best_last_check: jax.Array


def _per_example(v, x):
  """Reshapes a (B,) vector to broadcast against x (B, ...)."""
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def is_key_batch(key) -> bool:
  """True when ``key`` holds one PRNG key per example: (B, 2) raw uint32 keys or a (B,)
  array of typed keys (a single key is (2,) or a scalar typed key)."""
  key = jnp.asarray(key) if not hasattr(key, "dtype") else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 1
  return key.ndim == 2


def flat_draw(draw, key, shape):
  """``draw(key, shape)`` computed as a 1-D draw reshaped to ``shape``.

  JAX's (partitionable) threefry numbers the draws of a shape in row-major order, so
  the values are bit-identical to ``draw(key, shape)``; the 1-D form compiles several
  times faster on XLA:CPU (a per-row (32, 32, 3) uniform: 1.2 s → 0.3 s of compile),
  which every AutoAttack program pays once per batch shape (docs/results/performance.md).
  """
  return draw(key, (int(np.prod(shape, dtype=np.int64)),)).reshape(shape)


def per_example_uniform(key, shape, dtype, minval, maxval):
  """Uniform draws of ``shape`` (B, ...): from one key, or row b from its own key b when
  ``key`` is a batch of keys (then a row's draw does not depend on the other rows)."""
  uniform = lambda k, s: jax.random.uniform(k, s, dtype, minval, maxval)
  if is_key_batch(key):
    return jax.vmap(lambda k: flat_draw(uniform, k, shape[1:]))(key)
  return flat_draw(uniform, key, shape)


def _apgd_random_start(key, x, epsilon, clip_min, clip_max):
  t = per_example_uniform(key, x.shape, x.dtype, -1., 1.)
  t_max = jnp.max(jnp.abs(t.reshape(t.shape[0], -1)), axis=1)
  x0 = x + epsilon * t / (_per_example(t_max, x) + 1e-12)
  return jnp.clip(x0, clip_min, clip_max)


def apgd_attack(logits_fn: LogitsFn,
                x: jax.Array,
                labels: jax.Array,
                *,
                epsilon: float,
                loss_fn: LogitsLossFn = attack_losses.cross_entropy_loss,
                key: Optional[jax.Array] = None,
                num_iterations: int = 100,
                rho: float = 0.75,
                momentum: float = 0.75,
                random_start: bool = True,
                early_stop: bool = True,
                clip_min: float = 0.,
                clip_max: float = 1.) -> APGDResult:
  """Runs APGD (Croce & Hein 2020) on a batch, maximising `loss_fn`.

  Args:
    logits_fn: x (B, ...) -> logits (B, C); pure, examples independent.
    x: clean inputs (B, H, W, C) in [clip_min, clip_max].
    labels: (B,) int true labels; success = argmax logits ≠ label.
    epsilon: L∞ radius.
    loss_fn: (logits, labels) -> (B,) loss to maximise (CE for APGD-CE; a
      `targeted_dlr_loss` partial for APGD-T, see `apgd_targeted_attack`).
    key: PRNG key of the random start (needed when random_start), or one key per
      example ((B, 2) raw keys): each start then depends on its own key only, not on
      the batch it runs in (AutoAttack keys rows by (point, target)).
    num_iterations: N (static); the checkpoints scale with it.
    rho: oscillation threshold of condition (1).
    momentum: α of the momentum step (the first step uses 1).
    random_start: start at a random point of the ball (the authors' default).
    early_stop: stop once no example of the batch is robust (adversarial examples
      and `robust` are unaffected; `x_best`/`loss_best` then stop improving).
    clip_min, clip_max: the image box.

  Returns:
    APGDResult.
  """
  batch = x.shape[0]
  chex.assert_shape(labels, (batch,))
  checkpoints = apgd_checkpoints(num_iterations)[1:]
  is_checkpoint = np.zeros(num_iterations + 1, dtype=bool)
  is_checkpoint[checkpoints] = True
  is_checkpoint = jnp.asarray(is_checkpoint)

  def loss_and_grad(z):
    def total(z):
      logits = logits_fn(z)
      per_example = loss_fn(logits, labels)
      return jnp.sum(per_example), (per_example, logits)
    (_, (per_example, logits)), g = jax.value_and_grad(total, has_aux=True)(z)
    return per_example, logits, g

  if random_start:
    if key is None:
      raise ValueError("apgd_attack: random_start=True needs a PRNG `key`.")
    x0 = _apgd_random_start(key, x, epsilon, clip_min, clip_max)
  else:
    x0 = x
  loss0, logits0, grad0 = loss_and_grad(x0)
  robust0 = jnp.argmax(logits0, axis=-1) == labels

  state = _State(
      i=jnp.asarray(0), x_cur=x0, x_prev=x0, grad=grad0, loss_prev=loss0,
      x_best=x0, grad_best=grad0, loss_best=loss0, x_adv=x0, robust=robust0,
      step=jnp.full((batch,), 2. * epsilon, x.dtype),
      n_increases=jnp.zeros((batch,), jnp.int32),
      reduced_last=jnp.ones((batch,), bool),
      loss_best_last_check=loss0)

  def cond(s):
    keep = s.i < num_iterations
    if early_stop:
      keep = keep & jnp.any(s.robust)
    return keep

  def body(s):
    a = jnp.where(s.i == 0, 1.0, momentum).astype(x.dtype)
    step = _per_example(s.step, x)
    z = linf.linf_project(linf.sign_gradient_step(s.x_cur, s.grad, step),
                          x, epsilon, clip_min, clip_max)
    x_new = linf.linf_project(s.x_cur + a * (z - s.x_cur) + (1 - a) * (s.x_cur - s.x_prev),
                              x, epsilon, clip_min, clip_max)
    loss, logits, grad = loss_and_grad(x_new)

    fooled = jnp.argmax(logits, axis=-1) != labels
    x_adv = jnp.where(_per_example(fooled & s.robust, x), x_new, s.x_adv)
    robust = s.robust & ~fooled

    improved = loss > s.loss_best
    x_best = jnp.where(_per_example(improved, x), x_new, s.x_best)
    grad_best = jnp.where(_per_example(improved, x), grad, s.grad_best)
    loss_best = jnp.where(improved, loss, s.loss_best)
    n_increases = s.n_increases + (loss > s.loss_prev).astype(jnp.int32)

    # Checkpoint logic (after i + 1 iterations), per example.
    at_checkpoint = is_checkpoint[s.i + 1]
    since = s.i + 1 - _previous_checkpoint(s.i + 1, checkpoints)
    oscillating = n_increases.astype(x.dtype) <= rho * since.astype(x.dtype)
    stalled = (~s.reduced_last) & (s.loss_best_last_check >= loss_best)
    reduce = at_checkpoint & (oscillating | stalled)
    restart = _per_example(reduce, x)
    new_state = _State(
        i=s.i + 1,
        x_cur=jnp.where(restart, x_best, x_new),
        x_prev=s.x_cur,
        grad=jnp.where(restart, grad_best, grad),
        loss_prev=loss,
        x_best=x_best, grad_best=grad_best, loss_best=loss_best,
        x_adv=x_adv, robust=robust,
        step=jnp.where(reduce, s.step / 2., s.step),
        n_increases=jnp.where(at_checkpoint, 0, n_increases),
        reduced_last=jnp.where(at_checkpoint, reduce, s.reduced_last),
        loss_best_last_check=jnp.where(at_checkpoint, loss_best,
                                       s.loss_best_last_check))
    return new_state

  final = jax.lax.while_loop(cond, body, state)
  return APGDResult(x_adv=jax.lax.stop_gradient(final.x_adv),
                    robust=final.robust,
                    x_best=jax.lax.stop_gradient(final.x_best),
                    loss_best=final.loss_best)


def _previous_checkpoint(t, checkpoints):
  """The largest checkpoint < t (0 if none), with t traced; checkpoints static."""
  cps = jnp.asarray([0] + list(checkpoints))
  return jnp.max(jnp.where(cps < t, cps, 0))


def target_class_by_rank(logits: jax.Array, rank) -> jax.Array:
  """The class with the `rank`-th largest logit (rank 1 = argmax), per example.

  AutoAttack's targets for APGD-T / FAB-T are ranks 2, ..., n_target_classes + 1 of
  the clean logits (for a correctly classified point rank 2 is the runner-up).
  `rank` may be traced, so one compiled function serves every target.
  """
  order = jnp.argsort(-logits, axis=-1)
  idx = jnp.broadcast_to(jnp.asarray(rank) - 1, (logits.shape[0],))
  return jnp.take_along_axis(order, idx[:, None], axis=-1)[:, 0]


def apgd_targeted_attack(logits_fn: LogitsFn,
                         x: jax.Array,
                         labels: jax.Array,
                         *,
                         epsilon: float,
                         target_rank,
                         key: Optional[jax.Array] = None,
                         **kwargs) -> APGDResult:
  """APGD-T: APGD on the targeted DLR loss towards the `target_rank`-th class.

  The target is taken from the logits at the clean x (as in AutoAttack); success is
  still any misclassification. kwargs go to `apgd_attack`.
  """
  targets = target_class_by_rank(logits_fn(x), target_rank)

  def loss_fn(logits, y):
    return attack_losses.targeted_dlr_loss(logits, y, targets)

  return apgd_attack(logits_fn, x, labels, epsilon=epsilon, loss_fn=loss_fn,
                     key=key, **kwargs)
