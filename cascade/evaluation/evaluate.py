"""Per-stage evaluation routines behind ``scripts/evaluate_stage.py``.

Each routine takes a stage rebuilt from its checkpoint, typed by its role (:mod:`cascade.roles`), writes PNGs into ``out_dir`` and returns a JSON-ready dict.

* classifier: held-out accuracy per t-bucket.
* base: a guidance sweep (ADM §4, Fig. 4) — per (classifier scale, CFG scale) FID, IS and
  precision/recall of the samples against real images, and the fraction a clean reference
  classifier assigns to the requested class; FID is plotted against that accuracy. CAS (CDM
  §4.1) trains on the samples of the setting with the lowest FID.
* upsamplers: held-out images downsampled and super-resolved at every augmentation level
  (CDM §4.3): PSNR / SSIM / consistency for the model and bicubic, and FID of the outputs (on
  tiles); the best level by a chosen metric (:func:`select_level`).

Images are streamed batch by batch; only feature statistics, the rows of the first ``pr_num``
images for precision/recall, a few images for the grids and (for CAS) the uint8 samples of the
best setting so far are kept. Sampling runs under bf16 autocast where the hardware has native
bf16 (as ``cascade_sample.py`` does).

Under ``torchrun`` every routine splits its work by :func:`index_batches` (fixed batches, rank r
takes every K-th), draws each image's noise from its own generator seeded with ``derive_seed(seed,
stream, i)`` (:func:`image_generators`), all-reduces counts and float64 sums and gathers only the
rows precision/recall needs (:class:`FeatureCollector`); every rank returns the same report and
rank 0 writes the PNGs. One process is the case K = 1 of the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import matplotlib.pyplot as plt  # Agg backend: set by cascade.utils.plots, imported below
import timm
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from cascade.data.resize import central_crop, downsample, upsample
from cascade.diffusion.process import q_sample
from cascade.diffusion.schedules import NoiseSchedule
from cascade.evaluation.features import FeatureExtractor, extract, tiles
from cascade.evaluation.fid import frechet_distance, precision_recall
from cascade.evaluation.metrics import (
    ShapeJudge,
    classify,
    colour_blind,
    random_crops,
    super_resolution_metrics,
    topk_accuracy,
    train_reference_classifier,
)
from cascade.evaluation.stats import FeatureStats, ScoreStats, gather_rows
from cascade.roles import Generator, NoisyClassifier, Upsampler
from cascade.utils.device import bf16_autocast
from cascade.utils.distributed import all_reduce_sum, rank_world
from cascade.utils.plots import plot_bars, save_grid
from cascade.utils.rng import ImageGenerators, derive_seed

__all__ = [
    "FeatureSpace",
    "FeatureSet",
    "LOWER_IS_BETTER",
    "GUIDANCE_STREAM",
    "SR_STREAM",
    "REDRAW_STREAM",
    "index_batches",
    "random_subset",
    "reference_classifier",
    "distribution_metrics",
    "guidance_sweep",
    "classification_accuracy_score",
    "aug_level_sweep",
    "select_level",
    "FIDELITY_METRICS",
    "faithful_levels",
    "classifier_noise_accuracy",
    "json_ready",
]

LOWER_IS_BETTER = {"fid"}  # every other selectable metric (psnr, ssim, consistency_psnr) is higher-is-better
FIDELITY_METRICS = ("psnr", "ssim")  # what a level may lose against bicubic only within a margin (faithful_levels)


@dataclass
class FeatureSpace:
    """A feature extractor and how images reach it: tiles of ``crop`` px (at most ``tiles_per_image``), in batches."""

    extractor: FeatureExtractor
    crop: int | None
    tiles_per_image: int | None = None
    batch_size: int = 100

    @property
    def description(self) -> str:
        return self.extractor.description

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Features (N·k, D) and class probabilities (N·k, C) of images (N, 3, S, S) in [−1, 1]."""
        return extract(self.extractor, tiles(images, self.crop, self.tiles_per_image), batch_size=self.batch_size, progress=False)

    def of_dataset(
        self,
        data: Dataset,
        indices: Sequence[int],
        *,
        pr_num: int,
        progress: bool = True,
        desc: str = "real features",
    ) -> FeatureSet:
        """Features of the images ``data[indices]``, this rank's batches only, gathered into one :class:`FeatureSet`."""
        rank, world = rank_world()
        collect = FeatureCollector(pr_num=pr_num)
        batches = index_batches(len(indices), self.batch_size)
        for batch in tqdm(batches[rank::world], desc=desc, unit="batch", disable=not (progress and rank == 0), leave=False):
            images, _ = _images(data, [indices[i] for i in batch])
            collect.add(self(images)[0], None, batch)
        return collect.gather()


GUIDANCE_STREAM = 0  # derive_seed stream of the guidance sweep's images (the one sample_shards.py gives the base)
SR_STREAM = 1  # derive_seed stream of the aug-level sweep's outputs
NOISE_ACCURACY_STREAM = 2  # derive_seed stream of the noisy classifier's (t, noise) draws
REDRAW_STREAM = 3  # derive_seed stream of the realistic bound's redrawn detail (aug-level sweep)


