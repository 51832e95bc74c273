"""Defences (METHODS.md A.7): losses vs closed forms, ε = 0, budgets, freezing, order."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys import losses as recsys_losses
from uatmc_jax.recsys.data.interactions import InteractionData
from uatmc_jax.recsys.defences import amr, apr, batch_slots as bs, make_defence_loss, uat_mc
from uatmc_jax.recsys.defences.registry import DEFENCES, defence_hyperparameters
from uatmc_jax.recsys.models import base as base
from uatmc_jax.recsys.models.registry import build_recommender



@pytest.fixture(autouse=True)
def _float32_matmuls():
  """Full float32 dots for these closed-form comparisons, for this module's tests only
  (a module-level ``jax.config.update`` would change every later test of the process)."""
  with jax.default_matmul_precision("highest"):
    yield

REG = 1e-3


# ---------------------------------------------------------------------------------------
# A minimal linear stand-in of the recommender protocol: everything has a closed form.
class LinearRecommender(base.RecommenderBase):
  """project: x^m P_m; item vector: E_i + Σ_m x̂_i^m W_m; user vector: U_u."""

  shared_projected_space = True  # every x̂^m lives in one proj-d space

  def __init__(self, n_users, n_items, dims, width=3, proj=4, *, seed=0):
    rng = np.random.default_rng(seed)
    self.modalities = tuple(sorted(dims))
    self.is_graph = False
    self.n_users, self.n_items = n_users, n_items
    self.U = nnx.Param(jnp.asarray(rng.standard_normal((n_users, width)), jnp.float32))
    self.E = nnx.Param(jnp.asarray(rng.standard_normal((n_items, width)), jnp.float32))
    self.P = nnx.Dict({m: nnx.Param(jnp.asarray(
        rng.standard_normal((dims[m], proj)) / np.sqrt(dims[m]), jnp.float32))
        for m in self.modalities})
    self.W = nnx.Dict({m: nnx.Param(jnp.asarray(
        rng.standard_normal((proj, width)) / np.sqrt(proj), jnp.float32))
        for m in self.modalities})

  def project(self, features):
    return {m: features[m] @ self.P[m][...] for m in self.modalities}

  def item_vectors(self, projected, item_ids):
    v = jnp.take(self.E[...], item_ids, axis=0)
    for m in self.modalities:
      v = v + projected[m] @ self.W[m][...]
    return v

  def user_vectors(self):
    return self.U[...]


def np_params(model):
  return ({k: np.asarray(v, np.float64) for k, v in
           dict(U=model.U[...], E=model.E[...]).items()},
          {m: np.asarray(model.P[m][...], np.float64) for m in model.modalities},
          {m: np.asarray(model.W[m][...], np.float64) for m in model.modalities})


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_bpr(U, V, users, pos, neg):
  d = np.sum(U[users] * (V[pos] - V[neg]), -1)
  return -np.mean(np.log(1e-10 + sigmoid(d)))


def np_bpr_grads(U, V, users, pos, neg):
  """∂BPR/∂U (n_users, D) and ∂BPR/∂V (n_items, D) as tables (duplicates summed)."""
  b = len(users)
  d = np.sum(U[users] * (V[pos] - V[neg]), -1)
  c = -(1 - sigmoid(d)) / b
  gU, gV = np.zeros_like(U), np.zeros_like(V)
  np.add.at(gU, users, c[:, None] * (V[pos] - V[neg]))
  np.add.at(gV, pos, c[:, None] * U[users])
  np.add.at(gV, neg, -c[:, None] * U[users])
  return gU, gV


def np_emb(U, V, users, pos, neg):
  return sum(np.linalg.norm(x) for x in (U[users], V[pos], V[neg])) / len(users)


def row_normalize(x):
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  return np.where(n > 0, x / np.where(n > 0, n, 1), 0)


DIMS = {"image": 5, "audio": 4}


@pytest.fixture(scope="module")
def linear_case():
  rng = np.random.default_rng(3)
  n_users, n_items = 6, 9
  feats = {m: rng.standard_normal((n_items, d)).astype(np.float32) for m, d in DIMS.items()}
  # Duplicated users and items (as positive of one row and negative of another).
  users = np.array([0, 1, 1, 4, 5], np.int32)
  pos = np.array([2, 3, 2, 7, 0], np.int32)
  neg = np.array([3, 8, 5, 2, 1], np.int32)
  batch = {"users": jnp.asarray(users), "pos": jnp.asarray(pos), "neg": jnp.asarray(neg)}
  model = LinearRecommender(n_users, n_items, DIMS)
  return model, batch, {m: jnp.asarray(f) for m, f in feats.items()}, (users, pos, neg), feats


def np_forward(model, feats, raw_delta=None, proj_delta=None):
  p, P, W = np_params(model)
  xhat = {m: feats[m].astype(np.float64) @ P[m] for m in model.modalities}
  if raw_delta:
    xhat = {m: (feats[m] + raw_delta.get(m, 0)) @ P[m] for m in model.modalities}
  if proj_delta:
    xhat = {m: xhat[m] + proj_delta.get(m, 0) for m in model.modalities}
  V = p["E"] + sum(xhat[m] @ W[m] for m in model.modalities)
  return p["U"], V, xhat, P, W


def test_vanilla_is_bpr_plus_emb(linear_case):
  model, batch, feats, (users, pos, neg), np_feats = linear_case
  loss, aux = make_defence_loss("vanilla", {"reg_weight": REG})(model, batch, feats, None)
  U, V, *_ = np_forward(model, np_feats)
  expected = np_bpr(U, V, users, pos, neg) + REG * np_emb(U, V, users, pos, neg)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_apr_loss_equals_formula(linear_case):
  model, batch, feats, (users, pos, neg), np_feats = linear_case
  eps, lam = 0.3, 2.0
  loss, aux = make_defence_loss("apr", {"reg_weight": REG, "epsilon": eps, "adv_weight": lam})(
      model, batch, feats, None)
  U, V, *_ = np_forward(model, np_feats)
  gU, gV = np_bpr_grads(U, V, users, pos, neg)
  adv = np_bpr(U + eps * row_normalize(gU), V + eps * row_normalize(gV), users, pos, neg)
  clean = np_bpr(U, V, users, pos, neg)
  np.testing.assert_allclose(aux["bpr_adv"], adv, rtol=1e-5)
  np.testing.assert_allclose(loss, clean + lam * adv + REG * np_emb(U, V, users, pos, neg),
                             rtol=1e-5)
  assert adv > clean  # the perturbation ascends the loss


@pytest.mark.parametrize("relative", [False, True])
def test_amr_loss_equals_formula(linear_case, relative):
  model, batch, feats, (users, pos, neg), np_feats = linear_case
  eps, lam = 0.4, 1.5
  loss, aux = make_defence_loss("amr", {"reg_weight": REG, "epsilon": eps, "adv_weight": lam,
                                        "amr_relative_budget": relative})(
      model, batch, feats, None)
  U, V, xhat, P, W = np_forward(model, np_feats)
  _, gV = np_bpr_grads(U, V, users, pos, neg)
  g_image = gV @ W["image"].T @ P["image"].T  # ∂BPR/∂f_i^image, (n_items, d)
  radius = eps * (np.linalg.norm(np_feats["image"], axis=1, keepdims=True) if relative else 1)
  d = radius * row_normalize(g_image)
  Ua, Va, *_ = np_forward(model, np_feats, raw_delta={"image": d})
  adv = np_bpr(Ua, Va, users, pos, neg)
  np.testing.assert_allclose(aux["bpr_adv"], adv, rtol=1e-5)
  np.testing.assert_allclose(loss, np_bpr(U, V, users, pos, neg) + lam * adv
                             + REG * np_emb(U, V, users, pos, neg), rtol=1e-5)


def test_amr_modality_is_configurable_and_checked(linear_case):
  model, batch, feats, *_ = linear_case
  assert amr.default_amr_modality(("audio", "image")) == "image"
  assert amr.default_amr_modality(("acoustic", "text")) == "acoustic"
  _, a_img = make_defence_loss("amr", {})(model, batch, feats, None)
  _, a_aud = make_defence_loss("amr", {"amr_modality": "audio"})(model, batch, feats, None)
  assert float(a_img["bpr_adv"]) != float(a_aud["bpr_adv"])
  with pytest.raises(ConfigError, match="visual"):
    make_defence_loss("amr", {"amr_modality": "visual"})(model, batch, feats, None)


def test_uat_mc_no_align_loss_equals_formula(linear_case):
  model, batch, feats, (users, pos, neg), np_feats = linear_case
  eps, lam = 0.2, 3.0
  loss, aux = make_defence_loss("uat_mc_no_align", {"reg_weight": REG, "epsilon": eps,
                                                    "adv_weight": lam})(
      model, batch, feats, None)
  U, V, xhat, P, W = np_forward(model, np_feats)
  _, gV = np_bpr_grads(U, V, users, pos, neg)
  delta = {}
  for m in model.modalities:
    g = gV @ W[m].T  # ∂BPR/∂x̂_i^m
    delta[m] = eps * np.linalg.norm(xhat[m], axis=1, keepdims=True) * row_normalize(g)
  Ua, Va, *_ = np_forward(model, np_feats, proj_delta=delta)
  adv = np_bpr(Ua, Va, users, pos, neg)
  np.testing.assert_allclose(aux["bpr_adv"], adv, rtol=1e-5)
  np.testing.assert_allclose(loss, np_bpr(U, V, users, pos, neg) + lam * adv
                             + REG * np_emb(U, V, users, pos, neg), rtol=1e-5)


@functools.partial(nnx.jit, static_argnums=(3, 4))
def inner_steps(model, feats, slots, eps, lam_align):
  """(UAT-MC step with alignment, without alignment) for the batch's slots."""
  projected = model.project(bs.slot_features(model, feats, slots))

  def adv(p):
    return bs.slot_bpr(*bs.slot_vectors(model, p, slots), slots)

  return tuple(uat_mc.uat_mc_perturbation(adv, projected, slots.item_in_batch, epsilon=eps,
                                          align_weight=lam)
               for lam in (lam_align, 0.0))


