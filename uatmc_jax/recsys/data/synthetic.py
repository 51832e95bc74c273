"""An embedded synthetic multimodal recommendation dataset with planted structure.

It is written to disk in the MMRec layout (METHODS.md A.3: ``synthetic.inter``,
``<modality>_feat.npy``, plus ``user_groups.npy``) and read back with
:func:`~uatmc_jax.recsys.data.mmrec.load_mmrec`, so the default dataset runs through exactly
the reader the real data uses. No download, no files shipped: the generator is seeded
and deterministic (numpy ``default_rng``).

Generative model (``M`` modalities, in the order of ``config.modalities``):

1. Item latent factors. Each item i has ``z_i = [s_i ; p_i^1 ; ... ; p_i^M]`` with
   ``s_i ~ N(0, I_{k_s})`` shared by every modality and ``p_i^m ~ N(0, I_{k_p})``
   private to modality m.
2. Features. Modality m sees only its part of the latents, rendered into its feature
   space by a fixed random linear map plus noise:
   ``x_i^m = [s_i ; p_i^m] R_m + sigma * eps``, ``R_m ~ N(0, 1/(k_s+k_p))`` of shape
   (k_s+k_p, d_m), ``eps ~ N(0, I_{d_m})``. So the private factors p^m are visible
   only through modality m.
3. User groups. Users are split evenly (random assignment) into ``n_groups`` groups;
   group g "reads" modality ``g mod M`` (default: group 0 = A reads ``image``, group 1 =
   B reads ``text``). A user's taste is ``theta_u = [w * a_u ; b_u on block p^{m(g)} ;
   0 elsewhere]`` with ``a_u ~ N(0, I)``, ``b_u = c * mu_g + N(0, I)`` and
   ``w = shared_weight`` < 1, i.e. mainly expressed through the private factors of the
   user's modality; ``mu_g ~ N(0, I)`` is an optional group-wide taste of weight
   ``c = group_taste_weight`` (default 0: it concentrates interactions on few items and,
   measured with a trained model, blurs the per-group gradient dominance).
4. Long-tailed popularity. Item i has a Zipf prior ``pi_i ∝ (r_i + 1)^(-zipf_exponent)``
   over a random permutation r of ranks 0..n_items-1.
5. Interactions. User u interacts with ``n_u = min_interactions + floor(Exp(mean -
   min))`` distinct items (capped at n_items // 2), drawn without replacement (Gumbel
   top-k) from ``softmax_i(beta * theta_u . z_i / sqrt(k) + log pi_i)``, where ``k`` is the
   number of nonzero entries of theta_u (scale-free affinity).
6. Split. Per user, a random permutation of its items: ``max(1, round(0.1 n_u))`` test,
   ``max(1, round(0.1 n_u))`` valid, the rest (>= 3) train.

Consequence (the planted cross-modal mismatch, A.5): group-A users' positives are
predictable from modality-1 features and hardly from modality-2 features, and vice
versa for group B, so a model trained on this data should score group-A users mainly
through modality 1 and group-B users through modality 2.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile

import numpy as np

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys.data.interactions import InteractionData
from uatmc_jax.recsys.data.mmrec import FEATURE_SUFFIX, INTER_HEADER, USER_GROUPS_FILE, load_mmrec


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Parameters of the synthetic generator (see the module docstring for the model).

  The defaults (2000 users, 1000 items, ~40k interactions) keep the main training job
  to about a minute on a 2-core CPU. The latent / noise / affinity / Zipf defaults
  (2 shared factors of weight 0.1, noise 0.2, affinity 4, Zipf 1.3; chosen by the
  planted-mismatch check in docs/results/recsys.md) make the planted per-group modality preference strong
  enough that a trained VBPR-MLP (without its InfoNCE term, the synthetic default of
  ``experiments/configs/recsys.py``) shows it in the A.5 diagnostic: the dominant user
  group of the image and the text attack gradients differs for most targets.
  """
  n_users: int = 2000
  n_items: int = 1000
  n_groups: int = 2
  modalities: tuple[tuple[str, int], ...] = (("image", 256), ("text", 64))
  shared_factors: int = 2
  private_factors: int = 8
  shared_weight: float = 0.1
  group_taste_weight: float = 0.0
  feature_noise: float = 0.2
  affinity_scale: float = 4.0
  zipf_exponent: float = 1.3
  mean_interactions: float = 20.0
  min_interactions: int = 5
  valid_fraction: float = 0.1
  test_fraction: float = 0.1
  seed: int = 0
  name: str = "synthetic"

  def validate(self) -> None:
    """Raises ConfigError naming the first invalid field."""
    names = [m for m, _ in self.modalities]
    checks = [
        ("n_users", self.n_users >= max(1, self.n_groups), "an integer >= n_groups"),
        ("n_items", self.n_items >= 2 * self.min_interactions,
         "an integer >= 2 * min_interactions"),
        ("n_groups", self.n_groups >= 1, "an integer >= 1"),
        ("modalities", len(names) >= 1 and len(set(names)) == len(names)
         and all(isinstance(m, str) and m and d >= 1 for m, d in self.modalities),
         "distinct (name, dim >= 1) pairs"),
        ("shared_factors", self.shared_factors >= 0, ">= 0"),
        ("private_factors", self.private_factors >= 1, ">= 1"),
        ("feature_noise", self.feature_noise >= 0, ">= 0"),
        ("zipf_exponent", self.zipf_exponent >= 0, ">= 0"),
        ("min_interactions", self.min_interactions >= 3, ">= 3 (one train/valid/test)"),
        ("mean_interactions", self.mean_interactions >= self.min_interactions,
         ">= min_interactions"),
        ("valid_fraction", 0 <= self.valid_fraction < 0.5, "in [0, 0.5)"),
        ("test_fraction", 0 <= self.test_fraction < 0.5, "in [0, 0.5)"),
    ]
    for field, ok, expected in checks:
      if not ok:
        raise ConfigError(f"SyntheticConfig.{field} = {getattr(self, field)!r}; "
                          f"expected {expected}")


