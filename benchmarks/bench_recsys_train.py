"""Training and evaluation speed of the recommenders (METHODS.md A.3 protocol).

Prints, per model and setting, the steady-state seconds of one training epoch (BPR,
batch 2048, Adam; the first epoch, which compiles, is reported separately) and the
full-ranking evaluation throughput in users/s (all items scored, train items masked,
top-50, every metric). Settings:

* tiktok: ../shared/data/tiktok (9,308 users x 6,710 items, 59,541 train, 128-d
  image/audio);
* baby: ../shared/data/baby interactions (19,445 x 7,050, 118,551 train) with random
  4096-d image and 384-d text features (the real MMRec widths).

Model ``mmgcn_segment`` is MMGCN with its earlier segment-sum forward (per-modality
``segment_sum`` message passing Â (x W_conv) over all nodes, the loss taking its batch rows
from the full encode), the in-run baseline for the CSR / batch-rows forward of ``mmgcn``:
same parameters, same function (tests/test_graph_propagation.py), same run conditions.
Model ``mmgcn_onetable`` is MMGCN with its one-table CSR forward (``MMGCN._forward``: users
and items in one array, modalities side by side, one ``symmetric_propagate`` per layer),
the in-run baseline for the two-table ``split_forward`` of ``mmgcn``
(tests/test_mmgcn_train_speed.py checks they agree).
MMRec's MMGCN takes 13.6 s per TikTok epoch on this CPU (docs/results/performance.md).

Reference: a straightforward PyTorch VBPR-MLP with the same protocol on this 2-core CPU
takes 4.7 s per TikTok epoch; the goal is at least 2x faster (<= 2.35 s). On a shared
machine the wall time depends on the load; the process CPU seconds of an epoch (all
threads) are printed too: on an idle machine with P cores the wall time is at least
CPU s / P.

  python benchmarks/bench_recsys_train.py                       # all models, both settings
  python benchmarks/bench_recsys_train.py --models vbpr_mlp --settings tiktok --epochs 3
  python benchmarks/bench_recsys_train.py --models mmgcn,mmgcn_onetable --settings tiktok \
      --epochs 6 --alternate       # before/after ratio under a changing load
  python benchmarks/bench_recsys_train.py --models mmgcn --settings tiktok --epochs 20 \
      --eval_repeats 1 --ceiling_rounds 4   # the MMGCN epoch against its isolated floor

MFU: FLOPs of one training step and of one evaluation batch from XLA's cost analysis
(``uatmc_jax.core.parallel.throughput``; a scan body is counted once, so the epoch's FLOPs
are one step's times the number of steps), over the chip's peak: the table in
``throughput.PEAK_FLOPS`` on GPU/TPU, ``--peak_gflops`` (or ``UATMC_CPU_PEAK_FLOPS``) on
CPU, default 256 GFLOP/s = 2 cores x 2.0 GHz x 2 AVX-512 FMA units x 16 fp32 lanes x 2.

Measured ceiling (``--ceiling``, default on for the ``mmgcn`` models): a nominal peak
says little about a program made of (n_nodes x 64) @ (64 x 64) products, so the run also
times the epoch's *own* matrix products. The traced training step (the same jitted epoch,
one step) is walked for every ``dot_general`` (forward products and the backward's
transposed ones, with their exact shapes and contraction dimensions) and every sparse
product Â X (``graph_propagation.symmetric_propagate`` / ``bipartite_propagate``); each
distinct one is run alone as
its own jitted op (random float32 operands, best of ``--ceiling_reps``), and

  ceiling GFLOP/s  = dense-product FLOPs of a step / their summed isolated time
  floor s / epoch  = epoch FLOPs (XLA cost analysis, above) / ceiling
  fraction         = floor / measured epoch seconds

The sparse products' isolated time is printed as well (a step's Â X products alone, x the
steps of an epoch): a second lower bound that no rearrangement of the dense work removes.
So is the optimiser's update alone (Adam over the model's own parameters and optimiser
state, random gradients, jitted, best of ``--ceiling_reps``): the products and the update,
each at its isolated best, are the *isolated floor* of an epoch, the time its unavoidable
ops take with nothing else (no elementwise work, gathers or concatenations) and no
overlap between them; the per-call dispatch time of a jitted op is printed beside it (the
isolated timings include it once per call). The ceiling is taken in the same process,
under the same load, as the epoch it is compared with; ``--ceiling_rounds R`` takes it R
times, each right after its share of the timed epochs, reports the best round's ceiling
and each round's median epoch over its own isolated floor (a ratio that a machine whose
speed drifts during the run leaves comparable). The epochs' spread (min / median / max of
the timed epochs) is printed too: on a shared virtual machine one epoch's time can move by
15-30 % from the next.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from uatmc_jax.core.parallel import throughput  # noqa: E402
from uatmc_jax.core.parallel.mesh import make_mesh  # noqa: E402
from uatmc_jax.recsys import metrics as ranking_metrics  # noqa: E402
from uatmc_jax.recsys import trainer as recsys_trainer  # noqa: E402
from uatmc_jax.recsys.data.mmrec import load_mmrec  # noqa: E402
from uatmc_jax.recsys.models import base as base  # noqa: E402
from uatmc_jax.recsys.models import graph_propagation  # noqa: E402
from uatmc_jax.recsys.models.mmgcn import MMGCN, NodeForwardEncoder  # noqa: E402
from uatmc_jax.recsys.models.registry import build_recommender  # noqa: E402
from uatmc_jax.recsys.trainer import RecsysTrainer  # noqa: E402

REFERENCE_TIKTOK_EPOCH_SECONDS = 4.7
MMREC_MMGCN_TIKTOK_EPOCH_SECONDS = 13.6  # METHODS.md A.3, MMRec on this 2-core CPU
MMGCN_TIKTOK_EPOCH_GOAL_SECONDS = 1.75  # docs/results/performance.md, "Recommender training"
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


class OneTableMMGCN(MMGCN):
  """MMGCN with its one-table forward (``MMGCN._forward``: users and items in one (N, ·)
  array, the modalities side by side, one ``symmetric_propagate`` per layer), the in-run
  baseline for the two-table ``split_forward`` that ``mmgcn`` trains with."""

  encode = NodeForwardEncoder.encode
  encode_rows = NodeForwardEncoder.encode_rows


class SegmentSumMMGCN(MMGCN):
  """MMGCN with its earlier segment-sum forward (the benchmark's baseline; same parameters)."""

  encode = NodeForwardEncoder.encode
  encode_rows = NodeForwardEncoder.encode_rows

  def _forward(self, projected_all, rows=None):
    base.check_features(projected_all, self.modalities, self.n_items)
    ids = self.id_embedding[...]
    n_nodes = self.n_users + self.n_items
    edges = (self.edge_dst[...], self.edge_src[...], self.edge_weight[...])
    out = [ids]
    for m in self.modalities:
      x = base.l2_normalize(jnp.concatenate([self.preferences[m][...], projected_all[m]], 0))
      for layer in self.branches[m]:
        x = layer(x, ids, *edges, n_nodes)
      out.append(x)
    nodes = jnp.concatenate(out, axis=-1)
    return nodes if rows is None else jnp.take(nodes, rows, axis=0)


def build_model(name: str, data):
  baselines = {"mmgcn_segment": SegmentSumMMGCN, "mmgcn_onetable": OneTableMMGCN}
  if name in baselines:
    dims = {m: int(f.shape[1]) for m, f in data.features.items()}
    return baselines[name](data.n_users, data.n_items, dims, data.train, rngs=nnx.Rngs(0))
  return build_recommender(name, data, {}, nnx.Rngs(0))


def load_setting(name: str):
  if name == "tiktok":
    return load_mmrec(os.path.join(DATA, "tiktok"))
  if name == "baby":
    return load_mmrec(os.path.join(DATA, "baby"), random_features={"image": 4096, "text": 384})
  raise SystemExit(f"unknown setting {name!r} (tiktok, baby)")


def _sub_jaxprs(params):
  for v in params.values():
    for item in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def step_products(jaxpr, times: int = 1, dense=None, sparse=None):
  """The matrix products of a traced step: ({dense key: count}, {sparse key: count}).

  A dense key is (lhs shape, rhs shape, dimension_numbers, dtype) of a ``dot_general``;
  a sparse key (kind, x shape(s), number of edges, dtype) of a ``symmetric_propagate`` or a
  ``bipartite_propagate``. Sub-jaxprs
  (jit, custom_vjp, cond, scan, while) are walked; a scan body counts ``length`` times, a
  while body once.
  """
  dense = collections.Counter() if dense is None else dense
  sparse = collections.Counter() if sparse is None else sparse
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = (v.aval for v in eqn.invars[:2])
      dense[(tuple(lhs.shape), tuple(rhs.shape), eqn.params["dimension_numbers"],
             str(lhs.dtype))] += times
    elif name == "symmetric_propagate":
      weight, x = eqn.invars[0].aval, eqn.invars[-1].aval
      sparse[("symmetric", tuple(x.shape), int(weight.shape[0]), str(x.dtype))] += times
    elif name == "bipartite_propagate":
      w_u, w_i, x_u, x_i = (eqn.invars[k].aval for k in (0, 4, 8, 9))
      sparse[("bipartite", (tuple(x_u.shape), tuple(x_i.shape)),
              int(w_u.shape[0]) + int(w_i.shape[0]), str(x_u.dtype))] += times
    n = int(eqn.params.get("length", 1)) if name == "scan" else 1
    for sub in _sub_jaxprs(eqn.params):
      step_products(sub, times * n, dense, sparse)
  return dense, sparse


def dot_flops(key) -> float:
  """2 x batch x lhs-free x rhs-free x contracted sizes of a ``step_products`` dense key."""
  lhs, rhs, ((lc, rc), (lb, rb)), _ = key
  contract = np.prod([lhs[d] for d in lc])
  batch = np.prod([lhs[d] for d in lb])
  lhs_free = np.prod([n for d, n in enumerate(lhs) if d not in lc and d not in lb])
  rhs_free = np.prod([n for d, n in enumerate(rhs) if d not in rc and d not in rb])
  return float(2 * batch * lhs_free * rhs_free * contract)


def _best_seconds(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


@functools.partial(jax.jit, static_argnums=0)
def _optimizer_update(tx, grads, opt_state, params):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def optimizer_seconds(trainer, reps: int = 5) -> float:
  """Seconds of one optimiser update alone (``trainer.tx`` on the trainer's own parameters
  and state, random gradients; update and apply, jitted once per optimiser, best of
  ``reps``)."""
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype),
                       trainer.params)
  return _best_seconds(functools.partial(_optimizer_update, trainer.tx),
                       (grads, trainer.opt_state, trainer.params), reps)


