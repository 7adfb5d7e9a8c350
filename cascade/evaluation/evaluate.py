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

Images are streamed batch by batch; only features, a few images for the grids and (for CAS)
the uint8 samples of the best setting so far are kept. Sampling runs under bf16 autocast where
the hardware has native bf16 (as ``cascade_sample.py`` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # Agg backend: set by cascade.utils.plots, imported below
import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from cascade.data.resize import central_crop, downsample, upsample
from cascade.diffusion.schedules import NoiseSchedule
from cascade.evaluation.features import FeatureExtractor, extract, tiles
from cascade.evaluation.fid import fid, inception_score, precision_recall
from cascade.evaluation.metrics import (
    accuracy_by_noise_level,
    classify,
    random_crops,
    super_resolution_metrics,
    topk_accuracy,
    train_reference_classifier,
)
from cascade.roles import Generator, NoisyClassifier, Upsampler
from cascade.utils.device import bf16_autocast
from cascade.utils.plots import plot_bars, save_grid

__all__ = [
    "FeatureSpace",
    "LOWER_IS_BETTER",
    "random_subset",
    "reference_classifier",
    "distribution_metrics",
    "guidance_sweep",
    "classification_accuracy_score",
    "aug_level_sweep",
    "select_level",
    "classifier_noise_accuracy",
    "json_ready",
]

LOWER_IS_BETTER = {"fid"}  # every other selectable metric (psnr, ssim, consistency_psnr) is higher-is-better


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

    def of_dataset(self, data: Dataset, indices: Sequence[int], *, progress: bool = True, desc: str = "real features") -> Tensor:
        """Features of the images ``data[indices]``."""
        loader = DataLoader(Subset(data, list(indices)), batch_size=self.batch_size)
        return torch.cat([self(images)[0] for images, _ in tqdm(loader, desc=desc, unit="batch", disable=not progress)])


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
) -> tuple[nn.Module, dict[str, Any]]:
    """The clean-image judge: loaded from ``path`` if it was trained with this recipe, else trained and saved there.

    ``explicit``: ``path`` was given by the user, so a mismatch is an error rather than a reason to retrain.
    Returns the network and its report (recipe, path, held-out top-1/top-5 on ``crop`` crops).
    """
    num_classes = int(train_data.num_classes)
    recipe = {"arch": arch, "crop": crop, "num_classes": num_classes, "steps": steps, "batch_size": batch_size, "lr": lr}
    net = None
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        identity = ("arch", "crop", "num_classes")
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
            desc=f"reference {arch}",
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**recipe, "model": net.state_dict()}, path)
    images, labels = _images(val_data, random_subset(len(val_data), eval_images, seed))
    accuracy = topk_accuracy(classify(net, random_crops(images, crop, torch.Generator().manual_seed(seed))), labels)
    return net, {**recipe, "path": str(path), "held_out": accuracy, "held_out_images": len(labels)}


