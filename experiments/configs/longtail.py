"""Long-tailed adversarial training (METHODS.md B.1-B.4).

  python -m experiments.train_longtail \\
    --config=experiments/configs/longtail.py:dataset=folder,data_dir=../shared/data/cifar10,imbalance_ratio=100,method=mcat,model=small_cnn,runlocal=True \\
    --workdir=/tmp/lt

Arguments (``k=v`` joined by ``,``):
  dataset: cifar10 | cifar100 (TFDS, prepared under data_dir) | folder (an image
    folder with train/ and test/ sub-folders, one sub-folder per class).
  data_dir: TFDS data_dir, or the image folder root.
  cache_dir: dataset=folder only: cache the decoded images there as .npz so repeat
    runs skip JPEG decoding ("" / unset = no cache).
  imbalance_ratio: IR of the exponential profile (100).
  n_max: head-class count (default 5000 for 10 classes, 500 for 100; runlocal 300).
  method: pgd_at | trades | mart | at_bsl | robal | mcat, with optional add-ons
    "+etf", "+manifold" (e.g. trades+etf, at_bsl+manifold).
  etf_weight, manifold_weight, beta: override the method's weights.
  model: resnet18 | preact_resnet18 | wrn34_10 | reduced_resnet | small_cnn (resnet18).
  widths: small_cnn channel widths, e.g. "16+32+64" (the model's default otherwise).
  compute_dtype: float32 | bfloat16 (bf16 convolutions on GPU/TPU; parameters, BN
    statistics and optimiser state stay float32). mesh_data: data-axis devices (-1 = all).
  epochs (100), batch_size (128), lr (0.1), schedule (cosine | step), weight_decay
    (5e-4), pgd_steps (10, training), eval_pgd_steps (20).
  latent_dim (128), manifold_hidden (1024), latent_steps (T_z, 5), latent_step_size
    (0.01), manifold_refresh (every_step | frozen), manifold_warmup_epochs (5),
    manifold_fit_steps (1), manifold_lr (1e-3): MCAT's manifold models.
  test_per_class: evaluate on a seeded subsample of k test images per class (seed 0
    for every run, TFDS and folders alike; default all).
  seed (0): model/attack seed; data_seed (0): long-tail subsampling seed.
  eval_robust: after training, run experiments.eval_robust with these attacks
    ("" = skip; e.g. "pgd20+cw").
  runlocal: a few-minute CPU variant: n_max 300, 4 epochs, 50 test images per class,
    manifold hidden width 256, warm-up 1 epoch (all still overridable).
"""
from __future__ import annotations

import ml_collections

from experiments.configs import common

DEFAULTS = dict(
    dataset="cifar10", data_dir=None, imbalance_ratio=100.0, n_max=None, method="mcat",
    etf_weight=None, manifold_weight=None, beta=None, model="resnet18", epochs=None,
    batch_size=128, lr=0.1, schedule="cosine", weight_decay=5e-4, pgd_steps=10,
    eval_pgd_steps=20, latent_dim=128, manifold_hidden=None, latent_steps=5,
    latent_step_size=0.01, manifold_refresh="every_step", manifold_warmup_epochs=None,
    manifold_fit_steps=1, manifold_lr=1e-3, test_per_class=None, seed=0, data_seed=0,
    eval_robust="", cache_dir=None, widths=None, compute_dtype="float32", mesh_data=-1,
    runlocal=False)

RUNLOCAL = dict(n_max=300, epochs=4, test_per_class=50, manifold_hidden=256,
                manifold_warmup_epochs=1)
FULL = dict(epochs=100, manifold_hidden=1024, manifold_warmup_epochs=5)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, **DEFAULTS)
  fill = RUNLOCAL if a["runlocal"] else FULL
  for k, v in fill.items():
    if a.get(k) is None:
      a[k] = v
  cfg = ml_collections.ConfigDict()
  for k, v in a.items():
    if v is not None:
      cfg[k] = v
  # Keys whose default is None stay visible (as None) so the launcher can test them.
  cfg.model_kwargs = {}
  if a["widths"] is not None:
    cfg.model_kwargs = {"widths": tuple(common.as_list(a["widths"], int))}
  for k in ("data_dir", "cache_dir", "n_max", "etf_weight", "manifold_weight", "beta",
            "test_per_class"):
    if k not in cfg:
      cfg[k] = ml_collections.FieldReference(None, field_type=object)
  return cfg
