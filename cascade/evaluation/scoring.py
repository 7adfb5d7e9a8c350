"""Score a batch of samples against a reference at the papers' scale: FID, sFID, IS, precision/recall, FD_DINOv2.

Protocol (ADM's evaluator, openai/guided-diffusion ``evaluations/evaluator.py``; EDM2's
``calculate_metrics.py`` for FD_DINOv2):

* **Features, streamed and sharded.** Each rank extracts features of its blocks of images
  (:mod:`cascade.evaluation.sources`) and accumulates :class:`~cascade.evaluation.stats.FeatureStats`
  (and the Inception Score's per-split sums); ranks all-reduce statistics, never images. Only the
  features that precision/recall needs (``pr_num`` reference and ``pr_samples`` sample rows) are gathered.
* **FID / FD_DINOv2**: Fréchet distance between the Gaussians (:func:`cascade.evaluation.fid.frechet_distance`).
* **IS**: 10 splits of the class probabilities of the FID network, mean (and std) of the split scores.
* **Precision / recall**: Kynkäänniemi et al. 2019, k = 3, as ADM's evaluator computes them: the first
  ``pr_num`` reference images (its reference batches hold 10,000) against every sample (``pr_samples``,
  default all; a smaller number bounds the O(N²) k-NN work).
* **sFID** (Nash et al. 2021; ADM): the Fréchet distance of the first 7 channels of Inception's
  ``mixed_6/conv`` (7×17×17 = 2023-d). torch-fidelity's ``FeatureExtractorInceptionV3`` does not
  expose that layer, so sFID is reported as unavailable (``None`` with a note), never approximated.
* **Reference**: an ADM reference batch ``.npz`` (``mu``/``sigma`` used for FID when present — they
  come from the FID Inception —, images ``arr_0`` for everything else), a folder of images or a data
  set; statistics computed from images are cached in ``cache_dir`` under a key of (features,
  resolution, source digest, counts), so a reference is read once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from cascade.evaluation.features import FeatureExtractor
from cascade.evaluation.fid import frechet_distance, precision_recall
from cascade.evaluation.sources import ImageSource, SourceError
from cascade.evaluation.stats import FeatureStats, ScoreStats, gather_rows
from cascade.utils.npz import npz_keys, read_array

__all__ = ["SFID_UNAVAILABLE", "FeaturePass", "Reference", "extract_pass", "reference_statistics", "score_samples"]

SFID_UNAVAILABLE = (
    "sFID needs the first 7 channels of the FID Inception's mixed_6/conv (17x17 spatial, 2023-d), which "
    "torch-fidelity's FeatureExtractorInceptionV3 does not expose; not computed"
)


@dataclass
class FeaturePass:
    """What one pass of a feature network over a source leaves: Gaussian statistics, IS sums, rows for precision/recall."""

    stats: FeatureStats
    score: ScoreStats | None = None
    rows: Tensor | None = None  # (min(N, pr_num), D) float32, in index order


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@torch.no_grad()
def extract_pass(
    source: ImageSource,
    extractors: dict[str, FeatureExtractor],
    *,
    batch_size: int = 100,
    pr_num: int = 0,
    is_splits: int = 10,
    inception_score_of: str | None = None,
    progress: bool = True,
    desc: str = "features",
) -> dict[str, FeaturePass]:
    """One pass over ``source`` (this rank's blocks) through every extractor; statistics all-reduced over ranks."""
    rank, world = _rank_world()
    probe = torch.zeros(1, 3, source.resolution, source.resolution)
    results: dict[str, FeaturePass] = {}
    kept_rows: dict[str, list[Tensor]] = {name: [] for name in extractors}
    kept_index: list[Tensor] = []
    for name, extractor in extractors.items():
        features, probs = extractor(probe)
        score = None
        if name == inception_score_of and probs.shape[1] > 0:
            score = ScoreStats(source.num, probs.shape[1], is_splits)
        results[name] = FeaturePass(FeatureStats(features.shape[1]), score)
    blocks = -(-source.num // batch_size)
    bar = tqdm(total=source.num, desc=desc, unit="img", disable=not (progress and rank == 0), dynamic_ncols=True, leave=False)
    for indices, pixels in source.batches(batch_size, rank, world):
        images = pixels.float() / 127.5 - 1  # (B, 3, H, W) in [−1, 1]; the extractors quantise back exactly
        keep = indices < pr_num
        if keep.any():
            kept_index.append(indices[keep])
        for name, extractor in extractors.items():
            features, probs = extractor(images)  # (B, D), (B, C)
            results[name].stats.update(features)
            if results[name].score is not None:
                results[name].score.update(probs, indices)
            if keep.any():
                kept_rows[name].append(features[keep].float().cpu())
        bar.update(len(indices) * world)  # ranks advance together
    bar.close()
    del blocks
    index = torch.cat(kept_index) if kept_index else torch.zeros(0, dtype=torch.long)
    for name, result in results.items():
        result.stats.all_reduce()
        if result.score is not None:
            result.score.all_reduce()
        if pr_num > 0:
            rows = torch.cat(kept_rows[name]) if kept_rows[name] else torch.zeros(0, result.stats.dim)
            result.rows = gather_rows(rows, index)
    return results


@dataclass
class Reference:
    """Reference statistics per feature name: (mu, sigma) and, where images were available, rows for precision/recall."""

    description: str
    resolution: int | None
    mu: dict[str, Tensor] = field(default_factory=dict)
    sigma: dict[str, Tensor] = field(default_factory=dict)
    rows: dict[str, Tensor] = field(default_factory=dict)
    num: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _cache_key(name: str, extractor: FeatureExtractor, source: ImageSource, pr_num: int) -> str:
    record = {
        "metric": name,
        "features": extractor.description,
        "resolution": source.resolution,
        "num": source.num,
        "pr_num": pr_num,
        "source": source.digest(),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def reference_statistics(
    source: ImageSource | None,
    extractors: dict[str, FeatureExtractor],
    *,
    npz: str | Path | None = None,
    cache_dir: str | Path | None = None,
    pr_num: int = 10_000,
    batch_size: int = 100,
    progress: bool = True,
) -> Reference:
    """The reference for every extractor: precomputed ``mu``/``sigma`` of an ADM batch (FID only), a cache file, or a pass.

    ``source`` supplies the images (None: an ``.npz`` with statistics only). Passes over images
    run sharded over ranks; the cache is written by rank 0.
    """
    rank, _ = _rank_world()
    description = source.description if source is not None else str(npz)
    reference = Reference(description, source.resolution if source is not None else None)
    keys = set(npz_keys(npz)) if npz is not None else set()
    if "mu" in keys and "sigma" in keys and "fid" in extractors:
        reference.mu["fid"] = torch.from_numpy(read_array(npz, "mu").astype(np.float64))
        reference.sigma["fid"] = torch.from_numpy(read_array(npz, "sigma").astype(np.float64))
        reference.num["fid"] = -1  # unknown: the statistics of ADM's reference batches come from the whole training set
        reference.notes.append(f"FID against the mu/sigma stored in {npz}")
    missing = {
        name: ex
        for name, ex in extractors.items()
        if name not in reference.mu or (pr_num > 0 and name == "fid" and source is not None)
    }
    if missing and source is None:
        raise SourceError(
            f"{npz} holds no images (arr_0) to compute {', '.join(missing)} statistics from; pass a reference "
            "batch with images, a folder, or a data set"
        )
    todo: dict[str, FeatureExtractor] = {}
    cache = Path(cache_dir) if cache_dir is not None else None
    for name, extractor in missing.items():
        path = cache / f"ref_{name}_{_cache_key(name, extractor, source, pr_num)}.npz" if cache is not None else None
        if path is not None and path.is_file():
            with np.load(path) as saved:
                if name not in reference.mu:
                    reference.mu[name], reference.sigma[name] = torch.from_numpy(saved["mu"]), torch.from_numpy(saved["sigma"])
                    reference.num[name] = int(saved["n"])
                if "rows" in saved:
                    reference.rows[name] = torch.from_numpy(saved["rows"])
            reference.notes.append(f"{name} reference statistics read from the cache {path}")
        else:
            todo[name] = extractor
    if todo:
        passes = extract_pass(source, todo, batch_size=batch_size, pr_num=pr_num, progress=progress, desc="reference features")
        for name, result in passes.items():
            if name not in reference.mu:
                reference.mu[name], reference.sigma[name] = result.stats.mu, result.stats.sigma
                reference.num[name] = result.stats.n
            if result.rows is not None and len(result.rows):
                reference.rows[name] = result.rows
            if cache is not None and rank == 0:
                cache.mkdir(parents=True, exist_ok=True)
                path = cache / f"ref_{name}_{_cache_key(name, todo[name], source, pr_num)}.npz"
                tmp = path.with_name(path.name + ".tmp.npz")
                extra = {"rows": result.rows.numpy()} if result.rows is not None and len(result.rows) else {}
                result.stats.save(tmp, **extra)
                tmp.replace(path)
                reference.notes.append(f"{name} reference statistics cached in {path}")
    return reference


def score_samples(
    samples: ImageSource,
    reference: Reference,
    extractors: dict[str, FeatureExtractor],
    *,
    pr_k: int = 3,
    pr_samples: int | None = None,
    is_splits: int = 10,
    batch_size: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of ``samples`` against ``reference`` (the same on every rank): FID and FD_* per extractor, IS, precision/recall."""
    if reference.resolution is not None and reference.resolution != samples.resolution:
        raise SourceError(
            f"the reference is at {reference.resolution}px but the samples are at {samples.resolution}px; "
            "compare at one resolution (a reference batch of the samples' size)"
        )
    passes = extract_pass(
        samples,
        extractors,
        batch_size=batch_size,
        pr_num=(samples.num if pr_samples is None else pr_samples) if "fid" in extractors else 0,
        is_splits=is_splits,
        inception_score_of="fid",
        progress=progress,
        desc="sample features",
    )
    out: dict[str, Any] = {
        "num_samples": samples.num,
        "resolution": samples.resolution,
        "samples": samples.description,
        "reference": reference.description,
        "reference_num": dict(reference.num),
        "features": {name: ex.description for name, ex in extractors.items()},
    }
    for name, result in passes.items():
        key = "fid" if name == "fid" else f"fd_{name}"
        out[key] = frechet_distance(result.stats.mu, result.stats.sigma, reference.mu[name], reference.sigma[name])
        if result.score is not None:
            out["is"], out["is_std"] = result.score.score()
            out["is_splits"] = result.score.splits
    out["sfid"], out["sfid_note"] = None, SFID_UNAVAILABLE
    fid_pass = passes.get("fid")
    if fid_pass is not None and fid_pass.rows is not None and "fid" in reference.rows:
        real, fake = reference.rows["fid"], fid_pass.rows
        if min(len(real), len(fake)) <= pr_k:
            out["precision"] = out["recall"] = None
            out["precision_recall_note"] = f"needs more than k={pr_k} images on each side"
        else:
            out["precision"], out["recall"] = precision_recall(real, fake, pr_k)
            out |= {"pr_k": pr_k, "pr_num_reference": len(real), "pr_num_samples": len(fake)}
    else:
        out["precision"] = out["recall"] = None
        out["precision_recall_note"] = "the reference has no images (only mu/sigma): precision/recall not computed"
    out["notes"] = list(reference.notes)
    return out
