"""Feature extractors for FID, precision/recall and IS (:mod:`cascade.evaluation.fid`).

Two kinds, named in every report:

* ``inception``: the standard FID network — TensorFlow's Inception-v3 of 2015-12-05 with its
  1008-way head (Heusel et al. 2017; ADM's evaluator), through torch-fidelity: 2048-d pool
  features, and class probabilities from the unbiased logits for IS. Images are resized to
  299px inside the network as in TensorFlow. The weights download once into the torch hub
  cache on a connected machine, or load from a file given with ``features_path``.
* ``classifier``: a classifier trained on the same data set — a reference timm network
  (:func:`cascade.evaluation.metrics.train_reference_classifier`; its pre-logits features) or a noisy
  classifier checkpoint evaluated at t = 0 (its attention-pooled features). For offline use
  and small data sets, whose images Inception's ImageNet features describe poorly. Numbers
  are comparable only between runs with the same feature network.

Images larger than an extractor's input are cut into tiles first (:func:`tiles`), so FID of a
1024px stage sees its detail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.hub import download_url_to_file
from tqdm.auto import tqdm

__all__ = [
    "INCEPTION_URL",
    "INCEPTION_FILE",
    "FeatureError",
    "FeatureExtractor",
    "InceptionFeatures",
    "TimmFeatures",
    "NoisyClassifierFeatures",
    "inception_weights",
    "tiles",
    "extract",
]

# The FID Inception weights as torch-fidelity publishes them; pytorch-fid's pt_inception-2015-12-05-6726825d.pth
# carries the same SHA-256 prefix (torch.hub names files <name>-<sha256[:8]>).
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class FeatureError(ValueError):
    """A feature network that cannot be had; the one-line message says how to supply it."""


class FeatureExtractor(Protocol):
    """Maps a batch of images (B, 3, H, W) in [−1, 1] to features (B, D) and class probabilities (B, C)."""

    description: str  # what the features are, for the report
    input_size: int | None  # side of the tiles larger images are cut into (None: any size)

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]: ...


def inception_weights(path: str | Path | None) -> Path:
    """The FID Inception weights file: ``path`` if given, else the torch hub cache, else downloaded into it.

    Raises :class:`FeatureError` (one line, naming the fix) when the file is missing or cannot be downloaded.
    """
    fix = (
        f"download {INCEPTION_URL} on a connected machine and pass features_path=/path/to/{INCEPTION_FILE} "
        "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth is the same file), or use features=classifier"
    )
    if path is not None:
        if not Path(path).is_file():
            raise FeatureError(f"features_path={path} does not exist; {fix}")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            download_url_to_file(INCEPTION_URL, str(cached), hash_prefix=INCEPTION_FILE.rsplit("-", 1)[1][:8], progress=True)
        except Exception as error:  # no network, proxy, truncated download, hash mismatch
            reason = " ".join(str(error).split())[:120] or type(error).__name__
            raise FeatureError(
                f"features=inception needs the FID Inception weights, which are not in {cached.parent} and "
                f"could not be downloaded ({reason}); {fix}"
            ) from None
    return cached


class InceptionFeatures:
    """FID Inception-v3 (torch-fidelity): 2048-d pool3 features and softmax of the 1008 unbiased logits."""

    input_size = None

    def __init__(self, weights: str | Path, device: torch.device) -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:  # safe load first: a weights file must be tensors only
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "fc.weight" not in state:
                raise ValueError("no fc.weight")
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights)
            )
        except Exception as error:
            raise FeatureError(
                f"{weights} is not the FID Inception weights file {INCEPTION_FILE} "
                f"({type(error).__name__}); pass the right features_path or use features=classifier"
            ) from None
        self.net = net.to(device).eval()
        self.device = device
        self.description = f"inception: FID Inception-v3 pool3 (2048-d) via torch-fidelity, weights {weights}"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W) the network's uint8 input
        features, logits = self.net(pixels.to(self.device))  # (B, 2048), (B, 1008)
        return features.cpu(), logits.softmax(dim=1).cpu()


class TimmFeatures:
    """A timm classifier's pre-logits features (B, D) and its class probabilities."""

    def __init__(self, net: nn.Module, *, input_size: int, description: str) -> None:
        self.net, self.input_size, self.description = net.eval(), input_size, description

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        device = next(self.net.parameters()).device
        trunk = self.net.forward_features(images.to(device))
        features = self.net.forward_head(trunk, pre_logits=True)  # (B, D)
        logits = self.net.forward_head(trunk)  # (B, C)
        return features.float().cpu(), logits.float().softmax(dim=1).cpu()


class NoisyClassifierFeatures:
    """A noisy classifier (:class:`~cascade.nn.EncoderClassifier`) at t = 0: attention-pooled features and probabilities."""

    def __init__(self, net: nn.Module, t0: Tensor, *, input_size: int, description: str) -> None:
        self.net, self.t0, self.input_size, self.description = net.eval(), t0, input_size, description

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        device = next(self.net.parameters()).device
        captured: list[Tensor] = []
        hook = self.net.pool.out.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            logits = self.net(images.to(device), self.t0.to(device).expand(len(images)))  # (B, C)
        finally:
            hook.remove()
        return captured[0].float().cpu(), logits.float().softmax(dim=1).cpu()  # (B, D), (B, C)


def tiles(images: Tensor, crop: int | None, per_image: int | None = None, seed: int = 0) -> Tensor:
    """Aligned non-overlapping ``crop``×``crop`` tiles of images (N, 3, S, S): (N·k, 3, crop, crop).

    All (S // crop)² tiles, or ``per_image`` of them drawn without replacement from ``seed``;
    two image sets of the same size get the same tile positions. Images no larger than
    ``crop`` (or ``crop`` None) are returned as they are.
    """
    size = images.shape[-1]
    if crop is None or crop >= size:
        return images
    grid = size // crop
    generator = torch.Generator().manual_seed(seed)
    out = []
    for image in images:
        cells = torch.arange(grid * grid)
        if per_image is not None and per_image < len(cells):
            cells = cells[torch.randperm(len(cells), generator=generator)[:per_image]]
        for cell in cells.tolist():
            y, x = divmod(cell, grid)
            out.append(image[:, y * crop : (y + 1) * crop, x * crop : (x + 1) * crop])  # (3, crop, crop)
    return torch.stack(out)


def extract(
    extractor: FeatureExtractor, images: Tensor, *, batch_size: int = 100, progress: bool = True, desc: str = "features"
) -> tuple[Tensor, Tensor]:
    """Features (N, D) and class probabilities (N, C) of images (N, 3, H, W) in [−1, 1], batch by batch."""
    features, probs = [], []
    for chunk in tqdm(images.split(batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        f, p = extractor(chunk)
        features.append(f)
        probs.append(p)
    return torch.cat(features), torch.cat(probs)