def index_batches(n: int, batch_size: int) -> list[range]:
    """Positions 0 … n − 1 cut into batches of ``batch_size`` at fixed offsets; rank r of K takes batches r, r + K, ….

    Every image is computed in the same batch, with the same companions, whatever K: the results of
    K ranks equal one process's (sums up to float64 rounding of their order).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def image_generators(seed: int, stream: int, indices: Sequence[int], device: torch.device) -> ImageGenerators:
    """One generator per image, seeded with ``derive_seed(seed, stream, i)``: image i's noise is a function of (seed, i)."""
    return ImageGenerators([derive_seed(seed, stream, int(i)) for i in indices], device=device)


@dataclass
class FeatureSet:
    """Features of one image set over every rank: Gaussian statistics, Inception-Score sums, rows for precision/recall."""

    stats: FeatureStats
    rows: Tensor  # (min(N, pr_num)·k, D) float32, in image order (k tiles per image)
    score: ScoreStats | None = None

    @property
    def num(self) -> int:
        return self.stats.n


class FeatureCollector:
    """Accumulates one rank's features (streamed: O(D²) memory plus ``pr_num`` rows) and gathers them over ranks.

    Features arrive per batch of images with their global positions; an image gives k rows (its tiles),
    row i·k + t. Statistics are all-reduced; the rows of the first ``pr_num`` images are gathered in order.
    """

    def __init__(self, *, pr_num: int, num_images: int | None = None, is_splits: int | None = None) -> None:
        self.pr_num, self.num_images, self.is_splits = pr_num, num_images, is_splits
        self.stats: FeatureStats | None = None
        self.score: ScoreStats | None = None
        self.rows: list[Tensor] = []
        self.where: list[Tensor] = []
        self.tiles: int | None = None

    def add(self, features: Tensor, probs: Tensor | None, positions: Sequence[int]) -> None:
        """Features (B·k, D) (and class probabilities (B·k, C)) of the images at global ``positions`` (B,)."""
        k = len(features) // len(positions)
        if self.stats is None:
            self.stats, self.tiles = FeatureStats(features.shape[1]), k
            if probs is not None and self.is_splits is not None and self.num_images is not None and probs.shape[1] > 0:
                self.score = ScoreStats(self.num_images * k, probs.shape[1], self.is_splits)
        rows_index = (torch.tensor(list(positions))[:, None] * k + torch.arange(k)[None, :]).reshape(-1)  # (B·k,)
        self.stats.update(features)
        if self.score is not None and probs is not None:
            self.score.update(probs, rows_index)
        keep = rows_index < self.pr_num * k
        if keep.any():
            self.rows.append(features[keep].float().cpu())
            self.where.append(rows_index[keep])

    def gather(self) -> FeatureSet:
        if self.stats is None:  # this rank had no batch (more ranks than batches): learn the dimension from the others
            raise ValueError("more ranks than batches of images: use fewer ranks or a smaller batch size")
        self.stats.all_reduce()
        if self.score is not None:
            self.score.all_reduce()
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, self.stats.dim)
        where = torch.cat(self.where) if self.where else torch.zeros(0, dtype=torch.long)
        return FeatureSet(self.stats, gather_rows(rows, where), self.score)


def gather_images(images: list[Tensor], positions: list[int]) -> Tensor:
    """Images (3, H, W) held by this rank at ``positions`` → every rank's, in position order (n, 3, H, W), on every rank.

    The dtype is kept (uint8 samples travel as bytes).
    """
    _, world = rank_world()
    meta = (tuple(images[0].shape), images[0].dtype) if images else None
    if world > 1:  # ranks without an image learn the shape and dtype from the others
        metas: list[Any] = [None] * world
        torch.distributed.all_gather_object(metas, meta)
        meta = next(m for m in metas if m is not None)
    shape, dtype = meta
    flat = torch.stack([im.reshape(-1) for im in images]) if images else torch.zeros(0, math.prod(shape), dtype=dtype)
    rows = gather_rows(flat, torch.tensor(positions, dtype=torch.long))
    return rows.reshape(len(rows), *shape)