def reference_style_uat_mc(model, batch, feats, *, eps, lam_adv, lam_align, reg):
  """Independent UAT-MC: δ as rows of the full item table, plain cosine over batch items."""
  users, pos, neg = (np.asarray(batch[k]) for k in ("users", "pos", "neg"))
  ids = np.unique(np.concatenate([pos, neg]))
  xhat = model.project(feats)
  mods = model.modalities

  def vectors(table):
    users_all, items_all = model.encode(table)
    return users_all, items_all

  def bpr(table):
    U, V = vectors(table)
    d = jnp.sum(U[users] * (V[pos] - V[neg]), -1)
    return -jnp.mean(jnp.log(1e-10 + jax.nn.sigmoid(d)))

  def l_adv(rows):  # rows: {m: (len(ids), p)} perturbations of the batch's items
    return bpr({m: xhat[m].at[ids].add(rows[m]) for m in mods})

  def j(rows):
    g = jax.grad(l_adv)(rows)
    cos = [jnp.sum(g[a] * g[b], -1) / (jnp.linalg.norm(g[a], axis=-1)
                                       * jnp.linalg.norm(g[b], axis=-1))
           for i, a in enumerate(mods) for b in mods[i + 1:]]
    return l_adv(rows) + lam_align * jnp.mean(sum(cos) / len(cos))

  zeros = {m: jnp.zeros((len(ids), xhat[m].shape[1])) for m in mods}
  gj = nnx.jit(lambda model, z: jax.grad(j)(z))(model, zeros)
  delta = {m: eps * jnp.linalg.norm(xhat[m][ids], axis=1, keepdims=True)
           * gj[m] / jnp.linalg.norm(gj[m], axis=1, keepdims=True) for m in mods}
  U, V = vectors(xhat)
  emb = sum(jnp.linalg.norm(x) for x in (U[users], V[pos], V[neg])) / len(users)
  loss = bpr(xhat) + lam_adv * l_adv(delta) + reg * emb
  return loss, delta, ids  # (eager: only first-order ops remain here)