def call_overhead_seconds(reps: int = 50) -> float:
  """Dispatch time of a jitted call that does almost nothing (best of ``reps``)."""
  a = jnp.ones((1024, 64), jnp.float32)
  return _best_seconds(jax.jit(lambda a, b: a[0, 0] + b[0, 0]), (a, a), reps)


def measured_ceiling(dense, sparse, model, reps: int = 5) -> dict:
  """Times each distinct product of a step alone (jitted, random operands, best of
  ``reps``); returns the dense FLOPs and seconds of a step and the sparse seconds (the
  sparse products on ``model``'s own graph)."""
  rng = np.random.default_rng(0)
  dense_flops = dense_s = 0.0
  for key, count in dense.items():
    lhs, rhs, dims, dtype = key
    a = jnp.asarray(rng.standard_normal(lhs), dtype)
    b = jnp.asarray(rng.standard_normal(rhs), dtype)
    fn = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
    dense_s += count * _best_seconds(fn, (a, b), reps)
    dense_flops += count * dot_flops(key)
  sparse_flops = sparse_s = 0.0
  for (kind, shape, n_edges, dtype), count in sparse.items():
    if not hasattr(model, "edge_dst") or model.edge_dst.shape[0] != n_edges:
      continue
    if kind == "symmetric":
      dst, src, weight = model.edge_dst[...], model.edge_src[...], model.edge_weight[...]
      args = (jnp.asarray(rng.standard_normal(shape), dtype),)
      fn = jax.jit(lambda x: graph_propagation.symmetric_propagate(x, dst, src, weight))
      columns = int(np.prod(shape[1:]))
    else:
      graph = model.bipartite()
      args = tuple(jnp.asarray(rng.standard_normal(sh), dtype) for sh in shape)
      fn = jax.jit(lambda xu, xi: graph_propagation.bipartite_propagate(xu, xi, graph))
      columns = int(np.prod(shape[0][1:]))
    sparse_s += count * _best_seconds(fn, args, reps)
    sparse_flops += count * 2.0 * n_edges * columns
  return {"dense_flops": dense_flops, "dense_s": dense_s, "n_dense": sum(dense.values()),
          "sparse_flops": sparse_flops, "sparse_s": sparse_s, "n_sparse": sum(sparse.values())}


