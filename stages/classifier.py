"""The noisy classifier stage: p_φ(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, §4).

The encoder half of the U-Net with attention pooling, trained with cross-entropy on
x_t ~ q(x_t | x_0) at uniformly drawn t of the *base model's* noise process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.diffusion.process import q_sample
from cascade.diffusion.schedules import NoiseSchedule
from cascade.roles import NoisyClassifier

__all__ = ["ClassifierStage"]


class ClassifierStage(NoisyClassifier):
    """Noisy classifier for guidance; trained on the same noise process as the model it will guide."""

    def __init__(
        self,
        *,
        net: Callable[..., nn.Module],  # EncoderClassifier constructor; resolution and classes filled in here
        schedule: NoiseSchedule,  # the base model's noise process
        name: str = "classifier",  # stage name
        resolution: int = 64,  # input resolution
    ) -> None:
        self.net, self.schedule = net, schedule
        self.name, self.resolution = name, resolution

    def build(self, num_classes: int) -> nn.Module:
        return self.net(resolution=self.resolution, num_classes=num_classes)

    def loss(self, net: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Per-example cross-entropy of the label given x_t at uniformly drawn t."""
        batch, device = images.shape[0], images.device
        k = torch.randint(0, len(self.schedule), (batch,), generator=generator, device=device)  # (B,)
        noise = torch.randn(images.shape, generator=generator, device=device)
        x_t = q_sample(self.schedule, images, k, noise)  # (B, 3, R, R)
        logits = net(x_t, self.schedule.timesteps.to(device)[k])  # (B, num_classes)
        return F.cross_entropy(logits.float(), labels, reduction="none")
