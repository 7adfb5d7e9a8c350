"""What every diffusion stage shares, whatever it conditions on: the network factory, the noise
process, the objective, the model function with guidance wrapped on, and one sampler run.

:class:`DiffusionStage` is the common base of :class:`stages.base.GeneratorStage` and
:class:`stages.upsampler.UpsamplerStage`; it plays no role itself (the roles are in
:mod:`cascade.roles`). A stage subclass says what the network is conditioned on
(:meth:`DiffusionStage.net_kwargs`, the ``cond`` it passes to :meth:`DiffusionStage.run_sampler`).

Labels and the null class: a class-conditional network trained with label dropout
(``p_uncond`` > 0, Ho & Salimans 2022) has one more class-embedding row, the null class
``num_classes``, which is also the unconditional model of classifier-free guidance. Trained
without dropout it has no such row, and classifier-free guidance (w ≠ 1) is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cascade.diffusion.denoiser import ModelFn, ModelOutput, VarianceType, network_model_fn
from cascade.diffusion.guidance import autoguidance, classifier_free_guidance, classifier_guidance, classifier_log_prob
from cascade.diffusion.losses import DiffusionLoss
from cascade.diffusion.samplers import SamplerName, sampler_spec
from cascade.diffusion.schedules import NoiseSchedule, Spacing, check_same_schedule, respace
from cascade.utils import rng

__all__ = ["DiffusionStage", "SamplingOptions", "default_spacing", "network_classes"]


def default_spacing(sampler: SamplerName) -> Spacing:
    """The respacing a sampler uses when none is named (the sampler registry's ``default_spacing``)."""
    return sampler_spec(sampler).default_spacing


@dataclass(frozen=True)
class SamplingOptions:
    """How one sampler run goes: which sampler on which respaced process, and the guidance wrapped on."""

    sampler: SamplerName = "dpmpp_2m"
    steps: int = 25  # steps of the respaced process (= model evaluations, ×2 with CFG)
    spacing: Spacing | None = None  # None → the sampler's default (registry)
    cfg_scale: float = 1.0  # classifier-free guidance w (1: the conditional model)
    classifier: nn.Module | None = None  # noisy classifier for classifier guidance
    classifier_schedule: NoiseSchedule | None = None  # its training process (checked against the stage's)
    classifier_scale: float = 0.0  # classifier guidance s
    guide: nn.Module | None = None  # a weaker network of this stage (e.g. an earlier checkpoint) for autoguidance
    guide_scale: float = 1.0  # autoguidance w (1: the model alone)
    progress: bool = True  # the sampler's progress bar


def network_classes(net: nn.Module) -> int | None:
    """The class count of a network (``num_classes``), through DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        elif isinstance(getattr(net, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            net = net._orig_mod
        else:
            break
    num = getattr(net, "num_classes", None)
    return None if num is None else int(num)


def _hide_labels(fn: ModelFn, key: str = "class_labels") -> ModelFn:
    """``fn`` without ``cond[key]``: an unconditional network under classifier guidance, which reads the labels."""

    def unconditional(x_t: Tensor, t: Tensor, **cond: Tensor) -> ModelOutput:
        cond.pop(key, None)
        return fn(x_t, t, **cond)

    return unconditional


class DiffusionStage:
    """The shared diffusion core of the generator and upsampler stages (no role of its own)."""

    def __init__(
        self,
        *,
        net: Callable[..., nn.Module],  # network constructor (hydra partial); the stage fills in what it conditions on
        schedule: NoiseSchedule,  # the training noise process
        objective: DiffusionLoss,  # L_simple or hybrid, and the parameterisation
        name: str,  # stage name: checkpoints and run dirs carry it
        resolution: int,  # output resolution
        class_conditional: bool = True,  # the network sees the class
        p_uncond: float = 0.1,  # label dropout for classifier-free guidance; 0 → no null class at all
        fixed_variance: VarianceType = "large",  # Σ at sampling when the variance is not learned
    ) -> None:
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
        self.net, self.schedule, self.objective = net, schedule, objective
        self.name, self.resolution, self.class_conditional = name, resolution, class_conditional
        self.p_uncond, self.fixed_variance = p_uncond, fixed_variance

    # --- the network ---

    @property
    def out_channels(self) -> int:
        return 6 if self.objective.learned_variance else 3

    @property
    def null_class(self) -> bool:
        """Whether the network has a null-class row: class-conditional and trained with label dropout."""
        return self.class_conditional and self.p_uncond > 0

    def net_kwargs(self, num_classes: int) -> dict[str, object]:
        """What :meth:`build` fills into the network constructor (subclasses add their conditioning)."""
        kwargs: dict[str, object] = {
            "resolution": self.resolution,
            "out_channels": self.out_channels,
            "num_classes": num_classes if self.class_conditional else None,
        }
        if self.class_conditional:
            kwargs["null_class"] = self.null_class
        return kwargs

    def build(self, num_classes: int) -> nn.Module:
        """The network for ``num_classes`` classes (plus the null class with label dropout), through :meth:`precondition`."""
        return self.precondition(self.net(**self.net_kwargs(num_classes)))

    def precondition(self, net: nn.Module) -> nn.Module:
        """Any wrapping the stage puts around a network with the U-Net's signature (none here)."""
        return net

    def null_label(self, net: nn.Module) -> int:
        """The null class of ``net`` (its ``num_classes``); a clear error when it has none."""
        num = network_classes(net)
        if not self.class_conditional or num is None:
            raise ValueError(f"stage {self.name!r} is not class-conditional: it has no null class")
        if not self.null_class:
            raise ValueError(
                f"stage {self.name!r} was trained without label dropout (p_uncond=0): it has no null class, "
                "so classifier-free guidance and unlabelled sampling are not available; use cfg_scale=1 and give classes"
            )
        return num

    # --- training ---

    def drop_labels(self, net: nn.Module, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Labels with each one replaced by the null class at rate ``p_uncond`` (CFG training); unchanged when p_uncond = 0.

        The Bernoulli draw is made even at p_uncond = 0, so the random stream of a batch does not depend on it.
        """
        drop = torch.rand(labels.shape[0], generator=generator, device=labels.device) < self.p_uncond  # (B,)
        if not self.null_class:
            return labels
        return torch.where(drop, torch.full_like(labels, self.null_label(net)), labels)

    def diffusion_loss(
        self,
        net: nn.Module,
        x0: Tensor,
        labels: Tensor,
        generator: torch.Generator,
        loss_weight: Callable[[Tensor], Tensor] | None = None,
        **cond: Tensor,
    ) -> Tensor:
        """Per-example loss (B,) of the objective at t drawn by the objective (uniform by default), given the conditioning ``cond`` and the classes.

        ``loss_weight``: maps the drawn timesteps t (B,) to a factor (B,) of each example's loss
        (an upsampler's detail weighting, :meth:`LowresPrior.loss_weight`); None: unweighted.
        Random draws, in order: t, ε, then the label dropout (class-conditional stages only).
        """
        k = self.objective.draw_positions(self.schedule, x0.shape[0], generator, x0.device)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)  # (B, 3, H, W)
        if self.class_conditional:
            cond["class_labels"] = self.drop_labels(net, labels, generator)  # (B,)
        loss = self.objective(net, self.schedule, x0, k, noise, **cond)  # (B,)
        if loss_weight is not None:
            loss = loss * loss_weight(self.schedule.timesteps.to(k.device)[k])
        return loss

    # --- sampling ---

    def model_fn(self, net: nn.Module, sampling_schedule: NoiseSchedule, options: SamplingOptions) -> ModelFn:
        """The network as a model function, with autoguidance, classifier-free and/or classifier guidance wrapped on.

        Autoguidance is innermost: classifier-free guidance then mixes the autoguided conditional and
        unconditional predictions (the guide network must have the same classes, null class included).
        Classifier guidance takes its mode from the sampler registry (ADM's mean shift for the
        ancestral sampler, the ε-correction for DDIM / DPM-Solver).
        """
        variance: VarianceType = "learned" if self.objective.learned_variance else self.fixed_variance

        def as_model_fn(network: nn.Module) -> ModelFn:
            return network_model_fn(
                network, self.schedule, parameterization=self.objective.parameterization, variance=variance, clip_x0=True
            )

        fn = as_model_fn(net)
        if options.guide_scale != 1.0:
            if options.guide is None:
                raise ValueError(f"autoguidance scale {options.guide_scale:g} needs a guide network (an earlier checkpoint)")
            if network_classes(options.guide) != network_classes(net):
                raise ValueError(
                    f"the autoguidance guide has {network_classes(options.guide)} class rows, this stage's network "
                    f"{network_classes(net)}: guide with an earlier checkpoint of the same stage"
                )
            fn = autoguidance(fn, as_model_fn(options.guide), options.guide_scale)
        if not self.class_conditional:
            fn = _hide_labels(fn)
        if options.cfg_scale != 1.0:
            fn = classifier_free_guidance(fn, options.cfg_scale, null_label=self.null_label(net))
        if options.classifier is not None and options.classifier_scale > 0:
            if options.classifier_schedule is not None:
                check_same_schedule(self.schedule, options.classifier_schedule, "the classifier")
            mode = sampler_spec(options.sampler).guidance_mode
            fn = classifier_guidance(
                fn, classifier_log_prob(options.classifier), sampling_schedule, options.classifier_scale, mode=mode
            )
        return fn

    @torch.no_grad()
    def run_sampler(
        self, net: nn.Module, x_T: Tensor, cond: dict[str, Tensor], options: SamplingOptions, generator: rng.Generator = None
    ) -> Tensor:
        """Denoise ``x_T`` (B, 3, H, W) under ``cond`` (passed to the network as keywords) into [−1, 1]."""
        if options.steps < 1:
            raise ValueError(f"steps must be >= 1, got {options.steps}")
        spec = sampler_spec(options.sampler)
        sampling_schedule = respace(self.schedule, options.steps, options.spacing or spec.default_spacing)
        fn = self.model_fn(net, sampling_schedule, options)
        x0 = spec.fn(fn, x_T, sampling_schedule, cond=cond, generator=generator, progress=options.progress)
        return x0.clamp(-1.0, 1.0)
