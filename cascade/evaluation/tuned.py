"""Tuned sampling settings of one checkpoint: written by ``evaluate_stage.py``, read by ``cascade_sample.py``.

CDM (Ho et al. 2021, §4.3) picks an upsampler's sampling-time augmentation level by hand from a
sweep; ``evaluate_stage.py`` runs the sweep and writes the winner beside the checkpoint it was
measured on, ``runs/sr256/checkpoints/last.pt`` → ``runs/sr256/checkpoints/last.tuned.json``::

    {"settings": {"aug_level": 100}, "chosen_by": "lowest fid over aug levels [0, 50, 100, 200]",
     "checkpoint": {"path": ..., "step": 500}, "report": "runs/sr256/eval/metrics.json"}

``cascade_sample.py`` layers it between ``configs/cascade.yaml`` and ``--replay``/flags, for
whichever checkpoint a stage samples with, and its ``cascade.json`` says where each level came
from. Delete the file to go back to the config's (or the checkpoint's) default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["tuned_path", "write_tuned", "read_tuned"]


def tuned_path(ckpt: str | Path) -> Path:
    """``…/last.pt`` → ``…/last.tuned.json``."""
    return Path(ckpt).with_suffix(".tuned.json")


def write_tuned(ckpt: str | Path, settings: dict[str, Any], *, chosen_by: str, step: int, report: str | Path) -> Path:
    """Write (atomically) the settings chosen for checkpoint ``ckpt``; returns the file's path."""
    path = tuned_path(ckpt)
    record = {
        "settings": settings,
        "chosen_by": chosen_by,
        "checkpoint": {"path": str(ckpt), "step": int(step)},
        "report": str(report),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_tuned(ckpt: str | Path) -> dict[str, Any] | None:
    """The tuned record of checkpoint ``ckpt``, or None when there is none; ValueError (naming the file) when malformed."""
    path = tuned_path(ckpt)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("settings"), dict):
            raise ValueError("no settings object")
    except (ValueError, AttributeError) as error:
        raise ValueError(
            f"{path} is not a tuned-settings file written by evaluate_stage.py ({error}); delete it or "
            "run evaluate_stage.py again"
        ) from None
    return record