@pytest.mark.parametrize("model_name", ["linear", "vbpr_mlp", "mmgcn"])
def test_uat_mc_matches_reference_style_second_order(linear_case, model_name):
  if model_name == "linear":
    model, batch, feats, *_ = linear_case
  else:
    model, feats = tiny_backbone(model_name)
    batch = tiny_batch()
  ref_loss, ref_delta, ids = reference_style_uat_mc(model, batch, feats, eps=0.1, lam_adv=4.0,
                                                    lam_align=3.0, reg=REG)
  if model_name == "linear":  # the whole objective (the real models check the inner step)
    loss, _ = uat_mc.uat_mc_objective(model, batch, feats, None, epsilon=0.1, adv_weight=4.0,
                                      align_weight=3.0, reg_weight=REG)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  # The inner step itself, in slot coordinates.
  slots = bs.slots_for(model, batch)
  delta, no_align = inner_steps(model, feats, slots, 0.1, 3.0)
  item_ids = np.asarray(slots.item_ids)
  for m in model.modalities:
    for k, i in enumerate(ids):
      row = int(np.flatnonzero(item_ids == i)[0])
      np.testing.assert_allclose(delta[m][row], ref_delta[m][k], rtol=1e-4, atol=1e-7)
  # Alignment changes the step (the second-order term is not zero here).
  assert max(float(jnp.max(jnp.abs(delta[m] - no_align[m]))) for m in delta) > 1e-4


