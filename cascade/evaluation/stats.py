"""Streaming statistics of features, exact over any split of the images into batches and ranks.

* :class:`FeatureStats`: the Gaussian of FID / FD_DINOv2 (Heusel et al. 2017) from the running
  count n, sum Σx and sum of outer products Σxxᵀ in float64 — memory O(D²), constant in N, as
  EDM2's ``calculate_metrics.py`` accumulates them. μ = Σx / n, Σ = (Σxxᵀ − n μμᵀ) / (n − 1)
  (unbiased, as ``numpy.cov`` in ADM's evaluator). Sums over ranks are all-reduced, so the
  statistics of K ranks equal one process's up to float64 rounding of the summation order.
* :class:`ScoreStats`: the Inception Score (Salimans et al. 2016) from per-split sums. Within a
  split of n images, E_x KL(p(y|x) ‖ p(y)) = (1/n) Σ_i Σ_c p_ic log p_ic − Σ_c m_c log m_c with
  m = (1/n) Σ_i p_i, so the split needs n, Σ p log p and the column sums Σ_i p_i only. Image i
  belongs to split ⌊i / ⌈N / splits⌉⌋ of its global index: for N = 50,000 and 10 splits these
  are ADM's evaluator's contiguous 5,000-image parts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from cascade.utils.distributed import all_reduce_sum, collective_device

__all__ = ["FeatureStats", "ScoreStats", "all_reduce_sum", "gather_rows"]


def gather_rows(rows: Tensor, indices: Tensor) -> Tensor:
    """Every rank's ``rows`` (n_r, D) with their global ``indices`` (n_r,) → all rows (N, D) in index order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return rows[indices.argsort()]
    device = collective_device()
    count = torch.tensor([len(rows)], device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros(most, rows.shape[1], dtype=rows.dtype, device=device)
    padded[: len(rows)] = rows.to(device)
    where = torch.full((most,), -1, dtype=torch.long, device=device)
    where[: len(rows)] = indices.to(device)
    all_rows, all_where = [torch.zeros_like(padded) for _ in counts], [torch.zeros_like(where) for _ in counts]
    dist.all_gather(all_rows, padded)
    dist.all_gather(all_where, where)
    rows_cat, where_cat = torch.cat(all_rows), torch.cat(all_where)
    keep = where_cat >= 0
    rows_cat, where_cat = rows_cat[keep], where_cat[keep]
    return rows_cat[where_cat.argsort()].to(rows.device)


class FeatureStats:
    """Running n, Σx (D,) and Σxxᵀ (D, D) in float64; :attr:`mu` and :attr:`sigma` at any time."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: Tensor) -> None:
        """Add features (B, D)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features of shape {tuple(features.shape)} do not match dimension {self.dim}")
        x = features.detach().double().cpu()  # (B, D)
        self.n += len(x)
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x  # (D, D)

    def all_reduce(self) -> FeatureStats:
        """Sum n, Σx and Σxxᵀ over ranks (in place); returns self."""
        self.n = int(all_reduce_sum(torch.tensor([self.n], dtype=torch.float64)).item())
        self.sum = all_reduce_sum(self.sum)
        self.outer = all_reduce_sum(self.outer)
        return self

    @property
    def mu(self) -> Tensor:
        return self.sum / self.n  # (D,)

    @property
    def sigma(self) -> Tensor:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.mu
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)  # (D, D)
        return (cov + cov.T) / 2

    def save(self, path: str | Path, **extra: np.ndarray) -> None:
        """``mu``, ``sigma`` and ``n`` (and ``extra`` arrays) as an ``.npz`` — the keys of ADM's reference batches."""
        np.savez(path, mu=self.mu.numpy(), sigma=self.sigma.numpy(), n=np.array(self.n), **extra)


class ScoreStats:
    """Per-split sums for the Inception Score of N class-probability vectors, split by global index."""

    def __init__(self, num: int, num_classes: int, splits: int = 10) -> None:
        if num < 1 or splits < 1:
            raise ValueError(f"the Inception Score needs at least one image and one split, got {num} and {splits}")
        self.splits = min(splits, num)
        self.split_size = math.ceil(num / self.splits)
        self.splits = math.ceil(num / self.split_size)  # as torch.chunk: the last split may be smaller
        self.count = torch.zeros(self.splits, dtype=torch.float64)
        self.plogp = torch.zeros(self.splits, dtype=torch.float64)
        self.colsum = torch.zeros(self.splits, num_classes, dtype=torch.float64)

    def update(self, probs: Tensor, indices: Tensor) -> None:
        """Add class probabilities (B, C) of the images with global indices (B,)."""
        p = probs.detach().double().cpu()  # (B, C)
        split = indices.cpu().long() // self.split_size  # (B,)
        plogp = torch.where(p > 0, p * p.clamp(min=1e-300).log(), 0.0).sum(dim=1)  # (B,)
        self.count.index_add_(0, split, torch.ones(len(p), dtype=torch.float64))
        self.plogp.index_add_(0, split, plogp)
        self.colsum.index_add_(0, split, p)

    def all_reduce(self) -> ScoreStats:
        self.count, self.plogp, self.colsum = (all_reduce_sum(t) for t in (self.count, self.plogp, self.colsum))
        return self

    def score(self) -> tuple[float, float]:
        """Mean and (population) standard deviation over the splits of exp(E_x KL(p(y|x) ‖ p(y)))."""
        marginal = self.colsum / self.count[:, None]  # (S, C)
        cross = torch.where(marginal > 0, marginal * marginal.clamp(min=1e-300).log(), 0.0).sum(dim=1)  # (S,)
        scores = torch.exp(self.plogp / self.count - cross)  # (S,)
        return float(scores.mean()), float(scores.std(unbiased=False)) if len(scores) > 1 else 0.0
