"""Data sets: the built-in procedural shapes, ImageFolder/ImageNet trees, and class look-up."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from cascade.data.domain import ImageDomain, image_domain
from cascade.data.imagefolder import ImageFolderDataset, adm_center_crop, imagenet_class_names, imagenet_label_indices
from cascade.data.shapes import ShapeParams, ShapesDataset, render_shape, sample_shape_params

__all__ = [
    "ImageDomain",
    "ImageFolderDataset",
    "ShapesDataset",
    "ShapeParams",
    "adm_center_crop",
    "class_index",
    "image_domain",
    "imagenet_class_names",
    "imagenet_label_indices",
    "render_shape",
    "sample_shape_params",
]


def _index_in_range(index: int, num_classes: int) -> int:
    if not 0 <= index < num_classes:
        raise ValueError(f"class index {index} is out of range: valid indices are 0..{num_classes - 1}")
    return index


def _unique(query: str, matches: list[int], class_names: Sequence[str]) -> int | None:
    """The single matching index, None for no match; ValueError when several classes match."""
    if len(set(matches)) > 1:
        listed = ", ".join(f"{i} ({class_names[i]!r})" for i in sorted(set(matches)))
        raise ValueError(f"class name {query!r} is ambiguous: it matches {listed}; pass the index instead")
    return matches[0] if matches else None


def class_index(class_names: Sequence[str], query: str | int) -> int:
    """Resolve a class given as an index (int or digit string) or a name to its index.

    Names match case-insensitively, first against whole class names, then against any
    comma-separated alias of a name ("tench, Tinca tinca" answers to "Tinca tinca").
    Raises a one-line ValueError for out-of-range indices, unknown names (listing close
    matches) and names shared by several classes.
    """
    n = len(class_names)
    if isinstance(query, bool) or not isinstance(query, (int, str)):
        raise ValueError(f"a class is an index or a name, got {query!r}")
    if isinstance(query, int):
        return _index_in_range(query, n)
    text = query.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return _index_in_range(int(text), n)
    key = text.casefold()
    whole = [i for i, name in enumerate(class_names) if name.strip().casefold() == key]
    found = _unique(text, whole, class_names)
    if found is None:
        aliases = [i for i, name in enumerate(class_names) for a in name.split(",") if a.strip().casefold() == key]
        found = _unique(text, aliases, class_names)
    if found is not None:
        return found

    candidates: dict[str, int] = {}
    for i, name in enumerate(class_names):
        for alias in [name, *name.split(",")]:
            candidates.setdefault(alias.strip().casefold(), i)
    close = difflib.get_close_matches(key, list(candidates), n=8, cutoff=0.6)
    near = list(dict.fromkeys(candidates[c] for c in close))[:5]  # class indices, best first
    if near:
        hint = "close matches: " + ", ".join(f"{class_names[i]!r} ({i})" for i in near)
    elif n <= 20:  # few enough to list them all
        hint = f"pass an index 0..{n - 1} or one of: " + ", ".join(f"{name!r} ({i})" for i, name in enumerate(class_names))
    else:
        hint = f"pass an index 0..{n - 1} or one of the {n} class names"
    raise ValueError(f"unknown class {text!r}; {hint}")
