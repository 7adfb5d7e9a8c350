"""Held-out images for ``evaluate_stage.py``: never the images a stage or a judge trained on.

A checkpoint's data config names a ``val`` split or not (``data=imagefolder`` has none by default).
Without one:

* a noisy classifier or an upsampler is measured *on* held-out images, and the stage trained on
  every image of the folder, so none is held out: evaluation is refused with one line naming the fix;
* the base stage is measured on its samples; held-out images serve only the judges evaluation
  trains itself (the reference classifier's accuracy, CAS's test set). A fixed 10 % of the
  training images (a permutation from seed 0, the same on every run) is split off for them and
  the judges train on the rest; the report says so.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from hydra.utils import get_class, instantiate
from torch.utils.data import Dataset

__all__ = ["HELD_OUT_FRACTION", "SplitSubset", "held_out_data", "without_augmentation"]

HELD_OUT_FRACTION = 0.1


class SplitSubset(Dataset):
    """Items ``indices`` of a data set, keeping its ``num_classes`` and ``class_names``."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices
        self.num_classes, self.class_names = dataset.num_classes, dataset.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def held_out_data(
    data: dict[str, Any], resolution: int, role: Literal["classifier", "base", "upsampler"]
) -> tuple[Any, Any, str]:
    """(training images, held-out images, how the held-out set was made) for a stage of ``role`` trained on ``data``."""
    if data.get("val"):
        train = instantiate(data["train"], resolution=resolution) if role != "classifier" else None
        return train, instantiate(data["val"], resolution=resolution), "the data config's val split"
    where = data["train"].get("root", data["train"].get("_target_"))
    if role != "base":
        raise ValueError(
            f"the checkpoint's data config has no val split, so the {role} trained on every image of {where} "
            "and none is held out; train it with data.val={_target_: cascade.data.ImageFolderDataset, "
            "root: HELD_OUT_FOLDER} (or evaluate a stage trained on the built-in data set)"
        )
    full = instantiate(data["train"], resolution=resolution)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
    cut = max(1, int(round(HELD_OUT_FRACTION * len(full))))
    held, rest = sorted(order[:cut]), sorted(order[cut:])
    note = (
        f"no val split: {len(held)} of the {len(full)} images of {where} ({HELD_OUT_FRACTION:.0%}, a fixed permutation "
        "from seed 0) held out for the reference classifier's accuracy and CAS's test set, which train on the other "
        f"{len(rest)}; the base itself trained on all of them"
    )
    return SplitSubset(full, rest), SplitSubset(full, held), note


def without_augmentation(data: dict[str, Any]) -> dict[str, Any]:
    """The data config with random augmentation off: ``flip=False`` for every split whose data set takes ``flip``.

    Real images that metrics are computed on (FID's real features, held-out inputs) must be the images
    themselves: a flip drawn from torch's global RNG would make them differ between runs and between
    the ranks of ``torchrun`` (the default of ``ImageFolderDataset`` is ``flip=True`` even when the key is absent).
    """
    out: dict[str, Any] = {}
    for split, entry in data.items():
        if isinstance(entry, dict) and "_target_" in entry:
            if "flip" in inspect.signature(get_class(entry["_target_"])).parameters:
                entry = {**entry, "flip": False}
        out[split] = entry
    return out
