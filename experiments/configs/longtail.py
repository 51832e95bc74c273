"""Long-tailed adversarial training (METHODS.md B.1-B.4).

  python -m experiments.train_longtail \\
    --config=experiments/configs/longtail.py:preset=cpu_small,dataset=folder,data_dir=../shared/data/cifar10,imbalance_ratio=10,method=mcat \\
    --workdir=runs/lt

Presets (``preset=...``; every other argument given explicitly overrides them):
  paper: B.4's paper settings: ResNet-18 (CIFAR stem), 200 epochs, cosine decay from
    lr 0.1, SGD momentum 0.9, weight decay 5e-4, batch 128, PGD-10 (step 2/255) in
    training, PGD-20 in evaluation, manifold hidden width 1024, 5 warm-up epochs. A GPU
    run.
  full (the default): the same at 100 epochs (the length of most long-tail AT papers'
    CIFAR runs, e.g. AT-BSL); the numbers are not the paper's 200-epoch ones.
  cpu_small: the CPU-scale protocol chosen by measurement on a 2-core CPU (docs/results/longtail.md):
    small CNN (widths 16/32/64/128), CIFAR-10-LT with n_max 1000, 10 epochs, batch 64,
    lr 0.1 with 1 warm-up epoch then cosine, PGD-3 in training with step 2.5ε/3,
    PGD-20 evaluation on 100 test images per class, a monitor evaluation every 5 epochs;
    MCAT: generators d_z 32 -> 256 -> 256 -> d_f, 3 warm-up epochs. About 2 min per
    PGD-AT run on an idle 2-core machine as 2 XLA CPU devices (docs/results/performance.md); PGD-AT at IR 10 reaches 0.27 clean /
    0.20 PGD-20 balanced accuracy (chance 0.10), mostly on the head classes; AT-BSL
    0.38 / 0.22 with every class group non-zero.
  runlocal=True: a ~1-minute smoke run that still learns above chance, on top of any
    preset: cpu_small with n_max 200, 6 epochs, 30 test images per class.

Arguments (``k=v`` joined by ``,``):
  dataset: cifar10 | cifar100 (TFDS, prepared under data_dir) | folder (an image
    folder with train/ and test/ sub-folders, one sub-folder per class).
  data_dir: TFDS data_dir, or the image folder root.
  cache_dir: dataset=folder only: cache the decoded images there as .npz so repeat
    runs skip JPEG decoding ("" / unset = no cache).
  imbalance_ratio: IR of the exponential profile (100).
  n_max: head-class count (default 5000 for 10 classes, 500 for 100).
  method: pgd_at | trades | mart | at_bsl | robal | mcat, with optional add-ons
    "+etf", "+manifold" (e.g. trades+etf, at_bsl+manifold).
  etf_weight, manifold_weight, beta: override the method's weights.
  model: resnet18 | preact_resnet18 | wrn34_10 | reduced_resnet | small_cnn (resnet18).
  widths: small_cnn channel widths, e.g. "16+32+64" (a preset's widths apply to
    small_cnn only).
  compute_dtype: float32 | bfloat16 (bf16 convolutions on GPU/TPU; parameters, BN
    statistics and optimiser state stay float32). mesh_data: data-axis devices (-1 = all).
  matmul_precision: default | high | highest (default "default": the backend's choice,
    e.g. TF32 matmuls/convolutions on recent NVIDIA GPUs, exact float32 on CPU): the
    training step's float32 matmul precision. Evaluation (the test / monitor PGD and
    eval_robust's attacks) always runs at "highest" (uatmc_jax.core.parallel.precision).
  epochs, batch_size, lr, schedule (cosine | step), warmup_epochs (linear warm-up, may
    be fractional; 0), weight_decay, pgd_steps (training), pgd_step_size (training PGD
    step, 2/255), eval_pgd_steps (20).
  diagnostics (True), diagnostics_batch_size (64), diagnostics_in_step (False): the
    per-epoch record of what MCAT's terms do (uatmc_jax/longtail/diagnostics.py), in
    results.json "diagnostics", diagnostics.json and TensorBoard diag/*; in_step takes the
    attack's numbers from every training step (slower) instead of the monitor batch.
  latent_dim (128), manifold_hidden (1024), latent_steps (T_z, 5), latent_step_size
    (0.01), manifold_refresh (every_step | frozen), manifold_warmup_epochs (5),
    manifold_fit_steps (1), manifold_lr (1e-3): MCAT's manifold models.
  test_per_class: evaluate on a seeded subsample of k test images per class (seed 0
    for every run, TFDS and folders alike; default all).
  monitor_every (0 = off), monitor_per_class (20), monitor_pgd_steps (10): every k
    epochs, clean and PGD accuracy per class group on a small test subset, logged to
    TensorBoard (``<workdir>/events.out.tfevents.*``) and results.json["monitor"].
  seed (0): model/attack seed; data_seed (0): long-tail subsampling seed.
  eval_robust: after training, run experiments.eval_robust with these attacks
    ("" = skip; e.g. "pgd20+cw").
"""
from __future__ import annotations

