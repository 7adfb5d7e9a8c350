"""Distribution metrics over feature vectors: FID, precision/recall, Inception Score.

Pure functions of (N, D) feature matrices (or (N, C) class probabilities); which network made
the features is :mod:`cascade.evaluation.features`' business. Computed in float64.

* **FID** (Heusel et al. 2017, eq. 6): the Fréchet distance between Gaussians fitted to the two
  feature sets, d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½).
* **Precision / recall** (Kynkäänniemi et al. 2019, "Improved Precision and Recall", §2, eqs. 1–3):
  each point of a set gets a ball reaching its k-th nearest neighbour in that set (k = 3);
  precision is the fraction of generated points inside some real ball, recall the fraction
  of real points inside some generated ball.
* **Inception Score** (Salimans et al. 2016, §4): IS = exp(E_x KL(p(y|x) ‖ p(y))), mean and
  standard deviation over ``splits`` equal parts (10 in the paper and in ADM).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["gaussian_stats", "frechet_distance", "fid", "knn_radii", "precision_recall", "inception_score"]


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64."""
    x = features.double()
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D), got shape {tuple(features.shape)}")
    return x.mean(dim=0), torch.cov(x.T)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix via its eigendecomposition (negative rounding → 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """d²(N(μ₁, Σ₁), N(μ₂, Σ₂)) = ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (Σ₁^½ Σ₂ Σ₁^½)^½.

    The symmetric form Σ₁^½ Σ₂ Σ₁^½ (PSD, same eigenvalues as Σ₁Σ₂) keeps the square root
    real where a singular covariance (fewer samples than dimensions) would make sqrtm(Σ₁Σ₂) complex.
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root1 = _psd_sqrt(sigma1)  # (D, D)
    middle = root1 @ sigma2 @ root1  # (D, D) symmetric PSD
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return max(float(value), 0.0)


def fid(features_a: Tensor, features_b: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def knn_radii(features: Tensor, k: int = 3) -> Tensor:
    """Distance (N,) from each point to its k-th nearest neighbour among the other points of the set."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {len(features)}")
    x = features.double()
    # Row blocks of the (N, N) distances, so memory stays O(block · N) for 50,000 points; the diagonal (0) is the point itself.
    return torch.cat([torch.cdist(chunk, x).kthvalue(k + 1, dim=1).values for chunk in x.split(1024)])  # (N,)


def _coverage(points: Tensor, manifold: Tensor, radii: Tensor, batch: int = 1024) -> float:
    """Fraction of ``points`` within radius of at least one ``manifold`` point: ∃ j ‖p − m_j‖ ≤ r_j."""
    inside = [(torch.cdist(chunk.double(), manifold.double()) <= radii[None, :]).any(dim=1) for chunk in points.split(batch)]
    return float(torch.cat(inside).float().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` (N_f, D) against ``real`` (N_r, D)."""
    precision = _coverage(fake, real, knn_radii(real, k))
    recall = _coverage(real, fake, knn_radii(fake, k))
    return precision, recall


def inception_score(probs: Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) of class probabilities (N, C): mean and std over ``splits`` parts.

    p(y) is the mean of p(y|x) within each part. Between 1 (every image gets the same
    distribution) and C (confident, with all classes equally often).
    """
    p = probs.double()
    scores = []
    for part in p.chunk(min(splits, len(p))):
        marginal = part.mean(dim=0, keepdim=True)  # (1, C)
        kl = torch.where(part > 0, part * (part.clamp(min=1e-300).log() - marginal.clamp(min=1e-300).log()), 0.0)  # (n, C)
        scores.append(math.exp(float(kl.sum(dim=1).mean())))
    scores_t = torch.tensor(scores, dtype=torch.float64)
    return float(scores_t.mean()), float(scores_t.std(unbiased=False)) if len(scores) > 1 else 0.0
