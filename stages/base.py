"""The generator stage: diffusion from noise at one resolution (ADM; the first stage of the cascade).

What is conditioned on what: the network sees x_t and t, and on a class-conditional stage the
class label; with probability ``p_uncond`` the label is replaced by the null class so that one
network also serves as the unconditional model of classifier-free guidance (``p_uncond = 0``:
no null class at all, as ADM's released models). An unconditional stage
(``class_conditional: false``, e.g. ADM's 256px unconditional model) never sees the label; it
reaches a class only through classifier guidance. At sampling, classifier guidance (a noisy
classifier) and/or classifier-free guidance steer it towards the requested class.

With ``self_condition`` the network also sees its own estimate of x_0
(:mod:`cascade.diffusion.self_conditioning`; Chen, Zhang & Hinton 2022): in training on half of
the (micro-)batches, drawn from the training generator so that a resumed run draws the same; at
sampling on every model call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from cascade.diffusion.denoiser import VarianceType
from cascade.diffusion.losses import DiffusionLoss
from cascade.diffusion.samplers import SamplerName
from cascade.diffusion.schedules import NoiseSchedule, Spacing, check_same_schedule
from cascade.diffusion.self_conditioning import SelfConditioning
from cascade.roles import Generator
from cascade.utils import rng
from stages.core import DiffusionStage, SamplingOptions, default_spacing

__all__ = ["GeneratorStage", "BaseStage", "default_spacing", "check_same_schedule"]


class GeneratorStage(DiffusionStage, Generator):
    """Diffusion from noise, class-conditional (default) or unconditional, at any resolution."""

    def __init__(
        self,
        *,
        net: Callable[..., nn.Module],  # U-Net constructor; resolution, classes and output channels are filled in here
        schedule: NoiseSchedule,  # the training noise process
        objective: DiffusionLoss,  # L_simple or hybrid, and the parameterisation
        name: str = "base",  # stage name: checkpoints and run dirs carry it
        resolution: int = 64,  # training and sampling resolution
        class_conditional: bool = True,  # the network sees the class; False: unconditional (guided by a classifier)
        p_uncond: float = 0.1,  # label dropout for classifier-free guidance; 0: no null class
        fixed_variance: VarianceType = "large",  # Σ at sampling when the variance is not learned
        self_condition: bool = False,  # the network also sees its own x̂_0 estimate (Chen et al. 2022)
    ) -> None:
        self.self_condition = self_condition
        super().__init__(
            net=net,
            schedule=schedule,
            objective=objective,
            name=name,
            resolution=resolution,
            class_conditional=class_conditional,
            p_uncond=p_uncond,
            fixed_variance=fixed_variance,
        )

    def net_kwargs(self, num_classes: int) -> dict[str, object]:
        """The U-Net's arguments; with self-conditioning its ``lowres`` input carries the x̂_0 estimate."""
        kwargs = super().net_kwargs(num_classes)
        if self.self_condition:
            kwargs["lowres_channels"] = 3
        return kwargs

    def precondition(self, net: nn.Module) -> nn.Module:
        """``net`` wrapped in :class:`SelfConditioning` when ``self_condition``, else unchanged."""
        if not self.self_condition:
            return net
        return SelfConditioning(net, schedule=self.schedule, parameterization=self.objective.parameterization)

    def loss(self, net: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Per-example diffusion loss at t drawn by the objective, with labels dropped to ∅ at rate p_uncond.

        Random draws, in order: with ``self_condition`` one coin for the whole batch (refine from
        the network's own estimate, probability 1/2), then those of :meth:`diffusion_loss`.
        """
        cond: dict[str, object] = {}
        if self.self_condition:
            cond["refine"] = bool(torch.rand((), generator=generator, device=images.device) < 0.5)
        return self.diffusion_loss(net, images, labels, generator, **cond)

    @torch.no_grad()
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
        generator: rng.Generator = None,
        progress: bool = True,
    ) -> Tensor:
        """Images (B, 3, R, R) in [−1, 1] of the classes ``class_labels`` (B,).

        ``guide``, ``guide_scale``: autoguidance by a weaker network of this stage (an earlier checkpoint),
        :func:`cascade.diffusion.guidance.autoguidance`.

        Random draws: x_T (through :func:`cascade.utils.rng.randn`: per image with
        :class:`~cascade.utils.rng.ImageGenerators`), then the sampler's.
        """
        options = SamplingOptions(
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            cfg_scale=cfg_scale,
            classifier=classifier,
            classifier_schedule=classifier_schedule,
            classifier_scale=classifier_scale,
            guide=guide,
            guide_scale=guide_scale,
            progress=progress,
        )
        shape = (len(class_labels), 3, self.resolution, self.resolution)
        x_T = rng.randn(shape, generator, device=class_labels.device)  # (B, 3, R, R)
        return self.run_sampler(net, x_T, {"class_labels": class_labels}, options, generator)


BaseStage = GeneratorStage  # the name checkpoints written before the roles were explicit carry (stages.base.BaseStage)
