"""Class-conditional images from a folder tree (``root/<class>/<image>``), ADM preprocessing.

File discovery, class ordering (sorted folder names) and decoding come from
``torchvision.datasets.ImageFolder``. Each image is resized so its short side equals the
resolution, ADM-style (Dhariwal & Nichol 2021, ``image_datasets.center_crop_arr``):
repeated 2× box-filter halving while the short side is at least twice the target, then
one bicubic resize; then a centre crop to ``resolution``².

Class names are the folder names, except for ImageNet synset folders (``n01440764``):
those get the human-readable ImageNet-1k names of torchvision's weight metadata.

Bad data (policy):

* a missing root, a root without class folders, image files lying in the root beside the
  class folders (they would be silently unlabelled), a single class folder whose images all
  sit in sub-folders (the root is one level too high), or a class folder without images is
  one ``ValueError`` at construction, naming the problem and the fix;
* a file that cannot be decoded (corrupt, truncated, not an image) is skipped: the item is
  replaced by the next readable index (deterministically, so resumed runs see the same
  data), a warning names the file once, and it is counted in :meth:`fault_counts`;
* an image whose short side is smaller than the resolution is upscaled (bicubic, as ADM
  does) and counted as ``upscaled_small``; ``small_images="skip"`` skips it instead
  (counted as ``skipped_small``) — preferable for upsampler stages, whose target should
  hold real high-resolution detail.

The counts are shared between the loader's worker processes (a shared-memory status byte
per file), so the trainer reads the totals from the main process.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from cascade.data.domain import ImageDomain

__all__ = ["ImageFolderDataset", "adm_center_crop", "image_to_tensor", "imagenet_class_names", "imagenet_label_indices"]

_SYNSET = re.compile(r"n\d{8}")
_OK, _UNREADABLE, _SMALL_SKIPPED, _SMALL_UPSCALED = 0, 1, 2, 3  # per-file status codes
_MAX_SUBSTITUTES = 64  # consecutive unreadable files tolerated before giving up


def adm_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's centre crop: box-halve while short side >= 2R, bicubic to short side R, crop R×R."""
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, resample=Image.Resampling.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def image_to_tensor(image: Image.Image) -> Tensor:
    """A PIL image → float32 RGB (3, H, W) in [−1, 1]."""
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


def imagenet_label_indices(folders: Sequence[str], class_names: Sequence[str]) -> list[int] | None:
    """Each synset folder's index among ``class_names`` when those are ImageNet-1k's classes in sorted-synset order.

    That is ADM's label order (guided-diffusion ``image_datasets.py`` sorts the synset names): a
    folder tree holding only some of the 1000 synsets keeps each image's ImageNet label (the golden
    retriever folder ``n02099601`` is 207 whichever folders sit beside it). None when the folders are
    not all synsets, ``class_names`` are not the 1000 ImageNet names, or timm's synset list is missing.
    """
    synsets = _imagenet_synsets()
    if synsets is None or not folders or not all(_SYNSET.fullmatch(f) for f in folders):
        return None
    rank = {s: i for i, s in enumerate(synsets)}
    if not all(f in rank for f in folders) or imagenet_class_names(list(synsets)) != list(class_names):
        return None
    return [rank[f] for f in folders]


def _has_images(folder: str) -> bool:
    """Whether any image file lies in ``folder`` or below (stops at the first)."""
    return any(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(folder) for f in files)


def _check_tree(root: str) -> None:
    """Raise a one-line ValueError if ``root`` is missing or holds no class folders."""
    if not os.path.isdir(root):
        raise ValueError(
            f"image folder root {root!r} does not exist or is not a directory; "
            "pass the folder that holds one sub-folder of images per class"
        )
    loose = [e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    try:
        classes, _ = find_classes(root)
    except FileNotFoundError:
        found = f" (it holds {len(loose)} image files directly)" if loose else ""
        raise ValueError(f"no class folders in {root!r}{found}; expected {root}/<class_name>/<image files>") from None
    if loose:
        raise ValueError(
            f"{len(loose)} image files (e.g. {loose[0]!r}) lie directly in {root!r}, outside any class folder, so they "
            f"have no label; move them into {root}/<class_name>/ or remove them"
        )
    if len(classes) == 1:
        only = os.path.join(root, classes[0])
        direct = any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(only))
        nested = [e.name for e in os.scandir(only) if e.is_dir() and _has_images(e.path)]
        if not direct and nested:
            raise ValueError(
                f"{root!r} holds a single folder {classes[0]!r} whose images are all in sub-folders "
                f"({', '.join(sorted(nested)[:3])}, ...): every image would get one label; pass data.root={only}"
            )


