"""Where images to score come from: an ADM-style ``.npz`` batch, a folder of image files, or one of our data sets.

Every source yields uint8 images (B, 3, H, W) with their global indices, block by block: block b
holds indices [b·B, (b+1)·B) and rank r of K reads the blocks b ≡ r (mod K), so ranks split the
work without exchanging images. :meth:`ImageSource.digest` identifies the content for the
reference-statistics cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cascade.utils.npz import NpzError, iter_rows, npz_keys, read_header

__all__ = ["SourceError", "ImageSource", "NpzImages", "FolderImages", "DatasetImages", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class SourceError(ValueError):
    """Images that cannot be read as asked; the one-line message names the file and the fix."""


class ImageSource:
    """Base: ``num`` images of ``resolution``² pixels; subclasses implement :meth:`_block`."""

    description: str
    num: int
    resolution: int

    def limit(self, num: int, what: str) -> None:
        """Use the first ``num`` images; fewer than ``num`` available is a :class:`SourceError`."""
        if num > self.num:
            raise SourceError(
                f"{self.description} holds {self.num} images, fewer than the {num} asked for {what}; pass "
                f"{self.num} or fewer (metrics are comparable only at equal N)"
            )
        self.num = num

    def batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """(global indices (B,), uint8 images (B, 3, H, W)) of this rank's blocks."""
        for b in range(rank, -(-self.num // batch_size), world):
            start, stop = b * batch_size, min((b + 1) * batch_size, self.num)
            yield torch.arange(start, stop), self._block(start, stop)

    def _block(self, start: int, stop: int) -> Tensor:
        raise NotImplementedError

    def digest(self) -> str:
        raise NotImplementedError


def _check_hw3(shape: tuple[int, ...], where: str) -> int:
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
        raise SourceError(f"{where} has shape {shape}; expected square RGB images (N, H, H, 3) as ADM's evaluator reads")
    return int(shape[1])


class NpzImages(ImageSource):
    """``arr_0`` of an ``.npz``: uint8 (N, H, W, 3), streamed block by block (ADM's sample and reference batches)."""

    def __init__(self, path: str | Path, key: str = "arr_0") -> None:
        self.path, self.key = Path(path), key
        if not self.path.is_file():
            raise SourceError(f"{self.path} does not exist; pass an .npz made by sample_shards.py or ADM's image_sample.py")
        try:
            shape, dtype = read_header(self.path, key)
        except NpzError as error:
            raise SourceError(str(error)) from None
        if dtype != np.uint8:
            raise SourceError(f"{self.path}: {key} is {dtype}, expected uint8 pixels 0..255")
        self.resolution = _check_hw3(shape, f"{self.path}: {key}")
        self.num, self.description = int(shape[0]), f"{self.path} ({key})"

    def batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        blocks = range(rank, -(-self.num // batch_size), world)
        for start, rows in iter_rows(self.path, self.key, batch_size, blocks=blocks):
            rows = rows[: max(0, self.num - start)]  # limit() may have cut the file short
            yield torch.arange(start, start + len(rows)), torch.from_numpy(rows.copy()).permute(0, 3, 1, 2)  # (B, 3, H, W)

    def digest(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()


class FolderImages(ImageSource):
    """Image files under a folder (recursively, sorted by relative path), RGB; all of one square size."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"{self.root} is not a folder of images")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise SourceError(f"{self.root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        with Image.open(self.files[0]) as first:
            width, height = first.size
        if width != height:
            raise SourceError(f"{self.files[0]} is {width}x{height}; expected square images")
        self.resolution, self.num, self.description = width, len(self.files), f"{self.root}/ ({len(self.files)} files)"

    def _block(self, start: int, stop: int) -> Tensor:
        images = []
        for path in self.files[start:stop]:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))  # (H, W, 3)
            if array.shape[:2] != (self.resolution, self.resolution):
                raise SourceError(
                    f"{path} is {array.shape[1]}x{array.shape[0]}, the folder's first image "
                    f"{self.resolution}x{self.resolution}; use images of one size"
                )
            images.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
        return torch.stack(images)  # (B, 3, H, W)

    def digest(self) -> str:
        listing = [(str(p.relative_to(self.root)), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


class DatasetImages(ImageSource):
    """A data set of (image (3, R, R) in [−1, 1], label), e.g. ours from a ``configs/data`` entry; rounded to uint8.

    ``config`` (what built it, JSON-ready) identifies it for the cache. ``order``: the item behind
    global index i (e.g. a fixed random subset); default all items in order.
    """

    def __init__(self, dataset: Dataset, *, resolution: int, config: dict[str, Any], order: list[int] | None = None) -> None:
        self.dataset, self.resolution, self.config = dataset, resolution, config
        self.order = list(range(len(dataset))) if order is None else list(order)  # type: ignore[arg-type]
        self.num = len(self.order)
        self.description = f"data set {config.get('_target_', type(dataset).__name__)} ({self.num} images at {resolution}px)"

    def _block(self, start: int, stop: int) -> Tensor:
        images = torch.stack([self.dataset[i][0] for i in self.order[start:stop]])  # (B, 3, R, R) in [−1, 1]
        return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def digest(self) -> str:
        return hashlib.sha256(
            json.dumps(
                {
                    "config": self.config,
                    "resolution": self.resolution,
                    "order": hashlib.sha256(str(self.order).encode()).hexdigest(),
                },
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()


def npz_has(path: str | Path, *keys: str) -> bool:
    names = set(npz_keys(path))
    return all(k in names for k in keys)
