"""PNG plots a person wants to look at: loss curves and per-bucket bars."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

__all__ = ["read_metrics", "plot_loss_curve", "plot_bars", "save_grid"]


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a ``metrics.jsonl`` file (empty if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path, title: str = "training loss") -> None:
    """Loss against step (log scale) with an exponential moving average on top."""
    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    # Smooth in log space, bias-corrected: a loss that falls by decades is not dominated by its start.
    smooth, ema = [], 0.0
    for i, value in enumerate(losses, start=1):
        ema = 0.9 * ema + 0.1 * math.log(max(value, 1e-12))
        smooth.append(math.exp(ema / (1 - 0.9**i)))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, losses, alpha=0.35, label="logged")
    ax.plot(steps, smooth, label="smoothed (log-space EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if min(losses) > 0:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


def plot_bars(
    labels: Sequence[str],
    values: Sequence[float] | Mapping[str, Sequence[float]],
    out_path: str | Path,
    *,
    title: str,
    ylabel: str,
    chance: float | None = None,
) -> None:
    """A bar chart, e.g. accuracy per noise bucket, with an optional chance line; ``values`` as a mapping
    of series name → values draws the series side by side in every group, with a legend."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    series = dict(values) if isinstance(values, Mapping) else {None: values}
    width = 0.8 / len(series)
    for i, (name, ys) in enumerate(series.items()):
        offsets = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(offsets, list(ys), width=width, label=name)
    ax.set_xticks(range(len(labels)), list(labels))
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", label="chance")
    if chance is not None or len(series) > 1:
        ax.legend()
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


def save_grid(images: Tensor, nrow: int, *paths: str | Path) -> None:
    """Images (N, 3, H, W) in [−1, 1] as one PNG grid of ``nrow`` columns (2px white gaps), written to every path."""
    grid = make_grid((images.float().cpu() + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
