"""One process of a (possibly multi-process) run of both trainers on tiny data.

Started by ``tests/test_multihost.py`` with ``sys.executable``::

  python tests/multihost_driver.py --out DIR --jobs recsys:2,recsys:4,longtail \\
      --local_devices 2 --num_processes 2 --process_id 0 --coordinator localhost:PORT

``recsys:M`` trains the recommender on a (4/M) x M mesh (user/item tables split over a
model axis of M devices; M = 4 splits them across both processes). ``attack`` and
``eval`` run the cores of ``experiments.attack_recsys`` and ``experiments.eval_robust``
with their work split over the 4 devices (``eval`` restores the ``longtail`` job's
checkpoint, so it runs after it). With
``--num_processes 1 --local_devices 4`` it is the single-process reference. Every
process writes ``DIR/<job>_p<process_id>.json`` (``recsys:2`` -> ``recsys_m2``) with the
job's metrics as seen by that process, so the test can check that all processes agree
with each other and with the reference. Checkpoints go to ``DIR/<job>_ckpt`` (orbax,
written by all processes together).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--jobs", default="recsys:1,longtail")
  ap.add_argument("--local_devices", type=int, default=2)
  ap.add_argument("--num_processes", type=int, default=1)
  ap.add_argument("--process_id", type=int, default=0)
  ap.add_argument("--coordinator", default=None)
  ap.add_argument("--recsys_model", default="vbpr", help="vbpr (fast to compile) | vbpr_mlp")
  return ap.parse_args(argv)


def setup(args):
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.config.update("jax_num_cpu_devices", args.local_devices)
  from uatmc_jax.core.parallel import mesh as mesh_lib
  if args.num_processes > 1:
    mesh_lib.maybe_initialize_distributed(args.coordinator, args.num_processes,
                                          args.process_id)
  assert jax.process_count() == args.num_processes, jax.process_count()
  assert jax.device_count() == args.num_processes * args.local_devices


def _sum_of_squares(tree) -> float:
  """A scalar fingerprint of a (possibly multi-process) pytree, same on every process."""
  import jax
  import jax.numpy as jnp
  return float(jax.jit(lambda t: sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                                     for x in jax.tree.leaves(t)))(tree))


def recsys_job(args, workdir, mesh_model: int):
  """Two epochs of a recommender (tables over the model axis when mesh_model > 1)."""
  import jax
  import numpy as np
  from flax import nnx
  from uatmc_jax.core.parallel import mesh as mesh_lib
  from uatmc_jax.recsys.data.interactions import InteractionData
  from uatmc_jax.recsys.models.registry import build_recommender
  from uatmc_jax.recsys.trainer import RecsysTrainer

  rng = np.random.default_rng(0)
  n_users, n_items = 32, 24
  users = np.repeat(np.arange(n_users), 6)
  items = (users % 2) * (n_items // 2) + rng.integers(0, n_items // 2, users.size)
  pairs = np.unique(np.stack([users, items], 1), axis=0).astype(np.int32)
  label = rng.choice(3, size=len(pairs), p=[0.7, 0.15, 0.15])
  feats = {"image": rng.standard_normal((n_items, 6)).astype(np.float32),
           "text": rng.standard_normal((n_items, 4)).astype(np.float32)}
  data = InteractionData("tiny", n_users, n_items, pairs[label == 0], pairs[label == 1],
                         pairs[label == 2], feats)
  mesh = mesh_lib.make_mesh(-1, mesh_model)
  model = build_recommender(args.recsys_model, data, {"embedding_dim": 8}, nnx.Rngs(0))
  # lr 1e-2: two epochs of ~4 steps move the loss clearly (at 1e-3 the change is
  # within the noise of which negatives were drawn).
  config = dict(batch_size=32, epochs=2, patience=50, seed=3, eval_batch_size=8, log=False,
                ks=(5, 20), learning_rate=1e-2)
  # No checkpoints here (the long-tail job covers multi-process orbax saves).
  del workdir
  # Cross-process host gathers: every jax.device_put of a host value (numpy, or an
  # array of this process only) onto devices of several processes all-gathers it for
  # an equality check; start-up, training and evaluation must make none.
  host_puts = {"calls": 0, "bytes": 0}
  real_device_put = jax.device_put

  def counting_device_put(x, *a, **k):
    if jax.process_count() > 1:
      for leaf in jax.tree.leaves(x):
        if not (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable):
          host_puts["calls"] += 1
          host_puts["bytes"] += int(np.asarray(leaf).nbytes)
    return real_device_put(x, *a, **k)

  jax.device_put = counting_device_put
  try:
    trainer = RecsysTrainer(model, data, config, workdir=None, mesh=mesh)
    record = trainer.fit()
    first = trainer.evaluate("valid")
    # Back-to-back evaluations: independent multi-device programs left in flight
    # together deadlocked the CPU collectives (recsys/metrics.py chains its batches).
    repeats = [trainer.evaluate("valid") for _ in range(20)]
    assert all(r == first for r in repeats), "repeated evaluations disagree"
  finally:
    jax.device_put = real_device_put
  out = {"losses": [h["loss"] for h in record["history"]],
         "valid_recall@20": [h["valid_recall@20"] for h in record["history"]],
         "valid": trainer.evaluate("valid"), "params_sum_sq": _sum_of_squares(trainer.params)}
  table = trainer.params["user_embedding"][...]
  out["user_table_shard_rows"] = sorted({s.data.shape[0] for s in table.addressable_shards})
  out["host_device_put_calls"] = host_puts["calls"]
  out["host_device_put_bytes"] = host_puts["bytes"]
  return out


def longtail_job(args, workdir):
  """One epoch of PGD-AT (2 steps with PGD-2) on random 16x16 images, then clean eval."""
  import numpy as np
  from uatmc_jax.core.parallel import mesh as mesh_lib
  from uatmc_jax.longtail import methods as lm
  from uatmc_jax.longtail import trainer as lt
  from uatmc_jax.longtail.data.image_pipeline import TrainPipeline, eval_batches
  from uatmc_jax.longtail.train_config import LongTailTrainConfig

  rng = np.random.default_rng(1)
  counts = np.array([16, 10, 6])
  labels = np.repeat(np.arange(3), counts).astype(np.int32)
  images = rng.integers(0, 200, (labels.size, 16, 16, 3))
  images[..., 0] += 25 * labels[:, None, None]  # a learnable class signal
  images = images.astype(np.uint8)
  pipe = TrainPipeline(images, labels, batch_size=16, seed=0)
  config = LongTailTrainConfig(model="small_cnn", model_kwargs={"widths": (4, 8)},
                               num_epochs=1, batch_size=16, attack_steps=2, seed=0)
  trainer = lt.LongTailTrainer(config, lm.resolve_method("pgd_at"), num_classes=3,
                               class_counts=counts, steps_per_epoch=pipe.steps_per_epoch,
                               mesh=mesh_lib.make_mesh())
  state, info = trainer.fit(pipe, workdir)
  # every class, a padded last batch; PGD steps 0 keeps the test to one eval compile
  idx = np.r_[0:6, 16:22, 26:32]
  blocks = trainer.evaluate(state, eval_batches(images[idx], labels[idx], batch_size=8),
                            pgd_steps=0)
  return {"last_epoch_metrics": info["last_epoch_metrics"], "clean": blocks["clean"],
          "params_sum_sq": _sum_of_squares(state["params"]),
          "batch_stats_sum_sq": _sum_of_squares(state["batch_stats"])}


def _numeric(tree):
  """JSON-ready numbers of a result tree: arrays -> lists, None -> NaN, strings dropped."""
  import numpy as np
  if isinstance(tree, dict):
    return {str(k): v for k, v in ((k, _numeric(v)) for k, v in tree.items()) if v is not None}
  if hasattr(tree, "_asdict"):
    return _numeric(tree._asdict())
  if isinstance(tree, (list, tuple)) and any(isinstance(v, str) for v in tree):
    return None
  if isinstance(tree, (list, tuple)) and any(isinstance(v, dict) or hasattr(v, "_asdict")
                                             for v in tree):
    return [_numeric(v) for v in tree]
  if isinstance(tree, str):
    return None
  if tree is None:
    return float("nan")
  return np.asarray(tree, np.float64).tolist()


def attack_job(args, workdir):
  """The promotion-attack launcher's core (experiments.attack_recsys.run_attacks) on a
  tiny initialised VBPR: aligned PGD on 7 targets (padded to 8) split over the 4 devices
  of a global mesh; per-target hits, ranks, losses, perturbations and mismatch
  diagnostics, the aggregated results, and the launcher's files (process 0 only)."""
  import jax
  import numpy as np
  from flax import nnx
  from uatmc_jax.recsys import attack_eval
  from experiments.configs import attack as attack_config
  from uatmc_jax.recsys.data.interactions import InteractionData
  from uatmc_jax.recsys.models.registry import build_recommender

  rng = np.random.default_rng(2)
  n_users, n_items = 20, 40
  users = np.repeat(np.arange(n_users), 4)
  pairs = np.unique(np.stack([users, rng.integers(0, n_items, users.size)], 1),
                    axis=0).astype(np.int32)
  feats = {"image": rng.standard_normal((n_items, 6)).astype(np.float32),
           "text": rng.standard_normal((n_items, 4)).astype(np.float32)}
  data = InteractionData("tiny", n_users, n_items, pairs, pairs[:4], pairs[:4], feats,
                         user_groups=(np.arange(n_users) % 2).astype(np.int32))
  # VBPR-MLP: the aligned attacker needs a shared projected space (VBPR has none).
  model = build_recommender("vbpr_mlp", data, {"embedding_dim": 8}, nnx.Rngs(0))
  cfg = attack_config.get_config("targets=7,seeds=1,epsilon=1.0,attack=pgd_aligned,"
                                 "k=5,anchor_share=0.5")
  results, runs, runner = attack_eval.run_attacks(cfg, model, data,
                                                  attack_eval.attack_mesh(-1))
  # The launcher's outputs from process 0 only: one folder per process to check it.
  out_dir = f"{workdir}_p{jax.process_index()}"
  os.makedirs(out_dir, exist_ok=True)
  attack_eval.write_outputs(out_dir, results, cfg, data.name, "VBPRMLP")
  per_target = {f"{name}@{eps}": [{k: v for k, v in r.items() if k not in ("seconds",)}
                                  for r in rs] for (eps, name), rs in runs.items()}
  timing = ("targets_per_second", "seconds_per_seed", "total_seconds")
  summary = {n: {k: v for k, v in b.items() if k not in timing}
             for n, b in results.items() if n != "protocol"}
  return {"per_target": _numeric(per_target), "summary": _numeric(summary),
          "local_targets": runner.local_targets,
          "chunk_targets": runner.targets_per_chunk,
          "files_written": sorted(os.listdir(out_dir))}


