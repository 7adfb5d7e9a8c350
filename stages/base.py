"""The base stage: class-conditional diffusion at 64px (ADM; the first stage of the cascade).

What is conditioned on what: the network sees x_t, t and the class label; with probability
``p_uncond`` the label is replaced by the null class so that one network also serves as the
unconditional model of classifier-free guidance. At sampling, classifier guidance (a noisy
classifier) and/or classifier-free guidance steer it towards the requested class.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.utils import make_grid, save_image

from cascade.diffusion.denoiser import ModelFn, VarianceType, network_model_fn
from cascade.diffusion.guidance import classifier_free_guidance, classifier_guidance, classifier_log_prob
from cascade.diffusion.losses import DiffusionLoss
from cascade.diffusion.samplers import SamplerName, get_sampler
from cascade.diffusion.schedules import NoiseSchedule, Spacing, check_same_schedule, respace

__all__ = ["BaseStage", "default_spacing", "check_same_schedule"]


def default_spacing(sampler: SamplerName) -> Spacing:
    """Ancestral sampling keeps uniform steps (ADM respacing); DDIM and DPM-Solver use log-SNR spacing."""
    return "uniform" if sampler == "ddpm" else "logsnr"


class BaseStage:
    """Class-conditional diffusion stage (base 64px by default)."""

    def __init__(
        self,
        *,
        net: Callable[..., nn.Module],  # U-Net constructor; resolution, classes and output channels are filled in here
        schedule: NoiseSchedule,  # the training noise process
        objective: DiffusionLoss,  # L_simple or hybrid, and the parameterisation
        name: str = "base",  # stage name: checkpoints and run dirs carry it
        resolution: int = 64,  # training and sampling resolution
        p_uncond: float = 0.1,  # label dropout for classifier-free guidance
        fixed_variance: VarianceType = "large",  # Σ at sampling when the variance is not learned
        preview_sampler: SamplerName = "dpmpp_2m",  # sampler of the periodic sample grids
        preview_steps: int = 25,  # its number of steps
        preview_per_class: int = 8,  # grid columns: samples per class row
        preview_max_classes: int = 10,  # grid rows: the first classes
    ) -> None:
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
        self.net, self.schedule, self.objective = net, schedule, objective
        self.name, self.resolution, self.p_uncond, self.fixed_variance = name, resolution, p_uncond, fixed_variance
        self.preview_sampler, self.preview_steps = preview_sampler, preview_steps
        self.preview_per_class, self.preview_max_classes = preview_per_class, preview_max_classes
        self.num_classes: int | None = None

    @property
    def out_channels(self) -> int:
        return 6 if self.objective.learned_variance else 3

    def net_kwargs(self, num_classes: int) -> dict[str, object]:
        """What ``build`` fills into the network constructor (subclasses add their conditioning)."""
        return {"resolution": self.resolution, "num_classes": num_classes, "out_channels": self.out_channels}

    def build(self, num_classes: int) -> nn.Module:
        """The network for ``num_classes`` classes (plus the null class), through :meth:`precondition`."""
        kwargs = self.net_kwargs(num_classes)
        self.num_classes = kwargs["num_classes"]
        return self.precondition(self.net(**kwargs))

    def precondition(self, net: nn.Module) -> nn.Module:
        """Any wrapping the stage puts around a network with the U-Net's signature (none here)."""
        return net

    def drop_labels(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Labels with each one replaced by the null class ``num_classes`` at rate ``p_uncond`` (CFG training)."""
        drop = torch.rand(labels.shape[0], generator=generator, device=labels.device) < self.p_uncond  # (B,)
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def loss(self, net: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Per-example diffusion loss at uniformly drawn t, with labels dropped to ∅ at rate p_uncond."""
        batch, device = images.shape[0], images.device
        k = torch.randint(0, len(self.schedule), (batch,), generator=generator, device=device)  # (B,)
        noise = torch.randn(images.shape, generator=generator, device=device)  # (B, 3, H, W)
        return self.objective(net, self.schedule, images, k, noise, class_labels=self.drop_labels(labels, generator))

    def model_fn(
        self,
        net: nn.Module,
        *,
        sampling_schedule: NoiseSchedule,
        sampler: SamplerName,
        classifier: nn.Module | None = None,
        classifier_schedule: NoiseSchedule | None = None,
        classifier_scale: float = 0.0,
        cfg_scale: float = 1.0,
    ) -> ModelFn:
        """The network as a model function, with classifier-free and/or classifier guidance wrapped on."""
        variance: VarianceType = "learned" if self.objective.learned_variance else self.fixed_variance
        fn = network_model_fn(net, self.schedule, parameterization=self.objective.parameterization, variance=variance, clip_x0=True)
        if cfg_scale != 1.0:
            fn = classifier_free_guidance(fn, cfg_scale, null_label=self._num_classes(net))
        if classifier is not None and classifier_scale > 0:
            if classifier_schedule is not None:
                check_same_schedule(self.schedule, classifier_schedule, "the classifier")
            mode = "mean" if sampler == "ddpm" else "eps"
            fn = classifier_guidance(fn, classifier_log_prob(classifier), sampling_schedule, classifier_scale, mode=mode)
        return fn

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
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ) -> Tensor:
        """Images (B, 3, R, R) in [−1, 1] of the classes ``class_labels`` (B,)."""
        shape = (len(class_labels), 3, self.resolution, self.resolution)
        x_T = torch.randn(shape, generator=generator, device=class_labels.device)  # (B, 3, R, R)
        return self.run_sampler(net, x_T, {"class_labels": class_labels}, sampler=sampler, steps=steps, spacing=spacing,
                                classifier=classifier, classifier_schedule=classifier_schedule,
                                classifier_scale=classifier_scale, cfg_scale=cfg_scale, generator=generator, progress=progress)

    @torch.no_grad()
    def run_sampler(
        self,
        net: nn.Module,
        x_T: Tensor,
        cond: dict[str, Tensor],
        *,
        sampler: SamplerName = "dpmpp_2m",
        steps: int = 25,
        spacing: Spacing | None = None,
        classifier: nn.Module | None = None,
        classifier_schedule: NoiseSchedule | None = None,
        classifier_scale: float = 0.0,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ) -> Tensor:
        """Denoise ``x_T`` (B, 3, H, W) under the conditioning ``cond`` (passed to the network as keywords) into [−1, 1]."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        sampling_schedule = respace(self.schedule, steps, spacing or default_spacing(sampler))
        fn = self.model_fn(net, sampling_schedule=sampling_schedule, sampler=sampler, classifier=classifier,
                           classifier_schedule=classifier_schedule, classifier_scale=classifier_scale, cfg_scale=cfg_scale)
        x0 = get_sampler(sampler)(fn, x_T, sampling_schedule, cond=cond, generator=generator, progress=progress)
        return x0.clamp(-1.0, 1.0)

    def report(
        self, net: nn.Module, *, step: int, out_dir: Path, class_names: list[str], val_data: Dataset | None,
        device: torch.device, generator: torch.Generator,
    ) -> dict[str, float]:
        """A sample grid with one row per class (EMA weights), saved as ``samples/step_NNNNNNN.png``."""
        rows = min(len(class_names), self.preview_max_classes)
        labels = torch.arange(rows, device=device).repeat_interleave(self.preview_per_class)  # (rows·cols,)
        images = self.sample(net, labels, sampler=self.preview_sampler, steps=self.preview_steps, generator=generator, progress=False)
        out_dir.mkdir(parents=True, exist_ok=True)
        grid = make_grid((images.float().cpu() + 1) / 2, nrow=self.preview_per_class, padding=2, pad_value=1.0)
        save_image(grid, out_dir / f"step_{step:07d}.png")
        save_image(grid, out_dir / "latest.png")
        return {}

    def _num_classes(self, net: nn.Module) -> int:
        num = self.num_classes if self.num_classes is not None else getattr(net, "num_classes", None)
        if num is None:
            raise ValueError("classifier-free guidance needs a class-conditional network")
        return int(num)
