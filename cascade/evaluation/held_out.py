"""Held-out images for ``evaluate_stage.py``: never the images a stage or a judge trained on.

A checkpoint's data config names a ``val`` split or not (``data=imagefolder`` has none by default).
Without one:

* a noisy classifier or an upsampler is measured *on* held-out images, and the stage trained on
  every image of the folder, so none is held out: evaluation is refused with one line naming the fix;
* the base stage is measured on its samples; held-out images serve only the judges evaluation
  trains itself (the reference classifier's accuracy, CAS's test set). A fixed 10 % of the
  training images (a permutation from seed 0, the same on every run) is split off for them and
  the judges train on the rest; the report says so.

Evaluation images can instead be named on the command line (``data=imagefolder data.root=…``):
a stage converted from another project's release carries no data config, and a trained stage
may be measured on other images. Those are not the stage's training images, so without a ``val``
split a classifier is measured on all of them, and a base or an upsampler on the same fixed 10 %
(the judges evaluation trains, the reference classifier and CAS, train on the rest).

Labels are the stage's class indices (:class:`ClassAligned`): a folder of ImageNet synsets keeps
ADM's label of each synset (sorted synsets: the golden retriever is 207 however few folders there
are); other data sets' classes are matched to the stage's by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal

import torch
from hydra.utils import get_class, instantiate
from torch.utils.data import Dataset

from cascade.data import ImageFolderDataset, imagenet_label_indices

__all__ = [
    "HELD_OUT_FRACTION",
    "SplitSubset",
    "ClassAligned",
    "class_alignment",
    "held_out_data",
    "shown_classes",
    "without_augmentation",
]

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


class ClassAligned(Dataset):
    """A data set's items with each label ``c`` replaced by the stage's index ``mapping[c]``; the stage's classes.

    ``classes``: the stage's class indices the images show (sorted), e.g. the few synsets of a small ImageNet tree.
    """

    def __init__(self, dataset: Any, mapping: Sequence[int], class_names: Sequence[str]) -> None:
        self.dataset, self.mapping = dataset, list(mapping)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.classes = sorted(set(self.mapping))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        image, label = self.dataset[index]
        return image, self.mapping[int(label)]


def class_alignment(dataset: Any, class_names: Sequence[str]) -> list[int] | None:
    """The stage's class index of each of ``dataset``'s labels; None when both have the same classes in the same order.

    ImageNet synset folders map by synset (ADM's sorted-synset order, :func:`cascade.data.imagenet_label_indices`);
    otherwise every class name of the data set must name exactly one of the stage's classes (one-line ValueError).
    """
    names = list(dataset.class_names)
    if names == list(class_names):
        return None
    if isinstance(dataset, ImageFolderDataset):
        indices = imagenet_label_indices(dataset.folders, class_names)
        if indices is not None:
            return indices
    matches = [[i for i, stage_name in enumerate(class_names) if stage_name == name] for name in names]
    unknown = [name for name, m in zip(names, matches) if not m]
    shared = [name for name, m in zip(names, matches) if len(m) > 1]
    if unknown or shared:
        problem = f"{len(unknown)} are not classes of the stage (e.g. {unknown[0]!r})" if unknown else ""
        problem += ("; " if unknown and shared else "") + (f"{shared[0]!r} names several of its classes" if shared else "")
        raise ValueError(
            f"the evaluation images' classes do not line up with the stage's {len(class_names)} classes: of their "
            f"{len(names)} classes {problem}; name class folders after the stage's classes (ImageNet: synset folders "
            "such as n02099601, which keep ADM's labels)"
        )
    return [m[0] for m in matches]


def shown_classes(dataset: Any) -> list[int] | None:
    """The stage classes a :class:`ClassAligned` data set (or a split of one) shows; None for a data set of its own classes."""
    if isinstance(dataset, SplitSubset):
        dataset = dataset.dataset
    return dataset.classes if isinstance(dataset, ClassAligned) else None


def _aligned(dataset: Any, class_names: Sequence[str] | None) -> Any:
    mapping = None if class_names is None else class_alignment(dataset, class_names)
    return dataset if mapping is None else ClassAligned(dataset, mapping, class_names)


def held_out_data(
    data: dict[str, Any],
    resolution: int,
    role: Literal["classifier", "base", "upsampler"],
    *,
    class_names: Sequence[str] | None = None,
    named: bool = False,
) -> tuple[Any, Any, str]:
    """(training images, held-out images, how the held-out set was made) for a stage of ``role``.

    ``data``: the stage's own training data config, or (``named``) evaluation images named on the command line.
    ``class_names``: the stage's classes, which the labels are aligned to (:func:`class_alignment`).
    """
    if data.get("val"):
        train = _aligned(instantiate(data["train"], resolution=resolution), class_names) if role != "classifier" else None
        where = "the evaluation data's val split" if named else "the data config's val split"
        return train, _aligned(instantiate(data["val"], resolution=resolution), class_names), where
    where = data["train"].get("root", data["train"].get("_target_"))
    if named and role == "classifier":
        full = _aligned(instantiate(data["train"], resolution=resolution), class_names)
        return None, full, f"all {len(full)} images of {where}, named for evaluation (not the stage's training images)"
    if role != "base" and not named:
        raise ValueError(
            f"the checkpoint's data config has no val split, so the {role} trained on every image of {where} "
            "and none is held out; train it with data.val={_target_: cascade.data.ImageFolderDataset, "
            "root: HELD_OUT_FOLDER} (or evaluate a stage trained on the built-in data set)"
        )
    full = _aligned(instantiate(data["train"], resolution=resolution), class_names)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
    cut = max(1, int(round(HELD_OUT_FRACTION * len(full))))
    held, rest = sorted(order[:cut]), sorted(order[cut:])
    split = f"{len(held)} of the {len(full)} images of {where} ({HELD_OUT_FRACTION:.0%}, a fixed permutation from seed 0)"
    if named and role == "upsampler":
        note = (
            f"evaluation images named on the command line, no val split: the upsampler is measured on {split}; "
            f"a reference classifier (features=classifier) trains on the other {len(rest)}"
        )
    elif named:
        note = (
            f"evaluation images named on the command line, no val split: {split} held out for the reference "
            f"classifier's accuracy and CAS's test set, which train on the other {len(rest)}"
        )
    else:
        note = (
            f"no val split: {split} held out for the reference classifier's accuracy and CAS's test set, which train "
            f"on the other {len(rest)}; the base itself trained on all of them"
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