import ml_collections

from experiments.configs import common
from uatmc_jax.core.errors import ConfigError

DEFAULTS = dict(
    preset="full", dataset="cifar10", data_dir=None, imbalance_ratio=100.0, n_max=None,
    method="mcat", etf_weight=None, manifold_weight=None, beta=None, model="resnet18",
    epochs=None, batch_size=128, lr=0.1, schedule="cosine", warmup_epochs=0.0,
    weight_decay=5e-4, pgd_steps=10, pgd_step_size=2 / 255, eval_pgd_steps=20,
    latent_dim=128, manifold_hidden=None, latent_steps=5, latent_step_size=0.01,
    manifold_refresh="every_step", manifold_warmup_epochs=None, manifold_fit_steps=1,
    manifold_lr=1e-3, test_per_class=None, monitor_every=0, monitor_per_class=20,
    monitor_pgd_steps=10, seed=0, data_seed=0, eval_robust="", cache_dir=None,
    widths=None, compute_dtype="float32", matmul_precision="default", mesh_data=-1,
    diagnostics=True, diagnostics_batch_size=64, diagnostics_in_step=False, runlocal=False)

# B.4's paper settings, by name: ResNet-18 (CIFAR stem), 200 epochs, cosine, SGD 0.9,
# wd 5e-4, batch 128, lr 0.1, PGD-10 train (step 2/255) / PGD-20 eval. GPU scale.
PAPER = dict(model="resnet18", epochs=200, batch_size=128, lr=0.1, schedule="cosine",
             weight_decay=5e-4, pgd_steps=10, pgd_step_size=2 / 255, manifold_hidden=1024,
             manifold_warmup_epochs=5)
# The default ("full"): the paper's settings at half the epochs (100), the length most
# of the long-tail AT literature (AT-BSL, RoBal's CIFAR runs) trains for.
FULL = dict(PAPER, epochs=100)
# CPU scale, chosen by measurement on the 2-core build machine (docs/results/longtail.md): a small CNN
# on CIFAR-10-LT that learns well above chance in a few minutes per run.
CPU_SMALL = dict(model="small_cnn", widths="16+32+64+128", n_max=1000, epochs=10,
                 batch_size=64, lr=0.1, warmup_epochs=1.0, pgd_steps=3,
                 pgd_step_size=2.5 * 8 / 255 / 3, test_per_class=100, manifold_hidden=256,
                 latent_dim=32, manifold_warmup_epochs=3, monitor_every=5)
PRESETS = {"paper": PAPER, "full": FULL, "cpu_small": CPU_SMALL}
# runlocal: a ~1-minute smoke run that still learns (above chance); on top of any preset.
RUNLOCAL = dict(CPU_SMALL, n_max=200, epochs=6, test_per_class=30, monitor_every=0,
                manifold_warmup_epochs=2)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  explicit = common.parse_arg(arg, allowed=DEFAULTS)  # only the keys given
  preset = explicit.get("preset", DEFAULTS["preset"])
  if preset not in PRESETS:
    raise ConfigError(f"config argument preset={preset!r}: expected one of {sorted(PRESETS)}")
  runlocal = common.as_bool(explicit.get("runlocal", False), "runlocal")
  a = {**DEFAULTS, **PRESETS[preset], **(RUNLOCAL if runlocal else {}), **explicit}
  a["runlocal"] = runlocal
  for k in ("diagnostics", "diagnostics_in_step"):
    a[k] = common.as_bool(a[k], k)
  cfg = ml_collections.ConfigDict()
  for k, v in a.items():
    if v is not None:
      cfg[k] = v
  # Keys whose default is None stay visible (as None) so the launcher can test them.
  cfg.model_kwargs = {}
  # A preset's widths are the small CNN's; widths given explicitly always pass through
  # (so a model that takes none says so).
  if a["widths"] is not None and (a["model"] == "small_cnn" or "widths" in explicit):
    cfg.model_kwargs = {"widths": tuple(common.as_list(a["widths"], int))}
  for k in ("data_dir", "cache_dir", "n_max", "etf_weight", "manifold_weight", "beta",
            "test_per_class"):
    if k not in cfg:
      cfg[k] = ml_collections.FieldReference(None, field_type=object)
  return cfg
