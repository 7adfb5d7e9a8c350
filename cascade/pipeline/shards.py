"""Sharded, resumable sampling of N images of the base or of the whole cascade (ADM / CDM evaluation protocol).

The papers' numbers are computed on 50,000 samples (ADM: ``image_sample.py`` then the evaluator on
``samples_50000x64x64x3.npz``). This module makes such a batch on one process or on K ranks under
``torchrun`` and gives the same images for every K:

* **Randomness per image.** Image i's noise in stage j comes from its own generator seeded with
  ``derive_seed(seed, j, i)`` (:mod:`cascade.utils.rng`), and its class from ``derive_seed(seed,
  LABEL_STREAM, i)`` when classes are drawn at random, so it depends on (seed, i) alone.
* **Fixed batches.** Floating-point results of a network can depend on which other images share
  the batch (kernels choose blockings by batch size). The N indices are cut into shards of
  ``shard_size`` consecutive indices, and within a shard stage j runs on sub-batches of its
  ``batch_size`` at fixed offsets; ranks take whole shards (the missing ones, round-robin). So
  every image is computed in the same batch, with the same companions, whatever K.
* **Resumable.** A finished shard is one ``shards/shard_SSSSSS.npz`` (indices, labels, uint8 images
  of every stage), written to a temporary name and renamed, with its PNGs written before it. A
  killed job run again with the same command samples only the shards that are missing. The
  manifest (``manifest.json``) holds the settings that decide the images, the checkpoints'
  SHA-256 and the finished indices; a rerun whose settings differ is refused
  (:class:`ShardError`).
* **Output.** Once every shard is there, rank 0 streams them into one ADM-evaluator batch per
  stage, ``samples_{N}x{R}x{R}x3.npz`` (``arr_0`` uint8 (N, R, R, 3), ``arr_1`` int64 labels;
  :func:`cascade.utils.npz.write_npz`, byte-identical for identical images), and/or PNGs
  ``png/{R}px/{i:06d}.png``.

Pixels are quantised as ADM's ``image_sample.py`` does, ``((x + 1) · 127.5).clamp(0, 255).to(uint8)``:
truncation, not rounding (torchvision's ``save_image`` rounds), so a file of ours and one of ADM's
from the same floating-point samples hold the same bytes; truncation darkens every pixel by half a
level on average, as it does in every published ADM batch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from cascade.pipeline.orchestrator import Cascade, LoadedStage, StageSettings
from cascade.utils.device import bf16_autocast, native_bf16
from cascade.utils.distributed import barrier as _barrier
from cascade.utils.distributed import init_distributed
from cascade.utils.npz import ArraySpec, NpzError, npz_keys, read_array, write_npz
from cascade.utils.rng import ImageGenerators, derive_seed

__all__ = [
    "ClassMode",
    "Format",
    "LABEL_STREAM",
    "ShardError",
    "ShardJob",
    "class_labels",
    "image_generators",
    "sample_generator_stage",
    "sample_upsampler_stage",
    "sample_images",
    "to_uint8",
    "init_distributed",
    "run_shards",
    "file_sha256",
]

ClassMode = Literal["round-robin", "random"]
Format = Literal["npz", "png", "both"]
LABEL_STREAM = -1  # the derive_seed stream of randomly drawn classes (stages use 0, 1, 2, …)
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A sharded job that cannot run as asked (settings differ from the folder's manifest, bad options)."""


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def class_labels(indices: Sequence[int], *, num_classes: int, seed: int, mode: ClassMode, fixed: int | None = None) -> Tensor:
    """The class of each global image index (n,): ``fixed``, i mod C (round-robin), or uniform from (seed, i).

    Random classes are ``derive_seed(seed, LABEL_STREAM, i) mod C``: a 63-bit hash, so the modulo bias
    is below C / 2⁶³.
    """
    if fixed is not None:
        if not 0 <= fixed < num_classes:
            raise ShardError(f"--class {fixed} is out of range: the checkpoint has classes 0..{num_classes - 1}")
        return torch.full((len(indices),), fixed, dtype=torch.long)
    if mode == "round-robin":
        return torch.tensor([i % num_classes for i in indices], dtype=torch.long)
    if mode == "random":
        return torch.tensor([derive_seed(seed, LABEL_STREAM, i) % num_classes for i in indices], dtype=torch.long)
    raise ShardError(f"unknown class mode {mode!r}; use round-robin or random")


def image_generators(seed: int, stage_index: int, indices: Sequence[int], device: torch.device) -> ImageGenerators:
    """One generator per image, seeded with ``derive_seed(seed, stage_index, i)``."""
    return ImageGenerators([derive_seed(seed, stage_index, i) for i in indices], device=device)


