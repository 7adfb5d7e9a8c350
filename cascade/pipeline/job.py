"""The sampling job behind ``scripts/cascade_sample.py``: settings, stage selection, outputs, ``cascade.json``.

Settings are merged in layers: ``configs/cascade.yaml`` ← the tuned settings an evaluation sweep
wrote beside a stage's checkpoint (``<ckpt>.tuned.json``, :mod:`cascade.evaluation.tuned`) ← a replayed
``cascade.json`` (``--replay``) ← the flags given; ``cascade.json`` records where each upsampler's
augmentation level came from. A stage whose *default* checkpoint is absent ends the cascade
at the previous resolution (with a note); a checkpoint that was asked for by path must exist.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchvision.utils import save_image

from cascade.data import class_index
from cascade.pipeline.orchestrator import Cascade, LoadedStage, StageSettings, load
from cascade.evaluation.tuned import read_tuned, tuned_path

__all__ = ["SR_STAGES", "StageRequest", "CascadeRequest", "run_cascade", "file_sha256", "strip"]

SR_STAGES = ("sr256", "sr1024")
STRIP_PANEL = 512  # side of each panel of a sample's side-by-side strip


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class StageRequest:
    ckpt: str
    explicit: bool  # named by a flag or a replayed cascade.json: it must exist
    settings: dict[str, Any]  # StageSettings fields plus its _target_
    sources: dict[str, str] = field(default_factory=dict)  # setting → where it came from, when not configs/cascade.yaml
    tuned: dict[str, Any] | None = None  # the <ckpt>.tuned.json record applied, if any


@dataclass
class CascadeRequest:
    """Everything one cascade run needs, merged from config, replay and flags."""

    class_query: str
    num: int
    seed: int
    device: str
    bf16: bool
    out: str | None
    stop_at: int | None
    classifier: str | None  # None: no classifier guidance
    classifier_explicit: bool
    guidance_explicit: bool  # the classifier scale was asked for (flag or replay), not a config default
    stages: dict[str, StageRequest]
    argv: list[str] = field(default_factory=list)
    expected_sha256: dict[str, str] = field(default_factory=dict)  # path → hash recorded by a replayed run

    @classmethod
    def from_sources(cls, config: dict[str, Any], flags: dict[str, Any], argv: list[str] | None = None) -> CascadeRequest:
        """Merge ``configs/cascade.yaml`` (as a dict), an optional ``flags['replay']`` cascade.json, and set flags."""
        cfg = copy.deepcopy(config)
        stages = {name: StageRequest(entry["ckpt"], False, dict(entry["settings"])) for name, entry in cfg["stages"].items()}
        request = cls(class_query="", num=cfg["num"], seed=cfg["seed"], device=cfg["device"], bf16=cfg["bf16"], out=cfg["out"],
                      stop_at=None, classifier=cfg["classifier"], classifier_explicit=False, guidance_explicit=False,
                      stages=stages, argv=list(argv or []))
        if flags.get("replay"):
            request.apply_replay(flags["replay"])
        request.apply_flags(flags)
        request.apply_tuned()
        if not request.class_query:
            raise ValueError("give the class to sample: --class INDEX or --class NAME (or --replay a cascade.json)")
        if request.num < 1:
            raise ValueError(f"--num must be >= 1, got {request.num}")
        return request

    def apply_replay(self, path: str) -> None:
        """Take every setting of a previous run's ``cascade.json``; its checkpoints become required."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--replay {path} does not exist; pass the cascade.json of an earlier run")
        try:
            record = json.loads(path.read_text())
            self.class_query = str(record["class"]["index"])
            self.num, self.seed, self.bf16 = int(record["num"]), int(record["seed"]), bool(record["bf16"])
            self.device = record["device"].split(":")[0]
            ran = {entry["name"]: entry for entry in record["stages"]}
            for name, stage in self.stages.items():
                if name in ran:
                    entry = ran[name]
                    stage.ckpt, stage.explicit = entry["path"], True
                    replayed = {k: entry[k] for k in stage.settings if k in entry and k != "_target_"}
                    stage.settings.update(replayed)
                    stage.sources.update({k: f"--replay {path}" for k in replayed})
                    self.expected_sha256[entry["path"]] = entry["sha256"]
            self.stop_at = int(record["stages"][-1]["resolution"])
            clf = record.get("classifier")
            self.classifier, self.classifier_explicit = (clf["path"], True) if clf else (None, False)
            if clf:
                self.expected_sha256[clf["path"]] = clf["sha256"]
            self.guidance_explicit = True
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"--replay {path} is not a cascade.json written by cascade_sample.py ({error})") from None

    def apply_flags(self, flags: dict[str, Any]) -> None:
        """Flags that were given (not None) override everything else."""
        simple = {"class_": "class_query", "num": "num", "seed": "seed", "device": "device", "out": "out", "stop_at": "stop_at"}
        for flag, attr in simple.items():
            if flags.get(flag) is not None:
                setattr(self, attr, flags[flag])
        if flags.get("fp32"):
            self.bf16 = False
        if flags.get("classifier_ckpt") is not None:
            none = flags["classifier_ckpt"].lower() == "none"
            self.classifier, self.classifier_explicit = (None, False) if none else (flags["classifier_ckpt"], True)
        base = self.stages["base"].settings
        if flags.get("guidance_scale") is not None:
            base["classifier_scale"], self.guidance_explicit = flags["guidance_scale"], True
        if flags.get("cfg_scale") is not None:
            base["cfg_scale"] = flags["cfg_scale"]
        for name, stage in self.stages.items():
            key = name.replace("-", "_")
            if flags.get(f"{key}_ckpt") is not None:
                stage.ckpt, stage.explicit = flags[f"{key}_ckpt"], True
            for option in ("steps", "sampler", "batch_size", "aug_level"):
                if flags.get(f"{key}_{option}") is not None:
                    stage.settings[option] = flags[f"{key}_{option}"]
                    stage.sources[option] = f"--{name}-{option.replace('_', '-')}"

    def apply_tuned(self) -> None:
        """Settings an evaluation sweep chose for each stage's checkpoint (``<ckpt>.tuned.json``), unless replayed or flagged."""
        for stage in self.stages.values():
            tuned = read_tuned(stage.ckpt)
            if tuned is None:
                continue
            for key, value in tuned["settings"].items():
                if key in stage.settings and key not in stage.sources:
                    stage.settings[key] = value
                    stage.sources[key] = f"{tuned_path(stage.ckpt)} ({tuned.get('chosen_by', 'evaluate_stage.py')})"
                    stage.tuned = tuned


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "class"


