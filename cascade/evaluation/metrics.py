"""Per-image metrics of a stage's outputs: clean-image judges (accuracy, CAS) and super-resolution fidelity.

A *reference classifier* is a timm network trained from scratch on clean images of the
stage's own data set. It judges whether a generated sample shows the requested class
(the "classification accuracy" of ADM's guidance study, Dhariwal & Nichol 2021, §4) and its
penultimate features can stand in for Inception features on small data sets. It is never
the noisy classifier used for guidance: a guided sample is pushed towards whatever that
classifier likes, so it cannot be its own judge. The same training recipe on generated
images only gives the Classification Accuracy Score (CAS; Ravuri & Vinyals 2019, used by
CDM, Ho et al. 2021, §4.1).

Super-resolution fidelity (SR3, Saharia et al. 2021, §5; CDM §4.3): PSNR and SSIM against the
ground truth, and consistency — the PSNR of the downsampled output against the low-res input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import kornia
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cascade.data.resize import downsample, upsample
from cascade.diffusion.process import q_sample
from cascade.diffusion.schedules import NoiseSchedule
from cascade.utils.device import bf16_autocast, bf16_trains_faster

__all__ = [
    "random_crops",
    "luminance",
    "colour_blind",
    "ShapeJudge",
    "train_reference_classifier",
    "classify",
    "topk_accuracy",
    "accuracy_by_noise_level",
    "psnr",
    "ssim",
    "highfreq_energy",
    "super_resolution_metrics",
]


# --- Clean-image classifiers ---------------------------------------------------------------------


def random_crops(images: Tensor, crop: int | None, generator: torch.Generator | None = None) -> Tensor:
    """One uniformly placed ``crop``×``crop`` window per image (B, 3, c, c); the images themselves when they are not larger."""
    size = images.shape[-1]
    if crop is None or crop >= size:
        return images
    top = torch.randint(0, size - crop + 1, (len(images),), generator=generator).tolist()
    left = torch.randint(0, size - crop + 1, (len(images),), generator=generator).tolist()
    return torch.stack([im[:, y : y + crop, x : x + crop] for im, y, x in zip(images, top, left)])  # (B, 3, c, c)


def luminance(images: Tensor) -> Tensor:
    """Rec. 601 luma of images (B, 3, H, W) in [−1, 1], repeated on 3 channels (B, 3, H, W): colour removed."""
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)  # (B, 3, H, W)


def colour_blind(images: Tensor, generator: torch.Generator) -> Tensor:
    """Training view of the shape judge: luminance, then per image a random polarity, contrast and brightness.

    ``y = clamp(sign · gain · L + offset)`` with sign ±1, gain ∈ [0.5, 1.2], offset ∈ [−0.3, 0.3]:
    neither colour nor brightness nor which of object and background is darker says the
    class, so what is left to learn is geometry (outline, corners, holes, symmetry).
    """
    b = len(images)
    sign = torch.randint(0, 2, (b,), generator=generator).float().mul_(2).sub_(1)  # (B,) ±1
    gain = 0.5 + 0.7 * torch.rand(b, generator=generator)  # (B,)
    offset = 0.6 * torch.rand(b, generator=generator) - 0.3  # (B,)
    scale, shift = (sign * gain).view(b, 1, 1, 1), offset.view(b, 1, 1, 1)
    return (luminance(images) * scale.to(images) + shift.to(images)).clamp(-1, 1)  # (B, 3, H, W)


class ShapeJudge(nn.Module):
    """A reference classifier that sees only the luminance of its input (trained on :func:`colour_blind` views).

    Where classes differ in colour as well as in shape (the built-in data set), the ordinary
    reference classifier can name a colour blob's class; this one cannot, so its accuracy on
    samples says whether a generator draws the class's *geometry*.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        return self.net(luminance(images))  # (B, classes)


