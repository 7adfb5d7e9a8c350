"""The noisy classifier stage: p_φ(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, §4).

The encoder half of the U-Net with attention pooling, trained with cross-entropy on
x_t ~ q(x_t | x_0) at uniformly drawn t of the *base model's* noise process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from cascade.diffusion.process import q_sample
from cascade.evaluation.metrics import accuracy_by_noise_level
from cascade.utils.plots import plot_bars
from cascade.diffusion.schedules import NoiseSchedule

__all__ = ["ClassifierStage"]


class ClassifierStage:
    """Noisy classifier for guidance; trained on the same noise process as the model it will guide."""

    def __init__(
        self,
        *,
        net: Callable[..., nn.Module],  # EncoderClassifier constructor; resolution and classes filled in here
        schedule: NoiseSchedule,  # the base model's noise process
        name: str = "classifier",  # stage name
        resolution: int = 64,  # input resolution
        eval_buckets: int = 4,  # t-ranges of the accuracy report
        eval_images: int = 512,  # held-out images per report
        eval_batch_size: int = 128,
    ) -> None:
        self.net, self.schedule = net, schedule
        self.name, self.resolution = name, resolution
        self.eval_buckets, self.eval_images, self.eval_batch_size = eval_buckets, eval_images, eval_batch_size

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

    def report(
        self, net: nn.Module, *, step: int, out_dir: Path, class_names: list[str], val_data: Dataset | None,
        device: torch.device, generator: torch.Generator,
    ) -> dict[str, float]:
        """Held-out accuracy per noise bucket, as metrics and as ``samples/accuracy_step_NNNNNNN.png``."""
        if val_data is None:
            return {}
        metrics = accuracy_by_noise_level(net, self.schedule, val_data, buckets=self.eval_buckets, num_images=self.eval_images,
                                          batch_size=self.eval_batch_size, device=device, generator=generator)
        out_dir.mkdir(parents=True, exist_ok=True)
        labels = [key.removeprefix("acc_") for key in metrics]
        for path in (out_dir / f"accuracy_step_{step:07d}.png", out_dir / "accuracy_latest.png"):
            plot_bars(labels, list(metrics.values()), path, title=f"noisy classifier accuracy (step {step})",
                      ylabel="top-1 accuracy on held-out x_t", chance=1 / len(class_names))
        return metrics
