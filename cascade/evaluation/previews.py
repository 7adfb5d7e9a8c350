"""Periodic previews while a stage trains: one per role, injected into the trainer as its reporter.

* :class:`GeneratorPreview` — a sample grid, one row per class (EMA weights).
* :class:`UpsamplerPreview` — held-out images super-resolved; a grid (low-res, bicubic, model,
  truth) and PSNR / SSIM / consistency / sharpness of model and bicubic.
* :class:`ClassifierPreview` — held-out accuracy per noise bucket, as metrics and a bar chart.

A stage config chooses its preview with a ``preview:`` node (``_target_`` one of these, with its
settings); without one, :func:`default_preview` picks by the stage's role type. :func:`bind`
checks the preview fits the stage's role and returns the :class:`~cascade.training.trainer.Reporter`
the trainer calls. PNGs go to ``samples/step_NNNNNNN.png`` and ``samples/latest.png``
(``accuracy_step_NNNNNNN.png`` / ``accuracy_latest.png`` for the classifier).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from cascade.data.resize import central_crop, downsample, upsample
from cascade.diffusion.samplers import SamplerName
from cascade.evaluation.metrics import accuracy_by_noise_level, super_resolution_metrics
from cascade.roles import Generator, NoisyClassifier, Role, Upsampler, role_name
from cascade.training.trainer import ReportContext, Reporter
from cascade.utils.plots import plot_bars, save_grid

__all__ = ["GeneratorPreview", "UpsamplerPreview", "ClassifierPreview", "Preview", "default_preview", "bind"]


class GeneratorPreview:
    """A grid with one row per class (the first ``max_classes``), ``per_class`` samples each.

    With ``real_per_class`` > 0 and a held-out split, each row starts with that many held-out
    images of its class and a white gap, so the data and the samples compare at a glance.
    """

    role = Generator

    def __init__(
        self,
        *,
        sampler: SamplerName = "dpmpp_2m",
        steps: int = 25,
        per_class: int = 8,
        max_classes: int = 10,
        real_per_class: int = 0,
    ) -> None:
        self.sampler, self.steps, self.per_class, self.max_classes = sampler, steps, per_class, max_classes
        self.real_per_class = real_per_class
        self._real: tuple[int, torch.Tensor | None] | None = None  # (rows, held-out images): found once, reused every report

    def check(self, stage: Generator) -> None:
        pass

    def __call__(self, stage: Generator, net: nn.Module, context: ReportContext) -> dict[str, float]:
        rows = min(len(context.class_names), self.max_classes)
        labels = torch.arange(rows, device=context.device).repeat_interleave(self.per_class)  # (rows·cols,)
        images = stage.sample(net, labels, sampler=self.sampler, steps=self.steps, generator=context.generator, progress=False)
        columns = self.per_class
        if self._real is None or self._real[0] != rows:
            self._real = rows, held_out_by_class(context.val_data, rows, self.real_per_class)
        real = self._real[1]  # (rows, n, 3, H, W) or None
        if real is not None:
            gap = torch.ones_like(real[:, :1])  # (rows, 1, 3, H, W): white
            samples = images.float().cpu().view(rows, self.per_class, *images.shape[1:])
            images = torch.cat([real, gap, samples], dim=1).flatten(0, 1)  # (rows·(n+1+per_class), 3, H, W)
            columns = self.real_per_class + 1 + self.per_class
        save_grid(images, columns, context.out_dir / f"step_{context.step:07d}.png", context.out_dir / "latest.png")
        return {}


def held_out_by_class(data, classes: int | Sequence[int], per_class: int, max_scan: int = 2000) -> torch.Tensor | None:
    """The first ``per_class`` images (K, per_class, C, H, W) in ``data`` of each of ``classes`` (the first K, or these K).

    ``data`` yields (image, label). None when ``per_class`` is 0, there is no data, or the first
    ``max_scan`` items do not hold that many of every class (a rare class in a folder data set).
    """
    if per_class <= 0 or data is None:
        return None
    wanted = list(range(classes)) if isinstance(classes, int) else [int(c) for c in classes]
    found: dict[int, list[torch.Tensor]] = {c: [] for c in wanted}
    for index in range(min(len(data), max_scan)):
        image, label = data[index][:2]
        label = int(label)
        if label in found and len(found[label]) < per_class:
            found[label].append(torch.as_tensor(image).float())
        if all(len(v) == per_class for v in found.values()):
            return torch.stack([torch.stack(found[c]) for c in wanted])
    return None


class UpsamplerPreview:
    """The first ``images`` held-out images downsampled and super-resolved (their central aligned ``crop`` when set).

    Grid rows: low-res input (nearest), bicubic, model output, ground truth. Metrics: see
    :func:`~cascade.evaluation.metrics.super_resolution_metrics` (model and bicubic).
    """

    role = Upsampler

    def __init__(self, *, sampler: SamplerName = "dpmpp_2m", steps: int = 25, images: int = 4, crop: int | None = None) -> None:
        self.sampler, self.steps, self.images, self.crop = sampler, steps, images, crop

    def check(self, stage: Upsampler) -> None:
        if self.crop is not None and (self.crop % stage.factor or not 0 < self.crop <= stage.resolution):
            raise ValueError(f"preview crop={self.crop} must be a multiple of {stage.factor} in (0, {stage.resolution}]")

    def __call__(self, stage: Upsampler, net: nn.Module, context: ReportContext) -> dict[str, float]:
        data = context.val_data
        if data is None or self.images < 1:
            return {}
        n = min(self.images, len(data))
        items = [data[i] for i in range(n)]
        hi = torch.stack([image for image, _ in items]).to(context.device)  # (n, 3, R, R)
        labels = torch.tensor([int(label) for _, label in items], device=context.device)  # (n,)
        f = stage.factor
        lowres = downsample(hi, f)  # (n, 3, r, r)
        if self.crop is not None:  # the central aligned crop: full-size sampling costs too much on a CPU
            lowres, hi = central_crop(lowres, self.crop // f), central_crop(hi, self.crop, align=f)
        output = stage.sample(
            net,
            lowres,
            labels if stage.class_conditional else None,
            sampler=self.sampler,
            steps=self.steps,
            generator=context.generator,
            progress=False,
        )
        bicubic = upsample(lowres, f, "bicubic").clamp(-1, 1)
        nearest = upsample(lowres, f, "nearest")
        columns = torch.stack([nearest, bicubic, output, hi], dim=1).flatten(0, 1)  # (4n, 3, R, R) row-major
        save_grid(columns, 4, context.out_dir / f"step_{context.step:07d}.png", context.out_dir / "latest.png")
        return super_resolution_metrics(output, hi, lowres, f)


class ClassifierPreview:
    """Held-out accuracy per noise bucket, as metrics and as ``accuracy_step_NNNNNNN.png``."""

    role = NoisyClassifier

    def __init__(self, *, buckets: int = 4, images: int = 512, batch_size: int = 128) -> None:
        self.buckets, self.images, self.batch_size = buckets, images, batch_size

    def check(self, stage: NoisyClassifier) -> None:
        pass

    def __call__(self, stage: NoisyClassifier, net: nn.Module, context: ReportContext) -> dict[str, float]:
        if context.val_data is None:
            return {}
        metrics = accuracy_by_noise_level(
            net,
            stage.schedule,
            context.val_data,
            buckets=self.buckets,
            num_images=self.images,
            batch_size=self.batch_size,
            device=context.device,
            generator=context.generator,
        )
        context.out_dir.mkdir(parents=True, exist_ok=True)
        labels = [key.removeprefix("acc_") for key in metrics]
        for path in (context.out_dir / f"accuracy_step_{context.step:07d}.png", context.out_dir / "accuracy_latest.png"):
            plot_bars(
                labels,
                list(metrics.values()),
                path,
                title=f"noisy classifier accuracy (step {context.step})",
                ylabel="top-1 accuracy on held-out x_t",
                chance=1 / len(context.class_names),
            )
        return metrics


Preview = GeneratorPreview | UpsamplerPreview | ClassifierPreview


def default_preview(stage: Role) -> Preview:
    """The preview of a stage's role with its default settings."""
    for preview in (GeneratorPreview, UpsamplerPreview, ClassifierPreview):
        if isinstance(stage, preview.role):
            return preview()
    raise ValueError(f"{type(stage).__name__} plays no stage role (generator, upsampler or noisy classifier): no preview for it")


def bind(stage: Role, preview: Preview | None = None) -> Reporter:
    """The trainer's reporter: ``preview`` (default: :func:`default_preview`) bound to ``stage``, checked to fit its role."""
    preview = preview if preview is not None else default_preview(stage)
    if not isinstance(stage, preview.role):
        raise ValueError(
            f"stage {stage.name!r} is a {role_name(stage)}, but its preview {type(preview).__name__} "
            f"is for a {preview.role.__name__}; fix stage.preview._target_"
        )
    preview.check(stage)
    return partial(preview, stage)
