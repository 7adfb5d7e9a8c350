"""evaluate_stage.py never calls training images held-out (issue 20 item 5): cascade.evaluation.held_out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade.data import ImageFolderDataset, imagenet_class_names
from cascade.evaluation.held_out import ClassAligned, class_alignment, held_out_data, shown_classes


def _folder(root: Path, per_class: int = 10, classes: tuple[str, ...] = ("cats", "dogs")) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _config(root: Path, val: Path | None = None) -> dict:
    entry = lambda r: {"_target_": "cascade.data.ImageFolderDataset", "root": str(r), "flip": False}  # noqa: E731
    return {"root": str(root), "train": entry(root), "val": entry(val) if val else None}


def test_base_without_val_holds_out_a_fixed_disjoint_tenth(tmp_path: Path) -> None:
    data = _config(_folder(tmp_path / "train"))
    train, val, note = held_out_data(data, 16, "base")
    again_train, again_val, _ = held_out_data(data, 16, "base")
    assert len(val) == 2 and len(train) == 18 and not set(val.indices) & set(train.indices)
    assert val.indices == again_val.indices and train.indices == again_train.indices  # deterministic
    assert val.num_classes == 2 and val.class_names == ["cats", "dogs"] and val[0][0].shape == (3, 16, 16)
    assert "no val split" in note and "held out" in note


@pytest.mark.parametrize("role", ["classifier", "upsampler"])
def test_stages_measured_on_held_out_images_refuse_without_val(tmp_path: Path, role: str) -> None:
    with pytest.raises(ValueError, match="no val split") as error:
        held_out_data(_config(_folder(tmp_path / "train")), 16, role)
    assert "\n" not in str(error.value) and "data.val=" in str(error.value)


def test_a_val_split_is_used_as_it_is(tmp_path: Path) -> None:
    data = _config(_folder(tmp_path / "train"), _folder(tmp_path / "val", per_class=3))
    train, val, note = held_out_data(data, 16, "upsampler")
    assert len(train) == 20 and len(val) == 6 and note == "the data config's val split"
    assert held_out_data(data, 16, "classifier")[0] is None


def test_named_images_are_measured_on_and_keep_adm_labels(tmp_path: Path) -> None:
    """Evaluation images named on the command line (a converted ADM stage has no data config): a few ImageNet synset
    folders keep each synset's ADM label (its rank among the 1000 sorted synsets), however few folders there are."""
    from timm.data import ImageNetInfo

    synsets = sorted(ImageNetInfo("imagenet-1k").label_names())
    imagenet = imagenet_class_names(synsets)  # a converted ADM checkpoint's class names
    assert imagenet[207] == "golden retriever" and imagenet[0] == "tench" and synsets[0] == "n01440764"
    data = _config(_folder(tmp_path / "val", per_class=5, classes=("n02099601", "n01440764", "n15075141")))
    _, val, note = held_out_data(data, 16, "classifier", class_names=imagenet, named=True)
    assert isinstance(val, ClassAligned) and len(val) == 15 and "named for evaluation" in note
    assert sorted({val[i][1] for i in range(len(val))}) == [0, 207, 999] and val.num_classes == 1000
    assert val.class_names == imagenet and shown_classes(val) == [0, 207, 999]
    train, held, note = held_out_data(data, 16, "upsampler", class_names=imagenet, named=True)
    assert len(held) == 2 and len(train) == 13 and shown_classes(train) == [0, 207, 999] and "measured on" in note
    with pytest.raises(ValueError, match="no val split"):  # the stage's own data without a val split: still refused
        held_out_data(data, 16, "upsampler", class_names=imagenet)


def test_classes_are_matched_by_name_or_refused(tmp_path: Path) -> None:
    folder = ImageFolderDataset(root=str(_folder(tmp_path / "cd", 1, ("dogs", "cats"))), resolution=8)  # sorted: cats, dogs
    assert class_alignment(folder, ["cats", "dogs"]) is None
    assert class_alignment(folder, ["dogs", "birds", "cats"]) == [2, 0]
    with pytest.raises(ValueError, match="1 are not classes of the stage") as error:
        class_alignment(folder, ["dogs", "birds"])
    assert "\n" not in str(error.value) and "'cats'" in str(error.value)
    with pytest.raises(ValueError, match="names several"):
        class_alignment(folder, ["cats", "dogs", "cats"])