def test_mean_pairwise_cosine_closed_form():
  a = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 0.0]])
  b = jnp.array([[0.0, 2.0], [2.0, 2.0], [1.0, 0.0], [-1.0, 0.0]])
  c = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
  w = jnp.array([1.0, 1.0, 1.0, 0.0])
  # rows: (0, 1, 0 [zero row]) ; pairs ab, ac, bc
  expected = np.mean([(0 + 1 + 0) / 3, (1 + 2 ** -0.5 + 2 ** -0.5) / 3, (0 + 0 + 1) / 3])
  np.testing.assert_allclose(uat_mc.mean_pairwise_cosine([a, b, c], w), expected, rtol=1e-6)
  assert float(uat_mc.mean_pairwise_cosine([a], w)) == 0.0
  g = jax.grad(lambda x: uat_mc.mean_pairwise_cosine([x, b], w))(a)
  assert bool(jnp.all(jnp.isfinite(g)))


# ---------------------------------------------------------------------------------------
# Real backbones.
def tiny_data(n_users=8, n_items=12, seed=0):
  rng = np.random.default_rng(seed)
  pairs = np.unique(np.stack([rng.integers(0, n_users, 50), rng.integers(0, n_items, 50)], 1),
                    axis=0).astype(np.int32)
  feats = {"audio": rng.standard_normal((n_items, 6)).astype(np.float32),
           "image": rng.standard_normal((n_items, 10)).astype(np.float32)}
  return InteractionData("tiny", n_users, n_items, pairs[:-6], pairs[-6:-3], pairs[-3:], feats)


def tiny_batch(seed=1, b=6, n_users=8, n_items=12, mask=None):
  rng = np.random.default_rng(seed)
  out = {"users": jnp.asarray(rng.integers(0, n_users, b), jnp.int32),
         "pos": jnp.asarray(rng.integers(0, n_items, b), jnp.int32),
         "neg": jnp.asarray(rng.integers(0, n_items, b), jnp.int32)}
  if mask is not None:
    out["mask"] = jnp.asarray(mask, jnp.float32)
  return out


SMALL = {"embedding_dim": 8, "num_layers": 1}


@functools.lru_cache(maxsize=None)
def tiny_backbone(name):
  data = tiny_data()
  model = build_recommender(name, data, SMALL, nnx.Rngs(0))
  return model, {m: jnp.asarray(f) for m, f in data.features.items()}


