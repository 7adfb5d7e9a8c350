"""Class-conditional images from a folder tree (``root/<class>/<image>``), ADM preprocessing.

File discovery, class ordering (sorted folder names) and decoding come from
``torchvision.datasets.ImageFolder``. Each image is resized so its short side equals the
resolution, ADM-style (Dhariwal & Nichol 2021, ``image_datasets.center_crop_arr``):
repeated 2× box-filter halving while the short side is at least twice the target, then
one bicubic resize; then a centre crop to ``resolution``².

Class names are the folder names, except for ImageNet synset folders (``n01440764``):
those get the human-readable ImageNet-1k names of torchvision's weight metadata.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

__all__ = ["ImageFolderDataset", "adm_center_crop", "imagenet_class_names"]

_SYNSET = re.compile(r"n\d{8}")


def adm_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's centre crop: box-halve while short side >= 2R, bicubic to short side R, crop R×R."""
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, resample=Image.Resampling.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image → float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


@lru_cache(maxsize=1)
def _imagenet_synsets() -> tuple[str, ...] | None:
    """The 1000 ImageNet-1k synsets in class-index (sorted) order, or None if unavailable offline.

    torchvision ships the 1000 category names but not the synset ids; timm (a project
    dependency) ships the synset list.
    """
    try:
        from timm.data import ImageNetInfo

        synsets = tuple(ImageNetInfo("imagenet-1k").label_names())
    except (ImportError, OSError):
        return None
    return synsets if len(synsets) == 1000 else None


def imagenet_class_names(folders: Sequence[str]) -> list[str] | None:
    """Human-readable names for ImageNet synset folders, or None when they cannot be mapped.

    The names are torchvision's ImageNet-1k categories (index 207 → "golden retriever"),
    listed in sorted-synset order. A subset of the synsets is mapped through each synset's
    rank among the 1000 (needs timm's synset list); without it, only the complete set of
    1000 folders is mapped.
    """
    if not folders or not all(_SYNSET.fullmatch(f) for f in folders):
        return None
    from torchvision.models import ResNet50_Weights

    categories: list[str] = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    synsets = _imagenet_synsets()
    if synsets is not None:
        rank = {s: i for i, s in enumerate(synsets)}
        if all(f in rank for f in folders):
            return [categories[rank[f]] for f in folders]
        return None
    if len(set(folders)) == len(categories):  # all 1000: the sorted folders are the class order
        order = {f: i for i, f in enumerate(sorted(folders))}
        return [categories[order[f]] for f in folders]
    return None


def _check_tree(root: str) -> None:
    """Raise a one-line ValueError if ``root`` is missing or holds no class folders."""
    if not os.path.isdir(root):
        raise ValueError(
            f"image folder root {root!r} does not exist or is not a directory; "
            "pass the folder that holds one sub-folder of images per class"
        )
    try:
        find_classes(root)
    except FileNotFoundError:
        raise ValueError(
            f"no class folders in {root!r}; expected {root}/<class_name>/<image files>"
        ) from None


class ImageFolderDataset(Dataset[tuple[Tensor, int]]):
    """(image (3, R, R) float32 in [-1, 1], label) from ``root/<class>/<image>``, ADM centre crop.

    Labels index the sorted class folders. ``class_names`` are the folder names, or
    ImageNet category names for synset folders (see :func:`imagenet_class_names`).
    ``flip=True`` flips horizontally with probability 1/2 using torch's default RNG.
    """

    def __init__(self, *, root: str, resolution: int, flip: bool = True) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        root = os.path.expanduser(str(root))
        _check_tree(root)
        self._folder = ImageFolder(root, allow_empty=True)
        counts = Counter(self._folder.targets)
        empty = [c for i, c in enumerate(self._folder.classes) if counts[i] == 0]
        if empty:
            raise ValueError(
                f"class folders with no images in {root!r}: {', '.join(empty)}; add images "
                f"({'/'.join(IMG_EXTENSIONS)}) or remove these folders"
            )
        self.root = root
        self.resolution = resolution  # output side, pixels
        self.flip = flip  # random horizontal flip (augmentation)
        self.folders: list[str] = list(self._folder.classes)
        self.class_names: list[str] = imagenet_class_names(self.folders) or list(self.folders)
        self.num_classes: int = len(self.class_names)

    def __len__(self) -> int:
        return len(self._folder.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self._folder.samples[index]
        image = _to_tensor(adm_center_crop(self._folder.loader(path), self.resolution))  # (3, R, R)
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, int(label)