def strip(images: list[torch.Tensor], panel: int = STRIP_PANEL) -> torch.Tensor:
    """One sample's stage outputs (3, r_j, r_j) side by side, each shown at ``panel``×``panel`` (3, P, len·P).

    Lower resolutions are enlarged with nearest neighbour (their pixels stay visible), higher
    ones reduced with antialiasing.
    """
    panels = []
    for image in images:
        size = image.shape[-1]
        if size < panel:
            image = F.interpolate(image[None], size=(panel, panel), mode="nearest")[0]
        elif size > panel:
            image = F.interpolate(image[None], size=(panel, panel), mode="bilinear", antialias=True, align_corners=False)[0]
        panels.append(image)
    return torch.cat(panels, dim=-1)  # (3, P, len·P)


def _select_stages(request: CascadeRequest, device: torch.device, notes: list[str]) -> tuple[LoadedStage, list[LoadedStage], LoadedStage | None]:
    base_req = request.stages["base"]
    if not Path(base_req.ckpt).is_file():
        raise FileNotFoundError(f"base checkpoint {base_req.ckpt} does not exist; train it with "
                                "`python scripts/train_stage.py stage=base` (add preset=tiny on a CPU) or pass --base-ckpt PATH")
    base = load(base_req.ckpt, device)
    classifier = None
    scale = float(base_req.settings.get("classifier_scale", 0.0))
    if scale > 0 and request.classifier is not None and Path(request.classifier).is_file():
        classifier = load(request.classifier, device)
    elif scale > 0 and (request.classifier_explicit or request.guidance_explicit):
        where = f"{request.classifier} does not exist" if request.classifier else "--classifier-ckpt none was given"
        raise FileNotFoundError(f"classifier guidance needs a noisy classifier, but {where}; train one with "
                                "`python scripts/train_stage.py stage=classifier`, pass --classifier-ckpt PATH, or --guidance-scale 0")
    elif scale > 0:  # the config's default scale, and no classifier trained: sample unguided
        notes.append(f"no noisy classifier at {request.classifier}: classifier guidance is off")
        base_req.settings["classifier_scale"] = 0.0
    upsamplers: list[LoadedStage] = []
    resolution = base.stage.resolution  # of the last stage kept so far
    for name in SR_STAGES:
        req = request.stages.get(name)
        if req is None or (request.stop_at is not None and request.stop_at <= resolution):
            break
        if not Path(req.ckpt).is_file():
            if req.explicit:
                raise FileNotFoundError(f"{name} checkpoint {req.ckpt} does not exist; pass the right --{name}-ckpt")
            notes.append(f"no {name} checkpoint at {req.ckpt}: the cascade stops at {resolution}px "
                         f"(train it with `python scripts/train_stage.py stage={name}`)")
            break
        upsamplers.append(load(req.ckpt, device))
        resolution = upsamplers[-1].stage.resolution
    return base, upsamplers, classifier


