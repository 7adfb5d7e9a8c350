"""Random aligned windows of a data set's images: crop training without making whole images.

An upsampler trained on crops (Imagen App. B) needs, per example, one small window of the hi-res
image: the crop plus the context its conditioning is computed with (``stages/upsampler.py``). At
1024px the built-in data set spends ~34 ms of one core rendering a whole image of which a 32px crop
uses 0.1 %; :class:`AlignedWindows` asks a :class:`WindowSource` for the window's pixels alone, and
crops any other data set's images.

Randomness: the window's position is drawn from torch's global generator, which the trainer seeds
per item from (seed, epoch, index) (:class:`cascade.data.order.SeededItems`), so positions repeat on
resume and do not depend on the number of loader workers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["AlignedWindows", "WindowSource"]


class WindowSource(ABC):
    """A data set that can make one window of an item's image without making the rest of it."""

    resolution: int  # side of the whole images, pixels

    @abstractmethod
    def window(self, index: int, top: int, left: int, size: int) -> tuple[Tensor, int]:
        """Pixels [top, top+size) × [left, left+size) of item ``index``, (3, size, size), and its label:
        equal to that crop of ``self[index][0]`` (with the same random augmentation)."""


class AlignedWindows(Dataset[tuple[Tensor, int]]):
    """``dataset``'s items as ``size``×``size`` windows at uniformly random offsets that are multiples of ``align``.

    Windows lie wholly inside the image. Other attributes (``class_names``, ``resolution``, …) are ``dataset``'s.
    """

    def __init__(self, dataset: Dataset, size: int, align: int) -> None:
        resolution = dataset.resolution  # type: ignore[attr-defined]
        if align < 1 or size % align or not 0 < size <= resolution or resolution % align:
            raise ValueError(
                f"a window of {size}px aligned to {align}px must fit the {resolution}px images, with size and "
                "resolution multiples of the alignment"
            )
        self.dataset, self.size, self.align = dataset, size, align

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "size", "align"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        positions = (self.dataset.resolution - self.size) // self.align + 1
        top, left = (self.align * int(i) for i in torch.randint(positions, (2,)))
        if isinstance(self.dataset, WindowSource):
            return self.dataset.window(index, top, left, self.size)
        image, label = self.dataset[index]  # (3, R, R)
        return image[:, top : top + self.size, left : left + self.size], label