class _Run:
  """One model's benchmark: a trainer, its first (compiling) epoch, then timed epochs."""

  def __init__(self, model_name: str, data, max_batches: int = 0):
    full_batches = -(-len(data.train) // 2048)
    self.scale = 1.0
    train_data = data
    if max_batches and max_batches < full_batches:
      rows = np.random.default_rng(0).permutation(len(data.train))[:max_batches * 2048]
      train_data = dataclasses.replace(data, train=data.train[np.sort(rows)])
      self.scale = full_batches / max_batches
    self.trainer = RecsysTrainer(build_model(model_name, train_data), train_data,
                                 {"log": False}, mesh=make_mesh())
    t0 = time.perf_counter()
    self.trainer.train_epoch(0)
    self.first = time.perf_counter() - t0
    self.times, self.cpu_times = [], []

  def timed_epoch(self, epoch: int) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    self.trainer.train_epoch(epoch)
    self.times.append((time.perf_counter() - t0) * self.scale)
    self.cpu_times.append((time.process_time() - c0) * self.scale)


def _isolated(trainer, dense, sparse, reps: int) -> dict:
  """One measurement of the step's products and optimiser update, each alone."""
  c = measured_ceiling(dense, sparse, trainer.model, reps)
  c["optimizer_s"] = optimizer_seconds(trainer, reps)
  return c


def bench(model_name: str, data, epochs: int, eval_repeats: int, max_batches: int = 0,
          ceiling: bool = False, ceiling_reps: int = 5, run: _Run | None = None,
          ceiling_rounds: int = 1) -> dict:
  """Epoch seconds (first = with compile; then min/median of ``epochs``) and eval users/s.

  With ``max_batches`` > 0 the timed epoch uses only that many batches of the (shuffled)
  train set and the reported epoch seconds are scaled by full_batches / max_batches.
  ``run``: a :class:`_Run` whose timed epochs were already taken (``--alternate``).
  With ``ceiling``, the step's products and optimiser update are timed alone after every
  ``epochs / ceiling_rounds`` timed epochs (a fresh ``run`` only), so each round's epochs
  are compared with an isolated floor measured right after them.
  """
  fresh = run is None
  if fresh:
    run = _Run(model_name, data, max_batches)
  trainer, scale, first = run.trainer, run.scale, run.first
  # FLOPs (per device): one step (a 1-step epoch) x steps; one eval batch x batches.
  batches = trainer._device_epoch(0)
  n_steps = int(batches["users"].shape[0])
  # One trace of a 1-step epoch: its jaxpr lists the step's products, its compiled
  # program's cost analysis gives the step's FLOPs (throughput.flops_of's number).
  traced = recsys_trainer._run_epoch.trace(
      *trainer._static, trainer.params, trainer.opt_state, trainer.rest, trainer.features,
      jax.tree.map(lambda x: x[:1], batches), jax.random.key(0))
  cost = traced.lower().compile().cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else dict(cost or {})
  step_flops = float(cost["flops"]) if cost.get("flops", -1) >= 0 else None
  if ceiling:
    dense, sparse = step_products(traced.jaxpr.jaxpr)
  rounds = []  # (that round's epoch seconds, its isolated measurement)
  if fresh:
    n_rounds = max(1, min(ceiling_rounds, epochs)) if ceiling else 1
    bounds = np.linspace(0, epochs, n_rounds + 1).round().astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      for e in range(lo + 1, hi + 1):
        run.timed_epoch(e)
      if ceiling:
        rounds.append((run.times[lo:hi], _isolated(trainer, dense, sparse, ceiling_reps)))
  elif ceiling:
    rounds.append((run.times, _isolated(trainer, dense, sparse, ceiling_reps)))
  times, cpu_times = run.times, run.cpu_times
  ceil = None
  if ceiling:
    # Each isolated time at its best over the rounds (the machine at its fastest, as the
    # epochs' min is).
    ceil = dict(rounds[0][1])
    for key in ("dense_s", "sparse_s", "optimizer_s"):
      ceil[key] = min(c[key] for _, c in rounds)
    ceil["steps"] = n_steps * scale
    ceil["call_s"] = call_overhead_seconds()
    ceil["rounds"] = [
        (float(np.median(ts)),
         (c["dense_s"] + c["sparse_s"] + c["optimizer_s"]) * n_steps * scale)
        for ts, c in rounds]
  trainer.evaluate("test")  # compile
  ev = trainer.evaluators["test"]
  t0 = time.perf_counter()
  for _ in range(eval_repeats):
    jax.block_until_ready(trainer.evaluate("test"))
  eval_s = (time.perf_counter() - t0) / eval_repeats
  users, items = trainer.vectors()
  eval_flops = throughput.flops_of(ranking_metrics._add_user_batch_sums,
                                   ranking_metrics.zero_totals(ev.ks), users, items,
                                   ev._batches[0], ev.ks)
  return {"epoch_flops": step_flops and step_flops * n_steps * scale,
          "eval_flops": eval_flops and eval_flops * len(ev._batches),
          "epoch_cpu_s": min(cpu_times), "first_epoch_s": first, "epoch_s": min(times),
          "epoch_s_median": sorted(times)[len(times) // 2], "epoch_s_max": max(times),
          "n_epochs": len(times),
          "eval_users_per_s": ev.n_users / eval_s, "eval_s": eval_s, "eval_users": ev.n_users,
          "ceiling": ceil}


def ceiling_lines(name: str, r: dict) -> list[str]:
  """The measured-ceiling report of one benchmark row (see the module notes)."""
  c, epoch_flops = r["ceiling"], r["epoch_flops"]
  if not c or not c["dense_s"] or not epoch_flops:
    return [f"  ({name}: no measured ceiling: no dense products or no FLOP count)"]
  gflops = c["dense_flops"] / c["dense_s"] / 1e9
  floor = epoch_flops / (gflops * 1e9)
  lines = [
      f"  ({name}: epoch {epoch_flops / 1e9:,.1f} GFLOP = XLA cost analysis of the compiled "
      f"train step x {c['steps']:g} steps; its {c['n_dense']} dense products per step "
      f"({c['dense_flops'] / 1e9:.2f} GFLOP, "
      f"{100 * c['dense_flops'] * c['steps'] / epoch_flops:.0f}% of the epoch's FLOPs) timed "
      f"alone: measured ceiling {gflops:,.1f} GFLOP/s; floor {floor:.3f} s/epoch; "
      f"epoch {r['epoch_s']:.3f} s = {100 * floor / r['epoch_s']:.1f}% of the ceiling, "
      f"{epoch_flops / r['epoch_s'] / 1e9:,.1f} GFLOP/s)"]
  if c["n_sparse"]:
    lines.append(
        f"  ({name}: its {c['n_sparse']} sparse products Â X per step timed alone: "
        f"{c['sparse_s'] * c['steps']:.3f} s/epoch, "
        f"{c['sparse_flops'] / c['sparse_s'] / 1e9:.1f} GFLOP/s; dense + sparse products "
        f"alone: {(c['dense_s'] + c['sparse_s']) * c['steps']:.3f} s/epoch)")
  if "optimizer_s" in c:
    isolated = (c["dense_s"] + c["sparse_s"] + c["optimizer_s"]) * c["steps"]
    lines.append(
        f"  ({name}: the optimiser update alone {c['optimizer_s'] * c['steps']:.3f} s/epoch; "
        f"isolated floor (products + update, each alone) {isolated:.3f} s/epoch, of which "
        f"call dispatch {(c['n_dense'] + c['n_sparse'] + 1) * c['call_s'] * c['steps']:.3f} s; "
        f"epoch min / median / max of {r['n_epochs']}: {r['epoch_s']:.3f} / "
        f"{r['epoch_s_median']:.3f} / {r['epoch_s_max']:.3f} s, median = "
        f"{r['epoch_s_median'] / isolated:.2f}x the isolated floor, "
        f"{100 * floor / r['epoch_s_median']:.1f}% of the ceiling)")
  if len(c.get("rounds", ())) > 1:
    lines.append(
        f"  ({name}: per round, its epochs' median / the isolated floor measured right after "
        "them: " + ", ".join(f"{m:.3f} / {f:.3f} s = {m / f:.2f}x" for m, f in c["rounds"])
        + ")")
  return lines


def _rate(flops, seconds, peak) -> str:
  if not flops:
    return "n/a"
  return f"{flops / seconds / 1e9:,.1f} ({100 * throughput.mfu(flops, seconds, peak):.1f}%)"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="vbpr_mlp,vbpr,mmgcn,mmgcn_onetable,mmgcn_segment")
  p.add_argument("--settings", default="tiktok,baby")
  p.add_argument("--epochs", type=int, default=3, help="timed epochs after the first")
  p.add_argument("--eval_repeats", type=int, default=2)
  p.add_argument("--max_batches", type=int, default=0,
                 help="time only this many batches per epoch and scale up (0 = full epochs)")
  p.add_argument("--alternate", action="store_true",
                 help="time the models' epochs in turn (model A epoch 1, model B epoch 1, "
                      "...) so that a changing machine load hits them alike; ratios between "
                      "models are then comparable")
  p.add_argument("--ceiling", default="auto", choices=("auto", "on", "off"),
                 help="time the step's own matrix products alone for a measured ceiling "
                      "(auto: for the mmgcn models)")
  p.add_argument("--ceiling_reps", type=int, default=5,
                 help="repetitions per product for the measured ceiling (best is kept)")
  p.add_argument("--ceiling_rounds", type=int, default=1,
                 help="measure the ceiling and the isolated floor this many times, each "
                      "after its share of the timed epochs (not with --alternate), and print "
                      "each round's median epoch / isolated floor")
  p.add_argument("--peak_gflops", type=float, default=None,
                 help="chip peak for MFU (default: GPU/TPU table; CPU 256)")
  args = p.parse_args()
  peak = (args.peak_gflops * 1e9 if args.peak_gflops else throughput.peak_flops(dtype="float32")
          or 256e9)
  print(f"devices: {jax.devices()} ({os.cpu_count()} CPUs visible)")
  print(f"MFU against a peak of {peak / 1e9:,.0f} GFLOP/s per device (float32)")
  print("| setting | model | first epoch s (compile) | epoch s (min) | epoch s (median) | "
        "epoch CPU s (all threads) | train ex/s | eval users/s | train GFLOP/s (MFU) | "
        "eval GFLOP/s (MFU) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for setting in args.settings.split(","):
    data = load_setting(setting)
    names = args.models.split(",")
    runs = {}
    if args.alternate:  # every model's trainer first, then their timed epochs in turn
      runs = {name: _Run(name, data, args.max_batches) for name in names}
      for e in range(1, args.epochs + 1):
        for name in names:
          runs[name].timed_epoch(e)
    for name in names:
      ceiling = args.ceiling == "on" or (args.ceiling == "auto" and name.startswith("mmgcn"))
      r = bench(name, data, args.epochs, args.eval_repeats, args.max_batches, ceiling,
                args.ceiling_reps, runs.get(name), args.ceiling_rounds)
      print(f"| {setting} | {name} | {r['first_epoch_s']:.2f} | {r['epoch_s']:.3f} | "
            f"{r['epoch_s_median']:.3f} | {r['epoch_cpu_s']:.2f} | "
            f"{len(data.train) / r['epoch_s']:,.0f} | "
            f"{r['eval_users_per_s']:,.0f} | {_rate(r['epoch_flops'], r['epoch_s'], peak)} | "
            f"{_rate(r['eval_flops'], r['eval_s'], peak)} |", flush=True)
      if r["ceiling"] is not None:
        print("\n".join(ceiling_lines(name, r)), flush=True)
      if setting == "tiktok" and name == "vbpr_mlp":
        print(f"  (VBPR-MLP TikTok epoch: {REFERENCE_TIKTOK_EPOCH_SECONDS / r['epoch_s']:.2f}x "
              f"faster than the {REFERENCE_TIKTOK_EPOCH_SECONDS} s PyTorch reference; goal 2x)",
              flush=True)
      if setting == "tiktok" and name.startswith("mmgcn"):
        print(f"  ({name} TikTok epoch: median {r['epoch_s_median']:.3f} s, "
              f"{MMREC_MMGCN_TIKTOK_EPOCH_SECONDS / r['epoch_s_median']:.2f}x faster than "
              f"MMRec's {MMREC_MMGCN_TIKTOK_EPOCH_SECONDS} s; goal <= "
              f"{MMGCN_TIKTOK_EPOCH_GOAL_SECONDS} s at >= 70% of the measured ceiling)",
              flush=True)


if __name__ == "__main__":
  main()