def _sample_dataset(config: SyntheticConfig):
  """Draws (users, items, x_label, features, user_groups) following the docstring."""
  rng = np.random.default_rng(config.seed)
  n_mod = len(config.modalities)
  k_s, k_p = config.shared_factors, config.private_factors

  # 1. item latents: shared block then one private block per modality.
  shared = rng.standard_normal((config.n_items, k_s))
  private = rng.standard_normal((n_mod, config.n_items, k_p))
  latents = np.concatenate([shared, *private], axis=1)  # (n_items, k_s + M k_p)

  # 2. features: fixed random map of the visible latents plus noise.
  features = {}
  for m, (name, dim) in enumerate(config.modalities):
    visible = np.concatenate([shared, private[m]], axis=1)
    render = rng.standard_normal((k_s + k_p, dim)) / np.sqrt(k_s + k_p)
    noise = config.feature_noise * rng.standard_normal((config.n_items, dim))
    features[name] = (visible @ render + noise).astype(np.float32)

  # 3. user groups and tastes.
  groups = rng.permutation(np.arange(config.n_users) % config.n_groups).astype(np.int32)
  reads = groups % n_mod  # modality index each user reads
  theta = np.zeros((config.n_users, k_s + n_mod * k_p))
  theta[:, :k_s] = config.shared_weight * rng.standard_normal((config.n_users, k_s))
  group_taste = rng.standard_normal((config.n_groups, k_p))
  private_taste = (config.group_taste_weight * group_taste[groups]
                   + rng.standard_normal((config.n_users, k_p)))
  cols = k_s + reads[:, None] * k_p + np.arange(k_p)[None, :]
  theta[np.arange(config.n_users)[:, None], cols] = private_taste
  affinity = theta @ latents.T / np.sqrt(k_s + k_p)  # (n_users, n_items)

  # 4. long-tailed popularity prior.
  ranks = rng.permutation(config.n_items)
  log_prior = -config.zipf_exponent * np.log1p(ranks)

  # 5. interactions: Gumbel top-k == sampling without replacement from the softmax.
  extra = rng.exponential(config.mean_interactions - config.min_interactions,
                          size=config.n_users)
  counts = np.minimum(config.min_interactions + np.floor(extra).astype(np.int64),
                      config.n_items // 2)
  logits = config.affinity_scale * affinity + log_prior[None, :]
  keys = logits + rng.gumbel(size=logits.shape)
  max_count = int(counts.max())
  top = np.argpartition(-keys, max_count - 1, axis=1)[:, :max_count]
  top = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, 1), 1), 1)
  # Items were drawn in key order; a random order decides the split (step 6).
  order = np.argsort(rng.random(top.shape), axis=1)
  top = np.take_along_axis(top, order, 1)
  taken = order < counts[:, None]  # keeps the first n_u drawn, in shuffled positions
  users = np.broadcast_to(np.arange(config.n_users)[:, None], top.shape)[taken]
  items = top[taken]

  # 6. per-user split: position among the user's kept items decides the label.
  position = np.cumsum(taken, axis=1)[taken] - 1
  n_u = counts[users]
  n_test = np.maximum(1, np.round(config.test_fraction * n_u)).astype(np.int64)
  n_valid = np.maximum(1, np.round(config.valid_fraction * n_u)).astype(np.int64)
  labels = np.where(position < n_test, 2, np.where(position < n_test + n_valid, 1, 0))
  return users, items, labels, features, groups