def distribution_metrics(real: Tensor, fake: Tensor, fake_probs: Tensor | None, *, k: int, splits: int) -> dict[str, float]:
    """FID, precision and recall of ``fake`` against ``real`` features, and IS of ``fake_probs`` (if given)."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs more than {k} real and generated feature vectors, got "
            f"{len(real)} and {len(fake)}; raise num_samples / num_real / num_images"
        )
    precision, recall = precision_recall(real, fake, k)
    out = {"fid": fid(real, fake), "precision": precision, "recall": recall}
    if fake_probs is not None:
        out["is"], out["is_std"] = inception_score(fake_probs, splits)
    return out


def _grid(images: Tensor, nrow: int, path: Path) -> None:
    save_grid(images, nrow, path)


def _to_uint8(images: Tensor) -> Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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
    *,
    setting: tuple[float, float],
    batch_size: int,
    sample_kwargs: dict[str, Any],
    seed: int,
    device: torch.device,
    bf16: bool,
    on_batch: Callable[[Tensor, Tensor], None],
    progress: bool,
    desc: str,
) -> None:
    """Sample ``labels`` (N,) batch by batch from one generator seeded with ``seed``; ``on_batch(images, labels)`` per batch."""
    classifier_scale, cfg_scale = setting
    generator = torch.Generator(device).manual_seed(seed)
    for chunk in tqdm(labels.split(batch_size), desc=desc, unit="batch", leave=False, disable=not progress):
        with bf16_autocast(device, bf16):
            images = stage.sample(
                net,
                chunk.to(device),
                classifier_scale=classifier_scale,
                cfg_scale=cfg_scale,
                generator=generator,
                progress=False,
                **sample_kwargs,
            )
        on_batch(images.float().cpu(), chunk)


def guidance_sweep(
    stage: Generator,
    net: nn.Module,
    *,
    reference: nn.Module,
    features: FeatureSpace,
    real_features: Tensor,
    class_names: list[str],
    out_dir: Path,
    classes: Sequence[int] | None = None,
    classifier: nn.Module | None = None,
    classifier_schedule: NoiseSchedule | None = None,
    classifier_scales: Sequence[float] = (0.0,),
    cfg_scales: Sequence[float] = (1.0,),
    num_samples: int = 200,
    batch_size: int = 50,
    sampler: str = "dpmpp_2m",
    steps: int = 25,
    pr_k: int = 3,
    is_splits: int = 10,
    device: torch.device = torch.device("cpu"),
    bf16: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], Tensor, Tensor]:
    """For every (classifier scale s, CFG scale w): FID / IS / precision / recall and requested-class accuracy.

    Classes are requested round-robin so every class is equally represented: all of them, or
    ``classes`` (the ones the real images show, e.g. a few ImageNet synsets); every setting
    starts from the same seed, so the settings differ only by their guidance. Writes a sample
    grid per setting, ``guidance_accuracy.png`` and ``fid_vs_accuracy.png``. Returns the report
    and the samples (uint8 (N, 3, R, R)) and labels (N,) of the setting with the lowest FID.
    """
    num_classes = len(class_names)
    requested = list(range(num_classes)) if classes is None else sorted(int(c) for c in classes)
    if not requested or not all(0 <= c < num_classes for c in requested):
        raise ValueError(f"classes must be indices 0..{num_classes - 1} of the stage's classes, got {requested}")
    labels = torch.tensor(requested)[torch.arange(num_samples) % len(requested)]  # (N,)
    settings = [(float(cs), float(ws)) for ws in cfg_scales for cs in classifier_scales]
    if any(cs > 0 for cs, _ in settings) and classifier is None:
        raise ValueError("classifier scales > 0 need a noisy classifier: pass classifier_ckpt=PATH (or classifier_scales=[0])")
    sample_kwargs = {"sampler": sampler, "steps": steps, "classifier": classifier, "classifier_schedule": classifier_schedule}
    rows = requested[:10]  # the classes shown in the sample grids
    results: list[dict[str, Any]] = []
    best_images = torch.empty(0, dtype=torch.uint8)
    for setting in tqdm(settings, desc="guidance sweep", unit="setting", disable=not progress):
        feats, probs, predicted, kept, shown = [], [], [], [], {c: [] for c in rows}

        def on_batch(images: Tensor, chunk: Tensor) -> None:
            f, p = features(images)
            feats.append(f)
            probs.append(p)
            predicted.append(classify(reference, images))
            kept.append(_to_uint8(images))
            for image, label in zip(images, chunk.tolist()):
                if label in shown and len(shown[label]) < 8:
                    shown[label].append(image)

        tag = f"cls{setting[0]:g}_cfg{setting[1]:g}"
        _sample_base(
            stage,
            net,
            labels,
            setting=setting,
            batch_size=batch_size,
            sample_kwargs=sample_kwargs,
            seed=seed,
            device=device,
            bf16=bf16,
            on_batch=on_batch,
            progress=progress,
            desc=f"sampling s={setting[0]:g} w={setting[1]:g}",
        )
        logits = torch.cat(predicted)  # (N, C)
        accuracy = (logits.argmax(1) == labels).float()  # (N,)
        metrics = distribution_metrics(real_features, torch.cat(feats), torch.cat(probs), k=pr_k, splits=is_splits)
        results.append(
            {
                "classifier_scale": setting[0],
                "cfg_scale": setting[1],
                **metrics,
                "requested_class_accuracy": float(accuracy.mean()),
                "per_class_accuracy": [float(accuracy[labels == c].mean()) for c in requested],
            }
        )
        if len(results) == 1 or metrics["fid"] < min(r["fid"] for r in results[:-1]):  # ties: the first, as min() picks
            best_images = torch.cat(kept)
        _grid(torch.stack([im for c in rows for im in shown[c]]), 8, out_dir / f"samples_{tag}.png")
    names = [f"s={r['classifier_scale']:g}, w={r['cfg_scale']:g}" for r in results]
    plot_bars(
        names,
        [r["requested_class_accuracy"] for r in results],
        out_dir / "guidance_accuracy.png",
        title="samples showing the requested class (reference classifier)",
        ylabel="fraction",
        chance=1 / num_classes,
    )
    _plot_fid_vs_accuracy(results, names, out_dir / "fid_vs_accuracy.png", features.description.split(":")[0])
    report = {
        "sampler": sampler,
        "steps": steps,
        "num_samples": num_samples,
        "num_real": len(real_features),
        "seed": seed,
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
    device: torch.device = torch.device("cpu"),
    bf16: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Super-resolve ``num_images`` held-out images of ``data`` (at the stage resolution) at every augmentation level s.

    Inputs are the antialiased downsamples of the held-out images (their central aligned
    ``crop`` when given: cheap 1024px evaluation on a CPU). Per level: :func:`~cascade.evaluation.metrics.super_resolution_metrics`
    (model and bicubic; means over batches) and FID / precision / recall of the outputs
    against the ground truth (tiles, :class:`FeatureSpace`); bicubic's FID once. Every level
    starts from the same seed. Writes ``sr_sweep.png`` and ``sr_samples.png``.

    A stage without noise augmentation (ADM's upsamplers) has no level to sweep: ``aug_levels``
    is ``[None]``, one pass with the low-res input only resized up.
    """
    if not stage.noise_augmentation and list(aug_levels) != [None]:
        raise ValueError(f"{stage.name} was trained without noise conditioning augmentation: it has no aug levels to sweep")
    for s in aug_levels:
        if stage.noise_augmentation and not (s is not None and 0 <= s <= stage.aug_max_level):
            raise ValueError(
                f"aug level {s} is outside 0..{stage.aug_max_level}, the levels {stage.name} was trained on; fix aug_levels=[...]"
            )
    indices = random_subset(len(data), num_images, seed)
    f = stage.factor
    truth_feats, bicubic_feats, shown, results = [], [], {}, []
    for level_index, s in enumerate(tqdm(list(aug_levels), desc="aug-level sweep", unit="level", disable=not progress)):
        generator = torch.Generator(device).manual_seed(seed)
        sums: dict[str, float] = {}
        feats = []
        batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        desc = "no augmentation" if s is None else f"s={s}"
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress):
            hi, labels = _images(data, batch)  # (b, 3, R, R)
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
                    generator=generator,
                    progress=False,
                )
            out = out.float().cpu()  # (b, 3, crop, crop)
            for key, value in super_resolution_metrics(out, hi, lowres, f).items():
                sums[key] = sums.get(key, 0.0) + value * len(batch)
            feats.append(features(out)[0])
            if level_index == 0:
                truth_feats.append(features(hi)[0])
                bicubic_feats.append(features(upsample(lowres, f, "bicubic").clamp(-1, 1))[0])
            kept = shown.setdefault(s, [])
            kept.extend(list(out)[: 4 - len(kept)])  # the first 4 outputs of each level for the grid
            if level_index == 0:
                inputs = shown.setdefault("inputs", [])
                inputs.extend(list(zip(lowres, hi))[: 4 - len(inputs)])
        metrics = {key: value / len(indices) for key, value in sums.items()}
        dist = distribution_metrics(torch.cat(truth_feats), torch.cat(feats), None, k=pr_k, splits=1)
        results.append({"aug_level": None if s is None else int(s), **metrics, **dist})
    bicubic = distribution_metrics(torch.cat(truth_feats), torch.cat(bicubic_feats), None, k=pr_k, splits=1)
    _sr_grid(shown, list(aug_levels), f, out_dir / "sr_samples.png")
    return {
        "num_images": len(indices),
        "crop": crop,
        "sampler": sampler,
        "steps": steps,
        "seed": seed,
        "levels": results,
        "bicubic": {"fid": bicubic["fid"], "precision": bicubic["precision"], "recall": bicubic["recall"]},
    }


