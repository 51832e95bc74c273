"""Per-class accuracy under clean / PGD-20 / CW∞ / AutoAttack (METHODS.md B.5).

`RobustEvaluator` builds, once per `logits_fn`, jitted fixed-size batch functions for
each attack and returns per-example correctness; `evaluate_robustness` turns it into
the long-tail blocks `{"per_class", "overall", "balanced", "many", "medium", "few",
"tail", "seconds"}` (groups from the *training* counts via
`evaluation.class_accuracy.accuracy_block`: Many > 100, Medium 20–100, Few < 20,
Tail = rarest 30% of classes; an empty group is None).

Attack names: "clean", "pgd20" (CE, step 2/255, random start), "cw" (CW margin loss,
30 steps, step 2/255, random start), "autoattack" (standard: APGD-CE, APGD-T, FAB-T,
Square), "autoattack_apgd" (the cheaper APGD-CE + APGD-T subset).

Every attack runs only on the clean-correct points (a point misclassified at x counts
as broken, as in AutoAttack; for PGD-20 / CW this differs from "accuracy at x_adv"
only where the attack would turn a wrong prediction right), packed into full
fixed-size batches (`batching.run_until_fooled`), one trace per attack
(`trace_counts`). With a `log`, each attack prints a progress line per batch (points
done / total, robust so far, seconds, ETA) and a summary line.
"""

import dataclasses
import time
from typing import Callable, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.core.parallel import precision
from uatmc_jax.longtail.attacks import autoattack
from uatmc_jax.longtail.attacks import batching
from uatmc_jax.longtail.attacks import pgd_attacks
from uatmc_jax.longtail.evaluation import class_accuracy

LogitsFn = Callable[[jax.Array], jax.Array]

ATTACK_NAMES = ("clean", "pgd20", "cw", "autoattack", "autoattack_apgd")


@dataclasses.dataclass(frozen=True)
class RobustEvalConfig:
  """Budgets of B.5 (ε = 8/255, step 2/255, PGD-20, CW-30, AutoAttack standard)."""
  epsilon: float = 8. / 255.
  step_size: float = 2. / 255.
  pgd_steps: int = 20
  cw_steps: int = 30
  batch_size: int = 128
  seed: int = 0
  n_target_classes: int = 9
  apgd_iterations: int = 100
  fab_iterations: int = 100
  square_queries: int = 5000


class AttackOutcome(NamedTuple):
  """correct: (N,) bool, prediction = label at x_adv; x_adv: (N, ...); seconds."""
  correct: np.ndarray
  x_adv: np.ndarray
  seconds: float