def train_reference_classifier(
    data: Dataset,
    *,
    num_classes: int,
    arch: str = "resnet18",
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 2e-3,
    crop: int | None = None,
    device: torch.device = torch.device("cpu"),
    bf16: bool = False,
    seed: int = 0,
    progress: bool = True,
    desc: str | None = None,
    view: Callable[[Tensor, torch.Generator], Tensor] | None = None,
) -> nn.Module:
    """A timm ``arch`` trained from scratch (AdamW, one-cycle schedule) on clean (image, label) pairs in [−1, 1].

    ``view``: a random transform of every training batch (e.g. :func:`colour_blind`), drawn from the same generator.

    With ``crop`` each step sees one random ``crop``×``crop`` window of every image (so the
    network judges crops of large images). The initial weights and every draw come from
    ``seed``; the global RNG state is left as it was. ``bf16``: the forward pass under bf16
    autocast where the hardware has it natively and it trains faster than float32 there, as the
    stages' ``trainer.bf16=auto`` (:func:`~cascade.utils.device.bf16_trains_faster`).
    """
    bf16 = bf16 and bf16_trains_faster(device)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm.create_model(arch, pretrained=False, num_classes=num_classes).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=min(batch_size, len(data)), shuffle=True, drop_last=True, generator=generator)
    net.train()
    bar = tqdm(total=steps, desc=desc or f"train {arch}", unit="step", disable=not progress, dynamic_ncols=True)
    step = 0
    while step < steps:
        for images, labels in loader:
            images = random_crops(images, crop, generator)  # (B, 3, c, c)
            if view is not None:
                images = view(images, generator)  # (B, 3, c, c)
            with bf16_autocast(device, bf16):
                logits = net(images.to(device))  # (B, classes)
            loss = F.cross_entropy(logits.float(), labels.to(device))
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
    """Logits (N, classes) of images (N, 3, H, W) in [−1, 1], on CPU."""
    device = next(net.parameters()).device
    return torch.cat([net(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)])


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": …, "top5": …}``: the fraction of rows of ``logits`` (N, C) whose label is among the k largest (k ≤ C)."""
    ranked = logits.argsort(dim=1, descending=True)  # (N, C)
    hits = ranked == labels[:, None]  # (N, C)
    return {f"top{k}": float(hits[:, : min(k, logits.shape[1])].any(dim=1).float().mean()) for k in ks}


@torch.no_grad()
def accuracy_by_noise_level(
    net: nn.Module,
    schedule: NoiseSchedule,
    data: Dataset,
    *,
    buckets: int,
    num_images: int,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
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


# --- Super-resolution fidelity -------------------------------------------------------------------


def _to01(images: Tensor) -> Tensor:
    return (images.float().clamp(-1, 1) + 1) / 2


def psnr(a: Tensor, b: Tensor) -> float:
    """Mean over images of PSNR = 10 log10(1 / MSE) (kornia) of (B, 3, H, W) images in [−1, 1], measured on [0, 1]."""
    return float(torch.stack([kornia.metrics.psnr(x, y, 1.0) for x, y in zip(_to01(a), _to01(b))]).mean())


def ssim(a: Tensor, b: Tensor) -> float:
    """Mean SSIM (Wang et al. 2004; kornia, 11×11 Gaussian window) of (B, 3, H, W) images in [−1, 1], on [0, 1]."""
    return float(kornia.metrics.ssim(_to01(a), _to01(b), 11, max_val=1.0).mean())


def highfreq_energy(images: Tensor, factor: int) -> Tensor:
    """Per-image energy (B,) of the spatial frequencies a 1/``factor`` low-res image cannot hold.

    The mean |FFT|² over frequencies with max(|f_y|, |f_x|) > 1/(2·factor) cycles/pixel (above
    the low-res Nyquist limit): the detail a super-resolution model has to invent. Compare
    it with the ground truth's: bicubic upsampling has almost none.
    """
    x = images.float() - images.float().mean(dim=(-2, -1), keepdim=True)
    spectrum = torch.fft.fft2(x, norm="ortho").abs().square()  # (B, C, H, W)
    fy = torch.fft.fftfreq(x.shape[-2], device=x.device).abs()[:, None]  # (H, 1)
    fx = torch.fft.fftfreq(x.shape[-1], device=x.device).abs()[None, :]  # (1, W)
    band = torch.maximum(fy, fx) > 0.5 / factor  # (H, W)
    return (spectrum * band).flatten(1).sum(dim=1) / x[0].numel()  # (B,)


@torch.no_grad()
def super_resolution_metrics(output: Tensor, target: Tensor, lowres: Tensor, factor: int) -> dict[str, float]:
    """PSNR / SSIM against the ground truth for the model and for bicubic, consistency and sharpness.

    All images in [−1, 1]: ``output`` and ``target`` (B, 3, H, W), ``lowres`` (B, 3, H/f, W/f),
    the input the output was made from. ``consistency_psnr`` compares downsample(output) with
    ``lowres``. ``hf_ratio`` is the output's high-frequency energy over the truth's
    (:func:`highfreq_energy`; 1 is the truth's sharpness, bicubic is far below).
    """
    output, target, lowres = output.float(), target.float(), lowres.float()
    bicubic = upsample(lowres, factor, "bicubic").clamp(-1, 1)  # (B, 3, H, W)
    hf_truth = highfreq_energy(target, factor).sum()
    return {
        "psnr": psnr(output, target),
        "psnr_bicubic": psnr(bicubic, target),
        "ssim": ssim(output, target),
        "ssim_bicubic": ssim(bicubic, target),
        "consistency_psnr": psnr(downsample(output, factor), lowres),
        "consistency_psnr_bicubic": psnr(downsample(bicubic, factor), lowres),
        "hf_ratio": float(highfreq_energy(output, factor).sum() / hf_truth),
        "hf_ratio_bicubic": float(highfreq_energy(bicubic, factor).sum() / hf_truth),
    }
