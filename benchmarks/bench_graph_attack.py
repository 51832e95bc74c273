"""MMGCN promotion attack (METHODS.md A.4): the exact local path vs the full re-encode.

PGD-10 (ε = 0.05, projected space, K = 50, 40% anchor users, Hit@K and ranks unmasked
and masked) on a 2-layer MMGCN on TikTok (../shared/data/tiktok: 9,308 users x 6,710
items), both paths in the same run on the same model, anchors and targets: the default
local path (``PromotionAttackRunner(graph_path="local")``: every target's neighbourhood
recomputed from the clean cache, padded per size bucket) on ``--targets`` random targets,
the full re-encode path (``graph_path="full"``: the whole graph propagated and top-K'd
every step) on the first ``--full_targets`` of them; their results must agree.

The model: ``--train_epochs N`` BPR epochs of the library trainer from its seed-999 init
(0 = freshly initialised). Reference style: one target at a time with a full sort per
step, 11.6 s per target (VBPR-MLP, TikTok) on this 2-core CPU: the goals are >= 50x the
full path and >= 200x the reference style (>= 17 targets/s).

``--memory_only``: only the per-model precomputation (model, surface, clean activation
cache, anchors' context, neighbourhood buckets) at the Baby scale (19,445 users x 7,050
items, random 4096-d / 384-d features, ../shared/data/baby interactions), reporting peak
RSS (goal < 2 GiB).

  python benchmarks/bench_graph_attack.py --train_epochs 2 --targets 100 --full_targets 3
  python benchmarks/bench_graph_attack.py --memory_only
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from uatmc_jax.recsys.attacks import targets as targets_lib  # noqa: E402
from uatmc_jax.recsys.attacks.attackers import pgd_attack  # noqa: E402
from uatmc_jax.recsys.attacks.context import build_context  # noqa: E402
from uatmc_jax.recsys.attacks.runner import PromotionAttackRunner  # noqa: E402
from uatmc_jax.recsys.attacks.surface import surface_from_recommender  # noqa: E402
from uatmc_jax.recsys.attacks.views import LocalGraphSpec  # noqa: E402
from uatmc_jax.recsys.data import load_dataset  # noqa: E402
from uatmc_jax.recsys.data.interactions import InteractionData  # noqa: E402
from uatmc_jax.recsys.data.mmrec import read_inter_file  # noqa: E402
from uatmc_jax.recsys.models.mmgcn import MMGCN  # noqa: E402

REFERENCE_SECONDS_PER_TARGET = 11.6
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def _maxrss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(data, epochs: int):
  model = MMGCN(data.n_users, data.n_items, {m: f.shape[1] for m, f in data.features.items()},
                data.train, rngs=nnx.Rngs(999))
  if epochs:
    from uatmc_jax.recsys.trainer import RecsysTrainer
    trainer = RecsysTrainer(model, data, {"epochs": epochs, "log": False})
    for e in range(epochs):
      trainer.train_epoch(e)
    model = trainer.model
  return model


def memory(args) -> None:
  users, items, labels = read_inter_file(os.path.join(DATA, "baby", "baby.inter"))
  n_users, n_items = 19445, 7050
  rng = np.random.default_rng(0)
  feats = {"image": rng.standard_normal((n_items, 4096), np.float32),
           "text": rng.standard_normal((n_items, 384), np.float32)}
  train = np.unique(np.stack([users[labels == 0], items[labels == 0]], 1), axis=0)
  t0 = time.perf_counter()
  model = MMGCN(n_users, n_items, {m: f.shape[1] for m, f in feats.items()}, train,
                rngs=nnx.Rngs(0))
  surface = surface_from_recommender(model, feats, space="projected")
  anchors = targets_lib.select_anchors(n_users, 0.4, seed=1)
  ctx = build_context(surface, anchors, k=50, train_pairs=train)
  jax.block_until_ready(ctx)
  hoods = surface.graph.neighbourhoods
  print(f"[baby memory] {n_users} users x {n_items} items, {len(train)} train pairs, "
        f"{len(anchors)} anchors; precomputation {time.perf_counter() - t0:.1f}s; "
        f"{len(hoods.shapes)} buckets, largest {max(hoods.shapes.values())}; "
        f"ctx top-W width {ctx.desc_values.shape[1]}; peak RSS {_maxrss_mib():.0f} MiB",
        flush=True)


def speed(args) -> None:
  t0 = time.perf_counter()
  data: InteractionData = load_dataset(os.path.join(DATA, "tiktok"))
  model = _model(data, args.train_epochs)
  train_s = time.perf_counter() - t0
  surface = surface_from_recommender(model, data.features, space="projected")
  anchors = targets_lib.select_anchors(data.n_users, 0.4, seed=1)
  t1 = time.perf_counter()
  ctx = build_context(surface, anchors, k=50, train_pairs=data.train)
  jax.block_until_ready(ctx)
  setup_s = time.perf_counter() - t1
  hoods = surface.graph.neighbourhoods
  tg = targets_lib.select_targets("random", args.targets, np.ones(data.n_items), seed=1)
  attack = pgd_attack(0.05)
  local = PromotionAttackRunner(surface, chunk_size=args.chunk, with_mismatch=False,
                                          active_cap=args.active_cap,
                                          route_clean_active=not args.no_route,
                                          compile_seconds=args.compile_seconds)
  t2 = time.perf_counter()
  first = local.run(attack, ctx, tg)  # compiles every bucket hit
  compile_s = time.perf_counter() - t2
  local.log = lambda line: print(f"  [timed run] {line}", flush=True)  # per bucket
  t3 = time.perf_counter()
  out = local.run(attack, ctx, tg)
  local_s = time.perf_counter() - t3
  full = PromotionAttackRunner(surface, chunk_size=1, with_mismatch=False,
                                         graph_path="full")
  few = tg[:args.full_targets]
  full.run(attack, ctx, few[:1])  # compile
  t4 = time.perf_counter()
  ref = full.run(attack, ctx, few)
  full_s = time.perf_counter() - t4
  n = len(few)
  agree = max(float(np.abs(out[k][:n] - ref[k]).max()) for k in
              ("loss_after", "hit_after", "rank_after", "masked_rank_after"))
  local_tps, full_tps = len(tg) / local_s, n / full_s
  buckets = {int(b): int(c) for b, c in zip(*np.unique(hoods.bucket_of_item[tg],
                                                       return_counts=True))}
  print(f"[tiktok mmgcn, {args.train_epochs} train epochs ({train_s:.0f}s)] "
        f"{len(anchors)} anchors, PGD-10 eps=0.05: local {len(tg)} targets in {local_s:.2f}s "
        f"= {local_tps:.2f} targets/s (first run incl. compile {compile_s:.1f}s, "
        f"{len(local._compiled)} programs, {out['graph_fallbacks']} cap re-runs, "
        f"{out['graph_direct']} started above the first cap, "
        f"active_cap {args.active_cap}); full re-encode "
        f"{n} targets in {full_s:.1f}s = {full_s / n:.1f} s/target; local/full "
        f"{local_tps / full_tps:.0f}x, {local_tps * REFERENCE_SECONDS_PER_TARGET:.0f}x the "
        f"reference style's {REFERENCE_SECONDS_PER_TARGET}s/target; max |local-full| over "
        f"loss/hit/rank {agree:.2e}; hit@50 {out['hit_before'][:, 2].mean():.4f} -> "
        f"{out['hit_after'][:, 2].mean():.4f}; targets per bucket {buckets}; ctx setup "
        f"{setup_s:.1f}s; max RSS {_maxrss_mib():.0f} MiB", flush=True)
  del first


def _rank_programs(runner, attack, spec):
  """Jitted chunk programs of the clean and the perturbed rank evaluation alone."""
  from uatmc_jax.core.parallel import precision
  from uatmc_jax.recsys.attacks.views import target_view
  surface = runner.surface

  def build(perturbed):
    def chunk(params, attack_table, projected_table, ctx, group_weights, epsilon, nbs,
              targets):
      def one(target, nb):
        view = target_view(surface, params, attack_table, projected_table, ctx, target,
                           attack.k, nb, spec)
        if not perturbed:
          return view.ranks_fn({})
        return view.ranks_fn({m: jnp.full_like(x, 0.5) * epsilon
                              for m, x in view.x_t.items()})
      with precision.evaluation_precision():
        return jax.vmap(one)(targets, nbs)
    return jax.jit(chunk)

  return build(False), build(True)


def _timed(fn, *args, repeats=3):
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - t0)
  return compile_s, best


def profile(args) -> None:
  """Where a PGD-10 target's time goes, per neighbourhood bucket (ms per target).

  Per bucket of the random targets, at the bucket's own chunk (capped spec, the first
  runner pass): the host set-up of the chunk's neighbourhoods; the attack program
  (compile, run); the same with PGD-1, so one PGD step = (PGD-10 − PGD-1) / 9; the clean
  and the perturbed rank evaluation as programs of their own; the rest (per-target
  set-up of the view, the losses before/after) = PGD-10 − 10 steps − ranks.
  """
  data: InteractionData = load_dataset(os.path.join(DATA, "tiktok"))
  model = _model(data, args.train_epochs)
  surface = surface_from_recommender(model, data.features, space="projected")
  anchors = targets_lib.select_anchors(data.n_users, 0.4, seed=1)
  ctx = build_context(surface, anchors, k=50, train_pairs=data.train)
  hoods = surface.graph.neighbourhoods
  tg = targets_lib.select_targets("random", args.targets, np.ones(data.n_items), seed=1)
  attack, one_step = pgd_attack(0.05), pgd_attack(0.05, steps=1)
  runner = PromotionAttackRunner(surface, chunk_size=args.chunk, with_mismatch=False,
                                 active_cap=args.active_cap)
  s = surface
  base_args = (s.params, s.attack_table, s.projected_table, ctx,
               jnp.ones((len(anchors), 1), jnp.float32), jnp.asarray(0.05, jnp.float32))
  buckets = hoods.bucket_of_item[tg]
  totals = {}
  print("ms per target (chunk padding included):\n"
        "| bucket (items x users) | targets | chunk | host set-up | PGD-10 compile s | PGD-10 "
        "| one PGD step | ranks clean | ranks perturbed | rest |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for b in np.unique(buckets):
    shape = hoods.shapes[int(b)]
    idx = tg[buckets == b]
    chunk = min(runner.bucket_chunk(shape, len(anchors), attack.k),
                1 << max(0, int(np.ceil(np.log2(len(idx))))))
    block = np.resize(idx, chunk).astype(np.int32)
    t0 = time.perf_counter()
    nbs = jax.tree.map(jnp.asarray, hoods.batch(block, shape))
    host = (time.perf_counter() - t0) / chunk
    spec = LocalGraphSpec(shape, args.active_cap, chunk)
    call = base_args + (nbs, jnp.asarray(block))
    compile_s, whole = _timed(runner.chunk_function(attack, spec), *call)
    _, first = _timed(runner.chunk_function(one_step, spec), *call)
    clean_fn, after_fn = _rank_programs(runner, attack, spec)
    clean, after = (_timed(f, *call)[1] / chunk for f in (clean_fn, after_fn))
    whole, step = whole / chunk, (whole - first) / 9 / chunk
    row = dict(host=host, whole=whole, step=step, clean=clean, after=after,
               rest=whole - 10 * step - clean - after)
    for key, v in row.items():
      totals[key] = totals.get(key, 0.0) + v * len(idx)
    totals["compile"] = totals.get("compile", 0.0) + compile_s
    print(f"| {shape.items} x {shape.users} | {len(idx)} | {chunk} | {host*1e3:.1f} "
          f"| {compile_s:.1f} | {whole*1e3:.1f} | {step*1e3:.1f} | {clean*1e3:.1f} "
          f"| {after*1e3:.1f} | {row['rest']*1e3:.1f} |", flush=True)
  n, t = len(tg), totals
  print(f"[profile] {n} targets in {len(np.unique(buckets))} buckets: PGD-10 programs "
        f"{t['whole']:.2f} s = {n / t['whole']:.2f} targets/s, of which 10 steps "
        f"{10 * t['step']:.2f} s ({10 * t['step'] / t['whole']:.0%}), ranks "
        f"{t['clean'] + t['after']:.2f} s ({(t['clean'] + t['after']) / t['whole']:.0%}), rest "
        f"{t['rest']:.2f} s; host set-up {t['host']:.2f} s; compile {t['compile']:.1f} s",
        flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--targets", type=int, default=100)
  p.add_argument("--full_targets", type=int, default=3)
  p.add_argument("--train_epochs", type=int, default=2)
  p.add_argument("--chunk", type=int, default=64)
  p.add_argument("--active_cap", type=int, default=256)
  p.add_argument("--compile_seconds", type=float, default=2.0,
                 help="the runner's bucket-merge setting (0: one program per size bucket)")
  p.add_argument("--no_route", action="store_true",
                 help="run every target capped first (re-run when the cap is exceeded)")
  p.add_argument("--memory_only", action="store_true")
  p.add_argument("--profile", action="store_true",
                 help="per bucket: host set-up, compile, and the parts of a target's attack")
  args = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs",
        flush=True)
  if args.memory_only:
    memory(args)
  elif args.profile:
    profile(args)
  else:
    speed(args)


if __name__ == "__main__":
  sys.exit(main())