def write_synthetic(folder: str | pathlib.Path,
                    config: SyntheticConfig = SyntheticConfig()) -> pathlib.Path:
  """Writes the synthetic dataset in the MMRec layout.

  Files: ``<config.name>.inter``, ``<modality>_feat.npy`` (float32, row = item id),
  ``user_groups.npy`` (int32, row = user id) and ``synthetic_config.json`` (the
  parameters, for provenance; the reader ignores it).

  Args:
    folder: destination (created if needed).
    config: generator parameters.

  Returns:
    The folder, as a Path.
  """
  config.validate()
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  users, items, labels, features, groups = _sample_dataset(config)
  order = np.lexsort((items, labels, users))
  rows = np.stack([users[order], items[order], np.ones_like(order), np.zeros_like(order),
                   labels[order]], axis=1)
  lines = ["\t".join(INTER_HEADER)]
  lines += ["\t".join(map(str, r)) for r in rows.tolist()]
  (folder / f"{config.name}.inter").write_text("\n".join(lines) + "\n")
  for name, array in features.items():
    np.save(folder / f"{name}{FEATURE_SUFFIX}", array)
  np.save(folder / USER_GROUPS_FILE, groups)
  (folder / "synthetic_config.json").write_text(
      json.dumps(dataclasses.asdict(config), indent=1) + "\n")
  return folder


def make_synthetic(config: SyntheticConfig | None = None, **overrides) -> InteractionData:
  """Generates the synthetic dataset and loads it through the MMRec reader.

  Args:
    config: generator parameters (default ``SyntheticConfig()``).
    **overrides: fields of SyntheticConfig to replace, e.g. ``seed=3, n_users=500``.

  Returns:
    The dataset as :func:`load_mmrec` returns it, with ``user_groups`` set.

  Raises:
    ConfigError: an unknown override name or an invalid value.
  """
  config = config or SyntheticConfig()
  fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(f"unknown synthetic dataset option(s) {unknown}; "
                      f"valid: {sorted(fields)}")
  if "modalities" in overrides:
    overrides["modalities"] = tuple((str(m), int(d)) for m, d in overrides["modalities"])
  config = dataclasses.replace(config, **overrides)
  with tempfile.TemporaryDirectory(prefix="uatmc_synthetic_") as tmp:
    return load_mmrec(write_synthetic(tmp, config), name=config.name)