def to_uint8(images: Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [−1, 1] → uint8 (B, H, W, 3), truncated as ADM's ``image_sample.py`` (module docstring)."""
    pixels = ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)  # (B, 3, H, W)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (B, H, W, 3)


# --- one batch of one stage, drawn from per-image generators -------------------------------------------------------
# These follow BaseStage.sample and UpsamplerStage.sample draw for draw (x_T; augmentation noise, x_T; then the
# sampler's), drawing through cascade.utils.rng.randn so that an ImageGenerators works; once the stages draw through
# rng.randn themselves (and Cascade.sample takes first_index=), they reduce to calls of those methods.


def sample_generator_stage(
    loaded: LoadedStage,
    labels: Tensor,
    generators: ImageGenerators,
    settings: StageSettings,
    classifier: LoadedStage | None = None,
    guide: LoadedStage | None = None,
) -> Tensor:
    """A generator stage's images (B, 3, R, R) in [−1, 1] for classes ``labels`` (B,)."""
    stage = loaded.stage
    return stage.sample(
        loaded.net,
        labels,
        sampler=settings.sampler,
        steps=settings.steps,
        spacing=settings.spacing,
        classifier=classifier.net if classifier else None,
        classifier_schedule=classifier.stage.schedule if classifier else None,
        classifier_scale=settings.classifier_scale,
        guide=guide.net if guide else None,
        guide_scale=settings.guide_scale,
        cfg_scale=settings.cfg_scale,
        generator=generators,
        progress=False,
    )


def sample_upsampler_stage(
    loaded: LoadedStage, lowres: Tensor, labels: Tensor, generators: ImageGenerators, settings: StageSettings, aug_level: int
) -> Tensor:
    """An upsampler's images (B, 3, f·h, f·w) from ``lowres`` (B, 3, h, w), noise-augmented at ``aug_level`` (CDM §3)."""
    stage = loaded.stage
    if stage.noise_augmentation and not 0 <= aug_level <= stage.aug_max_level:
        raise ShardError(f"{loaded.name}: aug level must be in 0..{stage.aug_max_level}, got {aug_level}")
    return stage.sample(
        loaded.net,
        lowres,
        labels.to(lowres.device) if loaded.class_conditional else None,
        aug_level=aug_level if stage.noise_augmentation else None,
        sampler=settings.sampler,
        steps=settings.steps,
        spacing=settings.spacing,
        cfg_scale=settings.cfg_scale,
        enforce_consistency=settings.enforce_consistency,
        generator=generators,
        progress=False,
    )


def sample_images(
    cascade: Cascade, settings: Sequence[StageSettings], indices: range, labels: Tensor, *, seed: int, bf16: bool
) -> list[Tensor]:
    """Every stage's images (n, 3, R_j, R_j) in [−1, 1] (CPU, float32) of the global indices ``indices``.

    Stage j runs over the indices in sub-batches of its ``batch_size`` at offsets 0, b, 2b, … of ``indices``.
    """
    device = cascade.device
    levels = cascade.aug_levels(settings)
    labels = labels.to(device)
    outputs: list[Tensor] = []
    for j, (loaded, s) in enumerate(zip(cascade.stages, settings)):
        produced = []
        for start in range(0, len(indices), s.batch_size):
            part = slice(start, min(start + s.batch_size, len(indices)))
            generators = image_generators(seed, j, indices[part], device)
            with bf16_autocast(device, bf16):
                if j == 0:
                    images = sample_generator_stage(loaded, labels[part], generators, s, cascade.classifier, cascade.guide)
                else:
                    lowres = outputs[j - 1][part].to(device)  # (b, 3, r, r)
                    images = sample_upsampler_stage(loaded, lowres, labels[part], generators, s, int(levels[j]))
            produced.append(images.float().cpu())
        outputs.append(torch.cat(produced))
    return outputs


# --- the job -----------------------------------------------------------------------------------------------------


@dataclass
class ShardJob:
    """What decides the images of a sharded run (the manifest's ``settings``) and where they go."""

    out: str  # output folder
    num: int  # N images
    seed: int = 0
    classes: ClassMode = "round-robin"  # ignored when fixed_class is set
    fixed_class: int | None = None  # one class for every image (ADM's --class)
    shard_size: int = 256  # consecutive indices per shard: the unit of work, of resumption and of batching
    format: Format = "npz"  # final output: one .npz per stage, PNGs, or both
    keep_shards: bool = False  # keep shards/ after the final files are written

    def check(self) -> None:
        if self.num < 1:
            raise ShardError(f"--num-samples must be >= 1, got {self.num}")
        if self.shard_size < 1:
            raise ShardError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.format not in ("npz", "png", "both"):
            raise ShardError(f"--format must be npz, png or both, got {self.format!r}")

    @property
    def shards(self) -> list[range]:
        return [range(s, min(s + self.shard_size, self.num)) for s in range(0, self.num, self.shard_size)]


