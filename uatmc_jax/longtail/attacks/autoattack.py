"""AutoAttack in JAX: the "standard" L∞ ensemble and a cheaper "apgd" subset.

METHODS.md B.5; Croce & Hein, ICML 2020.

Versions (`SUITES`):
  * "standard": APGD-CE → APGD-T (targeted DLR, 9 target classes) → FAB-T (9 target
    classes) → Square (5000 queries, p_init 0.8, p schedule on the raw iteration as
    the authors' AutoAttack builds it: resc_schedule=False). The reference protocol.
  * "apgd": APGD-CE → APGD-T only. Cheaper (no FAB-T / Square); on models without
    gradient masking it is usually within a few tenths of a point of "standard",
    but it is an upper bound on it, so label results with the version used.

Each attack runs only on the points still robust (correct and not yet fooled): a
work queue (`batching.run_until_fooled`) packs the pending (point, target class)
pairs of a stage, whatever their target, into full fixed-size jitted batches (the
target rank is a per-row input), and a point leaves the queue at its first success.
A batch the queue cannot fill runs at the smallest of the bucket shapes
`batching.bucket_sizes(batch_size, min_bucket_rows)` (128 → 16, 32, 64, 128 rows)
that holds it, its free rows running the same points' next targets ahead of time
(each point keeps its lowest successful target): a stage compiles at most once per
bucket whatever the data set size, and the last few robust points of a stage (Square's
5000 queries above all) run at their own size, not padded to the full batch.
The stages with one run per point, APGD-CE and Square, are the exception
(`exact_last_batch`, default on): they meet one partial batch each, so running it at
exactly its pending count costs no extra compile in a run (only a persistent-cache miss
when another run has another count), and one Square row costs 5000 forward passes
(25 robust points: 25 rows, not 32; APGD-CE 51, not 64). `min_bucket_rows >=
batch_size` gives the single full-batch shape for every stage.

Randomness (APGD's random start, Square's stripes, windows and signs) is drawn per
row from a key of (seed, stage, point index, target rank), so a point's result does
not depend on which batch, bucket or row it runs in: bucketed and full-batch runs
give the same per-point outcomes (tests/test_autoattack_buckets.py). With a `log`,
each stage prints a progress line per batch (runs done / total, robust so far,
seconds, ETA) and a summary line. APGD uses the original
100-iteration schedule (not a 10-step shortcut). Targets of APGD-T / FAB-T are the
ranks 2 … n_target_classes + 1 of the clean logits, one run each, like the authors.
With fewer than 4 classes APGD-T is skipped (targeted DLR needs z_π4). A point counts
as non-robust only if its adversarial example is misclassified, lies
in the ε-ball and in the box — checked again at the end on the returned examples.
"""

import dataclasses
import time
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.longtail.attacks import apgd
from uatmc_jax.longtail.attacks import attack_losses
from uatmc_jax.longtail.attacks import batching
from uatmc_jax.longtail.attacks import fab
from uatmc_jax.longtail.attacks import pgd_attacks
from uatmc_jax.longtail.attacks import square

LogitsFn = Callable[[jax.Array], jax.Array]

SUITES = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "apgd": ("apgd-ce", "apgd-t"),
}

cw_attack = pgd_attacks.cw_attack  # re-exported: CW∞ lives with PGD.


@dataclasses.dataclass(frozen=True)
class AutoAttackConfig:
  """Parameters of AutoAttack; defaults are the reference "standard" settings.

  ``min_bucket_rows``: smallest batch shape of a stage's last batches (see the module
  doc; ``>= batch_size``: one shape). ``exact_last_batch``: APGD-CE's and Square's last
  batch at its exact size instead of a bucket (no extra compile in a run)."""
  epsilon: float = 8. / 255.
  version: str = "standard"
  n_target_classes: int = 9
  apgd_iterations: int = 100
  fab_iterations: int = 100
  square_queries: int = 5000
  square_p_init: float = 0.8
  batch_size: int = 128
  min_bucket_rows: int = 16
  exact_last_batch: bool = True
  seed: int = 0

  def attacks(self):
    if self.version not in SUITES:
      raise ValueError(f"unknown AutoAttack version {self.version!r}; "
                       f"expected one of {sorted(SUITES)}")
    return SUITES[self.version]


