"""Inner-maximisation strength of UAT-MC with and without alignment (METHODS.md A.6-A.7).

  python -m experiments.inner_max \\
    --config=experiments/configs/inner_max.py:batches=1000,epsilon=0.05,align_weight=4.0 \\
    --workdir=<dir of a model trained by experiments.train_recsys>

On the workdir's best checkpoint and the same training batches for every variant, prints
per inner maximisation (the defence's one normalised step; PGD-k on the same objective in
the same budget set) the increase of the BPR loss over the clean loss with and without
alignment, their paired difference with a 95% interval over batches, and the cosine
between the modalities' perturbations (``uatmc_jax.recsys.inner_max``). Writes
``inner_max.json`` and ``inner_max.md`` into the workdir.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from experiments import launch
from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys import inner_max
from uatmc_jax.recsys.attack_eval import load_trained
from uatmc_jax.recsys.data.sampling import NegativeSampler, epoch_batches

_CONFIG = launch.define_config_flag("Inner-max config file.")


def training_batches(data, n_batches: int, batch_size: int, seed: int) -> dict:
  """The first ``n_batches`` real-row-complete BPR batches of epochs seed, seed+1, ..."""
  sampler = NegativeSampler(data.train, data.n_users, data.n_items)
  pieces, have, epoch = [], 0, 0
  while have < n_batches:
    b = epoch_batches(sampler, data.train, batch_size, seed, epoch)
    full = b["mask"].min(axis=1) > 0  # drop the padded last batch of each epoch
    b = {k: v[full] for k, v in b.items()}
    if not b["users"].shape[0]:
      raise ConfigError(f"batch_size={batch_size} exceeds the {data.train.shape[0]} "
                        "training pairs")
    pieces.append(b)
    have += b["users"].shape[0]
    epoch += 1
  return {k: np.concatenate([p[k] for p in pieces])[:n_batches] for k in pieces[0]}


def main(argv):
  del argv
  cfg, workdir = launch.start(_CONFIG, "experiments/configs/inner_max.py:runlocal=True",
                              "the directory of a model trained by experiments.train_recsys")
  model, data = load_trained(workdir)
  features = {m: jax.numpy.asarray(f) for m, f in data.features.items()}
  batches = training_batches(data, cfg.batches, cfg.batch_size, cfg.seed)
  out = {"config": cfg.to_dict(), "model": type(model).__name__, "data": data.name,
         "tables": {}}
  text = []
  for lam in cfg.align_weights:
    start, parts = time.perf_counter(), []
    for lo in range(0, cfg.batches, cfg.chunk):
      chunk = {k: v[lo:lo + cfg.chunk] for k, v in batches.items()}
      parts.append(jax.device_get(inner_max.inner_max_over_batches(
          model, features, chunk, epsilon=cfg.epsilon, align_weight=lam,
          pgd_steps=tuple(cfg.pgd_steps), step_scale=cfg.step_scale)))
    per_batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    table = inner_max.summarize(per_batch)
    table["seconds"] = time.perf_counter() - start
    out["tables"][str(lam)] = table
    head = (f"{data.name} {type(model).__name__}: ε={cfg.epsilon}, λ_align={lam}, "
            f"step_scale={cfg.step_scale} ({table['seconds']:.1f}s)")
    text += [head, inner_max.markdown_table(table), ""]
    print(head)
    print(inner_max.markdown_table(table), flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "inner_max.json"), "w") as f:
      json.dump(out, f, indent=2)
    with open(os.path.join(workdir, "inner_max.md"), "w") as f:
      f.write("\n".join(text))


if __name__ == "__main__":
  launch.run(main)
