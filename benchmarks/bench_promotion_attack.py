"""Throughput of the promotion attack (METHODS.md A.4): PGD-10 targets per second.

VBPR-MLP (random parameters unless ``--workdir`` names a trained model; the attack's
cost does not depend on the parameter values), 40% anchor users, perturbation in the
projected space (the reference's), every target's metrics (Hit@{10,20,50,100} and
average rank before/after, unmasked and masked) included. Two settings:

* TikTok (../shared/data/tiktok: 9,308 users x 6,710 items, 128-d image/audio);
* the Baby scale: 19,445 users x 7,050 items with random 4096-d / 384-d features
  (the real widths; the real interactions from ../shared/data/baby for the masks).

Reference style: one target at a time, all scores recomputed and fully sorted every
step, 11.6 s per target on TikTok on this 2-core CPU; the goal is >= 200x (>= 17
targets/s). Peak memory: process max RSS and the compiled chunk's temp bytes.

  python benchmarks/bench_promotion_attack.py                     # both settings
  python benchmarks/bench_promotion_attack.py --settings tiktok --targets 200 --chunk 128
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

from uatmc_jax.core.parallel import throughput
from uatmc_jax.recsys.attacks import targets as targets_lib  # noqa: E402
from uatmc_jax.recsys.attacks.attackers import pgd_attack  # noqa: E402
from uatmc_jax.recsys.attacks.context import build_context  # noqa: E402
from uatmc_jax.recsys.attacks.runner import PromotionAttackRunner  # noqa: E402
from uatmc_jax.recsys.attacks.surface import surface_from_recommender  # noqa: E402
from uatmc_jax.recsys.data import load_dataset  # noqa: E402
from uatmc_jax.recsys.data.mmrec import read_inter_file  # noqa: E402
from uatmc_jax.recsys.models.vbpr_mlp import VBPRMLP  # noqa: E402

REFERENCE_SECONDS_PER_TARGET = 11.6  # TikTok, one target at a time, full sort per step
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def _maxrss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setting(name: str):
  """(n_users, n_items, features, train pairs) of a setting."""
  if name == "tiktok":
    data = load_dataset(os.path.join(DATA, "tiktok"))
    return data.n_users, data.n_items, data.features, data.train
  if name == "baby":
    # The Baby folder has no feature files: read only its interactions.
    users, items, labels = read_inter_file(os.path.join(DATA, "baby", "baby.inter"))
    n_users, n_items = 19445, 7050
    rng = np.random.default_rng(0)
    feats = {"image": rng.standard_normal((n_items, 4096), np.float32),
             "text": rng.standard_normal((n_items, 384), np.float32)}
    train = np.stack([users[labels == 0], items[labels == 0]], 1)
    return n_users, n_items, feats, train
  raise SystemExit(f"unknown setting {name!r}")


def bench(name: str, n_targets: int, chunk: int, repeats: int) -> dict:
  t0 = time.perf_counter()
  n_users, n_items, feats, train = _setting(name)
  model = VBPRMLP(n_users, n_items, {m: f.shape[1] for m, f in feats.items()},
                  rngs=nnx.Rngs(0))
  surface = surface_from_recommender(model, feats, space="projected")
  anchors = targets_lib.select_anchors(n_users, 0.4, seed=1)
  ctx = build_context(surface, anchors, k=50, train_pairs=train)
  jax.block_until_ready(ctx)
  setup_s = time.perf_counter() - t0
  runner = PromotionAttackRunner(surface, chunk_size=chunk, with_mismatch=False)
  attack = pgd_attack(0.05)
  tg = targets_lib.select_targets("random", n_targets, np.ones(n_items), seed=1)
  t1 = time.perf_counter()
  runner.run(attack, ctx, tg[:chunk])  # compile + first chunk
  compile_s = time.perf_counter() - t1
  times = []
  for _ in range(repeats):
    t2 = time.perf_counter()
    out = runner.run(attack, ctx, tg)
    times.append(time.perf_counter() - t2)
  best = min(times)
  fn = runner.chunk_function(attack)
  s = surface
  compiled = fn.lower(s.params, s.attack_table, s.projected_table, ctx,
                      jnp.ones((len(anchors), 1), jnp.float32),
                      jnp.asarray(attack.epsilon, jnp.float32), None,
                      jnp.zeros((chunk,), jnp.int32)).compile()
  mem = compiled.memory_analysis()
  temp_mib = getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem is not None else float("nan")
  tps = n_targets / best
  # Model FLOPs per target (analytic; XLA's cost analysis counts a fori_loop body once):
  # the attack lives in the projected space, so each PGD step is a forward + backward
  # (~3x forward) of the fusion layer on the target's row and of its scores for every
  # anchor (2*anchors*D); one more scoring pass after the attack gives Hit@K and ranks.
  d_user = int(model.user_embedding.value.shape[1])
  fusion = 2 * model.fusion.kernel.value.size
  forward = fusion + 2 * len(anchors) * d_user
  flops_per_target = (3 * attack.steps + 2) * forward
  peak = throughput.peak_flops(jax.devices()[0], "float32")
  return {
      "gflops_per_second": flops_per_target * tps / 1e9,
      "mfu": throughput.mfu(flops_per_target * n_targets, best, peak),
      "setting": name, "users": n_users, "items": n_items, "anchors": len(anchors),
      "targets": n_targets, "chunk": chunk, "setup_s": setup_s, "compile_s": compile_s,
      "seconds": best, "targets_per_second": tps,
      "speedup_vs_reference": tps * REFERENCE_SECONDS_PER_TARGET,
      "hit50_before": float(out["hit_before"][:, 2].mean()),
      "hit50_after": float(out["hit_after"][:, 2].mean()),
      "chunk_temp_mib": temp_mib, "max_rss_mib": _maxrss_mib(),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--settings", default="tiktok,baby")
  p.add_argument("--targets", type=int, default=256)
  p.add_argument("--chunk", type=int, default=64)
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs",
        flush=True)
  for name in args.settings.split(","):
    r = bench(name, args.targets, args.chunk, args.repeats)
    print(f"[{r['setting']}] {r['users']} users x {r['items']} items, {r['anchors']} anchors, "
          f"PGD-10 eps=0.05: {r['targets']} targets in {r['seconds']:.2f}s = "
          f"{r['targets_per_second']:.1f} targets/s ({r['speedup_vs_reference']:.0f}x the "
          f"reference style's 1/{REFERENCE_SECONDS_PER_TARGET}s); chunk {r['chunk']}, "
          f"compile+first chunk {r['compile_s']:.1f}s, setup {r['setup_s']:.1f}s; "
          f"hit@50 {r['hit50_before']:.4f} -> {r['hit50_after']:.4f}; chunk temp "
          f"{r['chunk_temp_mib']:.0f} MiB, max RSS {r['max_rss_mib']:.0f} MiB; model "
          f"{r['gflops_per_second']:.2f} GFLOP/s, MFU "
          + (f"{100 * r['mfu']:.3f}%" if r["mfu"] is not None else
             f"n/a (set {throughput.CPU_PEAK_ENV} for a CPU peak)"), flush=True)


if __name__ == "__main__":
  sys.exit(main())