def random_subset(n_total: int, n: int, seed: int) -> list[int]:
    """``min(n, n_total)`` distinct indices drawn from ``seed``, sorted (class-sorted folders are sampled evenly)."""
    return sorted(torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def _images(data: Dataset, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    items = [data[i] for i in indices]
    return torch.stack([image for image, _ in items]), torch.tensor([int(label) for _, label in items])


def reference_classifier(
    path: Path,
    *,
    explicit: bool,
    arch: str,
    crop: int | None,
    train_data: Dataset,
    val_data: Dataset,
    steps: int,
    batch_size: int,
    lr: float,
    eval_images: int,
    device: torch.device,
    bf16: bool,
    seed: int,
    progress: bool,
    view: Literal["colour", "shape"] = "colour",
) -> tuple[nn.Module, dict[str, Any]]:
    """The clean-image judge: loaded from ``path`` if it was trained with this recipe, else trained and saved there.

    ``explicit``: ``path`` was given by the user, so a mismatch is an error rather than a reason to retrain.
    ``view``: ``colour`` sees the images as they are; ``shape`` sees only their luminance and trains on
    :func:`~cascade.evaluation.metrics.colour_blind` views (a :class:`~cascade.evaluation.metrics.ShapeJudge`).
    Returns the network and its report (recipe, path, held-out top-1/top-5 on ``crop`` crops).
    """
    num_classes = int(train_data.num_classes)
    recipe = {
        "arch": arch,
        "crop": crop,
        "num_classes": num_classes,
        "view": view,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
    }
    net = None
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved.setdefault("view", "colour")  # judges saved before the shape judge existed
        identity = ("arch", "crop", "num_classes", "view")
        if all(saved.get(k) == recipe[k] for k in (recipe if not explicit else identity)):
            net = timm.create_model(arch, pretrained=False, num_classes=num_classes)
            net.load_state_dict(saved["model"])
            net = net.to(device).eval()
        elif explicit:
            raise ValueError(
                f"reference.ckpt={path} was trained as { ({k: saved.get(k) for k in identity}) }, but this "
                f"evaluation needs { ({k: recipe[k] for k in identity}) }; pass matching reference.* settings "
                "or drop reference.ckpt to train a new one"
            )
    if net is None:
        net = train_reference_classifier(
            train_data,
            num_classes=num_classes,
            arch=arch,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            crop=crop,
            device=device,
            bf16=bf16,
            seed=seed,
            progress=progress,
            desc=f"reference {arch}" + (" (shape judge)" if view == "shape" else ""),
            view=colour_blind if view == "shape" else None,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**recipe, "model": net.state_dict()}, path)
    if view == "shape":
        net = ShapeJudge(net).eval()
    images, labels = _images(val_data, random_subset(len(val_data), eval_images, seed))
    accuracy = topk_accuracy(classify(net, random_crops(images, crop, torch.Generator().manual_seed(seed))), labels)
    return net, {**recipe, "path": str(path), "held_out": accuracy, "held_out_images": len(labels)}


def distribution_metrics(real: FeatureSet, fake: FeatureSet, *, k: int) -> dict[str, float]:
    """FID of ``fake`` against ``real`` (their Gaussians), precision / recall on their rows, IS of ``fake`` (if it has sums)."""
    if min(len(real.rows), len(fake.rows)) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs more than {k} real and generated feature vectors, got "
            f"{len(real.rows)} and {len(fake.rows)}; raise num_samples / num_real / num_images (or pr_num)"
        )
    precision, recall = precision_recall(real.rows, fake.rows, k)
    out = {
        "fid": frechet_distance(fake.stats.mu, fake.stats.sigma, real.stats.mu, real.stats.sigma),
        "precision": precision,
        "recall": recall,
    }
    if fake.score is not None:
        out["is"], out["is_std"] = fake.score.score()
    return out


def _grid(images: Tensor, nrow: int, path: Path) -> None:
    save_grid(images, nrow, path)


def _beside_held_out(samples: Tensor, held_out: Tensor | None, rows: int, per_row: int = 8) -> tuple[Tensor, int]:
    """A sample grid's images and columns: each class's ``per_row`` samples, after its held-out images and a white gap.

    ``samples`` (rows·per_row, 3, R, R) class after class; ``held_out`` (rows, n, 3, R, R) of the same classes in
    the same order, or None (then the samples alone, ``per_row`` columns; also when a row has fewer samples).
    """
    if held_out is None or len(held_out) != rows or len(samples) != rows * per_row:
        return samples, per_row
    shaped = samples.view(rows, per_row, *samples.shape[1:])  # (rows, per_row, 3, R, R)
    gap = torch.ones_like(shaped[:, :1])  # (rows, 1, 3, R, R): white
    real = held_out.to(shaped)  # (rows, n, 3, R, R)
    return torch.cat([real, gap, shaped], dim=1).flatten(0, 1), real.shape[1] + 1 + per_row


def _to_uint8(images: Tensor) -> Tensor:
    """Images in [−1, 1] → uint8 as ADM's ``image_sample.py`` quantises its samples: truncated, not rounded."""
    return ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


