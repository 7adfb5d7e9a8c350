"""Per-stage evaluation routines behind ``scripts/evaluate_stage.py``.

Each routine takes a stage rebuilt from its checkpoint, writes PNGs into ``out_dir`` and
returns a JSON-ready dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from cascade.metrics import accuracy_by_noise_level, classify
from cascade.plots import plot_bars

__all__ = ["guidance_sweep", "classifier_noise_accuracy"]


def guidance_sweep(
    stage: Any,
    net: nn.Module,
    *,
    reference: nn.Module,
    class_names: list[str],
    out_dir: Path,
    classifier: nn.Module | None = None,
    classifier_schedule: Any = None,
    classifier_scales: list[float] = (0.0,),
    cfg_scales: list[float] = (1.0,),
    num_samples: int = 200,
    batch_size: int = 50,
    sampler: str = "dpmpp_2m",
    steps: int = 25,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
) -> dict[str, Any]:
    """For every (classifier scale, CFG scale): the fraction of samples the reference classifier assigns to the requested class.

    Classes are requested round-robin so every class is equally represented; each setting
    starts from the same seed, so the settings differ only by their guidance.
    """
    labels = (torch.arange(num_samples) % len(class_names)).to(device)  # (N,)
    results = []
    settings = [(cs, ws) for ws in cfg_scales for cs in classifier_scales]
    for classifier_scale, cfg_scale in tqdm(settings, desc="guidance sweep", unit="setting"):
        if classifier_scale > 0 and classifier is None:
            raise ValueError("classifier scales > 0 need a noisy classifier: pass classifier_ckpt=PATH")
        generator = torch.Generator(device).manual_seed(seed)
        images = torch.cat([
            stage.sample(net, chunk, sampler=sampler, steps=steps, classifier=classifier, classifier_schedule=classifier_schedule,
                         classifier_scale=classifier_scale, cfg_scale=cfg_scale, generator=generator, progress=False).cpu()
            for chunk in labels.split(batch_size)
        ])
        predicted = classify(reference, images)
        per_class = [float((predicted[labels.cpu() == c] == c).float().mean()) for c in range(len(class_names))]
        accuracy = float((predicted == labels.cpu()).float().mean())
        results.append({"classifier_scale": classifier_scale, "cfg_scale": cfg_scale, "requested_class_accuracy": accuracy,
                        "per_class_accuracy": per_class})
        tag = f"cls{classifier_scale:g}_cfg{cfg_scale:g}"
        rows = min(len(class_names), 10)
        order = torch.cat([torch.nonzero(labels.cpu() == c)[:8, 0] for c in range(rows)])
        out_dir.mkdir(parents=True, exist_ok=True)
        save_image(make_grid((images[order] + 1) / 2, nrow=8, padding=2, pad_value=1.0), out_dir / f"samples_{tag}.png")
    plot_bars([f"s={r['classifier_scale']:g}, w={r['cfg_scale']:g}" for r in results], [r["requested_class_accuracy"] for r in results],
              out_dir / "guidance_accuracy.png", title="samples showing the requested class (reference classifier)",
              ylabel="fraction", chance=1 / len(class_names))
    return {"sampler": sampler, "steps": steps, "num_samples": num_samples, "seed": seed, "guidance": results}


def classifier_noise_accuracy(stage: Any, net: nn.Module, data: Dataset, *, out_dir: Path, buckets: int, num_images: int,
                              device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A noisy classifier's held-out accuracy per t-bucket (with a PNG bar chart)."""
    metrics = accuracy_by_noise_level(net, stage.schedule, data, buckets=buckets, num_images=num_images, batch_size=128,
                                      device=device, generator=torch.Generator(device).manual_seed(seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_bars([k.removeprefix("acc_") for k in metrics], list(metrics.values()), out_dir / "accuracy_by_t.png",
              title="noisy classifier, held-out accuracy by t", ylabel="top-1", chance=1 / data.num_classes)
    return {"accuracy_by_t": metrics, "num_images": min(num_images, len(data))}