def _identity(
    job: ShardJob, cascade: Cascade, settings: Sequence[StageSettings], bf16_used: bool, sha256: dict[str, str]
) -> dict[str, Any]:
    """Everything that decides the images (not the number of ranks, not the output format)."""
    stages = []
    for loaded, s, level in zip(cascade.stages, settings, cascade.aug_levels(settings)):
        entry = {"name": loaded.name, "resolution": int(loaded.stage.resolution), "sha256": sha256[loaded.path], **asdict(s)}
        entry["aug_level"] = level
        stages.append(entry)
    classifier = cascade.classifier
    return {
        "num": job.num,
        "seed": job.seed,
        "classes": "fixed" if job.fixed_class is not None else job.classes,
        "fixed_class": job.fixed_class,
        "shard_size": job.shard_size,
        "stages": stages,
        "classifier_sha256": sha256[classifier.path] if classifier else None,
        "guide_sha256": sha256[cascade.guide.path] if cascade.guide else None,
        "bf16": bf16_used,
        "device_type": cascade.device.type,
    }


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{prefix}{i}.")]
    return [] if old == new else [f"{prefix.rstrip('.')} was {old!r}, now {new!r}"]


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def _shard_path(out: Path, s: int) -> Path:
    return out / "shards" / f"shard_{s:06d}.npz"


def _finished(out: Path, job: ShardJob) -> list[int]:
    """Shards whose file is there and names the expected indices (a foreign or damaged file counts as missing)."""
    done = []
    for s, indices in enumerate(job.shards):
        path = _shard_path(out, s)
        if not path.is_file():
            continue
        try:
            if "indices" in npz_keys(path) and read_array(path, "indices").tolist() == list(indices):
                done.append(s)
        except NpzError:
            pass
    return done


def _final_name(num: int, resolution: int) -> str:
    return f"samples_{num}x{resolution}x{resolution}x3.npz"  # ADM's image_sample.py naming