def eval_job(args, workdir):
  """The robust-evaluation launcher's core on the long-tail job's checkpoint, restored
  replicated on the global mesh, then clean, PGD-2 and APGD-CE (3 iterations; the
  AutoAttack code path) over 12 images in batches of 8 split over the 4 devices, plus
  the geometry (NC1 of the gathered features, margin bound on the adversarial ones)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from uatmc_jax.core.parallel import mesh as mesh_lib
  from uatmc_jax.core.parallel import multihost
  from uatmc_jax.longtail import trained_classifier
  from uatmc_jax.longtail.evaluation import evaluate
  from uatmc_jax.longtail.evaluation import robust_accuracy

  del workdir
  mesh = mesh_lib.make_mesh()
  # The launcher's restore path: the long-tail job's checkpoint, replicated on the mesh.
  trained = trained_classifier.load_trained_classifier(
      os.path.join(args.out, "longtail_ckpt"), mesh=mesh)
  restored_sum_sq = _sum_of_squares(nnx.state(trained.model, nnx.Param))
  # One epoch leaves that net predicting one class (so does a fresh small CNN); the
  # attacks are checked on a random tanh-feature linear classifier (a pure logits_fn /
  # features_fn / W, as evaluate.evaluate_classifier takes) whose arrays are
  # replicated on the mesh: some points right, some flipped by each attack.
  rng = np.random.default_rng(5)
  proj = rng.standard_normal((768, 8)).astype(np.float32) / np.sqrt(768)
  head = rng.standard_normal((3, 8)).astype(np.float32)
  images = rng.uniform(0, 1, (12, 16, 16, 3)).astype(np.float32)
  pred = (np.tanh(images.reshape(12, -1) @ proj * 4) @ head.T).argmax(1)
  labels = np.where(np.arange(12) < 9, pred, (pred + 1) % 3).astype(np.int32)
  proj_d, head_d = multihost.put_replicated((proj, head), mesh)
  features_fn = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ proj_d * 4)
  logits_fn = jax.jit(lambda x: features_fn(x) @ head_d.T)
  weight = head
  config = robust_accuracy.RobustEvalConfig(epsilon=1. / 255., step_size=.5 / 255.,
                                            pgd_steps=2, cw_steps=2, apgd_iterations=3,
                                            batch_size=8)
  evaluator = robust_accuracy.RobustEvaluator(logits_fn, config, mesh=mesh)
  out_dir = os.path.join(args.out, f"eval_p{jax.process_index()}")
  os.makedirs(out_dir, exist_ok=True)
  res = evaluate.evaluate_classifier(
      logits_fn, features_fn, weight, images, labels, np.array([40, 10, 3]),
      ["pgd20", "autoattack_apgd"], config, out_dir=out_dir, log=lambda s: None,
      mesh=mesh, evaluator=evaluator)
  res = {k: ({kk: vv for kk, vv in v.items() if kk != "seconds"} if isinstance(v, dict)
             else v) for k, v in res.items() if k != "settings"}
  return {"results": _numeric(res), "restored_params_sum_sq": restored_sum_sq,
          "local_rows": evaluator.local_rows,
          "files_written": sorted(os.listdir(out_dir))}


JOBS = {"recsys": recsys_job, "longtail": longtail_job, "attack": attack_job,
        "eval": eval_job}


def main(argv=None) -> int:
  args = parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  setup(args)
  os.makedirs(args.out, exist_ok=True)
  for spec in args.jobs.split(","):
    name, _, arg = spec.partition(":")
    job = f"{name}_m{arg}" if arg else name
    t0 = time.perf_counter()
    metrics = JOBS[name](args, os.path.join(args.out, f"{job}_ckpt"),
                         *([int(arg)] if arg else []))
    metrics["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, f"{job}_p{args.process_id}.json"), "w") as f:
      json.dump(metrics, f, indent=1, default=float)
    print(f"driver p{args.process_id}: {job} done in {metrics['seconds']:.1f}s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
