"""Per-device memory of a sharded recommender train step, from the compiler alone.

The recommender at catalogue scale — 10M users x 1M items, VBPR-MLP with embedding 64
(user vectors 128-d, item ID vectors 64-d), two 128-d item modalities — does not fit
on one 16-80 GB device once Adam's moments are counted (~17 GB of tables and
moments, plus a dense table-sized gradient). Sharded over a ``(data, model)`` mesh
(tables and item features split by rows over ``model``, batch over ``data``) each
device holds a fraction. Tables (and split features) are padded to a multiple of the
model axis, as ``build_sharded_recommender`` pads them, so real catalogue sizes (Baby's
19,445 x 7,050, TikTok's 9,308 x 6,710) split too; ``--replicate_features`` keeps the
item features whole on every device, as ``RecsysTrainer`` does.

Nothing is allocated: the model is built with ``nnx.eval_shape``, inputs are
``jax.ShapeDtypeStruct`` with shardings, and the jitted BPR train step (the vanilla
objective of ``uatmc_jax.recsys.losses`` + Adam, parameters and optimiser
state donated) is lowered and compiled for 8 faked CPU devices. The compiler's
``memory_analysis()`` then gives per-device argument / output / temp bytes. The
single-device figure is compiled the same way for contrast.

  python benchmarks/bench_memory_sharded.py                    # 10M x 1M, meshes 2x4, 1x8
  python benchmarks/bench_memory_sharded.py --users 100000 --items 10000   # quick
  python benchmarks/bench_memory_sharded.py --users 19445 --items 7050 --feature_dims 4096,384
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from uatmc_jax.core.parallel import mesh as mesh_lib  # noqa: E402
from uatmc_jax.core.parallel import sharding_rules  # noqa: E402
from uatmc_jax.recsys.losses import bpr_objective  # noqa: E402
from uatmc_jax.recsys.models.vbpr_mlp import VBPRMLP  # noqa: E402

GIB = 1024 ** 3
# Tables and per-item feature matrices over `model`; everything else replicated.
RULES = sharding_rules.RECSYS_TABLE_RULES + (("features", "model,None"),)


def build_abstract(n_users: int, n_items: int, feature_dims: dict[str, int], emb: int,
                   row_multiple: int = 1):
  """(graphdef, abstract params, abstract rest) without allocating tables; the ID tables
  padded to a multiple of ``row_multiple`` (the model axis), as the trainer builds them."""
  model = nnx.eval_shape(lambda: VBPRMLP(n_users, n_items, feature_dims, embedding_dim=emb,
                                         row_multiple=row_multiple, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def make_train_step(graphdef, tx, reg_weight: float = 1e-4):
  """One BPR + Adam step over (params, opt_state, rest, batch, features)."""

  def step(params, opt_state, rest, batch, features):
    def loss_fn(p):
      model = nnx.merge(graphdef, p, rest)
      return bpr_objective(model, batch, features, jax.random.key(0), reg_weight=reg_weight)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  return step


def compile_step(n_users, n_items, feature_dims, emb, batch_per_device, mesh, rules,
                 shard_features: bool = True):
  """Lowers + compiles the step for ``mesh``; returns (compiled, seconds).

  ID tables are padded to a multiple of the model axis (``row_multiple``); with
  ``shard_features`` the item-feature matrices are padded alike and split over
  ``model`` too, else they are replicated (what ``RecsysTrainer`` does).
  """
  multiple = int(mesh.shape[mesh_lib.MODEL_AXIS])
  if not shard_features:
    rules = tuple(r for r in rules if r[0] != "features")
  graphdef, params, rest = build_abstract(n_users, n_items, feature_dims, emb, multiple)
  tx = optax.adam(1e-3)
  opt_state = jax.eval_shape(tx.init, params)
  state = {"params": params, "opt_state": opt_state}
  state_sh = sharding_rules.tree_shardings(state, mesh, rules)
  rest_sh = sharding_rules.tree_shardings(rest, mesh, rules)
  global_batch = batch_per_device * mesh_lib.data_axis_size(mesh)
  data_sh = mesh_lib.data_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=data_sh)
           for k in ("users", "pos", "neg")}
  batch["mask"] = jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=data_sh)
  feature_rows = -(-n_items // multiple) * multiple if shard_features else n_items
  features = {m: jax.ShapeDtypeStruct((feature_rows, d), jnp.float32) for m, d in
              feature_dims.items()}
  feat_sh = sharding_rules.tree_shardings({"features": features}, mesh, rules)["features"]
  features = sharding_rules.abstract_tree(features, feat_sh)
  state = sharding_rules.abstract_tree(state, state_sh)
  rest = sharding_rules.abstract_tree(rest, rest_sh)
  step = make_train_step(graphdef, tx)
  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(
      step, donate_argnums=(0, 1),
      out_shardings=(state_sh["params"], state_sh["opt_state"], replicated, replicated))
  t0 = time.perf_counter()
  compiled = jitted.lower(state["params"], state["opt_state"], rest, batch, features).compile()
  return compiled, time.perf_counter() - t0


def compile_startup(n_users, n_items, feature_dims, emb, mesh, rules):
  """Per-device memory of start-up: the jitted model init (tables padded to the model
  axis, created on their shardings, as ``build_sharded_recommender``) and the jitted
  Adam init (moments on their shardings, as ``RecsysTrainer``). Returns
  ((output bytes, temp bytes) of the model init, same of the Adam init)."""
  multiple = int(mesh.shape[mesh_lib.MODEL_AXIS])
  create = lambda: nnx.state(VBPRMLP(n_users, n_items, feature_dims, embedding_dim=emb,
                                     row_multiple=multiple, rngs=nnx.Rngs(0)), nnx.Param)
  abstract = jax.eval_shape(create)
  init = jax.jit(create, out_shardings=sharding_rules.tree_shardings(abstract, mesh, rules))
  model_ma = init.lower().compile().memory_analysis()
  tx = optax.adam(1e-3)
  params = sharding_rules.abstract_tree(
      abstract, sharding_rules.tree_shardings(abstract, mesh, rules))
  opt_sh = sharding_rules.tree_shardings(jax.eval_shape(tx.init, abstract), mesh, rules)
  adam_ma = jax.jit(tx.init, out_shardings=opt_sh).lower(params).compile().memory_analysis()
  return ((model_ma.output_size_in_bytes, model_ma.temp_size_in_bytes),
          (adam_ma.output_size_in_bytes, adam_ma.temp_size_in_bytes))


def table_bytes(n_users, n_items, feature_dims, emb) -> dict[str, int]:
  """Analytic sizes of the big float32 arrays (for the printout)."""
  users = n_users * 2 * emb * 4
  items = n_items * emb * 4
  feats = n_items * sum(feature_dims.values()) * 4
  return {"tables": users + items, "adam_moments": 2 * (users + items), "features": feats}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--users", type=int, default=10_000_000)
  ap.add_argument("--items", type=int, default=1_000_000)
  ap.add_argument("--embedding_dim", type=int, default=64)
  ap.add_argument("--feature_dim", type=int, default=128, help="width of each of 2 modalities")
  ap.add_argument("--feature_dims", default=None,
                  help="per-modality widths, e.g. 4096,384 (Baby's image/text); "
                       "overrides --feature_dim")
  ap.add_argument("--batch_per_device", type=int, default=2048)
  ap.add_argument("--meshes", default="2x4,1x8", help="data x model meshes over 8 devices")
  ap.add_argument("--no_single", action="store_true", help="skip the 1-device contrast")
  ap.add_argument("--replicate_features", action="store_true",
                  help="replicate the item features (as RecsysTrainer does) instead of "
                       "splitting them (padded) over the model axis")
  ap.add_argument("--eval_widths", default="64,1024",
                  help="excluded-list widths of the evaluation batches to compile (one "
                       "device, 2048 users per batch, held-out width 64)")
  args = ap.parse_args(argv)

  dims = {"acoustic": args.feature_dim, "visual": args.feature_dim}
  if args.feature_dims:
    widths = [int(w) for w in args.feature_dims.split(",")]
    dims = {f"m{i}": w for i, w in enumerate(widths)}
  sizes = table_bytes(args.users, args.items, dims, args.embedding_dim)
  print(f"recommender: VBPR-MLP, {args.users:,} users x {args.items:,} items, embedding "
        f"{args.embedding_dim} (user 128-d), modalities {dims}; Adam; batch "
        f"{args.batch_per_device}/device; jax {jax.__version__}, "
        f"{jax.device_count()} faked {jax.devices()[0].platform} devices")
  print("analytic float32 sizes: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sizes.items()))
  header = (f"{'mesh (data x model)':>20} {'devices':>7} {'argument GiB':>12} {'output GiB':>10} "
            f"{'alias GiB':>9} {'temp GiB':>8} {'peak/device GiB':>15} {'compile s':>9}")
  print(header)
  print("-" * len(header))
  configs = []
  if not args.no_single:
    configs.append(("1x1", mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])))
  for spec in args.meshes.split(","):
    d, m = (int(v) for v in spec.lower().split("x"))
    configs.append((spec, mesh_lib.make_mesh(d, m)))
  for name, mesh in configs:
    compiled, secs = compile_step(args.users, args.items, dims, args.embedding_dim,
                                  args.batch_per_device, mesh, RULES,
                                  shard_features=not args.replicate_features)
    ma = compiled.memory_analysis()
    arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
    alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
    # Donated outputs alias their inputs: live bytes = arguments + new outputs + temps.
    peak = arg + out - alias + temp
    print(f"{name:>20} {mesh.devices.size:>7} {arg / GIB:>12.3f} {out / GIB:>10.3f} "
          f"{alias / GIB:>9.3f} {temp / GIB:>8.3f} {peak / GIB:>15.3f} {secs:>9.1f}", flush=True)
  for name, mesh in configs:
    (m_out, m_tmp), (a_out, a_tmp) = compile_startup(
        args.users, args.items, dims, args.embedding_dim, mesh, sharding_rules.RECSYS_TABLE_RULES)
    print(f"start-up {name:>5}: model init output {m_out / GIB:.4f} GiB temp "
          f"{m_tmp / GIB:.4f} GiB; Adam init output {a_out / GIB:.4f} GiB temp "
          f"{a_tmp / GIB:.4f} GiB; resident after start-up {(m_out + a_out) / GIB:.4f} "
          "GiB/device", flush=True)
  for width in (int(w) for w in args.eval_widths.split(",") if w):
    ma = compile_eval(args.users, args.items, 2 * args.embedding_dim, width).memory_analysis()
    peak = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
    print(f"evaluation batch (1 device, 2048 users, excluded width {width}): arguments "
          f"{ma.argument_size_in_bytes / GIB:.3f} GiB, temp {ma.temp_size_in_bytes / GIB:.3f} "
          f"GiB, peak {peak / GIB:.3f} GiB", flush=True)
  return 0


def compile_eval(n_users: int, n_items: int, dim: int, width: int, batch: int = 2048):
  """The full-ranking evaluation batch (recsys/metrics.py) compiled from shapes alone:
  user and item tables, one batch of ``batch`` users with ``width`` excluded ids."""
  from uatmc_jax.recsys.metrics import DEFAULT_KS, _add_user_batch_sums, zero_totals
  sds = jax.ShapeDtypeStruct
  b = {"users": sds((batch,), jnp.int32), "excluded": sds((batch, width), jnp.int32),
       "relevant": sds((batch, 64), jnp.int32), "weight": sds((batch,), jnp.float32)}
  return _add_user_batch_sums.lower(zero_totals(DEFAULT_KS), sds((n_users, dim), jnp.float32),
                                    sds((n_items, dim), jnp.float32), b, DEFAULT_KS).compile()


if __name__ == "__main__":
  sys.exit(main())