def run_cascade(request: CascadeRequest, device: torch.device, *, progress: bool = True) -> dict[str, Any]:
    """Load, check and sample the cascade; write PNGs per sample and stage, strips and ``cascade.json``. Returns the record."""
    notes: list[str] = []
    base, upsamplers, classifier = _select_stages(request, device, notes)
    cascade = Cascade(base, upsamplers, classifier, device=device, bf16=request.bf16)
    label = class_index(cascade.class_names, request.class_query)
    class_name = cascade.class_names[label]
    names = ["base", *[up.name for up in upsamplers]]
    settings: list[StageSettings] = [instantiate(request.stages[name].settings) for name in names]
    cascade.check(settings)
    for name, loaded in zip(names, cascade.stages):
        req = request.stages[name]
        if req.tuned is not None:
            for key in req.tuned["settings"]:
                if req.sources.get(key, "").startswith(str(tuned_path(req.ckpt))):
                    notes.append(f"{name} {key.replace('_', ' ')} {req.settings[key]} from {req.sources[key]}")
            tuned_step = req.tuned.get("checkpoint", {}).get("step")
            if tuned_step is not None and tuned_step != int(loaded.payload["step"]):
                notes.append(f"{tuned_path(req.ckpt)} was chosen at step {tuned_step} but the checkpoint is at step "
                             f"{loaded.payload['step']}: run evaluate_stage.py on it again")
    # Hashed once, right after loading: what the record names is what was sampled with.
    sha256 = {loaded.path: file_sha256(loaded.path) for loaded in [*cascade.stages, *([classifier] if classifier else [])]}
    for path, digest in sha256.items():
        expected = request.expected_sha256.get(path)
        if expected and digest != expected:
            notes.append(f"{path} has changed since the replayed run: the images will differ")
    for note in notes:
        print(f"note: {note}")

    out = Path(request.out or f"outputs/{_slug(class_name)}_seed{request.seed}")
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []

    def write(stage_index: int, part: slice, images: torch.Tensor) -> None:
        res = images.shape[-1]
        for i, image in zip(range(part.start, part.stop), images):
            path = out / f"{i:03d}_{res}px.png"
            save_image((image + 1) / 2, path)
            files.append(str(path))

    labels = torch.full((request.num,), label, dtype=torch.long)
    print(f"sampling {request.num} × class {label} ({class_name!r}) through {' → '.join(f'{s.stage.resolution}px' for s in cascade.stages)}"
          f" on {device}" + (f", classifier guidance s={settings[0].classifier_scale:g}" if classifier else ""), flush=True)
    outputs = cascade.sample(labels, settings, seed=request.seed, progress=progress, on_stage_output=write)
    for i in range(request.num):
        path = out / f"{i:03d}_strip.png"
        save_image((strip([o[i] for o in outputs]) + 1) / 2, path)

    described = cascade.describe(settings)
    for entry, name, loaded in zip(described["stages"], names, cascade.stages):
        entry |= {"name": name, "sha256": sha256[loaded.path]}
        if "aug_level" in entry:
            req = request.stages[name]
            entry["aug_level_source"] = req.sources.get("aug_level") or (
                "configs/cascade.yaml" if req.settings.get("aug_level") is not None else "the checkpoint's sample_aug_level")
    if classifier is not None:
        described["classifier"]["sha256"] = sha256[classifier.path]
    record = {
        "command": request.argv, "class": {"index": label, "name": class_name}, "num": request.num, "seed": request.seed,
        **described, "torch": torch.__version__, "notes": notes, "out": str(out), "files": files,
        "seeding": "stage j, image i: torch.Generator(device).manual_seed(cascade.pipeline.orchestrator.image_seed(seed, j, i))",
    }
    (out / "cascade.json").write_text(json.dumps(record, indent=2))
    return record

