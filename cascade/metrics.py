"""Metrics of a stage's outputs that need a judge independent of the stage itself.

A *reference classifier* is a timm network trained from scratch on clean images of the
stage's own data set. It judges whether a generated sample shows the requested class
(the "classification accuracy" of ADM's guidance study; the base of CDM's CAS). It is
never the noisy classifier used for guidance: a guided sample is pushed towards whatever
that classifier likes, so it cannot be its own judge.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cascade.diffusion import q_sample
from cascade.schedules import NoiseSchedule

__all__ = ["train_reference_classifier", "classify", "top1_accuracy", "accuracy_by_noise_level"]


def train_reference_classifier(
    data: Dataset,
    *,
    num_classes: int,
    arch: str = "resnet18",
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 2e-3,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """A timm ``arch`` trained from scratch with AdamW + cosine decay on clean (image, label) pairs in [−1, 1]."""
    torch.manual_seed(seed)
    net = timm.create_model(arch, pretrained=False, num_classes=num_classes).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed))
    net.train()
    bar = tqdm(total=steps, desc=f"reference {arch}", unit="step", disable=not progress)
    step = 0
    while step < steps:
        for images, labels in loader:
            loss = F.cross_entropy(net(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step == steps:
                break
    bar.close()
    return net.eval()


@torch.no_grad()
def classify(net: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Predicted labels (N,) of images (N, 3, H, W) in [−1, 1]."""
    device = next(net.parameters()).device
    return torch.cat([net(chunk.to(device)).argmax(-1).cpu() for chunk in images.split(batch_size)])


def top1_accuracy(net: nn.Module, data: Dataset, batch_size: int = 256, limit: int | None = None) -> float:
    """Top-1 accuracy on (image, label) pairs (at most ``limit`` of them)."""
    if limit is not None:
        data = torch.utils.data.Subset(data, range(min(limit, len(data))))
    correct = total = 0
    for images, labels in DataLoader(data, batch_size=batch_size):
        correct += int((classify(net, images, batch_size) == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


@torch.no_grad()
def accuracy_by_noise_level(
    net: nn.Module, schedule: NoiseSchedule, data: Dataset, *, buckets: int, num_images: int,
    batch_size: int, device: torch.device, generator: torch.Generator,
) -> dict[str, float]:
    """Top-1 accuracy on noised images, t drawn uniformly inside each of ``buckets`` equal t-ranges."""
    edges = torch.linspace(0, len(schedule), buckets + 1).long().tolist()
    correct = [0] * buckets
    seen = [0] * buckets
    loader = DataLoader(torch.utils.data.Subset(data, range(min(num_images, len(data)))), batch_size=batch_size)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        for b in range(buckets):
            k = torch.randint(edges[b], edges[b + 1], (len(images),), generator=generator, device=device)
            noise = torch.randn(images.shape, generator=generator, device=device)
            x_t = q_sample(schedule, images, k, noise)
            logits = net(x_t, schedule.timesteps.to(device)[k])
            correct[b] += int((logits.argmax(-1) == labels).sum())
            seen[b] += len(labels)
    return {f"acc_t{edges[b]}-{edges[b + 1] - 1}": correct[b] / max(seen[b], 1) for b in range(buckets)}
