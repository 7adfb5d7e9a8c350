"""The roles a stage plays in the cascade: what the orchestrator, the trainer and the evaluation code may ask of it.

* :class:`Trainable` — the training-facing part: build the network, a per-example loss.
* :class:`Generator` — samples images from noise (class-conditional or unconditional, any
  resolution), optionally steered by a noisy classifier and/or classifier-free guidance.
* :class:`Upsampler` — samples an image ``factor`` times larger than a low-res input (any
  integer factor), with or without noise-conditioning augmentation of that input (CDM §4.3).
* :class:`NoisyClassifier` — p_φ(y | x_t, t) on a generator's noise process, for guidance.

Why two kinds of type. ``Trainable`` is a :class:`typing.Protocol`: the trainer never asks what
a stage *is*, only that it builds and has a loss, so any object with those methods trains
(structural typing, checked statically). The three sampling roles are small abstract base
classes: the orchestrator and the evaluation code must tell, at run time, which role an object
rebuilt from a checkpoint plays, and ``isinstance`` on a nominal class answers that from the
class the stage declares. (``isinstance`` on a ``runtime_checkable`` Protocol would only test
that attributes exist — the ``hasattr`` sniffing these types replace.) A stage class declares
exactly one role; the roles share no implementation (``stages/core.py`` does, by a common
base under them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import Tensor, nn

from cascade.diffusion.samplers import SamplerName
from cascade.diffusion.schedules import NoiseSchedule, Spacing
from cascade.utils.rng import Generator as RandomSource

__all__ = ["Trainable", "Generator", "Upsampler", "NoisyClassifier", "Role", "role_name"]


class Trainable(Protocol):
    """What the trainer needs from a stage."""

    name: str  # checkpoints and run folders carry it
    resolution: int  # training resolution of the images the data set delivers

    def build(self, num_classes: int) -> nn.Module:
        """The network for a data set of ``num_classes`` classes (fresh weights)."""
        ...

    def loss(self, net: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Per-example loss (B,) of a batch ``images`` (B, 3, R, R) in [−1, 1] with ``labels`` (B,); randomness from ``generator``."""
        ...


class _DiffusionRole(ABC):
    """What the sampling roles have in common: a name, a resolution and the training noise process."""

    name: str
    resolution: int  # output resolution
    schedule: NoiseSchedule  # the training noise process (guidance and respacing are defined on it)
    class_conditional: bool  # the network sees the class (with a null class when trained with label dropout)
    null_class: bool  # the network has the null-class row that classifier-free guidance needs

    @abstractmethod
    def build(self, num_classes: int) -> nn.Module: ...

    @abstractmethod
    def loss(self, net: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor: ...


class Generator(_DiffusionRole):
    """A stage that samples images from noise: the first stage of a cascade."""

    @abstractmethod
    def sample(
        self,
        net: nn.Module,
        class_labels: Tensor,
        *,
        sampler: SamplerName = "dpmpp_2m",
        steps: int = 25,
        spacing: Spacing | None = None,
        classifier: nn.Module | None = None,
        classifier_schedule: NoiseSchedule | None = None,
        classifier_scale: float = 0.0,
        guide: nn.Module | None = None,
        guide_scale: float = 1.0,
        cfg_scale: float = 1.0,
        generator: RandomSource = None,
        progress: bool = True,
    ) -> Tensor:
        """Images (B, 3, R, R) in [−1, 1] for ``class_labels`` (B,).

        On an unconditional generator the labels only name the classes classifier guidance
        steers towards (and set B); the network never sees them.
        """


class Upsampler(_DiffusionRole):
    """A stage that samples a ``factor``× larger image given a low-res one."""

    lowres_resolution: int  # input resolution
    factor: int  # resolution // lowres_resolution
    noise_augmentation: bool  # the low-res input is corrupted at a level s the network is told (CDM §4.3)
    aug_max_level: int | None  # highest trained level s (None without augmentation)
    sample_aug_level: int | None  # default s at sampling (None without augmentation)
    enforce_consistency: bool  # default at sampling: outputs projected onto downsample(output) = the low-res input

    @abstractmethod
    def sample(
        self,
        net: nn.Module,
        lowres: Tensor,
        class_labels: Tensor | None = None,
        *,
        aug_level: int | None = None,
        sampler: SamplerName = "dpmpp_2m",
        steps: int = 25,
        spacing: Spacing | None = None,
        cfg_scale: float = 1.0,
        enforce_consistency: bool | None = None,
        generator: RandomSource = None,
        progress: bool = True,
    ) -> Tensor:
        """Super-resolve ``lowres`` (B, 3, h, w) in [−1, 1] to (B, 3, f·h, f·w) in [−1, 1].

        ``enforce_consistency`` (None: the stage's default) projects the output onto the images whose
        downsample is ``lowres``.
        """

    def consistency_in_effect(self, enforce_consistency: bool | None) -> bool:
        """Whether :meth:`sample` called with this ``enforce_consistency`` projects: the call's choice, else the stage's."""
        return self.enforce_consistency if enforce_consistency is None else bool(enforce_consistency)


class NoisyClassifier(ABC):
    """p_φ(y | x_t, t) trained on a generator's noise process: its gradient guides sampling (ADM §4)."""

    name: str
    resolution: int  # input resolution
    schedule: NoiseSchedule  # the noise process of the generator it guides

    @abstractmethod
    def build(self, num_classes: int) -> nn.Module:
        """The network ``net(x_t, t) -> logits (B, num_classes)``."""

    @abstractmethod
    def loss(self, net: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor: ...


Role = Generator | Upsampler | NoisyClassifier


def role_name(stage: object) -> str:
    """``generator``, ``upsampler``, ``noisy classifier`` or ``no stage role`` (for messages)."""
    if isinstance(stage, Generator):
        return "generator"
    if isinstance(stage, Upsampler):
        return "upsampler"
    if isinstance(stage, NoisyClassifier):
        return "noisy classifier"
    return "no stage role"
