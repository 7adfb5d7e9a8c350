"""Self-describing checkpoints: written atomically, verified on load, ``torch.load(weights_only=True)`` only.

A checkpoint is a plain dict of tensors and containers:
``format``, ``stage`` (name), ``config`` (the resolved run config, whose ``stage`` entry
rebuilds the stage with hydra), ``class_names``, ``resolution``, ``step``, ``model``,
``ema``, ``optimizer``, ``lr_scheduler``, ``rng`` (per-rank states, see :func:`rng_state`),
``trainer`` state, and ``sha256``.

Integrity (format 2). ``sha256`` is a digest of every other entry, computed over a
canonical walk of the payload (:func:`payload_digest`: type tags, dict keys in order,
numbers exactly, each tensor's dtype, shape and raw bytes), stored inside the file, and
recomputed after loading. The digest covers the *values* a run resumes from rather than
the bytes of torch's zip container, so it lives in the one file that is renamed into place
(no sidecar to fall out of step with it) and catches what the container does not check:
a flipped bit in tensor data loads without complaint from ``torch.load`` but fails the
digest. Truncation breaks the zip directory and fails ``torch.load``; both become a
:class:`CheckpointError`. Format-1 checkpoints (no digest) still load, unverified.

Writing: temporary file in the same folder, fsync, ``os.replace`` — a reader sees the old
file or the new one, never half of one; a kill mid-write leaves only a ``.tmp`` file,
which :func:`remove_temporaries` clears. Resuming (:func:`load_latest`) tries ``last.pt``,
then the numbered checkpoints newest first, warning about each one that fails.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cascade.diffusion.schedules import check_same_schedule
from cascade.nn.native import group_norm_kernels
from cascade.roles import Generator, NoisyClassifier, Role, Upsampler

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_latest",
    "load_stage",
    "inference_memory_format",
    "LoadedStage",
    "open_stage",
    "guide_problem",
    "upgrade_targets",
    "split_stage_config",
    "checkpoint_paths",
    "payload_digest",
    "prune_checkpoints",
    "remove_temporaries",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = 2  # 2: with the sha256 digest of the payload
_READABLE_FORMATS = (1, 2)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not one of ours (the message says which and what to do)."""


