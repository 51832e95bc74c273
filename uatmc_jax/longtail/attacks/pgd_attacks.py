"""The evaluation attacks of METHODS.md B.5 built from the pieces in `linf`:
PGD-k on cross-entropy (random start) and CW∞ = PGD on the CW margin loss.

Both take `logits_fn(x) -> (B, C)` (pure; BatchNorm in inference mode is the
caller's job) and images (B, H, W, C) in [0, 1].
"""

from typing import Callable, Optional

import jax

from uatmc_jax.longtail.attacks import attack_losses
from uatmc_jax.longtail.attacks import linf

LogitsFn = Callable[[jax.Array], jax.Array]


def pgd_ce_attack(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, *,
                  epsilon: float, key: jax.Array, num_steps: int = 20,
                  step_size: Optional[float] = None,
                  random_start: bool = True) -> jax.Array:
  """PGD-k on cross-entropy (Madry et al.); PGD-20 with step 2/255 at ε = 8/255 by
  default (step ε/4 when `step_size` is None)."""
  step_size = epsilon / 4. if step_size is None else step_size
  return linf.pgd_attack(
      lambda z: attack_losses.cross_entropy_loss(logits_fn(z), labels), x,
      epsilon=epsilon, step_size=step_size, num_steps=num_steps, key=key,
      random_start=random_start)


def cw_attack(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, *,
              epsilon: float, key: jax.Array, num_steps: int = 30,
              step_size: Optional[float] = None,
              random_start: bool = True) -> jax.Array:
  """CW∞: PGD maximising the margin max_{j≠y} z_j − z_y (Carlini & Wagner's loss),
  30 steps, step ε/4 (2/255 at ε = 8/255) by default, random start."""
  step_size = epsilon / 4. if step_size is None else step_size
  return linf.pgd_attack(
      lambda z: attack_losses.cw_margin_loss(logits_fn(z), labels), x,
      epsilon=epsilon, step_size=step_size, num_steps=num_steps, key=key,
      random_start=random_start)
