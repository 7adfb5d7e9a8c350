"""An exactly solvable diffusion: a Gaussian mixture in pixel space.

Data: x_0 ~ Σ_k π_k N(μ_k, diag(s_k²)) in (C, H, W). Under the forward process
x_t | k ~ N(√ᾱ μ_k, diag(ᾱ s_k² + 1 − ᾱ)), so the posterior over components, the
denoiser E[x_0 | x_t] (hence the exact ε-predictor) and log p(y | x_t) are closed form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cascade.diffusion.denoiser import ModelOutput
from cascade.diffusion.process import at
from cascade.diffusion.schedules import NoiseSchedule


class GaussianMixture:
    def __init__(self, shape: tuple[int, int, int] = (3, 8, 8), weights=(0.5, 0.3, 0.2), seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        num = len(weights)
        self.shape = shape
        self.weights = torch.tensor(weights, dtype=torch.float32)  # (K,)
        # Means: distinct smooth-ish patterns with values in about [−0.6, 0.6].
        self.means = 0.6 * (2 * torch.rand((num, *shape), generator=g) - 1)  # (K, C, H, W)
        # Per-component diagonal standard deviations, varying across channels.
        base = torch.tensor([0.2, 0.3, 0.4])[:num]
        per_channel = torch.tensor([1.0, 0.7, 1.3])[: shape[0]]
        self.stds = (base[:, None] * per_channel[None, :])[:, :, None, None].expand(num, *shape).clone()  # (K, C, H, W)

    @property
    def num_classes(self) -> int:
        return len(self.weights)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        x = self.means[labels] + self.stds[labels] * torch.randn((n, *self.shape), generator=generator)
        return x, labels

    def _log_likelihoods(self, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
        """log N(x_t; √ᾱ μ_k, ᾱ s_k² + 1 − ᾱ) for every component: (B, K)."""
        ab = alpha_bar.reshape(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
        var = ab * self.stds**2 + (1 - ab)  # (B, K, C, H, W)
        diff = x_t[:, None] - ab.sqrt() * self.means  # (B, K, C, H, W)
        return -0.5 * ((diff**2 / var) + var.log() + math.log(2 * math.pi)).flatten(2).sum(-1)

    def component_posterior(self, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
        """p(k | x_t): (B, K)."""
        return torch.softmax(self._log_likelihoods(x_t, alpha_bar) + self.weights.log(), dim=1)

    def log_prob_class(self, x_t: Tensor, alpha_bar: Tensor, y: Tensor) -> Tensor:
        """log p(y | x_t): (B,)."""
        logits = self._log_likelihoods(x_t, alpha_bar) + self.weights.log()  # (B, K)
        return torch.log_softmax(logits, dim=1).gather(1, y[:, None])[:, 0]

    def _component_denoiser(self, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
        """E[x_0 | x_t, k] for every component: (B, K, C, H, W)."""
        ab = alpha_bar.reshape(-1, 1, 1, 1, 1)
        gain = ab.sqrt() * self.stds**2 / (ab * self.stds**2 + 1 - ab)  # (B, K, C, H, W)
        return self.means + gain * (x_t[:, None] - ab.sqrt() * self.means)

    def denoiser(self, x_t: Tensor, alpha_bar: Tensor, labels: Tensor | None = None) -> Tensor:
        """E[x_0 | x_t] (labels None) or E[x_0 | x_t, k = label]: (B, C, H, W)."""
        per_component = self._component_denoiser(x_t, alpha_bar)  # (B, K, C, H, W)
        if labels is None:
            w = self.component_posterior(x_t, alpha_bar)  # (B, K)
            return (w[:, :, None, None, None] * per_component).sum(1)
        return per_component[torch.arange(len(labels)), labels]


class MixtureModel:
    """The exact model function of the mixture under ``schedule``: ε* = (x_t − √ᾱ E[x_0|x_t]) / √(1−ᾱ).

    ``class_labels`` equal to ``num_classes`` (the null class) or absent gives the unconditional
    model; a component index gives that component's exact conditional model.
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule) -> None:
        self.mixture, self.schedule = mixture, schedule
        self.calls = 0

    def alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        return at(self.schedule.alphas_cumprod, self.schedule.positions(t), like)  # (B, 1, 1, 1)

    def __call__(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> ModelOutput:
        self.calls += 1
        ab = self.alpha_bar(t, x_t)
        x0 = self.mixture.denoiser(x_t, ab[:, 0, 0, 0])
        if class_labels is not None:
            conditional = class_labels < self.mixture.num_classes
            if bool(conditional.any()):
                safe = class_labels.clamp(max=self.mixture.num_classes - 1)
                x0_c = self.mixture.denoiser(x_t, ab[:, 0, 0, 0], safe)
                x0 = torch.where(conditional[:, None, None, None], x0_c, x0)
        return ModelOutput(eps=(x_t - ab.sqrt() * x0) / (1 - ab).sqrt())

    def log_prob(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.mixture.log_prob_class(x_t, self.alpha_bar(t, x_t)[:, 0, 0, 0], y)