@pytest.mark.parametrize("name,mask", [("vbpr_mlp", [1, 1, 1, 1, 0, 0]), ("mmgcn", None)])
def test_epsilon_zero_reduces_to_vanilla(name, mask):
  model, feats = tiny_backbone(name)
  batch = tiny_batch(mask=mask)
  vanilla, vaux = recsys_losses.bpr_objective(model, batch, feats, None, reg_weight=REG)
  for defence in DEFENCES[1:]:
    lam = 2.5
    loss, aux = make_defence_loss(defence, {"reg_weight": REG, "epsilon": 0.0,
                                            "adv_weight": lam})(model, batch, feats, None)
    # ε = 0: the adversarial term is the clean BPR, the clean terms are vanilla's ...
    np.testing.assert_allclose(aux["bpr_adv"], vaux["bpr"], rtol=1e-5, err_msg=defence)
    np.testing.assert_allclose(aux["bpr"], vaux["bpr"], rtol=1e-5, err_msg=defence)
    np.testing.assert_allclose(aux["emb"], vaux["emb"], rtol=1e-5, err_msg=defence)
    # ... so the loss is vanilla's plus λ·BPR (UAT-MC has no auxiliary term by A.7).
    missing_aux = vaux["aux"] if defence.startswith("uat_mc") else 0.0
    np.testing.assert_allclose(loss - lam * aux["bpr_adv"] + missing_aux, vanilla,
                               rtol=1e-5, err_msg=defence)


@pytest.mark.parametrize("name", ["vbpr_mlp", "mmgcn"])
def test_inner_steps_respect_budgets(name):
  model, feats = tiny_backbone(name)
  batch = tiny_batch()
  slots = bs.slots_for(model, batch)
  projected = model.project(bs.slot_features(model, feats, slots))
  eps = 0.1
  delta, _ = inner_steps(model, feats, slots, eps, 3.0)  # compiled by the test above
  inside = np.asarray(slots.item_in_batch)
  for m in model.modalities:
    budget = eps * np.linalg.norm(np.asarray(projected[m]), axis=1)
    d = np.asarray(delta[m])
    assert np.all(np.abs(d) <= budget[:, None] * (1 + 1e-6))
    # Normalised step: norm = budget (the L∞ clip is inactive), or 0 where the batch's
    # gradient cancels (an item that is both positive and negative of one user).
    n = np.linalg.norm(d, axis=1)[inside]
    assert np.all((np.abs(n - budget[inside]) <= 1e-4 * budget[inside]) | (n == 0))
    assert np.mean(n > 0) > 0.7
    assert np.all(d[~inside] == 0)
  # APR: every perturbed row has L2 norm ε (or 0 when its gradient is 0).
  uv, iv = bs.slot_vectors(model, projected, slots)
  du, di = apr.apr_perturbation(uv, iv, slots, 0.3)
  for x in (du, di):
    n = np.linalg.norm(np.asarray(x), axis=1)
    assert np.all((np.abs(n - 0.3) < 1e-5) | (n == 0))
  # AMR: rows of the batch's items have norm ε·||f_i||; others 0.
  raw = bs.slot_features(model, feats, slots)
  d = np.asarray(amr.amr_perturbation(model, raw, slots, "image", 0.2, relative_budget=True,
                                      graph_items="batch"))
  n = np.linalg.norm(d, axis=1)
  radius = 0.2 * np.linalg.norm(np.asarray(raw["image"]), axis=1)[inside]
  assert np.all((np.abs(n[inside] - radius) <= 1e-4 * radius) | (n[inside] == 0))
  assert np.all(n[~inside] == 0)


@functools.partial(nnx.jit, static_argnums=(5,))
def adam_step(model, opt, batch, feats, key, loss_fn):
  (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, feats, key)
  opt.update(model, grads)
  return loss


def adam_steps(model, loss_fn, feats, n_steps=3, seed=0):
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  return [float(adam_step(model, opt, tiny_batch(seed=seed + t), feats, jax.random.key(t),
                          loss_fn)) for t in range(n_steps)]