class AutoAttackResult(NamedTuple):
  """robust: (N,) bool, correct and not fooled by any attack.
  clean_correct: (N,) bool.
  x_adv: (N, ...) adversarial examples (the clean x where none was found).
  robust_after: attack name -> number of robust points after that stage.
  seconds: attack name -> wall seconds of that stage (incl. compilation).
  fooled_by: (N,) str: the stage whose example fooled the point ("clean" for a clean
    error, "" for a robust point).
  stage_stats: attack name -> {"points_in", "points_out", "batches", "rows" (batch
    rows run, padding included), "pair_rows" (rows that were real (point, target)
    runs)}."""
  robust: np.ndarray
  clean_correct: np.ndarray
  x_adv: np.ndarray
  robust_after: Dict[str, int]
  seconds: Dict[str, float]
  fooled_by: Optional[np.ndarray] = None
  stage_stats: Optional[Dict[str, dict]] = None


class AutoAttack:
  """Builds the jitted stages once for a `logits_fn`, then `run(images, labels)`.

  Example:
    aa = AutoAttack(logits_fn, AutoAttackConfig(epsilon=8/255, version="standard"))
    result = aa.run(test_images, test_labels)
    robust_accuracy = result.robust.mean()
  """

  def __init__(self, logits_fn: LogitsFn, config: AutoAttackConfig = AutoAttackConfig(),
               mesh=None):
    """``mesh``: split every batch over the mesh's devices (all processes); see
    ``batching.OnMesh`` (``config.batch_size`` must be divisible by ``mesh.size``)."""
    self.logits_fn = logits_fn
    self.config = config
    config.attacks()  # validates the version
    base_key = jax.random.PRNGKey(config.seed)

    def row_keys(stage, ids, run):
      # One key per row from (stage, point index, run): a point's draws do not depend
      # on the batch, bucket or row it runs in.
      stage_key = jax.random.fold_in(base_key, stage)
      return jax.vmap(lambda i, r: jax.random.fold_in(jax.random.fold_in(stage_key, i), r))(
          ids, run)

    def apgd_ce(x, y, keys, rank, eps):
      res = apgd.apgd_attack(logits_fn, x, y, epsilon=eps,
                             loss_fn=attack_losses.cross_entropy_loss, key=keys,
                             num_iterations=config.apgd_iterations)
      return res.x_adv, res.robust

    def apgd_t(x, y, keys, rank, eps):
      res = apgd.apgd_targeted_attack(logits_fn, x, y, epsilon=eps, target_rank=rank,
                                      key=keys, num_iterations=config.apgd_iterations)
      return res.x_adv, res.robust

    def fab_t(x, y, keys, rank, eps):
      del keys  # FAB-T without restarts is deterministic
      res = fab.fab_targeted_attack(logits_fn, x, y, target_rank=rank,
                                    num_iterations=config.fab_iterations)
      robust = res.distance > eps
      return jnp.where(robust.reshape((-1,) + (1,) * (x.ndim - 1)), x, res.x_adv), robust

    def square_stage(x, y, keys, rank, eps):
      res = square.square_attack(logits_fn, x, y, epsilon=eps, key=keys,
                                 num_queries=config.square_queries,
                                 p_init=config.square_p_init,
                                 rescale_schedule=False)  # the authors' AutoAttack
      return res.x_adv, res.robust

    # ε and the target rank are traced and batches are padded to a bucket shape, so
    # each stage traces once per bucket it meets; `trace_counts` records it (tests
    # assert 1 when batch_size <= min_bucket_rows, i.e. a single shape).
    self.trace_counts: Dict[str, int] = {}

    def queued(fn, stage, targeted):
      # The work queue's signature: (x, y, run (B,) int32, ids (B,) int32, batch_index,
      # eps); run r of a targeted stage attacks the target of rank r + 2.
      def staged(x, y, run, ids, batch_index, eps):
        del batch_index  # randomness comes from (point, run), not the batch
        rank = run + 2 if targeted else jnp.int32(0)
        return fn(x, y, row_keys(stage, ids, run), rank, eps)
      return staged

    self._stages = {name: batching.counted_jit(self.trace_counts, name,
                                               queued(fn, stage, t))
                    for stage, (name, fn, t) in enumerate((
                        ("apgd-ce", apgd_ce, False), ("apgd-t", apgd_t, True),
                        ("fab-t", fab_t, True), ("square", square_stage, False)))}
    self._predict = jax.jit(lambda x, _: (jnp.argmax(logits_fn(x), axis=-1),))
    # On a mesh: (x, y, run, ids) batches split over its devices; each process attacks
    # its rows. Buckets stay divisible by the device count.
    self._stages = {k: batching.on_mesh(f, mesh, 4) for k, f in self._stages.items()}
    multiple = 1 if mesh is None else mesh.size
    self.buckets = batching.bucket_sizes(config.batch_size, config.min_bucket_rows, multiple)
    # The one-run stages' last batch at its exact size (rounded to the mesh): a stage
    # with one run per point has one partial batch, so this adds no compile (see the
    # module doc). Off in the single-shape mode.
    self._exact_multiple = {"apgd-ce": multiple, "square": multiple} if (
        config.exact_last_batch and len(self.buckets) > 1) else {}
    self._predict = batching.on_mesh(self._predict, mesh, 1)
    for f in (self._predict, *self._stages.values()):
      if isinstance(f, batching.OnMesh):
        f.check_batch_size(config.batch_size)

  @property
  def local_rows(self) -> int:
    """Rows this process fed to the stages and predictions (0 without a mesh)."""
    return sum(getattr(f, "local_rows", 0) for f in (self._predict, *self._stages.values()))

  def predict(self, images: np.ndarray) -> np.ndarray:
    (pred,) = batching.map_in_fixed_batches(self._predict, [images],
                                            self.config.batch_size)
    return pred

  def run(self, images: np.ndarray, labels: np.ndarray,
          log: Optional[Callable[[str], None]] = None,
          epsilon: Optional[float] = None,
          version: Optional[str] = None) -> AutoAttackResult:
    """Attacks (N, H, W, C) images in [0, 1] with (N,) integer labels.

    `epsilon` overrides the config's budget; it is a traced argument, so sweeping
    it does not recompile. `version` overrides the config's suite (the stages are
    shared, so "apgd" and "standard" runs of one instance compile each stage once).
    """
    eps = self.config.epsilon if epsilon is None else float(epsilon)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if images.shape[0] != labels.shape[0]:
      raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    cfg = self.config
    n_classes = int(jax.eval_shape(
        self.logits_fn, jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32)).shape[-1])
    n_targets = min(cfg.n_target_classes, n_classes - 1)

    clean_correct = self.predict(images) == labels if len(images) else np.zeros(0, bool)
    robust = clean_correct.copy()
    x_adv = images.copy()
    robust_after, seconds = {"clean": int(robust.sum())}, {}
    fooled_by = np.where(clean_correct, "", "clean").astype(object)
    stage_stats = {}
    suite = dataclasses.replace(cfg, version=version).attacks() if version else cfg.attacks()
    if log is not None:
      log(f"autoattack clean: robust {robust.sum()}/{len(robust)}; stages {list(suite)}")
    for name in suite:
      start = time.time()
      n_runs = n_targets if name in ("apgd-t", "fab-t") else 1
      if name == "apgd-t" and n_classes < 4:
        n_runs = 0  # the targeted DLR loss needs 4 classes; the stage is skipped
        if log is not None:
          log(f"autoattack apgd-t: skipped, the targeted DLR loss needs >= 4 classes")
      idx = np.flatnonzero(robust)
      stats = {"points_in": int(idx.size), "batches": 0, "rows": 0, "pair_rows": 0}

      def count(rows, real, stats=stats):
        stats["batches"] += 1
        stats["rows"] += rows
        stats["pair_rows"] += real

      if idx.size and n_runs:
        unit = "point x target runs" if n_runs > 1 else "points"
        progress = batching.StageProgress(f"autoattack {name}", idx.size * n_runs,
                                          len(robust), log, unit=unit)
        still, adv = batching.run_until_fooled(
            self._stages[name], images, labels, idx, n_runs, cfg.batch_size,
            np.float32(eps), progress=progress, robust_before=int(robust.sum()),
            buckets=self.buckets, with_ids=True, on_batch=count,
            exact_multiple=self._exact_multiple.get(name))
        robust[idx[~still]] = False
        x_adv[idx[~still]] = adv[~still]
        fooled_by[idx[~still]] = name
      seconds[name] = time.time() - start
      stats["points_out"] = int(robust.sum())
      stage_stats[name] = stats
      robust_after[name] = int(robust.sum())
      if log is not None:
        log(f"autoattack {name}: robust {robust.sum()}/{len(robust)} "
            f"({seconds[name]:.1f}s)")

    # Final check on the returned examples: in the ball, in the box, misclassified.
    flat_dist = np.abs(x_adv - images).reshape(len(images), -1)
    in_ball = (flat_dist.max(axis=1, initial=0.) <= eps + 1e-6) & \
        (x_adv.reshape(len(images), -1).min(axis=1, initial=0.) >= 0.) & \
        (x_adv.reshape(len(images), -1).max(axis=1, initial=1.) <= 1.)
    if len(images):
      misclassified = self.predict(x_adv) != labels
      robust = clean_correct & ~(misclassified & in_ball)
      x_adv = np.where(robust.reshape((-1,) + (1,) * (images.ndim - 1)), images, x_adv)
      fooled_by[robust] = ""
    return AutoAttackResult(robust=robust, clean_correct=clean_correct, x_adv=x_adv,
                            robust_after=robust_after, seconds=seconds,
                            fooled_by=fooled_by.astype(str), stage_stats=stage_stats)
