"""Self-describing checkpoints: written atomically, loadable with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and containers:
``format``, ``stage`` (name), ``config`` (the resolved run config, whose ``stage`` entry
rebuilds the stage with hydra), ``class_names``, ``resolution``, ``step``, ``model``,
``ema``, ``optimizer``, ``lr_scheduler``, ``rng`` and ``trainer`` state.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_stage",
    "checkpoint_paths",
    "prune_checkpoints",
]

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not one of ours (the message says which and what to do)."""


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints safely (no code execution: ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train the stage first or pass the right path")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, corrupt or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}); it is corrupt or not a checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or "config" not in payload:
        raise CheckpointError(f"{path} is not a cascade checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def checkpoint_paths(folder: str | Path) -> list[Path]:
    """The numbered checkpoints ``step_NNNNNNN.pt`` in ``folder``, oldest first."""
    pattern = re.compile(r"step_(\d+)\.pt$")
    found = [(int(m.group(1)), p) for p in Path(folder).glob("step_*.pt") if (m := pattern.search(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` numbered checkpoints (``last.pt`` is never touched)."""
    if keep <= 0:
        return
    for old in checkpoint_paths(folder)[:-keep]:
        old.unlink(missing_ok=True)


def load_stage(path: str | Path, *, device: str | torch.device = "cpu", weights: str = "ema") -> tuple[Any, torch.nn.Module, dict[str, Any]]:
    """Rebuild a stage and its network from a checkpoint alone: (stage, net in eval mode, checkpoint).

    The stage is instantiated from the checkpoint's resolved config (hydra ``_target_``), the
    network built for its class names, and ``weights`` (``ema`` or ``model``) loaded.
    """
    from hydra.utils import instantiate  # local: keeps checkpoint I/O importable without hydra's start-up cost

    payload = load_checkpoint(path, map_location=device)
    stage = instantiate(payload["config"]["stage"])
    net = stage.build(num_classes=len(payload["class_names"]))
    net.load_state_dict(payload[weights])
    return stage, net.to(device).eval(), payload
