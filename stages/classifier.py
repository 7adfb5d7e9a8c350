"""The noisy classifier stage: p_φ(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, §4).

The encoder half of the U-Net with attention pooling, trained with cross-entropy on
x_t ~ q(x_t | x_0) at uniformly drawn t of the *base model's* noise process.

Guidance follows whatever the classifier relies on: where a class is told by its colour alone, a classifier
trained on raw images learns the colour (the easier cue) and its gradient steers nothing else. ``recolour``
trains it on randomly recoloured images (:func:`random_recolour`), so that it must tell the classes by what
recolouring leaves, e.g. their shapes; the base model still supplies the colour.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.diffusion.process import q_sample
from cascade.diffusion.schedules import NoiseSchedule
from cascade.roles import NoisyClassifier

__all__ = ["ClassifierStage", "random_recolour"]


def random_recolour(images: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Recolour a random ``p`` of the images (B, 3, H, W) in [-1, 1]: hue rotated by U(−π, π), saturation scaled by U(0, 1).

    Per image, drawn from ``generator`` (exact resume). Brightness and every edge are kept; hue and saturation,
    which tell nothing afterwards, are what a classifier trained on the output cannot rely on.
    """
    batch, device = images.shape[0], images.device
    apply = torch.rand(batch, generator=generator, device=device) < p  # (B,)
    hue = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * math.pi  # (B,) radians
    saturation = torch.rand(batch, generator=generator, device=device)  # (B,)
    rgb = ((images.float() + 1) / 2).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
    recoloured = kornia.enhance.adjust_saturation(kornia.enhance.adjust_hue(rgb, hue), saturation) * 2 - 1
    return torch.where(apply[:, None, None, None], recoloured.to(images.dtype), images)  # (B, 3, H, W)


class ClassifierStage(NoisyClassifier):
    """Noisy classifier for guidance; trained on the same noise process as the model it will guide."""

    def __init__(
        self,
        *,
        net: Callable[..., nn.Module],  # EncoderClassifier constructor; resolution and classes filled in here
        schedule: NoiseSchedule,  # the base model's noise process
        name: str = "classifier",  # stage name
        resolution: int = 64,  # input resolution
        recolour: float = 0.0,  # fraction of training images recoloured (random_recolour); 0: ADM's classifier
    ) -> None:
        if not 0.0 <= recolour <= 1.0:
            raise ValueError(f"recolour is the fraction of training images recoloured, in [0, 1]; got {recolour}")
        self.net, self.schedule = net, schedule
        self.name, self.resolution, self.recolour = name, resolution, recolour

    def build(self, num_classes: int) -> nn.Module:
        return self.net(resolution=self.resolution, num_classes=num_classes)

    def loss(self, net: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Per-example cross-entropy of the label given x_t at uniformly drawn t (of recoloured images if asked)."""
        batch, device = images.shape[0], images.device
        if self.recolour > 0:
            images = random_recolour(images, self.recolour, generator)  # (B, 3, R, R)
        k = torch.randint(0, len(self.schedule), (batch,), generator=generator, device=device)  # (B,)
        noise = torch.randn(images.shape, generator=generator, device=device)
        x_t = q_sample(self.schedule, images, k, noise)  # (B, 3, R, R)
        logits = net(x_t, self.schedule.timesteps.to(device)[k])  # (B, num_classes)
        return F.cross_entropy(logits.float(), labels, reduction="none")
