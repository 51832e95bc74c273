"""Many promotion-attack targets at once, with one compiled function (METHODS.md A.4).

``PromotionAttackRunner`` vmaps the per-target attack (``views.attack_and_evaluate_target``)
over a fixed-size chunk of targets (padding the last chunk) with one jitted function
reused for every chunk, so memory is bounded and nothing recompiles; results do not
depend on the chunk size. Given a ``mesh`` the runner splits each chunk of targets over
all of the mesh's devices (``shard_map``; every target's attack is independent), on one
host or many: each process feeds and attacks only its block of targets and the
per-target results are gathered on every process. The model tables, context and groups
are replicated for the attack. Graph models on the exact local path are attacked per
neighbourhood-size bucket, with exact re-runs where the active-anchor cap was hit
(``local_runs``).
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from uatmc_jax.core import errors
from uatmc_jax.core.memory import memory_map_usage
from uatmc_jax.core.parallel import precision
from uatmc_jax.recsys.attacks import alignment as alignment_lib
from uatmc_jax.recsys.attacks import local_runs
from uatmc_jax.recsys.attacks import mismatch as mismatch_lib
from uatmc_jax.recsys.attacks.attackers import PromotionAttack
from uatmc_jax.recsys.attacks.context import PromotionContext
from uatmc_jax.recsys.attacks.objective import METRIC_KS
from uatmc_jax.recsys.attacks.surface import AttackSurface
from uatmc_jax.recsys.attacks.views import LocalGraphSpec, attack_and_evaluate_target

GRAPH_PATHS = ("local", "full")


def chunk_size_for(surface: AttackSurface, chunk_size: int, n_targets: int, mesh=None,
                   graph_path: str = "local") -> int:
  """Targets per vmapped chunk (per device on a mesh) for ``n_targets`` targets.

  Graph surfaces on the full re-encode path recompute the propagation per target, so their
  chunks are capped at 4 (the local path caps each size bucket by memory instead, see
  ``PromotionAttackRunner``); on a mesh the per-device chunk is capped so that one chunk
  holds about ``n_targets`` (at most one padded target per device).
  """
  full_graph = surface.is_graph and (graph_path == "full" or surface.graph is None)
  chunk = min(int(chunk_size), 4) if full_graph else int(chunk_size)
  if mesh is not None:
    chunk = max(1, min(chunk, -(-int(n_targets) // mesh.size)))
  return chunk


class PromotionAttackRunner:
  """Attacks many targets of one model, chunk by chunk, with one compiled function.

  The compiled chunk function depends on the attack and the shapes only; the context
  (anchors, clean top-k, sorted scores) and the user groups are arguments, so other
  seeds' anchor sets of the same size reuse it.

  Args:
    surface: the attacked model.
    chunk_size: targets per vmapped chunk (memory ~ chunk_size × one target's attack).
    ks: Hit@K cut-offs.
    with_mismatch: compute the A.5 diagnostics too.
    mesh: None (one device), or a mesh whose devices (all axes, all processes) share
      each chunk: ``chunk_size`` is then per device, a chunk holds
      ``chunk_size * mesh.size`` targets laid out as a global array split over every
      mesh axis, and every process attacks only its devices' targets
      (``local_targets`` counts them, padding included). Parameters, tables, context
      and groups are replicated over the mesh (pass arrays that are identical on every
      process, e.g. local copies). A one-device, one-process mesh takes the plain path.
    graph_path: graph models only: "local" (default; the exact neighbourhood-local
      recomputation of ``_graph_local_view``, used when the surface has one, i.e.
      ``surface.graph``) or "full" (re-encode the whole graph every step: the reference).
    active_cap: local path: anchors per step whose K-th score is recomputed. A target
      that ever has more active anchors is re-run with ``cap_growth`` times as many, up
      to all anchors (``graph_fallbacks`` counts the re-runs): the caps form a ladder
      active_cap, active_cap·cap_growth, ..., n_A, each a compiled variant used only
      when a target needs it. An attacker whose targets mostly need more than the first
      cap (more than half of a bucket's, e.g. FGSM's margin 10 makes every anchor
      active) runs its later buckets with all anchors directly (``uncapped``): the same
      numbers without the wasted capped passes and their compiles. "Mostly" counts over
      all of the attacker's targets so far, from ``uncapped_after`` such targets on (one
      in a bucket of one target is no evidence, and switching makes every later bucket
      and model compile the uncapped variant).
    cap_growth: the ladder's factor (>= 2).
    route_clean_active: local path: a target whose clean point already has more active
      anchors than a cap (``clean_active_counts``; it would fail ``exact`` at δ = 0)
      starts at the first cap of the ladder that holds them instead of failing the
      smaller ones; such targets count for ``uncapped`` like re-runs.
    chunk_elements: local path: a size bucket's chunk holds at most this many elements of
      per-target working arrays (about anchors x (K + 2·changed items) + changed users x
      items), so big neighbourhoods run in small chunks and small ones in big chunks.
    log: optional ``log(message)`` for progress. Local graph path: one line per
      program of merged buckets, then one per larger cap that some targets needed
      (targets, seconds, compile included on first use, re-runs). Chunked path: targets
      done, seconds and targets/s, at most every ``log_every_seconds`` and at the end.
    log_every_seconds: the chunked path's least interval between progress lines (30).
    compile_seconds: local path: the run time one program's compilation is worth when
      the size buckets a run hits are merged (``graph_local.plan_buckets``). 2: a
      program compiles in about 6 s on a 2-core CPU, but the launchers' persistent
      compilation cache and the run's other models reuse it; on TikTok at PGD-10 this
      gave the fastest timed run and a 100-target run's compilation of about 30 s
      (docs/results/performance.md). 0: one program per bucket.

  With ``with_mismatch`` the A.5 diagnostics at δ = 0 (``mismatch``) of an attacker are
  those of any earlier attacker with the same objective (top-K, hinge, attacked
  modalities; e.g. the four PGD attackers, or one attacker at several budgets) on the
  same surface, context, groups and targets: they are taken over (a log line says so)
  and its programs leave them out (docs/results/performance.md, "the A.5 diagnostics").
  Not on a device mesh: there XLA:CPU (jaxlib 0.10.2) aborted compiling the program
  without them, in its TopkDecomposer under ``shard_map``; every attacker computes them.

  The local path's driver (size buckets, the cap ladder, exact re-runs) is
  ``local_runs.run_local``.
  """

  def __init__(self, surface: AttackSurface, *, chunk_size: int = 64,
               ks: Sequence[int] = METRIC_KS, with_mismatch: bool = True,
               mesh: jax.sharding.Mesh | None = None, graph_path: str = "local",
               active_cap: int = 256, chunk_elements: int = 2**25, log=None,
               uncapped_after: int = 4, route_clean_active: bool = True,
               cap_growth: int = 4, compile_seconds: float = 2.0,
               log_every_seconds: float = 30.0):
    self.surface = surface
    self.log, self.log_every_seconds = log, float(log_every_seconds)
    self.chunk_size = int(chunk_size)
    if self.chunk_size < 1:
      raise errors.ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if graph_path not in GRAPH_PATHS:
      raise errors.ConfigError(f"graph_path must be one of {GRAPH_PATHS}, got {graph_path!r}")
    if active_cap < 1 or chunk_elements < 1:
      raise errors.ConfigError("active_cap and chunk_elements must be >= 1")
    if cap_growth < 2:
      raise errors.ConfigError(f"cap_growth must be >= 2, got {cap_growth}")
    self.cap_growth = int(cap_growth)
    if not compile_seconds >= 0:
      raise errors.ConfigError(f"compile_seconds must be >= 0, got {compile_seconds}")
    self.compile_seconds = float(compile_seconds)
    self.graph_path, self.active_cap = graph_path, int(active_cap)
    self.route_clean_active = bool(route_clean_active)
    self.chunk_elements = int(chunk_elements)
    self.ks = tuple(int(k) for k in ks)
    self.with_mismatch = with_mismatch
    if mesh is not None and mesh.size == 1 and jax.process_count() == 1:
      mesh = None
    self.mesh = mesh
    self.local_targets = 0
    self._replicated: dict[str, tuple[Any, Any]] = {}
    self._compiled: dict[PromotionAttack, Any] = {}
    self.uncapped: set[PromotionAttack] = set()  # attackers run with all anchors
    # Local path, per budget-free attacker: [targets that needed more than the first cap,
    # targets run] (``local_runs.run_local`` switches it to all anchors from these).
    self.rerun_counts: dict[PromotionAttack, list[int]] = {}
    self.uncapped_after = int(uncapped_after)
    # Before each run: compiled programs are dropped above this share of the process's
    # memory-map limit (``memory_map_usage``; ``releases`` counts the drops).
    self.map_usage_fn, self.max_map_share, self.releases = memory_map_usage, 0.6, 0
    self.trace_counts: dict[PromotionAttack, int] = {}
    self._clean_diagnostics = mismatch_lib.CleanDiagnosticsStore()  # A.5 at δ = 0

  @property
  def targets_per_chunk(self) -> int:
    """Targets in one call of the chunk function (all devices together)."""
    return self.chunk_size * (1 if self.mesh is None else self.mesh.size)

  def _on_mesh(self, key: str, tree):
    """``tree`` replicated over the mesh, cached while the same object is passed."""
    from uatmc_jax.core.parallel import multihost
    held = self._replicated.get(key)
    if held is None or held[0] is not tree:
      held = (tree, multihost.put_replicated(tree, self.mesh))
      self._replicated[key] = held
    return held[1]

  @property
  def uses_local_graph_path(self) -> bool:
    """True when the current surface is attacked on the exact local graph path."""
    return self.graph_path == "local" and self.surface.graph is not None

  @staticmethod
  def _compile_key(attack: PromotionAttack, local: LocalGraphSpec | None,
                   clean_mismatch: bool):
    base = attack.without_budget()
    key = base if local is None else (base, local)
    return key if clean_mismatch else (key, "no clean diagnostics")

  def is_compiled(self, attack: PromotionAttack, local: LocalGraphSpec | None = None,
                  clean_mismatch: bool = True) -> bool:
    """Whether ``chunk_function`` holds this program already (no compile on next use)."""
    return self._compile_key(attack, local, clean_mismatch) in self._compiled

  def chunk_function(self, attack: PromotionAttack, local: LocalGraphSpec | None = None,
                     clean_mismatch: bool = True):
    """The jitted (params, tables, ctx, groups, ε, neighbourhoods, targets (chunk,)) -> dict.

    ``neighbourhoods`` is None except on the local graph path (``local`` given). The
    budget ε is an argument (a float32 scalar), not part of the compiled program:
    attackers that differ only in ``epsilon`` share one function (a budget sweep
    compiles once). ``clean_mismatch=False``: without the A.5 diagnostics at δ = 0.
    """
    key = self._compile_key(attack, local, clean_mismatch)
    attack = attack.without_budget()
    if key not in self._compiled:
      unknown = set(attack.modalities or ()) - set(self.surface.modalities)
      if unknown:
        raise errors.ConfigError(f"attacked modalities {sorted(unknown)} not in the model's "
                                 f"{list(self.surface.modalities)}")
      if (attack.alignment in alignment_lib.SHARED_SPACE_ALIGNMENTS
          and not self.surface.shared_space):
        raise errors.ConfigError(
            f"alignment {attack.alignment!r} compares modality gradients in a shared "
            "projected space, which this model does not have (shared_projected_space="
            "False, e.g. VBPR); use alignment 'none' or a group-level one")
      if local is not None and attack.surrogate != "relu":
        raise errors.ConfigError(
            f"surrogate {attack.surrogate!r}: the exact local graph path skips anchors "
            "whose hinge is provably zero, which a smooth surrogate is not; use "
            "graph_path='full' for graph models with this surrogate")
      surface, ks, with_mismatch = self.surface, self.ks, self.with_mismatch
      counts = self.trace_counts

      def chunk(params, attack_table, projected_table, ctx, group_weights, epsilon, nbs,
                targets):
        # Runs only when traced: a fixed chunk shape must never retrace (cf.
        # chex.assert_max_traces, which keys on the definition site, not the closure).
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > 1:
          raise AssertionError(f"promotion chunk function for {key} retraced")
        one = functools.partial(attack_and_evaluate_target, surface, attack, params,
                                attack_table, projected_table, ctx, group_weights, ks=ks,
                                with_mismatch=with_mismatch, clean_mismatch=clean_mismatch,
                                local=local, epsilon=epsilon)
        # Full float32 matmuls (no TF32 / one-pass bf16): the exact local path's margins
        # and the ranks assume float32 scores.
        with precision.evaluation_precision():
          return jax.vmap(one)(targets, nbs)

      if self.mesh is None:
        self._compiled[key] = jax.jit(chunk)
      else:
        # Targets (and their neighbourhoods) split over every mesh axis; everything else
        # replicated. Each device vmaps over its own targets, no communication inside.
        split = P(tuple(self.mesh.axis_names))
        self._compiled[key] = jax.jit(jax.shard_map(
            chunk, mesh=self.mesh, in_specs=(P(), P(), P(), P(), P(), P(), split, split),
            out_specs=split, check_vma=False))
    return self._compiled[key]

  def bucket_chunk(self, shape, n_anchors: int, k: int) -> int:
    """Targets per chunk (per device) of one neighbourhood bucket, by working memory."""
    per_target = local_runs.target_elements(self.surface, shape, n_anchors, k)
    return max(1, min(self.chunk_size, self.chunk_elements // per_target))

  def run(self, attack: PromotionAttack, ctx: PromotionContext, targets: Sequence[int],
          group_weights: jax.Array | None = None) -> dict[str, Any]:
    """Attacks ``targets``; returns numpy arrays with a leading (n_targets,) axis.

    Args:
      attack: the attacker (its ``k`` must be the context's).
      ctx: the model's ``PromotionContext`` for one anchor set.
      targets: item ids.
      group_weights: (n_A, G) anchor user groups (one-hot); None = one group.

    The last chunk is padded with copies of the first target and the padding dropped,
    so every chunk has the same shape (no recompiles). ``seconds`` (wall time of the
    chunks, compile included on first use) is added.
    """
    self._release_executables_if_needed()
    if attack.k + 1 != ctx.topk_values.shape[1]:
      raise errors.ConfigError(f"attack k={attack.k} but the context was built for "
                               f"k={ctx.topk_values.shape[1] - 1}")
    n_a = int(ctx.anchors.shape[0])
    given_groups = group_weights
    if group_weights is None:
      group_weights = jnp.ones((n_a, 1), jnp.float32)
    chex.assert_shape(group_weights, (n_a, None))
    group_weights = jnp.asarray(group_weights, jnp.float32)
    targets = np.asarray(targets, np.int32)
    n = len(targets)
    if n == 0:
      raise errors.ConfigError("no targets to attack")
    s = self.surface
    t0 = time.perf_counter()
    epsilon = jnp.asarray(attack.epsilon, jnp.float32)
    args = (s.params, s.attack_table, s.projected_table, ctx, group_weights, epsilon)
    place, fetch = jnp.asarray, jax.device_get
    if self.mesh is not None:
      from uatmc_jax.core.parallel import multihost
      args = tuple(self._on_mesh(k, v) for k, v in zip(
          ("params", "attack_table", "projected_table", "ctx"), args[:4]))
      args += (multihost.put_replicated(group_weights, self.mesh),
               multihost.put_replicated(epsilon, self.mesh))
      split = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
      place = lambda t: multihost.put_global(t, split)  # noqa: E731
      fetch = multihost.to_host
    # The A.5 diagnostics at δ = 0 depend on the objective, not on the attacker: an
    # earlier attacker's are reused (same model, context, groups and targets).
    owner, objective = (self.surface, ctx, given_groups), attack.clean_objective
    reuse = self.with_mismatch and self.mesh is None
    reused = self._clean_diagnostics.get(owner, objective, targets) if reuse else None
    clean = reused is None
    if not clean and self.log is not None:
      self.log(f"{attack.display_name} ε={attack.epsilon:g}: A.5 diagnostics at δ = 0 "
               "reused from an earlier attacker with the same objective")
    if not self.uses_local_graph_path:
      result = self.run_chunks(self.chunk_function(attack, clean_mismatch=clean), args,
                               targets, self.chunk_size, place, fetch,
                               progress=self._chunk_progress(attack, n))
    else:
      if ctx.graph_cache is None:
        raise errors.ConfigError("the local graph path needs a context built by "
                                 "build_context on this graph surface (graph_cache is None)")
      result, fallbacks, direct = local_runs.run_local(self, attack, ctx, args, targets,
                                                       place, fetch, clean)
      result["graph_fallbacks"], result["graph_direct"] = fallbacks, direct
    if reuse and clean:
      self._clean_diagnostics.put(owner, objective, targets, result["mismatch"])
    elif reuse:
      result["mismatch"] = reused
    result["targets"] = targets
    result["seconds"] = time.perf_counter() - t0
    return result

  def _release_executables_if_needed(self) -> None:
    """Drops every compiled program when the process nears its memory-map limit.

    They are rebuilt on next use: with the persistent compilation cache on (the
    launchers' default) that reads them back instead of compiling.
    """
    usage = self.map_usage_fn()
    if usage is None or usage < self.max_map_share:
      return
    if self.log is not None:
      self.log(f"memory maps at {usage:.0%} of vm.max_map_count: dropping "
               f"{len(self._compiled)} compiled attack programs (jax.clear_caches)")
    jax.clear_caches()
    self._compiled.clear()
    self.trace_counts.clear()
    self.releases += 1

  def _chunk_progress(self, attack: PromotionAttack, n: int):
    """``progress(done)`` for the chunked path: a log line at most every
    ``log_every_seconds`` and after the last chunk (targets done, seconds, the rate
    after the first chunk, which includes the compilation); None without ``log``."""
    if self.log is None:
      return None
    name = attack.display_name
    t0 = time.perf_counter()
    state = {"last": t0, "first": None}

    def progress(done: int) -> None:
      now = time.perf_counter()
      if state["first"] is None:
        state["first"] = (now, done)
      if done < n and now - state["last"] < self.log_every_seconds:
        return
      state["last"] = now
      t1, d1 = state["first"]
      rate = (f", {(done - d1) / (now - t1):.2f} targets/s after the first chunk"
              if done > d1 and now > t1 else "")
      self.log(f"{name} ε={attack.epsilon:g}: {done}/{n} targets, {now - t0:.0f} s"
               f"{rate}")

    return progress

  def run_chunks(self, fn, args, targets, per_device, place, fetch, nbs_of=None,
                 progress=None):
    """``fn`` over fixed-size chunks of ``targets`` (last one padded with the first);
    ``progress(targets done)`` after each chunk."""
    n = len(targets)
    c = per_device * (1 if self.mesh is None else self.mesh.size)
    n_chunks = math.ceil(n / c)
    padded = np.concatenate([targets, np.full(n_chunks * c - n, targets[0], np.int32)])
    pieces = []
    for i in range(n_chunks):
      block = padded[i * c:(i + 1) * c]
      nbs = None if nbs_of is None else jax.tree.map(place, nbs_of(block))
      chunk_targets = place(block)
      if self.mesh is not None:
        self.local_targets += len(chunk_targets.addressable_shards) * per_device
      pieces.append(fetch(fn(*args, nbs, chunk_targets)))
      if progress is not None:
        progress(min(n, (i + 1) * c))
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0)[:n], *pieces)

  def cap_ladder(self, n_anchors: int, uncapped: bool = False) -> tuple[int, ...]:
    """The local path's active-anchor caps (``local_runs.cap_ladder``) of this runner."""
    return local_runs.cap_ladder(self.active_cap, self.cap_growth, n_anchors, uncapped)

  def clean_active_counts(self, ctx: PromotionContext, targets: Sequence[int],
                          attack: PromotionAttack) -> np.ndarray:
    """Per target, the local path's active anchors at δ = 0 (``local_runs``)."""
    return local_runs.clean_active_counts(self.surface, ctx, targets, attack)