def _save_pngs(folder: Path, indices: range, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in zip(indices, images):
        tmp = folder / f".{i:06d}.png.tmp"
        Image.fromarray(pixels).save(tmp, format="PNG")
        os.replace(tmp, folder / f"{i:06d}.png")


def _assemble(out: Path, job: ShardJob, resolutions: list[int]) -> dict[str, str]:
    """Stream the shards into one ADM batch per stage; returns {file: sha256}."""
    paths = [_shard_path(out, s) for s in range(len(job.shards))]
    labels = np.concatenate([read_array(p, "labels") for p in paths]).astype(np.int64)
    written = {}
    for res in resolutions:
        name = _final_name(job.num, res)
        chunks = (read_array(p, f"images_{res}") for p in paths)
        write_npz(
            out / name,
            {
                "arr_0": ArraySpec((job.num, res, res, 3), np.dtype(np.uint8), chunks),
                "arr_1": ArraySpec((job.num,), np.dtype(np.int64), [labels]),
            },
        )
        written[name] = file_sha256(out / name)
    return written


def _index_ranges(shards: list[range], done: list[int]) -> list[list[int]]:
    """Finished indices as [first, last] ranges (compact for 50,000 images)."""
    ranges: list[list[int]] = []
    for s in sorted(done):
        r = shards[s]
        if ranges and ranges[-1][1] + 1 == r.start:
            ranges[-1][1] = r.stop - 1
        else:
            ranges.append([r.start, r.stop - 1])
    return ranges


def run_shards(
    cascade: Cascade,
    settings: Sequence[StageSettings],
    job: ShardJob,
    *,
    bf16: bool = True,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    command: list[str] | None = None,
    on_shard: Callable[[int], None] | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample the job's missing shards on this rank, then (rank 0) write the final files and the manifest.

    Returns the manifest. ``on_shard(s)`` is called after shard s is written (tests use it to stop mid-way).
    ``provenance`` (where each setting came from, tuned files applied, notes) is recorded in the manifest
    beside the settings; it does not decide the images, so a rerun may differ in it.
    """
    job.check()
    cascade.check(settings)
    out = Path(job.out)
    num_classes = len(cascade.class_names)
    if job.fixed_class is not None:
        class_labels(range(0), num_classes=num_classes, seed=job.seed, mode=job.classes, fixed=job.fixed_class)  # range check
    bf16_used = bool(bf16 and native_bf16(cascade.device))
    checkpoints = [*cascade.stages, *(loaded for loaded in (cascade.classifier, cascade.guide) if loaded is not None)]
    sha256 = {loaded.path: file_sha256(loaded.path) for loaded in checkpoints}
    identity = _identity(job, cascade, settings, bf16_used, sha256)
    resolutions = [int(s.stage.resolution) for s in cascade.stages]
    manifest_path = out / MANIFEST

    error, complete = "", False
    if rank == 0:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        for stale in (out / "shards").glob("*.tmp"):  # a rank killed while writing
            stale.unlink(missing_ok=True)
        if manifest_path.is_file():
            try:
                previous = json.loads(manifest_path.read_text())["settings"]
            except (json.JSONDecodeError, KeyError) as err:
                error = f"{manifest_path} is not a manifest written by sample_shards.py ({err}); use another --out"
            else:
                diff = _differences(previous, identity)
                record = json.loads(manifest_path.read_text())
                complete = bool(record.get("complete")) and all((out / name).is_file() for name in record.get("files", {}))
                if diff:
                    error = (
                        f"{out} holds a run with other settings ({'; '.join(diff[:4])}"
                        f"{'; …' if len(diff) > 4 else ''}); rerun with its settings to resume it, or use another --out"
                    )
        if not error and not manifest_path.is_file():
            _write_json(
                manifest_path,
                {
                    "settings": identity,
                    "command": command or [],
                    "checkpoints": {loaded.path: sha256[loaded.path] for loaded in checkpoints},
                    "done": [],
                    "complete": False,
                    "files": {},
                    **(provenance or {}),
                },
            )
    if world > 1:  # every rank learns rank 0's verdict
        box = [error, complete]
        dist.broadcast_object_list(box, src=0)
        error, complete = box
    if error:
        raise ShardError(error)
    if complete:  # the same command again after it finished: nothing to do
        return json.loads(manifest_path.read_text()) if rank == 0 else {}

    _barrier()
    shards = job.shards
    done = _finished(out, job)
    missing = [s for s in range(len(shards)) if s not in set(done)]
    mine = missing[rank::world]
    total_missing = sum(len(shards[s]) for s in missing)
    bar = tqdm(
        total=total_missing,
        desc=f"sampling {' → '.join(f'{r}px' for r in resolutions)}",
        unit="img",
        disable=not (progress and rank == 0),
        dynamic_ncols=True,
        smoothing=0.1,
    )
    start_time = time.perf_counter()
    for s in mine:
        indices = shards[s]
        labels = class_labels(indices, num_classes=num_classes, seed=job.seed, mode=job.classes, fixed=job.fixed_class)
        outputs = sample_images(cascade, settings, indices, labels, seed=job.seed, bf16=bf16_used)
        pixels = {res: to_uint8(images) for res, images in zip(resolutions, outputs)}
        if job.format in ("png", "both"):
            for res, array in pixels.items():
                _save_pngs(out / "png" / f"{res}px", indices, array)
        arrays = {
            "indices": ArraySpec((len(indices),), np.dtype(np.int64), [np.arange(indices.start, indices.stop)]),
            "labels": ArraySpec((len(indices),), np.dtype(np.int64), [labels.numpy()]),
        }
        arrays |= {f"images_{res}": ArraySpec(array.shape, np.dtype(np.uint8), [array]) for res, array in pixels.items()}
        write_npz(_shard_path(out, s), arrays)
        if on_shard is not None:
            on_shard(s)
        if rank == 0:  # the other ranks' progress is read from the folder, without a collective
            finished_now = sum(len(shards[t]) for t in _finished(out, job)) - sum(len(shards[t]) for t in done)
            bar.update(finished_now - bar.n)
    _barrier()
    elapsed = time.perf_counter() - start_time
    if rank == 0:
        bar.update(total_missing - bar.n)
    bar.close()

    manifest: dict[str, Any] = {}
    if rank == 0:
        done = _finished(out, job)
        manifest = json.loads(manifest_path.read_text())
        manifest |= provenance or {}
        manifest["done"] = _index_ranges(shards, done)
        manifest["last_run"] = {
            "world_size": world,
            "images_sampled": total_missing,
            "seconds": round(elapsed, 3),
            "images_per_second": round(total_missing / elapsed, 4) if total_missing and elapsed > 0 else None,
        }
        if len(done) == len(shards):
            files = _assemble(out, job, resolutions) if job.format in ("npz", "both") else {}
            manifest |= {"complete": True, "files": files, "format": job.format}
            if not job.keep_shards:
                for s in range(len(shards)):
                    _shard_path(out, s).unlink(missing_ok=True)
        _write_json(manifest_path, manifest)
    _barrier()
    return manifest
