"""evaluate_stage.py never calls training images held-out (issue 20 item 5): cascade.evaluation.held_out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade.evaluation.held_out import held_out_data


def _folder(root: Path, per_class: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
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
