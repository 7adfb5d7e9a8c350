"""The orchestrator: chains stage checkpoints in memory, generator → (augment → upsampler)* (CDM, Ho et al. 2021, §3).

Every stage is rebuilt from its checkpoint alone (:func:`~cascade.training.checkpoint.load_stage`)
and plays a role of :mod:`cascade.roles`. :func:`check_chain` says everything that keeps the
stages from forming one cascade; :meth:`Cascade.sample` then runs the generator (classifier
and/or classifier-free guidance and/or autoguidance), noise-augments its output at the chosen level and
super-resolves it, stage after stage, batch by batch, handing tensors from stage to stage
(files are only written by the caller).

Randomness: image i of stage j draws all its noise (x_T, the augmentation noise, the sampler's)
from its own ``torch.Generator`` seeded with :func:`image_seed` (seed, j, i) — i the global
index of the image — so an image does not depend on the batch size, on which other images are
sampled with it (sharded sampling) or on whether later stages run, and the same settings give
bit-identical images on the same machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cascade.diffusion.samplers import REGISTRY, SamplerName
from cascade.diffusion.schedules import Spacing, check_same_schedule
from cascade.roles import Generator, NoisyClassifier, Upsampler
from cascade.training.checkpoint import CheckpointError, LoadedStage, guide_problem, open_stage
from cascade.utils.device import bf16_autocast
from cascade.utils.rng import ImageGenerators

__all__ = [
    "StageSettings",
    "LoadedStage",
    "ChainError",
    "Cascade",
    "check_chain",
    "check_settings",
    "stage_seed",
    "image_seed",
    "IMAGE_SEED_STRIDE",
]


@dataclass
class StageSettings:
    """How one stage samples. ``aug_level`` is for upsamplers with noise augmentation (None → the stage's trained default)."""

    sampler: SamplerName = "dpmpp_2m"  # a name of cascade.diffusion.samplers.REGISTRY
    steps: int = 25  # sampler steps (= model evaluations, ×2 with CFG)
    batch_size: int = 16  # images per sampler call (bounds memory; 1024px wants small batches)
    cfg_scale: float = 1.0  # classifier-free guidance w (1 = the conditional model)
    classifier_scale: float = 0.0  # classifier guidance s (generator only)
    guide_scale: float = 1.0  # autoguidance w by the cascade's guide network (generator only; 1 = off)
    aug_level: int | None = None  # noise-augmentation level s of the low-res input (upsamplers only)
    enforce_consistency: bool | None = None  # project outputs onto the low-res input (upsamplers only; None: the stage's)
    spacing: Spacing | None = None  # respacing of the training process (None: the sampler's default)


class ChainError(ValueError):
    """Stages that do not form one cascade; the message lists every mismatch."""


def check_chain(
    base: LoadedStage,
    classifier: LoadedStage | None,
    upsamplers: Sequence[LoadedStage],
    guide: LoadedStage | None = None,
) -> None:
    """Raise :class:`ChainError` naming every way the stages fail to chain; return quietly when they fit.

    Checked: each checkpoint plays the role its slot needs (generator, noisy classifier,
    upsamplers); the classifier sees the generator's resolution and was trained on its noise
    process; the autoguidance guide is a checkpoint of the same generator
    (:func:`~cascade.training.checkpoint.guide_problem`); every upsampler's low-res input is the
    previous stage's output resolution; class-conditional stages share one class list.
    """
    problems: list[str] = []
    if not isinstance(base.stage, Generator):
        problems.append(f"{base.path} is a {base.name!r} checkpoint, not a base stage (a generator)")
    elif guide is not None and (problem := guide_problem(guide, base)) is not None:
        problems.append(f"the guide {problem}")
    if classifier is not None:
        if not isinstance(classifier.stage, NoisyClassifier):
            problems.append(f"{classifier.path} is a {classifier.name!r} checkpoint, not a noisy classifier")
        else:
            if classifier.stage.resolution != base.stage.resolution:
                problems.append(
                    f"the classifier sees {classifier.stage.resolution}px images but the base makes "
                    f"{base.stage.resolution}px ones"
                )
            if isinstance(base.stage, Generator):
                try:
                    check_same_schedule(base.stage.schedule, classifier.stage.schedule, "the classifier")
                except ValueError as error:
                    problems.append(str(error))
            if classifier.class_names != base.class_names:
                problems.append(
                    f"the classifier's {len(classifier.class_names)} classes differ from the base's "
                    f"{len(base.class_names)} (first difference: {_first_difference(classifier.class_names, base.class_names)})"
                )
    previous = base
    for up in upsamplers:
        if not isinstance(up.stage, Upsampler):
            problems.append(f"{up.path} is a {up.name!r} checkpoint, not an upsampler")
            previous = up
            continue
        if up.stage.lowres_resolution != previous.stage.resolution:
            problems.append(
                f"{up.name} upsamples {up.stage.lowres_resolution}px images but {previous.name} makes "
                f"{previous.stage.resolution}px ones"
            )
        if up.class_conditional and up.class_names != base.class_names:
            problems.append(
                f"{up.name} was trained on {len(up.class_names)} classes that differ from the base's "
                f"{len(base.class_names)} (first difference: {_first_difference(up.class_names, base.class_names)})"
            )
        previous = up
    if problems:
        raise ChainError("the stages do not chain: " + "; ".join(problems))


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"class {i} is {x!r} vs {y!r}"
    return f"{len(a)} vs {len(b)} classes"


def check_settings(
    name: str, stage: Generator | Upsampler, settings: StageSettings, *, guided: bool, has_guide: bool = False
) -> None:
    """One clear ValueError for sampler settings that cannot run (``guided``: a noisy classifier is there; ``has_guide``: a guide)."""
    if settings.sampler not in REGISTRY:
        raise ValueError(f"{name}: unknown sampler {settings.sampler!r}; choose one of {', '.join(REGISTRY)}")
    if settings.steps < 1:
        raise ValueError(f"{name}: steps must be >= 1, got {settings.steps}")
    if settings.steps > len(stage.schedule):
        raise ValueError(f"{name}: steps must be <= {len(stage.schedule)} (the training process), got {settings.steps}")
    if settings.batch_size < 1:
        raise ValueError(f"{name}: batch size must be >= 1, got {settings.batch_size}")
    if settings.cfg_scale < 0 or settings.classifier_scale < 0:
        raise ValueError(
            f"{name}: guidance scales must be >= 0, got cfg {settings.cfg_scale}, classifier {settings.classifier_scale}"
        )
    if settings.cfg_scale != 1.0 and not stage.null_class:
        raise ValueError(
            f"{name}: classifier-free guidance (cfg scale {settings.cfg_scale}) needs a null class, and this stage was trained "
            "without label dropout (p_uncond=0: ADM's released models); use cfg scale 1 (and classifier guidance instead)"
        )
    if settings.classifier_scale > 0 and not guided:
        raise ValueError(f"{name}: classifier guidance scale {settings.classifier_scale} needs a noisy classifier checkpoint")
    if settings.guide_scale < 0:
        raise ValueError(f"{name}: the autoguidance scale must be >= 0 (1 = off), got {settings.guide_scale}")
    if settings.guide_scale != 1.0 and not has_guide:
        raise ValueError(
            f"{name}: autoguidance scale {settings.guide_scale} needs a guide network (an earlier checkpoint of the same run); "
            "pass --guide-ckpt PATH, or --guide-scale 1"
        )
    if isinstance(stage, Upsampler) and settings.aug_level is not None:
        if not stage.noise_augmentation:
            raise ValueError(
                f"{name}: this upsampler was trained without noise conditioning augmentation; it takes no aug level "
                f"(got {settings.aug_level})"
            )
        if not 0 <= settings.aug_level <= stage.aug_max_level:
            raise ValueError(
                f"{name}: aug level must be in 0..{stage.aug_max_level} (the levels it was trained on), got {settings.aug_level}"
            )


def stage_seed(seed: int, stage_index: int, batch_index: int) -> int:
    """The seed the orchestrator gave stage ``stage_index``'s generator for batch ``batch_index`` before per-image seeds."""
    return (seed * 1_000_003 + stage_index * 10_007 + batch_index) % (2**63)


# An odd 63-bit constant (2^63 / golden ratio): i ↦ i·K mod 2^63 is a bijection, so image seeds of one stage never repeat.
IMAGE_SEED_STRIDE = 0x4F1BBCDCBFA53E0B


def image_seed(seed: int, stage_index: int, image_index: int) -> int:
    """The seed of image ``image_index``'s generator in stage ``stage_index``: ``stage_seed(seed, j, 0) + i·K`` mod 2^63.

    Image 0 keeps the seed batch 0 had when each batch shared one generator, so a one-image run
    (the demo's) gives the very images it gave then; every other image has a seed of its own.
    """
    return (stage_seed(seed, stage_index, 0) + image_index * IMAGE_SEED_STRIDE) % (2**63)


def _batches(n: int, size: int) -> Iterator[tuple[int, slice]]:
    for b, start in enumerate(range(0, n, size)):
        yield b, slice(start, min(start + size, n))


class Cascade:
    """A generator (+ noisy classifier, + autoguidance guide) and upsamplers, validated to chain; samples them in memory."""

    def __init__(
        self,
        base: LoadedStage,
        upsamplers: Sequence[LoadedStage] = (),
        classifier: LoadedStage | None = None,
        *,
        guide: LoadedStage | None = None,
        device: torch.device = torch.device("cpu"),
        bf16: bool = True,
    ) -> None:
        check_chain(base, classifier, upsamplers, guide)
        self.base, self.upsamplers, self.classifier, self.guide = base, list(upsamplers), classifier, guide
        self.device, self.bf16 = device, bf16

    @classmethod
    def from_checkpoints(
        cls,
        base: str | Path,
        upsamplers: Sequence[str | Path] = (),
        classifier: str | Path | None = None,
        *,
        guide: str | Path | None = None,
        device: torch.device = torch.device("cpu"),
        bf16: bool = True,
    ) -> Cascade:
        """Rebuild every stage from its checkpoint and check the chain (:class:`ChainError` if it does not fit)."""
        try:
            loaded_base = open_stage(base, device)
            loaded_clf = open_stage(classifier, device) if classifier is not None else None
            loaded_guide = open_stage(guide, device) if guide is not None else None
            loaded_ups = [open_stage(p, device) for p in upsamplers]
        except (KeyError, TypeError) as error:  # a checkpoint whose config does not rebuild a stage
            raise CheckpointError(f"a checkpoint does not describe a stage of this version ({error})") from None
        return cls(loaded_base, loaded_ups, loaded_clf, guide=loaded_guide, device=device, bf16=bf16)

    @property
    def generator(self) -> Generator:
        assert isinstance(self.base.stage, Generator)  # check_chain
        return self.base.stage

    @property
    def stages(self) -> list[LoadedStage]:
        return [self.base, *self.upsamplers]

    @property
    def class_names(self) -> list[str]:
        return self.base.class_names

    def check(self, settings: Sequence[StageSettings]) -> None:
        """Validate one :class:`StageSettings` per stage (generator first)."""
        if len(settings) != len(self.stages):
            raise ValueError(f"expected settings for {len(self.stages)} stages, got {len(settings)}")
        for loaded, s in zip(self.stages, settings):
            assert isinstance(loaded.stage, (Generator, Upsampler))  # check_chain
            is_base = loaded is self.base
            check_settings(
                loaded.name,
                loaded.stage,
                s,
                guided=is_base and self.classifier is not None,
                has_guide=is_base and self.guide is not None,
            )

    def aug_levels(self, settings: Sequence[StageSettings]) -> list[int | None]:
        """The augmentation level each stage will use (None for the generator and upsamplers without augmentation)."""
        levels: list[int | None] = [None]
        for up, s in zip(self.upsamplers, settings[1:]):
            assert isinstance(up.stage, Upsampler)  # check_chain
            levels.append(
                (s.aug_level if s.aug_level is not None else up.stage.sample_aug_level) if up.stage.noise_augmentation else None
            )
        return levels

    @torch.no_grad()
    def sample(
        self,
        class_labels: Tensor,
        settings: Sequence[StageSettings],
        *,
        seed: int = 0,
        first_index: int = 0,
        progress: bool = True,
        on_stage_output: Callable[[int, slice, Tensor], None] | None = None,
    ) -> list[Tensor]:
        """Images of every stage for the classes ``class_labels`` (N,): [(N, 3, 64, 64), (N, 3, 256, 256), …] in [−1, 1], on CPU.

        Stage after stage, each over the N images in batches of its ``batch_size``; the
        previous stage's output (in memory) is the low-res input, noise-augmented at the
        stage's ``aug_level``. The images are those of global indices ``first_index`` …
        ``first_index + N − 1``: image i's noise in stage j comes from :func:`image_seed` (seed,
        j, i) alone, so a range sampled on its own (a shard) equals the same range of a larger
        run, whatever the batch sizes. ``on_stage_output(stage_index, slice, images)`` is called
        on every finished batch (e.g. to write PNGs as they come). One progress bar per stage.
        """
        self.check(settings)
        if first_index < 0:
            raise ValueError(f"first_index must be >= 0, got {first_index}")
        labels = class_labels.to(self.device).long()  # (N,)
        levels = self.aug_levels(settings)
        outputs: list[Tensor] = []
        for j, (loaded, s) in enumerate(zip(self.stages, settings)):
            res = loaded.stage.resolution
            bar = tqdm(total=len(labels), desc=f"{loaded.name} {res}px", unit="img", disable=not progress, dynamic_ncols=True)
            produced = []
            for _, part in _batches(len(labels), s.batch_size):
                seeds = [image_seed(seed, j, first_index + i) for i in range(part.start, part.stop)]
                generators = ImageGenerators(seeds, self.device)
                with bf16_autocast(self.device, self.bf16):
                    images = self._sample_stage(
                        loaded, labels[part], outputs[j - 1][part] if j else None, s, levels[j], generators, progress
                    )
                images = images.float().cpu()  # (b, 3, R, R)
                produced.append(images)
                if on_stage_output is not None:
                    on_stage_output(j, part, images)
                bar.update(len(images))
            bar.close()
            outputs.append(torch.cat(produced))
        return outputs

    def _sample_stage(
        self,
        loaded: LoadedStage,
        labels: Tensor,
        lowres: Tensor | None,
        s: StageSettings,
        aug_level: int | None,
        generators: ImageGenerators,
        progress: bool,
    ) -> Tensor:
        """One batch of one stage: the generator from labels, an upsampler from the previous stage's images."""
        stage = loaded.stage
        if isinstance(stage, Generator):
            clf = self.classifier
            return stage.sample(
                loaded.net,
                labels,
                sampler=s.sampler,
                steps=s.steps,
                spacing=s.spacing,
                classifier=clf.net if clf else None,
                classifier_schedule=clf.stage.schedule if clf else None,
                classifier_scale=s.classifier_scale,
                guide=self.guide.net if self.guide else None,
                guide_scale=s.guide_scale,
                cfg_scale=s.cfg_scale,
                generator=generators,
                progress=progress,
            )
        assert isinstance(stage, Upsampler) and lowres is not None  # check_chain
        return stage.sample(
            loaded.net,
            lowres.to(self.device),
            labels if stage.class_conditional else None,
            aug_level=aug_level,
            sampler=s.sampler,
            steps=s.steps,
            spacing=s.spacing,
            cfg_scale=s.cfg_scale,
            enforce_consistency=s.enforce_consistency,
            generator=generators,
            progress=progress,
        )

    def describe(self, settings: Sequence[StageSettings]) -> dict[str, Any]:
        """Every stage and setting, JSON-ready (the core of ``cascade.json``)."""
        levels = self.aug_levels(settings)
        described = []
        for loaded, s, level in zip(self.stages, settings, levels):
            entry = {**loaded.describe(), **asdict(s)}
            if level is not None:
                entry["aug_level"] = level
            else:
                entry.pop("aug_level")
            if isinstance(loaded.stage, Upsampler):  # the value in effect, so a replay projects as this run did
                entry["enforce_consistency"] = loaded.stage.consistency_in_effect(s.enforce_consistency)
            else:
                entry.pop("enforce_consistency")
            described.append(entry)
        return {
            "stages": described,
            "classifier": self.classifier.describe() if self.classifier else None,
            "guide": self.guide.describe() if self.guide else None,
            "bf16": self.bf16,
            "device": str(self.device),
        }
