"""AutoAttack throughput on CPU (or whatever JAX platform is present), METHODS.md B.5.

Two numbers, because AutoAttack's cost depends on how robust the model is:

1. Per-stage cost of one *robust* example (no early exit: APGD's 100 iterations,
   FAB-T's 100 iterations, Square's full query budget), from timed jitted batches after
   compilation; the worst-case standard-AutoAttack cost per robust example is
   APGD-CE + 9·APGD-T + 9·FAB-T + Square, and "apgd" is APGD-CE + 9·APGD-T. A
   non-robust example costs only up to the stage that fools it.
2. End-to-end `AutoAttack.run` examples/s (compilation excluded by a warm-up run on
   the same shapes) on the given model, labelled with its own predictions. An untrained
   network predicts almost one class everywhere and ε = 8/255 rarely changes that, so
   most points survive every stage: this is close to the worst case, not the cheap end.

3. ``--end_to_end``: standard AutoAttack on N images, each stage's wall seconds, its
   compilation seconds (JAX's tracing + lowering + XLA compile events during the
   stage), points in / out, batches and rows run (padding included) against the
   (point, target) rows that were real work; compilation included (a fresh AutoAttack
   per configuration), or served from a persistent cache with ``--compile_cache``. On a
   train_longtail checkpoint (``--workdir``, its test set, ``--per_class`` images per
   class) or the built-in untrained model on random images. ``--min_bucket_rows 128,16``
   runs one configuration per value in one process (128 = every batch padded to the
   full 128 rows; 16 = the default buckets 16/32/64/128; Square's last batch runs at its
   exact size unless the value is >= the batch). A repeated value with
   ``--compile_cache`` and an empty cache directory (``16,16``) gives a cold run, then a
   run from the warm persistent cache, in one process. ``--official PATH`` also runs
   the authors' PyTorch AutoAttack (a checkout of fra31/auto-attack, not part of this
   project; needs torch) on a PyTorch copy of the same small CNN with the same weights
   and reports its per-stage seconds and whether robust sets and fooling stages agree.
   Pin threads for a fair comparison, e.g. ``taskset -c 0`` with ``--threads 1``.

  python benchmarks/bench_autoattack.py                          # small CNN, batch 32
  python benchmarks/bench_autoattack.py --model resnet18 --batch 8 --square_queries 500
  taskset -c 0 python benchmarks/bench_autoattack.py --end_to_end --threads 1 \
      --workdir runs/lt_pgd_at --per_class 20 --batch 128 --min_bucket_rows 16,16 \
      --compile_cache runs/aa_cache --official ../auto-attack
"""
import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--threads" in sys.argv and sys.argv[sys.argv.index("--threads") + 1] == "1":
  # One compute thread for XLA (must be set before JAX starts).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false"
                             " intra_op_parallelism_threads=1").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from uatmc_jax.core.parallel import throughput
from uatmc_jax.longtail.attacks import apgd, attack_losses, autoattack, fab, square  # noqa: E402
from uatmc_jax.longtail.models import image_classifiers as ic  # noqa: E402


def _time(fn, *args, repeats=1):
  jax.block_until_ready(fn(*args))  # compile + warm
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_log = []  # (end time, seconds) of every tracing / lowering / compile event


def _on_event(event, duration, **_):
  if event in _COMPILE_EVENTS:
    _compile_log.append((time.perf_counter(), float(duration)))