@pytest.mark.parametrize("name", ["vbpr_mlp", "mmgcn"])
def test_uat_mc_freezes_projection_and_is_deterministic(name):
  data = tiny_data()
  feats = tiny_backbone(name)[1]
  loss_fn = make_defence_loss("uat_mc", {"reg_weight": REG})
  runs = []
  for _ in range(2):
    model = build_recommender(name, data, SMALL, nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    losses = adam_steps(model, loss_fn, feats)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    runs.append((losses, after))
  # Deterministic for a seed: identical losses and parameters.
  assert runs[0][0] == runs[1][0]
  jax.tree.map(np.testing.assert_array_equal, runs[0][1], runs[1][1])
  # Projections frozen: projecting raw features gives the same x̂ before and after.
  fresh = build_recommender(name, data, SMALL, nnx.Rngs(0))
  trained = build_recommender(name, data, SMALL, nnx.Rngs(0))
  nnx.update(trained, runs[0][1])
  for m in fresh.modalities:
    np.testing.assert_array_equal(fresh.project(feats)[m], trained.project(feats)[m])
  # ... while the rest of the model did train.
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  assert any(jax.tree.leaves(changed))


def test_training_and_serving_use_the_same_modality_order():
  """A perturbation of one modality moves the training loss exactly as serving scores.

  The reference code concatenates [t; v] in its training loss and [v; t] at inference
  (A.7); here the adversarial BPR the defence trains on must equal the BPR computed from
  the serving path (the full encode that attacks and evaluation use) with the same
  perturbation on the same modality, and must not depend on the order of the feature
  dict the caller passes.
  """
  model, feats = tiny_backbone("vbpr_mlp")
  batch = tiny_batch()
  users, pos, neg = (np.asarray(batch[k]) for k in ("users", "pos", "neg"))
  slots = bs.slots_for(model, batch)
  projected = model.project(bs.slot_features(model, feats, slots))
  # Perturb only "image" (a modality that is not first in the sorted order).
  delta_rows = {m: jnp.zeros_like(projected[m]) for m in projected}
  delta_rows["image"] = 0.3 * jnp.ones_like(projected["image"]) * slots.item_in_batch[:, None]
  train_adv = bs.slot_bpr(*bs.slot_vectors(model, {m: projected[m] + delta_rows[m]
                                                   for m in projected}, slots), slots)
  # Serving: the full table, perturbed on the same items and modality, scored by encode.
  inside = np.asarray(slots.item_in_batch)
  table = model.project(feats)
  table = dict(table, image=table["image"].at[np.asarray(slots.item_ids)[inside]].set(
      (projected["image"] + delta_rows["image"])[inside]))
  U, V = model.encode(table)
  scores = np.asarray(U @ V.T)
  d = scores[users, pos] - scores[users, neg]
  serve_adv = -np.mean(np.log(1e-10 + 1 / (1 + np.exp(-d))))
  np.testing.assert_allclose(train_adv, serve_adv, rtol=1e-5)
  # The swapped order (the reference's defect) gives a different loss on this model.
  swapped = {"audio": projected["image"] + delta_rows["image"], "image": projected["audio"]}
  wrong = bs.slot_bpr(*bs.slot_vectors(model, swapped, slots), slots)
  assert abs(float(wrong) - float(train_adv)) > 1e-4
  # The caller's dict order does not matter.
  reordered = {m: feats[m] for m in reversed(list(feats))}
  for name in ("uat_mc_no_align", "amr"):
    fn = make_defence_loss(name, {})
    np.testing.assert_array_equal(fn(model, batch, feats, None)[0],
                                  fn(model, batch, reordered, None)[0])


def test_hyperparameters_presets_and_errors():
  hp = defence_hyperparameters("uat_mc", {"defence_preset": "mmgcn_clothing"})
  assert (hp["epsilon"], hp["adv_weight"], hp["align_weight"]) == (0.1, 8.0, 8.0)
  hp = defence_hyperparameters("uat_mc_no_align", {"defence_preset": "vbpr_baby"})
  assert (hp["epsilon"], hp["adv_weight"], hp["align_weight"]) == (0.05, 5.0, 0.0)
  assert defence_hyperparameters("uat_mc", {"defence_preset": "vbpr_baby",
                                            "epsilon": 0.2})["epsilon"] == 0.2
  with pytest.raises(ConfigError, match="unknown"):
    defence_hyperparameters("fgsm_at", {})
  with pytest.raises(ConfigError, match="defence_preset"):
    defence_hyperparameters("uat_mc", {"defence_preset": "nope"})
  with pytest.raises(ConfigError, match="epsilon"):
    defence_hyperparameters("apr", {"epsilon": -1.0})


@pytest.mark.parametrize("widths", [(6, 10), (128, 128)])
def test_alignment_needs_a_common_projected_space(widths):
  """VBPR has no shared projected space: alignment is refused whatever the raw widths,
  also at equal widths (TikTok's 128/128), where a shape test would let it through."""
  rng = np.random.default_rng(0)
  data = tiny_data()
  data = InteractionData("tiny", data.n_users, data.n_items, data.train, data.valid, data.test,
                         {m: rng.standard_normal((data.n_items, w)).astype(np.float32)
                          for m, w in zip(("audio", "image"), widths)})
  model = build_recommender("vbpr", data, {}, nnx.Rngs(0))  # identity projection
  assert not model.shared_projected_space
  assert tiny_backbone("vbpr_mlp")[0].shared_projected_space
  assert tiny_backbone("mmgcn")[0].shared_projected_space
  feats = {m: jnp.asarray(f) for m, f in data.features.items()}
  with pytest.raises(ConfigError, match="shared projected space.*VBPR"):
    make_defence_loss("uat_mc", {})(model, tiny_batch(), feats, None)
  # Without alignment UAT-MC is defined on VBPR.
  loss, _ = make_defence_loss("uat_mc_no_align", {})(model, tiny_batch(), feats, None)
  assert np.isfinite(float(loss))


# ---------------------------------------------------------------------------------------
# Graph models: every item the batch's loss reaches is perturbed (A.7), not only the
# batch's own items. References: per-item brute force on the full item table.
def _full_table_bpr(model, batch):
  users, pos, neg = (np.asarray(batch[k]) for k in ("users", "pos", "neg"))

  def bpr(projected_table):
    U, V = model.encode(projected_table)
    d = jnp.sum(U[users] * (V[pos] - V[neg]), -1)
    return -jnp.mean(jnp.log(1e-10 + jax.nn.sigmoid(d)))
  return bpr


def _per_item_gradients(loss_of_table, table, modalities):
  """{m: (n_items, p_m)}: row i is ∇ of the loss w.r.t. a perturbation of row i alone."""
  @jax.jit
  def row_grad(i):
    def f(rows):
      return loss_of_table({m: table[m].at[i].add(rows[m]) for m in modalities})
    return jax.grad(f)({m: jnp.zeros(table[m].shape[1]) for m in modalities})
  n = table[modalities[0]].shape[0]
  rows = [row_grad(i) for i in range(n)]  # brute force: one gradient per item
  return {m: np.stack([np.asarray(r[m]) for r in rows]) for m in modalities}


def test_graph_defences_perturb_every_item_with_gradient():
  model, feats = tiny_backbone("mmgcn")
  batch = tiny_batch(b=3)
  mods = model.modalities
  eps, lam = 0.1, 3.0
  xhat = {m: np.asarray(v, np.float64) for m, v in model.project(feats).items()}
  bpr = _full_table_bpr(model, batch)
  table = {m: jnp.asarray(xhat[m], jnp.float32) for m in mods}
  g = _per_item_gradients(bpr, table, mods)
  has = np.any(np.stack([np.any(g[m] != 0, axis=1) for m in mods]), axis=0)
  in_batch = np.zeros(model.n_items, bool)
  in_batch[np.concatenate([np.asarray(batch["pos"]), np.asarray(batch["neg"])])] = True
  assert np.sum(has & ~in_batch) >= 2  # the graph carries gradient beyond the batch
  slots = bs.slots_for(model, batch)

  def adv(p):
    return bs.slot_bpr(*bs.slot_vectors(model, p, slots), slots)

  projected = model.project(bs.slot_features(model, feats, slots))
  rows = bs.perturbed_rows(model, slots)  # the default: every item with gradient
  # Without alignment: each item's own normalised gradient at its own budget.
  got = nnx.jit(lambda model: uat_mc.uat_mc_perturbation(
      adv, projected, rows, epsilon=eps, align_weight=0.0))(model)
  for m in mods:
    expect = eps * np.linalg.norm(xhat[m], axis=1, keepdims=True) * row_normalize(g[m])
    np.testing.assert_allclose(got[m], expect, rtol=1e-4, atol=1e-7)
  # With alignment: ∇J on the full table, J = L + λ · mean over the items with gradient
  # (found by the brute force above) of the plain cosine.
  H = np.flatnonzero(has)

  def j(delta):
    grads = jax.grad(lambda d: bpr({m: table[m] + d[m] for m in mods}))(delta)
    a, b = grads[mods[0]][H], grads[mods[1]][H]
    cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))
    return bpr({m: table[m] + delta[m] for m in mods}) + lam * jnp.mean(cos)

  gj = jax.jit(jax.grad(j))({m: jnp.zeros_like(table[m]) for m in mods})
  aligned = nnx.jit(lambda model: uat_mc.uat_mc_perturbation(
      adv, projected, rows, epsilon=eps, align_weight=lam))(model)
  for m in mods:
    expect = eps * np.linalg.norm(xhat[m], axis=1, keepdims=True) * row_normalize(
        np.asarray(gj[m], np.float64)) * has[:, None]
    np.testing.assert_allclose(aligned[m], expect, rtol=2e-4, atol=1e-6)
  # The objectives' adversarial terms are the BPR of those perturbed tables ...
  _, aux = make_defence_loss("uat_mc_no_align", {"epsilon": eps})(model, batch, feats, None)
  np.testing.assert_allclose(aux["bpr_adv"], bpr({m: table[m] + got[m] for m in mods}),
                             rtol=1e-5)
  # ... and "batch", the named narrower option, perturbs only the batch's items.
  _, aux_b = make_defence_loss("uat_mc_no_align", {"epsilon": eps, "graph_items": "batch"})(
      model, batch, feats, None)
  only_batch = {m: table[m] + got[m] * jnp.asarray(in_batch)[:, None] for m in mods}
  np.testing.assert_allclose(aux_b["bpr_adv"], bpr(only_batch), rtol=1e-5)
  assert abs(float(aux_b["bpr_adv"]) - float(aux["bpr_adv"])) > 1e-6
  with pytest.raises(ConfigError, match="graph_items"):
    make_defence_loss("uat_mc", {"graph_items": "all"})


def test_graph_amr_perturbs_every_item_with_gradient():
  model, feats = tiny_backbone("mmgcn")
  batch = tiny_batch(b=3)
  eps = 0.2
  bpr = _full_table_bpr(model, batch)

  def raw_loss(raw_table):
    return bpr(model.project(dict(feats, image=raw_table["image"])))

  g = _per_item_gradients(raw_loss, {"image": feats["image"]}, ("image",))["image"]
  f = np.asarray(feats["image"], np.float64)
  d = eps * np.linalg.norm(f, axis=1, keepdims=True) * row_normalize(g)
  in_batch = np.zeros(model.n_items, bool)
  in_batch[np.concatenate([np.asarray(batch["pos"]), np.asarray(batch["neg"])])] = True
  assert np.any(np.linalg.norm(d[~in_batch], axis=1) > 0)
  _, aux = make_defence_loss("amr", {"epsilon": eps, "amr_modality": "image"})(
      model, batch, feats, None)
  expect = raw_loss({"image": feats["image"] + jnp.asarray(d, jnp.float32)})
  np.testing.assert_allclose(aux["bpr_adv"], expect, rtol=1e-5)