def _feed(h: Any, obj: Any) -> None:
    """Update hash ``h`` with a canonical, type-tagged encoding of ``obj`` (the types weights_only loading allows)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):  # tuple includes torch.Size
        h.update(f"L{len(obj)};".encode())
        for value in obj:
            _feed(h, value)
    elif isinstance(obj, str):
        data = obj.encode()
        h.update(f"S{len(data)};".encode() + data)
    elif obj is None or isinstance(obj, (bool, torch.dtype, torch.device)):
        h.update(f"V{obj!r};".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj};".encode())
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()};".encode())  # exact, NaN and inf included
    else:
        raise TypeError(f"a checkpoint holds only tensors, containers and plain values; got {type(obj).__name__}")


def payload_digest(payload: dict[str, Any]) -> str:
    """SHA-256 (hex) of ``payload`` without its ``sha256`` entry, over the canonical walk of :func:`_feed`."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "sha256"})
    return h.hexdigest()


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` (plus format and digest) to ``path`` atomically: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": CHECKPOINT_FORMAT, **payload}
    body["sha256"] = payload_digest(body)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(body, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the folder)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints safely (``weights_only=True``: no code runs) and verify its digest."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train the stage first or pass the right path")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, corrupt or foreign file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(error).__name__}); it is corrupt or not a checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") not in _READABLE_FORMATS or "config" not in payload:
        raise CheckpointError(f"{path} is not a cascade checkpoint (format {CHECKPOINT_FORMAT})")
    if payload["format"] >= 2:
        try:
            intact = payload.get("sha256") == payload_digest(payload)
        except TypeError:
            intact = False
        if not intact:
            raise CheckpointError(f"checkpoint {path} fails its sha256 check; it is corrupt (use an older checkpoint)")
    payload.pop("sha256", None)
    return payload


def checkpoint_paths(folder: str | Path) -> list[Path]:
    """The numbered checkpoints ``step_NNNNNNN.pt`` in ``folder``, oldest first."""
    pattern = re.compile(r"step_(\d+)\.pt$")
    found = [(int(m.group(1)), p) for p in Path(folder).glob("step_*.pt") if (m := pattern.search(p.name))]
    return [p for _, p in sorted(found)]


def load_latest(folder: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint in ``folder``: ``last.pt``, else numbered ones newest first; None if there are none.

    Each candidate that fails to load or verify is skipped with a warning on stderr naming
    the one used instead. If checkpoints exist but none is intact, raises
    :class:`CheckpointError` (saying why each failed) rather than silently starting over.
    """
    folder = Path(folder)
    candidates = [p for p in [folder / "last.pt", *reversed(checkpoint_paths(folder))] if p.is_file()]
    failures: list[str] = []
    for path in candidates:
        try:
            payload = load_checkpoint(path, map_location=map_location)
        except CheckpointError as error:
            failures.append(str(error))
            continue
        for failure in failures:
            print(f"warning: {failure}; falling back to {path.name} (step {payload.get('step')})", file=sys.stderr, flush=True)
        return path, payload
    if candidates:
        raise CheckpointError(
            f"no intact checkpoint in {folder} ({'; '.join(failures)}); move the folder away to train from scratch"
        )
    return None


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` numbered checkpoints (``last.pt`` is never touched)."""
    if keep <= 0:
        return
    for old in checkpoint_paths(folder)[:-keep]:
        old.unlink(missing_ok=True)


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files a write killed midway left in ``folder``; returns them."""
    stale = [p for p in Path(folder).glob(".*.pt.*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """One rank's random state: its training generator, torch's CPU generator and (on CUDA) the device generator.

    torch's default generators drive weight initialisation and dropout; the training
    generator drives the diffusion noise. Exact resume restores all of them.
    """
    state = {"generator": generator.get_state().cpu(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device) -> None:
    """Restore what :func:`rng_state` captured (the CUDA state only when both sides are on CUDA)."""
    generator.set_state(state["generator"].cpu())
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# Modules that moved when the flat ``cascade/`` became layered packages. Checkpoints written before
# name their constructors (``_target_``) by the old paths; loading maps them to the new ones.
MOVED_MODULES = {
    "cascade.schedules": "cascade.diffusion.schedules",
    "cascade.diffusion": "cascade.diffusion.process",
    "cascade.denoiser": "cascade.diffusion.denoiser",
    "cascade.losses": "cascade.diffusion.losses",
    "cascade.samplers": "cascade.diffusion.samplers",
    "cascade.guidance": "cascade.diffusion.guidance",
    "cascade.preconditioning": "cascade.diffusion.preconditioning",
    "cascade.resize": "cascade.data.resize",
    "cascade.train": "cascade.training.trainer",
    "cascade.checkpoint": "cascade.training.checkpoint",
    "cascade.pipeline": "cascade.pipeline.orchestrator",
}


# Stage classes renamed when the roles became explicit (cascade.roles); the old names stay importable as aliases too.
RENAMED_TARGETS = {"stages.base.BaseStage": "stages.base.GeneratorStage"}

# Preview settings that were stage constructor keywords before previews moved to cascade.evaluation.previews:
# per stage class, the preview class and the keyword renames.
LEGACY_PREVIEW_KEYS: dict[str, tuple[str, dict[str, str]]] = {
    "stages.base.GeneratorStage": (
        "cascade.evaluation.previews.GeneratorPreview",
        {
            "preview_sampler": "sampler",
            "preview_steps": "steps",
            "preview_per_class": "per_class",
            "preview_max_classes": "max_classes",
        },
    ),
    "stages.upsampler.UpsamplerStage": (
        "cascade.evaluation.previews.UpsamplerPreview",
        {"preview_sampler": "sampler", "preview_steps": "steps", "preview_images": "images", "preview_crop": "crop"},
    ),
    "stages.classifier.ClassifierStage": (
        "cascade.evaluation.previews.ClassifierPreview",
        {"eval_buckets": "buckets", "eval_images": "images", "eval_batch_size": "batch_size"},
    ),
}


def upgrade_targets(config: Any) -> Any:
    """``config`` with every ``_target_`` that names a moved module or a renamed class rewritten to its new path."""
    if isinstance(config, dict):
        upgraded = {key: upgrade_targets(value) for key, value in config.items()}
        target = upgraded.get("_target_")
        if isinstance(target, str):
            module, _, name = target.rpartition(".")
            target = f"{MOVED_MODULES.get(module, module)}.{name}"
            upgraded["_target_"] = RENAMED_TARGETS.get(target, target)
        return upgraded
    if isinstance(config, list):
        return [upgrade_targets(value) for value in config]
    return config


def split_stage_config(stage: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A stage config (upgraded) → (what the stage's constructor takes, the preview settings it carried or None).

    Configs written before previews left the stages carry the preview settings as stage
    keywords (``preview_steps``, ``eval_images``, …); they come back as a preview config node
    (today's configs keep it at the top level, ``preview``).
    """
    stage, preview = dict(stage), None
    legacy = LEGACY_PREVIEW_KEYS.get(stage.get("_target_", ""))
    if legacy is not None:
        target, renames = legacy
        found = {new: stage.pop(old) for old, new in renames.items() if old in stage}
        if found:
            preview = {"_target_": target, **found}
    return stage, preview


def load_stage(
    path: str | Path, *, device: str | torch.device = "cpu", weights: str = "ema"
) -> tuple[Role, torch.nn.Module, dict[str, Any]]:
    """Rebuild a stage and its network from a checkpoint alone: (stage, net in eval mode, checkpoint).

    The stage is instantiated from the checkpoint's resolved config (hydra ``_target_``, old
    paths and keywords upgraded: :func:`upgrade_targets`, :func:`split_stage_config`), the
    network built for its class names, and ``weights`` (``ema`` or ``model``) loaded. The
    stage must play one of the roles of :mod:`cascade.roles`. The network is laid out as it
    samples fastest here (:func:`inference_memory_format`).
    """
    from hydra.utils import instantiate  # local: keeps checkpoint I/O importable without hydra's start-up cost

    payload = load_checkpoint(path, map_location=device)
    payload["config"] = upgrade_targets(payload["config"])
    stage_config, _ = split_stage_config(payload["config"]["stage"])
    stage = instantiate(stage_config)
    if not isinstance(stage, (Generator, Upsampler, NoisyClassifier)):
        raise CheckpointError(
            f"{path}: its stage {type(stage).__name__} plays no stage role (generator, upsampler, noisy classifier)"
        )
    net = stage.build(num_classes=len(payload["class_names"]))
    net.load_state_dict(_without_untrained_null_rows(payload[weights], net.state_dict()))
    device = torch.device(device)
    return stage, net.to(device).to(memory_format=inference_memory_format(device)).eval(), payload


def inference_memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on a CPU with the C++ GroupNorm kernel, else NCHW: the layout a loaded network samples in.

    oneDNN's convolutions then run NHWC without converting every input and output, and the norms run on the kernel.
    Unlike training's ``channels_last=auto`` (:func:`cascade.utils.device.choose_compute`), this holds on AVX2-only CPUs
    too: there NCHW trains faster but channels-last samples faster (README, "Speed and scale": sampling times in both
    layouts per CPU kind). Inputs may come in either layout; outputs follow the network's. On CUDA networks stay NCHW:
    no GPU measurement chose otherwise.
    """
    if device.type != "cpu":
        return torch.contiguous_format
    return torch.channels_last if group_norm_kernels() is not None else torch.contiguous_format


def _without_untrained_null_rows(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints written before ``null_class`` gave every class table a null row, even with p_uncond = 0, where it was
    never trained; a network built without it takes the table less that last row."""
    fixed = dict(saved)
    for key, value in saved.items():
        if key.endswith("class_embed.weight") and key in expected and value.shape[0] == expected[key].shape[0] + 1:
            fixed[key] = value[:-1]
    return fixed


@dataclass
class LoadedStage:
    """A stage rebuilt from its checkpoint: the stage object (a role), its network (EMA weights, eval mode), its checkpoint."""

    path: str
    stage: Role
    net: torch.nn.Module
    payload: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.payload["stage"])

    @property
    def class_names(self) -> list[str]:
        return list(self.payload["class_names"])

    @property
    def is_generator(self) -> bool:
        return isinstance(self.stage, Generator)

    @property
    def is_upsampler(self) -> bool:
        return isinstance(self.stage, Upsampler)

    @property
    def is_classifier(self) -> bool:
        return isinstance(self.stage, NoisyClassifier)

    @property
    def class_conditional(self) -> bool:
        """Whether the stage's network sees the class (a noisy classifier always does)."""
        return self.stage.class_conditional if isinstance(self.stage, (Generator, Upsampler)) else True

    def describe(self) -> dict[str, Any]:
        """What identifies this stage in a ``cascade.json``."""
        return {
            "path": self.path,
            "stage": self.name,
            "step": int(self.payload["step"]),
            "resolution": int(self.stage.resolution),
        }


def open_stage(path: str | Path, device: torch.device) -> LoadedStage:
    """The stage, network (EMA weights, eval mode) and checkpoint at ``path`` as one :class:`LoadedStage`."""
    stage, net, payload = load_stage(path, device=device)
    return LoadedStage(str(path), stage, net, payload)


def guide_problem(guide: LoadedStage, model: LoadedStage) -> str | None:
    """Why ``guide`` cannot be the autoguidance guide of the generator ``model``; None when it can.

    Autoguidance (Karras et al. 2024) contrasts a model with a weaker version of itself, so the
    guide must denoise the same thing: a generator of the same stage name, resolution, classes,
    parameterisation, variance and noise process (in practice an earlier checkpoint of the same run).
    """
    same = (
        guide.is_generator
        and guide.name == model.name
        and guide.stage.resolution == model.stage.resolution
        and guide.class_names == model.class_names
        and guide.stage.objective.parameterization == model.stage.objective.parameterization
        and guide.stage.objective.learned_variance == model.stage.objective.learned_variance
    )
    if not same:
        return (
            f"{guide.path} is a {guide.name!r} checkpoint at {guide.stage.resolution}px with {len(guide.class_names)} "
            f"classes; autoguidance needs an earlier checkpoint of {model.path} ({model.name!r}, "
            f"{model.stage.resolution}px, {len(model.class_names)} classes)"
        )
    try:
        check_same_schedule(model.stage.schedule, guide.stage.schedule, "the guide")
    except ValueError as error:
        return f"{guide.path}: {error}"
    return None