def _sr_grid(shown: dict, levels: list[int], factor: int, path: Path, panel: int = 256) -> None:
    """Rows: held-out images; columns: low-res input (nearest), bicubic, the model at each level, ground truth."""
    columns = []
    for i, (lowres, hi) in enumerate(shown["inputs"]):
        row = [upsample(lowres[None], factor, "nearest")[0], upsample(lowres[None], factor, "bicubic")[0].clamp(-1, 1)]
        row += [shown[s][i] for s in levels] + [hi]
        columns += [image[:, :panel, :panel] for image in row]  # top-left panel of large images
    _grid(torch.stack(columns), len(levels) + 3, path)


def select_level(results: list[dict[str, float]], metric: str) -> dict[str, float]:
    """The sweep entry that is best by ``metric`` (lowest FID; highest PSNR / SSIM / consistency); ties → the lowest level."""
    if not results or metric not in results[0]:
        known = ", ".join(k for k in (results[0] if results else {}) if k != "aug_level")
        raise ValueError(f"select_by={metric!r} is not a metric of the sweep; choose one of: {known}")
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    return min(results, key=lambda r: (sign * r[metric], r["aug_level"]))


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
) -> dict[str, Any]:
    """A noisy classifier's held-out accuracy per t-bucket (with a PNG bar chart)."""
    metrics = accuracy_by_noise_level(
        net,
        stage.schedule,
        data,
        buckets=buckets,
        num_images=num_images,
        batch_size=128,
        device=device,
        generator=torch.Generator(device).manual_seed(seed),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_bars(
        [k.removeprefix("acc_") for k in metrics],
        list(metrics.values()),
        out_dir / "accuracy_by_t.png",
        title="noisy classifier, held-out accuracy by t",
        ylabel="top-1",
        chance=1 / data.num_classes,
    )
    return {"accuracy_by_t": metrics, "num_images": min(num_images, len(data))}


def json_ready(value: Any) -> Any:
    """``value`` with non-finite floats (PSNR of identical images) as the strings "inf" / "-inf" / "nan" (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
