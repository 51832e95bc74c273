"""Geometry diagnostics of a classifier f(x) = W φ(x) (METHODS.md B.4, B.5).

* NC1 = tr(Σ_W Σ_B⁺)/C (Papyan et al. 2020): within-class over between-class scatter
  of the penultimate features. Σ_W averages the class covariances and Σ_B the class
  means around their mean μ_G, each class weighted equally (under imbalance a
  frequency-weighted Σ_B would be dominated by the head classes).
* Equiangularity: mean over c ≠ c' of |cos(μ_c − μ_G, μ_c' − μ_G) + 1/(C−1)|
  (0 for class means on a simplex ETF).
* ETF distance of W: mean((W̃W̃ᵀ − T)²), W̃ the row-normalised classifier, T the
  simplex-ETF Gram (1 on the diagonal, −1/(C−1) off it) — MCAT's L_ETF value.
* Theorem-1 margin bound: with unit-norm features φ̃ and rows w̃, the feature-space
  margin of an example is m = min_{j≠y} (w̃_y − w̃_j)·φ̃ / ||w̃_y − w̃_j|| (its
  distance to the nearest pairwise decision hyperplane); at φ̃ = w̃_y it equals
  sin(θ_yj/2), so sin(θ_min/2) is the best margin W allows, and an ε-perturbation
  with an L-Lipschitz normalised feature map lowers it to ≥ sin(θ_min/2) − 2Lε.
  L is not known for a network; `margin_bound` estimates it from attack pairs,
  L̂ = max ||φ̃(x') − φ̃(x)||₂ / ||x' − x||∞ (a lower bound on L, so the reported
  bound is optimistic) and reports it beside the measured clean/adversarial margins.

Computed in float64 NumPy (evaluation only, d ≤ a few thousand).
"""

from typing import Dict

import numpy as np

from uatmc_jax.longtail import etf


def _class_statistics(features, labels, num_classes):
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  present = np.bincount(labels, minlength=num_classes) > 0
  means = np.zeros((num_classes, features.shape[1]))
  np.add.at(means, labels, features)
  counts = np.bincount(labels, minlength=num_classes)
  means[present] /= counts[present, None]
  return features, labels, means, present


def nc1(features: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
  """tr(Σ_W Σ_B⁺)/C over the classes present in `labels`; features (N, d)."""
  features, labels, means, present = _class_statistics(features, labels, num_classes)
  classes = np.flatnonzero(present)
  mu_g = means[classes].mean(0)
  d = features.shape[1]
  sigma_w = np.zeros((d, d))
  for c in classes:  # C small d×d products; not a hot path
    centred = features[labels == c] - means[c]
    sigma_w += centred.T @ centred / len(centred)
  sigma_w /= len(classes)
  between = means[classes] - mu_g
  sigma_b = between.T @ between / len(classes)
  return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True))
               / len(classes))


def equiangularity(features: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
  """mean_{c≠c'} |cos(μ_c − μ_G, μ_c' − μ_G) + 1/(C−1)|."""
  _, _, means, present = _class_statistics(features, labels, num_classes)
  classes = np.flatnonzero(present)
  k = len(classes)
  centred = means[classes] - means[classes].mean(0)
  unit = centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
  cos = unit @ unit.T
  off = ~np.eye(k, dtype=bool)
  return float(np.mean(np.abs(cos[off] + 1. / (k - 1))))


def etf_distance(weight: np.ndarray) -> float:
  """mean((W̃W̃ᵀ − T)²) for classifier rows weight (C, d)."""
  return float(etf.etf_gram_penalty(np.asarray(weight, np.float32)))


def _unit_rows(a):
  a = np.asarray(a, np.float64)
  return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def min_classifier_angle(weight: np.ndarray) -> float:
  """θ_min: the smallest angle (radians) between two classifier rows."""
  w = _unit_rows(weight)
  cos = np.clip(w @ w.T, -1., 1.)
  np.fill_diagonal(cos, -1.)
  return float(np.arccos(cos.max()))


def feature_margins(features: np.ndarray, labels: np.ndarray,
                    weight: np.ndarray) -> np.ndarray:
  """min_{j≠y} (w̃_y − w̃_j)·φ̃ / ||w̃_y − w̃_j|| per example (N,); < 0 = wrong."""
  phi = _unit_rows(features)
  w = _unit_rows(weight)
  labels = np.asarray(labels)
  diff = w[labels][:, None, :] - w[None, :, :]                     # (N, C, d)
  norm = np.linalg.norm(diff, axis=-1)
  score = np.einsum("ncd,nd->nc", diff, phi) / np.maximum(norm, 1e-12)
  score[np.arange(len(labels)), labels] = np.inf
  return score.min(axis=1)


def _summary(v):
  v = np.asarray(v, np.float64)
  return {"mean": float(v.mean()), "min": float(v.min()),
          "q10": float(np.quantile(v, 0.1)), "median": float(np.median(v))}


def margin_bound(weight: np.ndarray, labels: np.ndarray, clean_features: np.ndarray,
                 adv_features: np.ndarray, clean_inputs: np.ndarray,
                 adv_inputs: np.ndarray, epsilon: float) -> Dict[str, object]:
  """Theorem-1 bound sin(θ_min/2) − 2L̂ε against measured feature margins.

  Returns theta_min, sin_half_theta_min, lipschitz_estimate, epsilon, bound, the
  clean and adversarial margin summaries, and the share of adversarial margins at
  or above the bound.
  """
  theta = min_classifier_angle(weight)
  phi_c, phi_a = _unit_rows(clean_features), _unit_rows(adv_features)
  n = len(labels)
  dx = np.abs(np.asarray(adv_inputs, np.float64) - np.asarray(clean_inputs, np.float64))
  dx = dx.reshape(n, -1).max(1)
  moved = dx > 0
  ratios = np.linalg.norm(phi_a - phi_c, axis=1)[moved] / dx[moved]
  lipschitz = float(ratios.max()) if ratios.size else 0.
  bound = float(np.sin(theta / 2.) - 2. * lipschitz * epsilon)
  clean_m = feature_margins(clean_features, labels, weight)
  adv_m = feature_margins(adv_features, labels, weight)
  return {"theta_min": theta, "sin_half_theta_min": float(np.sin(theta / 2.)),
          "lipschitz_estimate": lipschitz, "epsilon": float(epsilon), "bound": bound,
          "clean_margin": _summary(clean_m), "adversarial_margin": _summary(adv_m),
          "share_adversarial_margin_above_bound": float(np.mean(adv_m >= bound))}