class ImageFolderDataset(Dataset[tuple[Tensor, int]]):
    """(image (3, R, R) float32 in [-1, 1], label) from ``root/<class>/<image>``, ADM centre crop.

    Labels index the sorted class folders. ``class_names`` are the folder names, or
    ImageNet category names for synset folders (see :func:`imagenet_class_names`).
    ``flip=True`` flips horizontally with probability 1/2 using torch's default RNG (the
    trainer seeds it per item, :class:`cascade.data.order.SeededItems`). Unreadable and
    small images follow the module's policy.
    """

    domain: ClassVar[ImageDomain] = "natural"  # photographs: Inception features apply (cascade.data.ImageDomain)

    def __init__(
        self, *, root: str, resolution: int, flip: bool = True, small_images: Literal["upscale", "skip"] = "upscale"
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if small_images not in ("upscale", "skip"):
            raise ValueError(f"small_images must be 'upscale' or 'skip', got {small_images!r}")
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
        self.small_images = small_images  # policy for images whose short side is below the resolution
        self.folders: list[str] = list(self._folder.classes)
        self.class_names: list[str] = imagenet_class_names(self.folders) or list(self.folders)
        self.num_classes: int = len(self.class_names)
        # One status byte per file, in shared memory so that loader workers' findings reach the main process.
        self._status = torch.zeros(len(self._folder.samples), dtype=torch.uint8).share_memory_()  # (N,)

    def __len__(self) -> int:
        return len(self._folder.samples)

    def fault_counts(self) -> dict[str, int]:
        """Distinct files met so far that were skipped as unreadable, skipped as small, or upscaled."""
        counts = torch.bincount(self._status.long(), minlength=4).tolist()
        return {
            "skipped_unreadable": counts[_UNREADABLE],
            "skipped_small": counts[_SMALL_SKIPPED],
            "upscaled_small": counts[_SMALL_UPSCALED],
        }

    def _mark(self, index: int, status: int, note: str | None = None) -> None:
        if int(self._status[index]) != status:
            self._status[index] = status
            if note:
                print(f"warning: {note}", file=sys.stderr, flush=True)

    def _load(self, index: int) -> Image.Image | None:
        """The decoded image at ``index``, or None if the policy skips it (marking why)."""
        path = self._folder.samples[index][0]
        try:
            image = self._folder.loader(path)  # decodes fully (PIL convert)
        except Exception as error:  # any failure to decode a file is bad data, not a bug of ours
            self._mark(index, _UNREADABLE, f"skipping unreadable image {path} ({type(error).__name__}: {error})")
            return None
        if min(image.size) < self.resolution:
            if self.small_images == "skip":
                self._mark(
                    index,
                    _SMALL_SKIPPED,
                    f"skipping {path}: {image.width}x{image.height} is smaller than {self.resolution}px (small_images=skip)",
                )
                return None
            self._mark(index, _SMALL_UPSCALED)
        return image

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for k in range(min(n, _MAX_SUBSTITUTES)):
            i = (index + k) % n  # a skipped file is replaced by the next readable one
            image = self._load(i)
            if image is not None:
                break
        else:
            raise RuntimeError(
                f"{min(n, _MAX_SUBSTITUTES)} files in a row from {Path(self._folder.samples[index][0])} "
                "cannot be used (see the warnings); check the data folder"
            )
        image = image_to_tensor(adm_center_crop(image, self.resolution))  # (3, R, R)
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, int(self._folder.samples[i][1])