def _timed_autoattack(logits_fn, images, labels, config):
  """One fresh AutoAttack run (compilation included): the result and per-stage rows
  (stage, seconds, CPU seconds of this process, compile seconds, points in, points
  out, batches, rows, real rows). CPU seconds are the fairer measure on a shared
  machine when compute is single-threaded (``--threads 1``)."""
  from uatmc_jax.longtail.attacks import autoattack
  marks = []
  aa = autoattack.AutoAttack(logits_fn, config)
  start, cpu_start = time.perf_counter(), time.process_time()
  n_events = len(_compile_log)

  def log(line):
    if line.startswith("autoattack ") and "ETA" not in line:
      # clean line, then one summary per stage
      marks.append((time.perf_counter(), time.process_time()))
  res = aa.run(images, labels, log=log)
  total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
  events = _compile_log[n_events:]
  bounds = [(start, cpu_start)] + marks
  names = ["clean"] + list(res.seconds)
  rows = []
  for i, name in enumerate(names[:len(bounds) - 1]):
    (lo, cpu_lo), (hi, cpu_hi) = bounds[i], bounds[i + 1]
    compile_s = sum(d for t, d in events if lo < t <= hi)
    st = (res.stage_stats or {}).get(name, {})
    rows.append((name, hi - lo, cpu_hi - cpu_lo, compile_s,
                 st.get("points_in", len(labels)), res.robust_after.get(name),
                 st.get("batches", ""), st.get("rows", ""), st.get("pair_rows", "")))
  return res, rows, (total, cpu_total), dict(aa.trace_counts)


def _torch_small_cnn(model):
  """A PyTorch copy of a SmallCNN (conv3x3 no bias - BN - ReLU - maxpool2, global
  average pool, linear) with its weights, in eval mode; inputs NCHW in [0, 1]."""
  import torch
  from torch import nn
  from uatmc_jax.longtail.models import image_classifiers as ic
  if model.input_mean is not None or model.head != "linear":
    raise SystemExit("--official supports the small CNN without input standardisation "
                     "and with a linear head")
  layers = []
  for conv, bn in zip(model.convs, model.bns):
    k = np.asarray(conv.kernel[...])                       # (kh, kw, in, out)
    c = nn.Conv2d(k.shape[2], k.shape[3], 3, padding=1, bias=False)
    c.weight.data = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))
    b = nn.BatchNorm2d(k.shape[3], eps=ic.BN_EPSILON)
    b.weight.data = torch.from_numpy(np.asarray(bn.scale[...]).copy())
    b.bias.data = torch.from_numpy(np.asarray(bn.bias[...]).copy())
    b.running_mean.data = torch.from_numpy(np.asarray(bn.mean[...]).copy())
    b.running_var.data = torch.from_numpy(np.asarray(bn.var[...]).copy())
    layers += [c, b, nn.ReLU(), nn.MaxPool2d(2)]
  w = np.asarray(model.classifier.kernel[...])
  lin = nn.Linear(w.shape[0], w.shape[1])
  lin.weight.data = torch.from_numpy(np.ascontiguousarray(w.T))
  lin.bias.data = torch.from_numpy(np.asarray(model.classifier.bias[...]).copy())
  return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin).eval()


def _official_autoattack(path, net, images, labels, eps, batch, seed):
  """The authors' standard AutoAttack from a checkout at ``path``; per image the stage
  that fooled it (recorded by wrapping each attack's perturb) and per-stage seconds."""
  import torch
  sys.path.insert(0, os.path.abspath(path))
  from autoattack import AutoAttack as OfficialAutoAttack  # pylint: disable=import-error
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  y = torch.from_numpy(labels.astype(np.int64))
  adversary = OfficialAutoAttack(net, norm="Linf", eps=eps, version="standard",
                                 device="cpu", seed=seed, verbose=False)
  with torch.no_grad():
    clean = (net(x).argmax(1) == y).numpy()
  fooled_by = np.where(clean, "", "clean").astype(object)
  mirror = {"robust": clean.copy(), "stage": None, "queue": None, "ptr": 0}
  seconds, cpu, counts = {}, {}, {}

  def wrap(stage, attack):
    original = attack.perturb

    def perturb(xb, yb, *a, **k):
      if mirror["stage"] != stage:
        mirror.update(stage=stage, queue=np.flatnonzero(mirror["robust"]), ptr=0)
        counts[stage] = [len(mirror["queue"]), 0]
      t0, c0 = time.perf_counter(), time.process_time()
      adv = original(xb, yb, *a, **k)
      with torch.no_grad():
        pred = net(adv).argmax(1).numpy()
      seconds[stage] = seconds.get(stage, 0.) + time.perf_counter() - t0
      cpu[stage] = cpu.get(stage, 0.) + time.process_time() - c0
      idx = mirror["queue"][mirror["ptr"]:mirror["ptr"] + len(xb)]
      mirror["ptr"] += len(xb)
      hit = idx[pred != yb.numpy()]
      mirror["robust"][hit] = False
      fooled_by[hit] = stage
      counts[stage][1] = int(mirror["robust"].sum())
      return adv
    attack.perturb = perturb

  wrap("apgd-ce", adversary.apgd)
  wrap("apgd-t", adversary.apgd_targeted)
  wrap("fab-t", adversary.fab)
  wrap("square", adversary.square)
  start, cpu_start = time.perf_counter(), time.process_time()
  x_adv = adversary.run_standard_evaluation(x, y, bs=batch)
  total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
  with torch.no_grad():
    robust = (net(x_adv).argmax(1) == y).numpy() & clean
  return robust, fooled_by.astype(str), seconds, cpu, counts, (total, cpu_total)