class _Uint8Images(Dataset):
    """(uint8 image (3, H, W), label) pairs served as float images in [−1, 1]."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index].float() / 127.5 - 1, int(self.labels[index])


def _sample_base(
    stage: Generator,
    net: nn.Module,
    labels: Tensor,
    batches: Sequence[range],
    *,
    setting: tuple[float, float, float],
    sample_kwargs: dict[str, Any],
    seed: int,
    device: torch.device,
    bf16: bool,
    on_batch: Callable[[Tensor, range], None],
    progress: bool,
    desc: str,
) -> None:
    """Sample the images at positions ``batches`` (this rank's); image i's noise from ``derive_seed(seed, GUIDANCE_STREAM, i)``.

    ``on_batch(images, positions)`` per batch. The same seeds for every setting: the settings differ only by their guidance.
    """
    classifier_scale, cfg_scale, guide_scale = setting
    rank, _ = rank_world()
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not (progress and rank == 0)):
        with bf16_autocast(device, bf16):
            images = stage.sample(
                net,
                labels[batch.start : batch.stop].to(device),
                classifier_scale=classifier_scale,
                cfg_scale=cfg_scale,
                guide_scale=guide_scale,
                generator=image_generators(seed, GUIDANCE_STREAM, batch, device),
                progress=False,
                **sample_kwargs,
            )
        on_batch(images.float().cpu(), batch)


def setting_name(classifier_scale: float, cfg_scale: float, guide_scale: float = 1.0, sep: str = " ") -> str:
    """``s=… w=…`` of a guidance setting, with ``g=…`` when it is autoguided."""
    parts = [f"s={classifier_scale:g}", f"w={cfg_scale:g}"] + ([f"g={guide_scale:g}"] if guide_scale != 1 else [])
    return sep.join(parts)


def guidance_sweep(
    stage: Generator,
    net: nn.Module,
    *,
    reference: nn.Module,
    shape_judge: nn.Module | None = None,
    features: FeatureSpace,
    real_features: FeatureSet,
    class_names: list[str],
    out_dir: Path,
    classifier: nn.Module | None = None,
    classifier_schedule: NoiseSchedule | None = None,
    classifier_scales: Sequence[float] = (0.0,),
    cfg_scales: Sequence[float] = (1.0,),
    guide: nn.Module | None = None,
    guide_scales: Sequence[float] = (1.0,),
    num_samples: int = 200,
    batch_size: int = 50,
    sampler: str = "dpmpp_2m",
    steps: int = 25,
    pr_k: int = 3,
    pr_num: int = 10_000,
    is_splits: int = 10,
    device: torch.device = torch.device("cpu"),
    bf16: bool = True,
    seed: int = 0,
    progress: bool = True,
    keep_best: bool = True,
    classes: Sequence[int] | None = None,
    held_out: Tensor | None = None,
) -> tuple[dict[str, Any], Tensor, Tensor]:
    """For every (classifier scale s, CFG scale w, autoguidance scale g): FID / IS / precision / recall and requested-class accuracy.

    Autoguidance (g ≠ 1) extrapolates away from ``guide``, a weaker network of the same stage (an earlier checkpoint).

    Requested-class accuracy is judged by ``reference`` and, if given, by ``shape_judge`` (a
    :class:`~cascade.evaluation.metrics.ShapeJudge`: geometry only), overall and per class.

    Classes are requested round-robin so every class is equally represented: all of them, or
    ``classes`` (the ones the real images show, e.g. a few ImageNet synsets); image i's noise
    is a function of (seed, i) alone and the same for every setting, so the settings differ only
    by their guidance. Under ``torchrun`` each rank samples its batches (:func:`index_batches`),
    features are streamed into statistics and all-reduced (the rows of the first ``pr_num``
    images gathered for precision/recall), and every rank returns the same report; rank 0
    writes a sample grid per setting (one row per requested class, up to 10, of 8 samples; each row starts with
    that class's images in ``held_out`` (rows, n, 3, R, R), when given, then a white gap), ``guidance_accuracy.png``
    and ``fid_vs_accuracy.png``.
    Returns the report and, with ``keep_best`` (on rank 0; empty elsewhere), the samples (uint8
    (N, 3, R, R)) and labels (N,) of the setting with the lowest FID.
    """
    rank, world = rank_world()
    num_classes = len(class_names)
    requested = list(range(num_classes)) if classes is None else sorted(int(c) for c in classes)
    if not requested or not all(0 <= c < num_classes for c in requested):
        raise ValueError(f"classes must be indices 0..{num_classes - 1} of the stage's classes, got {requested}")
    labels = torch.tensor(requested)[torch.arange(num_samples) % len(requested)]  # (N,)
    settings = [(float(cs), float(ws), float(gs)) for gs in guide_scales for ws in cfg_scales for cs in classifier_scales]
    if any(cs > 0 for cs, _, _ in settings) and classifier is None:
        raise ValueError("classifier scales > 0 need a noisy classifier: pass classifier_ckpt=PATH (or classifier_scales=[0])")
    if any(gs != 1 for _, _, gs in settings) and guide is None:
        raise ValueError("autoguidance scales other than 1 need a guide: pass guide_ckpt=PATH (or guide_scales=[1])")
    sample_kwargs = {
        "sampler": sampler,
        "steps": steps,
        "classifier": classifier,
        "classifier_schedule": classifier_schedule,
        "guide": guide,
    }
    period, rows = len(requested), min(len(requested), 10)  # position i requests requested[i % period]; grids show `rows`
    shown_positions = {j + period * m for j in range(rows) for m in range(8) if j + period * m < num_samples}
    mine = index_batches(num_samples, batch_size)[rank::world]
    results: list[dict[str, Any]] = []
    best_images = torch.empty(0, dtype=torch.uint8)
    judges = {"reference": reference, "shape": shape_judge} if shape_judge is not None else {"reference": reference}
    for setting in tqdm(settings, desc="guidance sweep", unit="setting", disable=not (progress and rank == 0)):
        collect = FeatureCollector(pr_num=pr_num, num_images=num_samples, is_splits=is_splits)
        hits = {name: torch.zeros(num_classes, dtype=torch.float64) for name in judges}  # (C,) requested class predicted
        kept: list[Tensor] = []
        shown: list[Tensor] = []
        shown_at: list[int] = []

        def on_batch(images: Tensor, batch: range) -> None:
            f, p = features(images)
            collect.add(f, p, batch)
            requested_here = labels[batch.start : batch.stop]  # (b,)
            for name, judge in judges.items():
                hits[name].index_add_(0, requested_here, (classify(judge, images).argmax(1) == requested_here).double())
            if keep_best:
                kept.append(_to_uint8(images))
            for i, image in zip(batch, images):
                if i in shown_positions:
                    shown.append(image)
                    shown_at.append(i)

        tag = f"cls{setting[0]:g}_cfg{setting[1]:g}" + (f"_ag{setting[2]:g}" if setting[2] != 1 else "")
        _sample_base(
            stage,
            net,
            labels,
            mine,
            setting=setting,
            sample_kwargs=sample_kwargs,
            seed=seed,
            device=device,
            bf16=bf16,
            on_batch=on_batch,
            progress=progress,
            desc=f"sampling {setting_name(*setting)}",
        )
        fake = collect.gather()
        hits = {name: all_reduce_sum(count) for name, count in hits.items()}  # (C,) each, exact: integer counts in float64
        correct = hits["reference"]
        per_class = torch.bincount(labels, minlength=num_classes).double()  # (C,)
        metrics = distribution_metrics(real_features, fake, k=pr_k)
        results.append(
            {
                "classifier_scale": setting[0],
                "cfg_scale": setting[1],
                "guide_scale": setting[2],
                **metrics,
                "requested_class_accuracy": float(correct.sum() / num_samples),
                "per_class_accuracy": [float(correct[c] / per_class[c]) for c in requested],
            }
        )
        if "shape" in hits:
            shape_correct = hits["shape"]
            results[-1]["shape_accuracy"] = float(shape_correct.sum() / num_samples)
            results[-1]["per_class_shape_accuracy"] = [float(shape_correct[c] / per_class[c]) for c in requested]
        if keep_best and (len(results) == 1 or metrics["fid"] < min(r["fid"] for r in results[:-1])):  # ties: the first
            mine_positions = [i for batch in mine for i in batch]
            pixels = torch.cat(kept) if kept else torch.zeros(0, 3, stage.resolution, stage.resolution, dtype=torch.uint8)
            gathered = gather_images(list(pixels), mine_positions)  # (N, 3, R, R) uint8
            best_images = gathered if rank == 0 else torch.empty(0, dtype=torch.uint8)
        grid = gather_images(shown, shown_at)  # (n, 3, R, R) in position order: requested[j]'s m-th image at j + period·m
        if rank == 0:
            at = sorted(shown_positions)
            rows_of_samples = grid[sorted(range(len(at)), key=lambda j: (at[j] % period, at[j]))]  # (n, 3, R, R) by class
            _grid(*_beside_held_out(rows_of_samples.float().cpu(), held_out, rows), out_dir / f"samples_{tag}.png")
    names = [setting_name(r["classifier_scale"], r["cfg_scale"], r["guide_scale"], sep=", ") for r in results]
    if rank == 0:
        accuracy = {"reference classifier": [r["requested_class_accuracy"] for r in results]}
        if shape_judge is not None:
            accuracy["shape judge (luminance only)"] = [r["shape_accuracy"] for r in results]
        plot_bars(
            names,
            accuracy,
            out_dir / "guidance_accuracy.png",
            title="samples showing the requested class",
            ylabel="fraction",
            chance=1 / num_classes,
        )
        _plot_fid_vs_accuracy(results, names, out_dir / "fid_vs_accuracy.png", features.description.split(":")[0])
    report = {
        "sampler": sampler,
        "steps": steps,
        "num_samples": num_samples,
        "num_real": real_features.num,
        "pr_num": min(pr_num, num_samples),
        "seed": seed,
        "seeding": f"image i: torch.Generator seeded with cascade.utils.rng.derive_seed(seed, {GUIDANCE_STREAM}, i), every setting",
        "world_size": world,
        "requested_classes": None if classes is None else requested,  # None: every class; per_class_accuracy follows it
        "guidance": results,
    }
    return report, best_images, labels


def _plot_fid_vs_accuracy(results: list[dict], names: list[str], path: Path, features: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for w in sorted({r["cfg_scale"] for r in results}):
        rows = [(r["requested_class_accuracy"], r["fid"]) for r in results if r["cfg_scale"] == w]
        ax.plot(*zip(*rows), marker="o", label=f"CFG w={w:g}")
    for r, name in zip(results, names):
        ax.annotate(name, (r["requested_class_accuracy"], r["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("requested-class accuracy (reference classifier)")
    ax.set_ylabel(f"FID ({features} features)")
    ax.set_title("guidance: fidelity vs. class accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def classification_accuracy_score(
    images: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    train_data: Dataset,
    val_data: Dataset,
    arch: str,
    steps: int,
    batch_size: int,
    lr: float,
    eval_images: int,
    real_baseline: bool,
    device: torch.device,
    bf16: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """CAS (Ravuri & Vinyals 2019; CDM §4.1): a timm ``arch`` trained from scratch on generated images only, tested on real ones.

    ``images`` (N, 3, R, R) uint8 with their requested ``labels`` (N,); top-1 / top-5 on
    ``eval_images`` held-out real images of ``val_data``. With ``real_baseline`` the same recipe
    is trained on N real training images (the "real data" row of CDM's Table 2).
    """
    generated = _Uint8Images(images, labels)
    test_images, test_labels = _images(val_data, random_subset(len(val_data), eval_images, seed))

    def score(data: Dataset, what: str) -> dict[str, float]:
        classifier = train_reference_classifier(
            data,
            num_classes=num_classes,
            arch=arch,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            device=device,
            bf16=bf16,
            seed=seed,
            progress=progress,
            desc=f"CAS {arch} on {what}",
        )
        return topk_accuracy(classify(classifier, test_images), test_labels)

    report: dict[str, Any] = {
        "arch": arch,
        "steps": steps,
        "train_images": len(images),
        "test_images": len(test_labels),
        **score(generated, "samples"),
    }
    if real_baseline:
        report["real_data"] = score(Subset(train_data, random_subset(len(train_data), len(images), seed)), "real images")
    return report


@torch.no_grad()
def aug_level_sweep(
    stage: Upsampler,
    net: nn.Module,
    data: Dataset,
    *,
    aug_levels: Sequence[int | None],
    features: FeatureSpace,
    out_dir: Path,
    num_images: int = 32,
    crop: int | None = None,
    batch_size: int = 8,
    sampler: str = "dpmpp_2m",
    steps: int = 25,
    pr_k: int = 3,
    pr_num: int = 10_000,
    device: torch.device = torch.device("cpu"),
    bf16: bool = True,
    seed: int = 0,
    progress: bool = True,
    redraw: Callable[[int, torch.Generator], Tensor] | None = None,
    enforce_consistency: bool | None = None,
) -> dict[str, Any]:
    """Super-resolve ``num_images`` held-out images of ``data`` (at the stage resolution) at every augmentation level s.

    Inputs are the antialiased downsamples of the held-out images (their central aligned
    ``crop`` when given: cheap 1024px evaluation on a CPU). Per level: :func:`~cascade.evaluation.metrics.super_resolution_metrics`
    (model and bicubic; means over batches, weighted by batch size) and FID / precision / recall of the
    outputs against the ground truth (tiles, :class:`FeatureSpace`); bicubic's FID once. Output j's
    noise comes from ``derive_seed(seed, SR_STREAM, j)`` at every level. Under ``torchrun`` each rank
    super-resolves its batches (:func:`index_batches`); sums and feature statistics are all-reduced.
    Rank 0 writes ``sr_samples.png`` (the caller writes ``sr_sweep.png``).

    A stage without noise augmentation (ADM's upsamplers) has no level to sweep: ``aug_levels``
    is ``[None]``, one pass with the low-res input only resized up.

    ``redraw(i, generator)``, where the data set can say it: item ``i`` with the detail its low-res input cannot
    show drawn afresh (:meth:`~cascade.data.ShapesDataset.redrawn`). Those images, measured like an output,
    are the ``realistic_bound``: what a perfect model that invents detail (rather than averaging it away)
    scores, the reference for how much PSNR realism costs on this data. Image j's draws come from
    ``derive_seed(seed, REDRAW_STREAM, j)``.

    ``enforce_consistency`` (None: the stage's default) projects every output onto its input
    (:meth:`~cascade.roles.Upsampler.sample`); the report says which was used.
    """
    if not stage.noise_augmentation and list(aug_levels) != [None]:
        raise ValueError(f"{stage.name} was trained without noise conditioning augmentation: it has no aug levels to sweep")
    for s in aug_levels:
        if stage.noise_augmentation and not (s is not None and 0 <= s <= stage.aug_max_level):
            raise ValueError(
                f"aug level {s} is outside 0..{stage.aug_max_level}, the levels {stage.name} was trained on; fix aug_levels=[...]"
            )
    rank, world = rank_world()
    indices = random_subset(len(data), num_images, seed)
    f = stage.factor
    mine = index_batches(len(indices), batch_size)[rank::world]
    truth, bicubic_feats = FeatureCollector(pr_num=pr_num), FeatureCollector(pr_num=pr_num)
    bound_feats = FeatureCollector(pr_num=pr_num)  # the realistic bound (with redraw)
    shown: dict[Any, list[Tensor]] = {}
    shown_at: list[int] = []
    results = []
    keys = list(
        super_resolution_metrics(torch.zeros(1, 3, 2 * f, 2 * f), torch.zeros(1, 3, 2 * f, 2 * f), torch.zeros(1, 3, 2, 2), f)
    )
    bound_sums = torch.zeros(len(keys), dtype=torch.float64)  # (M,) its metric × batch size, summed over batches
    for level_index, s in enumerate(
        tqdm(list(aug_levels), desc="aug-level sweep", unit="level", disable=not (progress and rank == 0))
    ):
        sums = torch.zeros(len(keys), dtype=torch.float64)  # (M,) metric × batch size, summed over batches
        collect = FeatureCollector(pr_num=pr_num)
        desc = "no augmentation" if s is None else f"s={s}"
        for batch in tqdm(mine, desc=desc, unit="batch", leave=False, disable=not (progress and rank == 0)):
            hi, labels = _images(data, [indices[i] for i in batch])  # (b, 3, R, R)
            if crop is not None and crop < hi.shape[-1]:
                hi = central_crop(hi, crop, align=f)  # (b, 3, crop, crop) aligned with the low-res crop
            lowres = downsample(hi, f)  # (b, 3, r, r)
            with bf16_autocast(device, bf16):
                out = stage.sample(
                    net,
                    lowres.to(device),
                    labels.to(device) if stage.class_conditional else None,
                    aug_level=s,
                    sampler=sampler,
                    steps=steps,
                    enforce_consistency=enforce_consistency,
                    generator=image_generators(seed, SR_STREAM, batch, device),
                    progress=False,
                )
            out = out.float().cpu()  # (b, 3, crop, crop)
            sums += _weighted(super_resolution_metrics(out, hi, lowres, f), keys, len(batch))
            collect.add(features(out)[0], None, batch)
            if level_index == 0:
                truth.add(features(hi)[0], None, batch)
                bicubic_feats.add(features(upsample(lowres, f, "bicubic").clamp(-1, 1))[0], None, batch)
                if redraw is not None:
                    bound = _redrawn(redraw, [indices[i] for i in batch], batch, seed, crop, f)  # (b, 3, crop, crop)
                    bound_sums += _weighted(super_resolution_metrics(bound, hi, lowres, f), keys, len(batch))
                    bound_feats.add(features(bound)[0], None, batch)
            for i, image, low, high in zip(batch, out, lowres, hi):
                if i < 4:  # the first 4 outputs of each level for the grid
                    shown.setdefault(s, []).append(image)
                    if level_index == 0:
                        nearest, bicubic = (upsample(low[None], f, mode)[0] for mode in ("nearest", "bicubic"))
                        shown.setdefault("inputs", []).append(torch.cat([nearest, bicubic.clamp(-1, 1), high]))  # (9, H, W)
                        shown_at.append(i)
        if level_index == 0:
            truth_set, bicubic_set = truth.gather(), bicubic_feats.gather()
        sums = all_reduce_sum(sums)
        metrics = {key: float(value) / len(indices) for key, value in zip(keys, sums)}
        dist_metrics = distribution_metrics(truth_set, collect.gather(), k=pr_k)
        results.append({"aug_level": None if s is None else int(s), **metrics, **dist_metrics})
    bicubic = distribution_metrics(truth_set, bicubic_set, k=pr_k)
    realistic_bound = None
    if redraw is not None:
        sums = all_reduce_sum(bound_sums)
        bound_metrics = {key: float(value) / len(indices) for key, value in zip(keys, sums) if not key.endswith("_bicubic")}
        realistic_bound = {**bound_metrics, **distribution_metrics(truth_set, bound_feats.gather(), k=pr_k)}
    grid = {key: gather_images(shown.get(key, []), shown_at) for key in dict.fromkeys([*aug_levels, "inputs"])}
    if rank == 0:
        _sr_grid(grid, list(aug_levels), out_dir / "sr_samples.png")
    return {
        "num_images": len(indices),
        "crop": crop,
        "sampler": sampler,
        "steps": steps,
        "enforce_consistency": stage.consistency_in_effect(enforce_consistency),
        "seed": seed,
        "pr_num": min(pr_num, len(indices)),
        "seeding": f"output j: torch.Generator seeded with cascade.utils.rng.derive_seed(seed, {SR_STREAM}, j), every level",
        "world_size": world,
        "levels": results,
        "bicubic": {"fid": bicubic["fid"], "precision": bicubic["precision"], "recall": bicubic["recall"]},
        "realistic_bound": realistic_bound,
    }


def _weighted(values: dict[str, float], keys: Sequence[str], n: int) -> Tensor:
    """(M,) float64: the metrics ``keys`` of one batch of ``n`` images, times ``n`` (summed, then divided by the total)."""
    return torch.tensor([values[key] * n for key in keys], dtype=torch.float64)


def _redrawn(
    redraw: Callable[[int, torch.Generator], Tensor],
    items: Sequence[int],
    positions: Sequence[int],
    seed: int,
    crop: int | None,
    f: int,
) -> Tensor:
    """The realistic bound's images (b, 3, H, W) of data items ``items`` (output positions ``positions``), cropped as the truth."""
    images = torch.stack(
        [redraw(item, torch.Generator().manual_seed(derive_seed(seed, REDRAW_STREAM, j))) for item, j in zip(items, positions)]
    )  # (b, 3, R, R)
    if crop is not None and crop < images.shape[-1]:
        images = central_crop(images, crop, align=f)  # (b, 3, crop, crop)
    return images


def _sr_grid(shown: dict, levels: list[int], path: Path, panel: int = 256) -> None:
    """Rows: held-out images; columns: low-res input (nearest), bicubic, the model at each level, ground truth.

    ``shown["inputs"]``: (n, 9, H, W), the nearest and bicubic enlargements of the input and the truth stacked on channels.
    """
    columns = []
    for i, packed in enumerate(shown["inputs"]):
        nearest, bicubic, hi = packed.split(3)
        row = [nearest, bicubic] + [shown[s][i] for s in levels] + [hi]
        columns += [image[:, :panel, :panel] for image in row]  # top-left panel of large images
    _grid(torch.stack(columns), len(levels) + 3, path)


def select_level(results: list[dict[str, float]], metric: str) -> dict[str, float]:
    """The sweep entry that is best by ``metric`` (lowest FID; highest PSNR / SSIM / consistency); ties → the lowest level."""
    if not results or metric not in results[0]:
        known = ", ".join(k for k in (results[0] if results else {}) if k != "aug_level")
        raise ValueError(f"select_by={metric!r} is not a metric of the sweep; choose one of: {known}")
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    return min(results, key=lambda r: (sign * r[metric], r["aug_level"]))


def faithful_levels(results: list[dict[str, float]], max_loss: dict[str, float]) -> list[dict[str, float]]:
    """The sweep entries that fall short of bicubic by at most ``max_loss[m]`` in each metric m (higher is better).

    ``{"psnr": 1.0, "ssim": 0.05}`` keeps the levels within 1 dB and 0.05 SSIM of bicubic. A briefly trained
    upsampler passes its conditioning's noise on to its output, and tile FID can reward that noise as texture: the
    tiny sr256 scores FID 9.7 at s = 100 against 14.9 at s = 0, 2.9 dB and 0.50 SSIM below bicubic
    (docs/demo_measurements.md). CDM picks by FID alone; this keeps such levels from being picked.
    """
    unknown = sorted(set(max_loss) - set(FIDELITY_METRICS))
    if unknown or any(margin < 0 for margin in max_loss.values()):
        raise ValueError(
            f"select_max_loss={max_loss} must map {' / '.join(FIDELITY_METRICS)} to margins >= 0, e.g. {{psnr: 1.0, ssim: 0.05}}"
        )
    return [r for r in results if all(r[f"{m}_bicubic"] - r[m] <= margin for m, margin in max_loss.items())]


def plot_sr_sweep(sweep: dict[str, Any], chosen: int, metric: str, path: Path) -> None:
    """PSNR, SSIM, consistency and FID against the augmentation level, bicubic dashed, the chosen level marked."""
    levels = [r["aug_level"] for r in sweep["levels"]]
    panels = [("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("consistency_psnr", "consistency PSNR (dB)"), ("fid", "FID")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), dpi=100)
    for ax, (key, label) in zip(axes, panels):
        ax.plot(levels, [r[key] for r in sweep["levels"]], marker="o", label="model")
        base = sweep["bicubic"]["fid"] if key == "fid" else sweep["levels"][0].get(f"{key}_bicubic")
        if base is not None and math.isfinite(base):
            ax.axhline(base, color="gray", linestyle="--", label="bicubic")
        ax.axvline(chosen, color="tab:red", alpha=0.4, label=f"chosen by {metric}")
        ax.set_xlabel("augmentation level s")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def classifier_noise_accuracy(
    stage: NoisyClassifier,
    net: nn.Module,
    data: Dataset,
    *,
    out_dir: Path,
    buckets: int,
    num_images: int,
    device: torch.device,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, Any]:
    """A noisy classifier's held-out top-1 accuracy per t-bucket (with a PNG bar chart).

    The first ``num_images`` held-out images, each noised by q(x_t | x_0) (DDPM eq. 4) at a t drawn
    uniformly inside each of ``buckets`` equal t-ranges; image i's t and noise in bucket b come from
    ``derive_seed(seed, NOISE_ACCURACY_STREAM, b, i)`` alone. Under ``torchrun`` each rank takes its
    batches (:func:`index_batches`) and the counts are all-reduced (exact).
    """
    rank, world = rank_world()
    n = min(num_images, len(data))
    edges = torch.linspace(0, len(stage.schedule), buckets + 1).long().tolist()
    correct = torch.zeros(buckets, dtype=torch.float64)  # (buckets,)
    timesteps = stage.schedule.timesteps.to(device)
    for batch in index_batches(n, batch_size)[rank::world]:
        images, labels = _images(data, list(batch))
        images, labels = images.to(device), labels.to(device)
        for b in range(buckets):
            generators = ImageGenerators([derive_seed(seed, NOISE_ACCURACY_STREAM, b, i) for i in batch], device=device)
            k = torch.cat(
                [torch.randint(edges[b], edges[b + 1], (1,), generator=g, device=device) for g in generators.generators]
            )
            noise = generators.randn(images.shape, device=device)  # (B, 3, R, R)
            logits = net(q_sample(stage.schedule, images, k, noise), timesteps[k])  # (B, C)
            correct[b] += float((logits.argmax(-1) == labels).sum())
    correct = all_reduce_sum(correct)
    metrics = {f"acc_t{edges[b]}-{edges[b + 1] - 1}": float(correct[b]) / max(n, 1) for b in range(buckets)}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_bars(
            [key.removeprefix("acc_") for key in metrics],
            list(metrics.values()),
            out_dir / "accuracy_by_t.png",
            title="noisy classifier, held-out accuracy by t",
            ylabel="top-1",
            chance=1 / data.num_classes,
        )
    return {"accuracy_by_t": metrics, "num_images": n, "world_size": world}


def json_ready(value: Any) -> Any:
    """``value`` with non-finite floats (PSNR of identical images) as the strings "inf" / "-inf" / "nan" (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