class RobustEvaluator:
  """Per-example correctness of a classifier under each attack of B.5."""

  def __init__(self, logits_fn: LogitsFn, config: RobustEvalConfig = RobustEvalConfig(),
               mesh=None):
    """``mesh``: split every batch over its devices (on one host or many; see
    ``batching.OnMesh``): each process attacks only its rows, per-example results are
    gathered on every process, and the numbers do not depend on the mesh."""
    self.logits_fn = logits_fn
    self.config = config
    base_key = jax.random.PRNGKey(config.seed)

    def predict(x, y, batch_index):
      del batch_index
      return x, jnp.argmax(logits_fn(x), -1) == y

    # (x, y, run, batch_index): the work queue's signature (one run per point).
    def pgd(x, y, run, batch_index):
      del run
      xa = pgd_attacks.pgd_ce_attack(
          logits_fn, x, y, epsilon=config.epsilon, step_size=config.step_size,
          num_steps=config.pgd_steps, key=jax.random.fold_in(base_key, batch_index))
      return xa, jnp.argmax(logits_fn(xa), -1) == y

    def cw(x, y, run, batch_index):
      del run
      xa = pgd_attacks.cw_attack(
          logits_fn, x, y, epsilon=config.epsilon, step_size=config.step_size,
          num_steps=config.cw_steps,
          key=jax.random.fold_in(jax.random.fold_in(base_key, 1), batch_index))
      return xa, jnp.argmax(logits_fn(xa), -1) == y

    # The un-meshed batch programs, for ``lower`` (the same functions run wraps).
    self._programs = {"clean": (predict, 2), "pgd20": (pgd, 3), "cw": (cw, 3)}
    # One trace per attack whatever the number of batches (tests assert it).
    self.trace_counts: dict = {}
    self._batch_fns = {"clean": batching.on_mesh(
        batching.counted_jit(self.trace_counts, "clean", predict), mesh, 2)}
    for name, fn in (("pgd20", pgd), ("cw", cw)):
      self._batch_fns[name] = batching.on_mesh(
          batching.counted_jit(self.trace_counts, name, fn), mesh, 3)
    # One AutoAttack for both suites: the APGD stages are compiled once.
    self.autoattack = autoattack.AutoAttack(logits_fn, autoattack.AutoAttackConfig(
        epsilon=config.epsilon, version="standard",
        n_target_classes=config.n_target_classes, apgd_iterations=config.apgd_iterations,
        fab_iterations=config.fab_iterations, square_queries=config.square_queries,
        batch_size=config.batch_size, seed=config.seed), mesh=mesh)

  @property
  def local_rows(self) -> int:
    """Rows (examples, padding included) this process attacked or predicted on a mesh."""
    return self.autoattack.local_rows + sum(getattr(f, "local_rows", 0)
                                            for f in self._batch_fns.values())

  def lower(self, attack: str, images: np.ndarray, labels: np.ndarray):
    """The lowered (not compiled) batch program of ``clean`` / ``pgd20`` / ``cw`` on one
    batch, under the precision ``run`` uses (its text shows the matmul precision)."""
    fn, n_data = self._programs[attack]
    args = [jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)]
    args += [jnp.zeros(len(labels), jnp.int32)] * (n_data - 2) + [jnp.int32(0)]
    with precision.evaluation_precision():
      return jax.jit(fn).lower(*args)

  def run(self, attack: str, images: np.ndarray, labels: np.ndarray,
          log: Optional[Callable[[str], None]] = None) -> AttackOutcome:
    """Attacks (N, H, W, C) images in [0, 1]; returns per-example correctness.

    Every program runs with float32 matmuls / convolutions at full precision
    (``precision.evaluation_precision``: "highest"), whatever the training used."""
    if attack not in ATTACK_NAMES:
      raise ValueError(f"unknown attack {attack!r}; expected one of {ATTACK_NAMES}")
    with precision.evaluation_precision():
      return self._run(attack, images, labels, log)

  def _run(self, attack, images, labels, log) -> AttackOutcome:
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    start = time.time()
    if attack.startswith("autoattack"):
      version = "apgd" if attack == "autoattack_apgd" else "standard"
      res = self.autoattack.run(images, labels, log=log, version=version)
      correct, x_adv = res.robust, res.x_adv
    elif attack == "clean":
      x_adv, correct = batching.map_in_fixed_batches(
          self._batch_fns["clean"], [images, labels], self.config.batch_size)
    else:
      # Only the clean-correct points are attacked; the others stay at x, broken.
      _, correct = batching.map_in_fixed_batches(
          self._batch_fns["clean"], [images, labels], self.config.batch_size)
      correct = np.asarray(correct, bool)
      x_adv = images.copy()
      idx = np.flatnonzero(correct)
      if log is not None:
        log(f"{attack}: attacking the {idx.size}/{len(labels)} clean-correct points")
      if idx.size:
        progress = batching.StageProgress(attack, idx.size, len(labels), log,
                                          unit="points")
        still, adv = batching.run_until_fooled(
            self._batch_fns[attack], images, labels, idx, 1, self.config.batch_size,
            progress=progress)
        correct[idx] = still
        x_adv[idx] = adv
    return AttackOutcome(correct=np.asarray(correct, bool), x_adv=x_adv,
                         seconds=time.time() - start)


def accuracy_block_from_correct(correct: np.ndarray, labels: np.ndarray,
                                train_counts: np.ndarray) -> dict:
  """Per-example correctness (N,) -> the long-tail block (without "seconds")."""
  num_classes = len(train_counts)
  labels = np.asarray(labels)
  right = np.bincount(labels, weights=np.asarray(correct, np.float64),
                      minlength=num_classes)
  total = np.bincount(labels, minlength=num_classes)
  return class_accuracy.accuracy_block(right, total, np.asarray(train_counts))


def evaluate_robustness(logits_fn: LogitsFn, images: np.ndarray, labels: np.ndarray,
                        train_counts: np.ndarray, attacks: Iterable[str] = ("clean", "pgd20"),
                        config: RobustEvalConfig = RobustEvalConfig(),
                        evaluator: Optional[RobustEvaluator] = None,
                        log: Optional[Callable[[str], None]] = None, mesh=None):
  """Runs each attack and returns ({name: block with "seconds"}, {name: AttackOutcome}).

  ``mesh``: the batches are split over its devices (see ``RobustEvaluator``)."""
  evaluator = evaluator or RobustEvaluator(logits_fn, config, mesh=mesh)
  blocks, outcomes = {}, {}
  for name in attacks:
    outcome = evaluator.run(name, images, labels, log=log)
    block = accuracy_block_from_correct(outcome.correct, labels, train_counts)
    block["seconds"] = outcome.seconds
    blocks[name], outcomes[name] = block, outcome
    if log is not None:
      log(f"{name}: overall {block['overall']:.4f} balanced {block['balanced']:.4f} "
          f"({outcome.seconds:.1f}s)")
  return blocks, outcomes