def end_to_end(args):
  import jax.monitoring
  jax.monitoring.register_event_duration_secs_listener(_on_event)
  eps = 8. / 255.
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if args.workdir:
    from uatmc_jax.core import reporting
    from uatmc_jax.longtail import trained_classifier
    from uatmc_jax.longtail.evaluation import evaluate
    trained = trained_classifier.load_trained_classifier(args.workdir)
    run = reporting.read_json(os.path.join(args.workdir, "results.json"))
    images, labels, _ = evaluate.load_test_set(run, args.per_class)
    images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
    logits_fn, model = trained.logits_fn, trained.model
    what = f"{args.workdir} ({run.get('method')}), {len(labels)} test images"
  else:
    model = ic.build_classifier(args.model, args.num_classes, nnx.Rngs(0))
    graphdef, params, stats = ic.split_classifier(model)
    logits_fn = jax.jit(lambda x: ic.apply_logits(graphdef, params, stats, x, train=False)[0])
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(args.n, 32, 32, 3)).astype(np.float32)
    labels = np.asarray(jnp.argmax(logits_fn(images), -1)).astype(np.int32)
    what = f"untrained {args.model}, {args.n} random images labelled by the model"
  print(f"end-to-end standard AutoAttack: {what}; eps 8/255, batch {args.batch}, "
        f"threads {args.threads or 'default'}, compile cache "
        f"{args.compile_cache or 'off'}; load average {os.getloadavg()[0]:.2f}", flush=True)
  results, totals = {}, {}
  for i, min_rows in enumerate(args.min_bucket_rows):
    config = autoattack.AutoAttackConfig(
        epsilon=eps, batch_size=args.batch, min_bucket_rows=min_rows,
        apgd_iterations=args.apgd_iterations, square_queries=args.square_queries,
        seed=args.seed)
    res, rows, total, traces = _timed_autoattack(logits_fn, images, labels, config)
    label = f"project, min_bucket_rows={min_rows}"
    if min_rows in args.min_bucket_rows[:i]:  # a repeat: its programs are in the cache
      label += (f" (repeat {args.min_bucket_rows[:i + 1].count(min_rows)}"
                + (", warm persistent cache)" if args.compile_cache else ")"))
    results[label], totals[label] = res, total
    print(f"\n{label} (buckets {autoattack.batching.bucket_sizes(args.batch, min_rows)}): "
          f"{total[0]:.1f} s total ({total[1]:.1f} CPU s), robust "
          f"{int(res.robust.sum())}/{len(labels)}, traces {traces}; load average "
          f"{os.getloadavg()[0]:.2f}")
    print("| stage | seconds | CPU seconds | of which compile | points in | points out | "
          "batches | rows run | real rows |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, sec, cpu_s, comp, p_in, p_out, batches, n_rows, real in rows:
      print(f"| {name} | {sec:.1f} | {cpu_s:.1f} | {comp:.1f} | {p_in} | {p_out} | "
            f"{batches} | {n_rows} | {real} |")
  if args.official:
    import torch
    if args.threads:
      torch.set_num_threads(args.threads)
    net = _torch_small_cnn(model)
    with torch.no_grad():
      t_logits = net(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    diff = float(np.abs(t_logits.numpy() - np.asarray(logits_fn(images))).max())
    robust, fooled_by, seconds, cpu, counts, total = _official_autoattack(
        args.official, net, images, labels, eps, args.batch, args.seed)
    print(f"\nofficial PyTorch AutoAttack (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; max |logit difference| to JAX {diff:.1e}): "
          f"{total[0]:.1f} s total ({total[1]:.1f} CPU s), robust "
          f"{int(robust.sum())}/{len(labels)}; load average {os.getloadavg()[0]:.2f}")
    print("| stage | seconds | CPU seconds | points in | points out |")
    print("|---|---|---|---|---|")
    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
      if name in seconds:
        print(f"| {name} | {seconds[name]:.1f} | {cpu[name]:.1f} | {counts[name][0]} | "
              f"{counts[name][1]} |")
    for label, res in results.items():
      same = np.array_equal(res.robust, robust)
      stage_same = np.array_equal(res.fooled_by, fooled_by)
      print(f"{label} vs official: robust sets {'agree' if same else 'DIFFER'} "
            f"({int((res.robust != robust).sum())} points differ), fooling stage per image "
            f"{'agrees' if stage_same else 'differs'} "
            f"({int((res.fooled_by != fooled_by).sum())} points); time ratio "
            f"{totals[label][0] / total[0]:.2f}x the official (CPU time "
            f"{totals[label][1] / total[1]:.2f}x)")
  labels_ = list(results)
  for a, b in zip(labels_, labels_[1:]):
    print(f"{b} vs {a}: robust sets {'agree' if np.array_equal(results[a].robust, results[b].robust) else 'DIFFER'}, "
          f"fooling stages {'agree' if np.array_equal(results[a].fooled_by, results[b].fooled_by) else 'differ'}; "
          f"time ratio {totals[b][0] / totals[a][0]:.2f} (CPU time "
          f"{totals[b][1] / totals[a][1]:.2f})")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="small_cnn")
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--n", type=int, default=64, help="examples for the end-to-end run")
  p.add_argument("--apgd_iterations", type=int, default=100)
  p.add_argument("--square_queries", type=int, default=5000)
  p.add_argument("--skip_end_to_end", action="store_true")
  p.add_argument("--end_to_end", action="store_true",
                 help="only the per-stage end-to-end report (item 3 of the module doc)")
  p.add_argument("--workdir", default=None, help="a train_longtail workdir to attack")
  p.add_argument("--per_class", type=int, default=20, help="test images per class")
  p.add_argument("--min_bucket_rows", default="16",
                 help="comma-separated AutoAttackConfig.min_bucket_rows values to run")
  p.add_argument("--official", default=None,
                 help="path of a fra31/auto-attack checkout to run as the baseline")
  p.add_argument("--threads", type=int, default=None,
                 help="1: one XLA compute thread and torch.set_num_threads(1)")
  p.add_argument("--compile_cache", default=None, help="persistent JAX compilation cache dir")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  args.min_bucket_rows = [int(v) for v in args.min_bucket_rows.split(",")]
  if args.end_to_end:
    end_to_end(args)
    return

  model = ic.build_classifier(args.model, args.num_classes, nnx.Rngs(0))
  graphdef, params, stats = ic.split_classifier(model)
  logits_fn = lambda x: ic.apply_logits(graphdef, params, stats, x, train=False)[0]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(args.batch, 32, 32, 3)), jnp.float32)
  # Labels no attack can reach ("class −1" is never predicted) would break the losses;
  # instead time with early exits disabled on the model's own predictions.
  y = jnp.argmax(logits_fn(x), -1)
  eps = 8. / 255.
  key = jax.random.PRNGKey(0)
  b = args.batch
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), "
        f"model {args.model}, batch {b}")

  apgd_ce = jax.jit(lambda x, y: apgd.apgd_attack(
      logits_fn, x, y, epsilon=eps, key=key, num_iterations=args.apgd_iterations,
      early_stop=False).robust)
  apgd_t = jax.jit(lambda x, y: apgd.apgd_targeted_attack(
      logits_fn, x, y, epsilon=eps, target_rank=2, key=key,
      num_iterations=args.apgd_iterations, early_stop=False).robust)
  fab_t = jax.jit(lambda x, y: fab.fab_targeted_attack(logits_fn, x, y, target_rank=2).distance)
  sq = jax.jit(lambda x, y: square.square_attack(
      logits_fn, x, y, epsilon=eps, key=key, num_queries=args.square_queries,
      early_stop=False).robust)
  # Model FLOPs per stage (XLA counts a loop body once, so count per iteration):
  # F = one forward of the batch; an attack iteration with an input gradient is ~3F,
  # FAB's iteration needs the logits and the Jacobian rows of 2 classes (~5F), a Square
  # query is one forward.
  forward = throughput.flops_of(jax.jit(logits_fn), x) or 0.0
  peak = throughput.peak_flops(jax.devices()[0], "float32")
  stage_flops = {"apgd-ce": 3 * forward * args.apgd_iterations,
                 "apgd-t (1 target)": 3 * forward * args.apgd_iterations,
                 "fab-t (1 target)": 5 * forward * 100,
                 f"square ({args.square_queries} q)": forward * args.square_queries}
  per_example = {}
  for name, fn in (("apgd-ce", apgd_ce), ("apgd-t (1 target)", apgd_t),
                   ("fab-t (1 target)", fab_t), (f"square ({args.square_queries} q)", sq)):
    t = _time(fn, x, y)
    per_example[name] = t / b
    util = throughput.mfu(stage_flops[name], t, peak)
    print(f"  {name:24s} {t:8.2f} s/batch  {b / t:8.2f} examples/s  "
          f"{stage_flops[name] / t / 1e9:7.2f} model GFLOP/s  MFU "
          + (f"{100 * util:.2f}%" if util is not None else
             f"n/a (set {throughput.CPU_PEAK_ENV})"))
  square_full = per_example[f"square ({args.square_queries} q)"] * 5000 / args.square_queries
  apgd_scale = 100 / args.apgd_iterations
  worst_apgd = apgd_scale * (per_example["apgd-ce"] + 9 * per_example["apgd-t (1 target)"])
  worst_std = worst_apgd + 9 * per_example["fab-t (1 target)"] + square_full
  print(f"worst case per robust example (reference budgets): "
        f"apgd suite {worst_apgd:.2f} s ({1 / worst_apgd:.3f} ex/s), "
        f"standard {worst_std:.2f} s ({1 / worst_std:.3f} ex/s)")

  if not args.skip_end_to_end:
    images = rng.uniform(size=(args.n, 32, 32, 3)).astype(np.float32)
    labels = np.asarray(jax.jit(lambda z: jnp.argmax(logits_fn(z), -1))(images))
    aa = autoattack.AutoAttack(jax.jit(logits_fn), autoattack.AutoAttackConfig(
        epsilon=eps, batch_size=b, apgd_iterations=args.apgd_iterations,
        square_queries=args.square_queries))
    aa.run(images[:b], labels[:b])  # compile every stage on the batch shape
    start = time.perf_counter()
    res = aa.run(images, labels)
    t = time.perf_counter() - start
    print(f"end-to-end standard AutoAttack on the untrained model: {args.n / t:.2f} "
          f"examples/s ({t:.1f} s, robust {res.robust.sum()}/{args.n}, stage counts "
          f"{res.robust_after})")


if __name__ == "__main__":
  main()
