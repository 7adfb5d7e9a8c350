"""The sampling job behind ``scripts/cascade_sample.py``: its flags, stage selection, outputs, ``cascade.json``.

Settings are merged in one place, :func:`cascade.pipeline.settings.merge_settings`:
``configs/cascade.yaml`` ← the tuned settings an evaluation sweep wrote beside a stage's checkpoint
(``<ckpt>.tuned.json``) ← a replayed ``cascade.json`` (``--replay``) ← the flags given;
``cascade.json`` records where each upsampler's augmentation level came from.

The flags are made from the stage names: ``--base-*`` for the generator, ``--<name>-*`` for every
upsampler of the config, of a replayed run, or added with ``--stage NAME=PATH``. ``--stage`` (repeated,
in chain order) replaces the config's upsamplers, so any chain — 64→256, 32→128→512, 64→256→1024 —
runs with the same code: ``--base-ckpt b32.pt --stage sr128=a.pt --stage sr512=b.pt``.
A stage whose *default* checkpoint is absent ends the cascade at the previous resolution (with a
note); a checkpoint that was asked for (flag, ``--stage``, replay) must exist.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchvision.utils import save_image

from cascade.data import class_index
from cascade.diffusion.samplers import SAMPLERS
from cascade.evaluation.tuned import tuned_path
from cascade.pipeline.orchestrator import Cascade, StageSettings
from cascade.pipeline.settings import (
    CONFIG_SOURCE,
    GeneratorSettings,
    Override,
    ResolvedSettings,
    UpsamplerSettings,
    chain_names,
    merge_settings,
    read_replay,
)
from cascade.training.checkpoint import CheckpointError, LoadedStage, open_stage
from cascade.utils.cli import OneLineParser, on_off
from cascade.utils.device import resolve_device

__all__ = [
    "build_parser",
    "add_stage_flags",
    "stage_flag_overrides",
    "stage_pairs",
    "select_stages",
    "select_guide",
    "optional_ckpt_overrides",
    "stage_settings",
    "settings_from_argv",
    "run_cascade",
    "main",
    "file_sha256",
    "strip",
]

STRIP_PANEL = 512  # side of each panel of a sample's side-by-side strip
STAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# Per-stage flags: option → (dotted key under the stage's slot, type, help).
STAGE_OPTIONS: dict[str, tuple[str, Any, str]] = {
    "ckpt": ("ckpt", str, "checkpoint"),
    "steps": ("settings.steps", int, "sampler steps"),
    "sampler": ("settings.sampler", str, "sampler"),
    "batch-size": ("settings.batch_size", int, "images per sampler call"),
    "spacing": ("settings.spacing", str, "respacing of the training process (default: the sampler's)"),
}
METAVARS = {"ckpt": "PATH", "steps": "N", "batch-size": "N", "spacing": "SPACING"}
# Upsamplers only: flag suffix → (dotted key in the stage's slot, type, metavar, help with {name}).
UPSAMPLER_OPTIONS: dict[str, tuple[str, Any, str, str]] = {
    "aug-level": ("settings.aug_level", int, "S", "noise-augmentation level s of {name}'s low-res input"),
    "consistency": (
        "settings.enforce_consistency",
        on_off,
        "on|off",
        "project {name}'s outputs onto the images whose downsample is its input (default: the checkpoint's)",
    ),
}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _pre_parser() -> argparse.ArgumentParser:
    """The flags that decide which other flags exist: the config, a replayed run, the ``--stage`` list."""
    p = OneLineParser(add_help=False, allow_abbrev=False)
    p.add_argument("--config", help="settings file (default configs/cascade.yaml)")
    p.add_argument("--replay", help="a cascade.json: rerun its exact settings (flags given here override)")
    p.add_argument(
        "--stage",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an upsampler of the chain, in order (repeat; replaces the config's upsamplers)",
    )
    return p


def stage_pairs(values: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path or not STAGE_NAME.fullmatch(name) or name == "base":
            parser.error(
                f"--stage {value}: give NAME=PATH, NAME a letter then letters, digits or _ (not 'base'), "
                "e.g. --stage sr512=runs/sr512/checkpoints/last.pt"
            )
        pairs.append((name, path))
    return pairs


def add_stage_flags(p: argparse.ArgumentParser, upsamplers: Sequence[str]) -> None:
    """``--<name>-ckpt/-steps/-sampler/-batch-size/-spacing`` (and ``-aug-level``, ``-consistency`` for upsamplers) for the base and ``upsamplers``."""
    for name in ("base", *upsamplers):
        group = p.add_argument_group(f"stage {name}", "the generator" if name == "base" else "an upsampler")
        for option, (_, kind, what) in STAGE_OPTIONS.items():
            extra = {"choices": list(SAMPLERS)} if option == "sampler" else {"metavar": METAVARS[option]}
            group.add_argument(f"--{name}-{option}", dest=f"{name}:{option}", type=kind, help=f"{name} {what}", **extra)
        for option, (_, kind, metavar, what) in UPSAMPLER_OPTIONS.items() if name != "base" else ():
            group.add_argument(
                f"--{name}-{option}", dest=f"{name}:{option}", type=kind, metavar=metavar, help=what.format(name=name)
            )


def stage_flag_overrides(args: dict[str, Any], names: Sequence[str]) -> list[Override]:
    """The :class:`Override` of every per-stage flag given (``args``: ``vars`` of a parser with :func:`add_stage_flags`)."""
    overrides = []
    for name in ("base", *names):
        prefix = "base" if name == "base" else f"upsamplers.{name}"
        options = {
            **{k: v[0] for k, v in STAGE_OPTIONS.items()},
            **({k: v[0] for k, v in UPSAMPLER_OPTIONS.items()} if name != "base" else {}),
        }
        for option, key in options.items():
            if args.get(f"{name}:{option}") is not None:
                overrides.append(Override(f"{prefix}.{key}", args[f"{name}:{option}"], f"--{name}-{option}"))
    return overrides


def build_parser(upsamplers: Sequence[str], description: str | None = None) -> argparse.ArgumentParser:
    """The full command line, with ``--<name>-*`` flags for the base and every upsampler in ``upsamplers``."""
    p = OneLineParser(
        description=description,
        parents=[_pre_parser()],
        epilog="Every flag defaults to None: an unset flag falls back to --replay's cascade.json, the "
        "checkpoint's tuned file, then the config. Per-stage flags exist for the base and for every "
        "upsampler of the config, of a replayed run and of --stage.",
    )
    p.add_argument("--class", dest="class_", help="class index or name, e.g. 207 or 'golden retriever'")
    p.add_argument("--num", type=int, help="number of samples")
    p.add_argument("--seed", type=int, help="seed of every stage's noise")
    p.add_argument("--guidance-scale", type=float, help="classifier guidance scale s of the base (0 = off)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale w of the base (1 = off)")
    p.add_argument(
        "--guide-scale", type=float, help="autoguidance scale w of the base by --guide-ckpt (1 = off; Karras et al. 2024)"
    )
    p.add_argument("--guide-ckpt", help="autoguidance guide: an earlier checkpoint of the base's run ('none': no guide)")
    p.add_argument("--out", help="output folder (default outputs/<class>_seed<seed>)")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--fp32", action="store_true", default=None, help="no bf16 autocast")
    p.add_argument("--stop-at", type=int, help="last resolution to produce, e.g. 64 or 256")
    p.add_argument("--classifier-ckpt", help="noisy classifier checkpoint ('none': no classifier guidance)")
    add_stage_flags(p, upsamplers)
    return p


def settings_from_argv(argv: Sequence[str], config: str | Path, *, description: str | None = None) -> ResolvedSettings:
    """Parse ``argv`` (without the program name) and merge it with the config, tuned files and replay."""
    pre, _ = _pre_parser().parse_known_args(argv)
    config_path = Path(pre.config or config)
    if not config_path.is_file():
        raise FileNotFoundError(f"--config {config_path} does not exist")
    file_layer = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    replay_names = read_replay(pre.replay)[1] if pre.replay and Path(pre.replay).is_file() else None
    pairs = stage_pairs(pre.stage, _pre_parser())
    chain = chain_names(file_layer, replay_names, [name for name, _ in pairs])
    known = list(dict.fromkeys([*chain, *(file_layer.get("upsamplers") or {}), *(replay_names or [])]))
    args = vars(build_parser(known, description).parse_args(argv))

    overrides: list[Override] = []
    simple = {
        "class_": ("class_query", "--class"),
        "num": ("num", "--num"),
        "seed": ("seed", "--seed"),
        "device": ("device", "--device"),
        "out": ("out", "--out"),
        "stop_at": ("stop_at", "--stop-at"),
        "guidance_scale": ("base.settings.classifier_scale", "--guidance-scale"),
        "cfg_scale": ("base.settings.cfg_scale", "--cfg-scale"),
        "guide_scale": ("base.settings.guide_scale", "--guide-scale"),
    }
    for dest, (key, flag) in simple.items():
        if args[dest] is not None:
            overrides.append(Override(key, args[dest], flag))
    if args["fp32"]:
        overrides.append(Override("bf16", False, "--fp32"))
    overrides += optional_ckpt_overrides({"classifier": args["classifier_ckpt"], "guide": args["guide_ckpt"]})
    for name, path in pairs:
        overrides.append(Override(f"upsamplers.{name}.ckpt", path, f"--stage {name}={path}"))
    overrides += stage_flag_overrides(args, known)
    label = CONFIG_SOURCE if pre.config is None else str(config_path)
    resolved = merge_settings(file_layer, overrides, replay=pre.replay, chain=chain, config_source=label)
    cfg = resolved.config
    if not cfg.class_query:
        raise ValueError("give the class to sample: --class INDEX or --class NAME (or --replay a cascade.json)")
    if cfg.num < 1:
        raise ValueError(f"--num must be >= 1, got {cfg.num}")
    if cfg.stop_at is not None and cfg.stop_at < 1:
        raise ValueError(f"--stop-at must be a resolution >= 1, got {cfg.stop_at}")
    return resolved


def stage_settings(settings: GeneratorSettings | UpsamplerSettings) -> StageSettings:
    """The orchestrator's settings of one stage (fields a role does not have keep their neutral defaults)."""
    return StageSettings(**asdict(settings))


def optional_ckpt_overrides(paths: dict[str, str | None]) -> list[Override]:
    """The :class:`Override` of each optional checkpoint flag given (``--classifier-ckpt``, ``--guide-ckpt``); 'none' unsets it."""
    return [
        Override(key, None if path.lower() == "none" else path, f"--{key}-ckpt")
        for key, path in paths.items()
        if path is not None
    ]


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


def select_guide(resolved: ResolvedSettings, device: torch.device, notes: list[str]) -> LoadedStage | None:
    """The base's autoguidance guide, loaded only when its scale is not 1.

    Asked for (``--guide-ckpt``, ``--guide-scale`` or a replay) and absent: an error naming the fix. Set only
    by a config file and absent: sampling goes on without autoguidance, with a note.
    """
    cfg = resolved.config
    if cfg.base.settings.guide_scale == 1.0:
        return None
    asked = resolved.explicit("guide") or resolved.explicit("base.settings.guide_scale")
    if cfg.guide is not None and Path(cfg.guide).is_file():
        return open_stage(cfg.guide, device)
    if asked:
        where = f"{cfg.guide} does not exist" if cfg.guide else "no guide checkpoint was given"
        raise FileNotFoundError(
            f"autoguidance (guide scale {cfg.base.settings.guide_scale:g}) needs a guide network, but {where}; pass "
            "--guide-ckpt PATH (an earlier checkpoint of the base's run, e.g. runs/base/checkpoints/step_0000400.pt) "
            "or --guide-scale 1"
        )
    notes.append(f"no autoguidance guide at {cfg.guide}: autoguidance is off")
    cfg.base.settings.guide_scale = 1.0
    return None


def select_stages(
    resolved: ResolvedSettings, device: torch.device, notes: list[str]
) -> tuple[LoadedStage, list[tuple[str, LoadedStage]], LoadedStage | None, LoadedStage | None]:
    """The base, the upsamplers (name, stage) that the run reaches, the noisy classifier and the autoguidance guide."""
    cfg = resolved.config
    if not Path(cfg.base.ckpt).is_file():
        raise FileNotFoundError(
            f"base checkpoint {cfg.base.ckpt} does not exist; train it with "
            "`python scripts/train_stage.py stage=base` (add preset=tiny on a CPU) or pass --base-ckpt PATH"
        )
    base = open_stage(cfg.base.ckpt, device)
    classifier = None
    scale = cfg.base.settings.classifier_scale
    # Asked for: a classifier path or the scale given by a flag or replay (--classifier-ckpt none asks for no classifier).
    asked = (resolved.explicit("classifier") and cfg.classifier is not None) or resolved.explicit(
        "base.settings.classifier_scale"
    )
    if scale > 0 and cfg.classifier is not None and Path(cfg.classifier).is_file():
        classifier = open_stage(cfg.classifier, device)
    elif scale > 0 and asked:
        where = f"{cfg.classifier} does not exist" if cfg.classifier else "--classifier-ckpt none was given"
        raise FileNotFoundError(
            f"classifier guidance needs a noisy classifier, but {where}; train one with "
            "`python scripts/train_stage.py stage=classifier`, pass --classifier-ckpt PATH, or --guidance-scale 0"
        )
    elif scale > 0:  # the config's default scale, and no classifier trained: sample unguided
        notes.append(f"no noisy classifier at {cfg.classifier}: classifier guidance is off")
        cfg.base.settings.classifier_scale = 0.0
    upsamplers: list[tuple[str, LoadedStage]] = []
    resolution = base.stage.resolution  # of the last stage kept so far
    for name, slot in cfg.upsamplers.items():
        if cfg.stop_at is not None and cfg.stop_at <= resolution:
            break
        if not Path(slot.ckpt).is_file():
            if resolved.explicit(f"upsamplers.{name}.ckpt"):
                raise FileNotFoundError(
                    f"{name} checkpoint {slot.ckpt} does not exist; pass the right "
                    f"{resolved.sources[f'upsamplers.{name}.ckpt'].split('=')[0]}"
                )
            notes.append(
                f"no {name} checkpoint at {slot.ckpt}: the cascade stops at {resolution}px "
                f"(train it with `python scripts/train_stage.py stage={name}`)"
            )
            break
        upsamplers.append((name, open_stage(slot.ckpt, device)))
        resolution = upsamplers[-1][1].stage.resolution
    return base, upsamplers, classifier, select_guide(resolved, device, notes)


def run_cascade(
    resolved: ResolvedSettings, device: torch.device, *, argv: Sequence[str] = (), progress: bool = True
) -> dict[str, Any]:
    """Load, check and sample the cascade; write PNGs per sample and stage, strips and ``cascade.json``. Returns the record."""
    cfg = resolved.config
    notes: list[str] = []
    base, upsamplers, classifier, guide = select_stages(resolved, device, notes)
    cascade = Cascade(base, [up for _, up in upsamplers], classifier, guide=guide, device=device, bf16=cfg.bf16)
    label = class_index(cascade.class_names, cfg.class_query)
    class_name = cascade.class_names[label]
    names = ["base", *[name for name, _ in upsamplers]]
    typed = [cfg.base.settings, *[cfg.upsamplers[name].settings for name in names[1:]]]
    settings = [stage_settings(s) for s in typed]
    cascade.check(settings)
    for name, loaded, slot_settings in zip(names, cascade.stages, typed):
        record = resolved.tuned.get(name)
        if record is None:
            continue
        ckpt = cfg.base.ckpt if name == "base" else cfg.upsamplers[name].ckpt
        for key in record["settings"]:
            source = resolved.source(name, key)
            if source.startswith(str(tuned_path(ckpt))):
                notes.append(f"{name} {key.replace('_', ' ')} {getattr(slot_settings, key)} from {source}")
        tuned_step = record.get("checkpoint", {}).get("step")
        if tuned_step is not None and tuned_step != int(loaded.payload["step"]):
            notes.append(
                f"{tuned_path(ckpt)} was chosen at step {tuned_step} but the checkpoint is at step "
                f"{loaded.payload['step']}: run evaluate_stage.py on it again"
            )
    # Hashed once, right after loading: what the record names is what was sampled with.
    extra = [loaded for loaded in (classifier, guide) if loaded is not None]
    sha256 = {loaded.path: file_sha256(loaded.path) for loaded in [*cascade.stages, *extra]}
    for path, digest in sha256.items():
        expected = resolved.expected_sha256.get(path)
        if expected and digest != expected:
            notes.append(f"{path} has changed since the replayed run: the images will differ")
    for note in notes:
        print(f"note: {note}")

    out = Path(cfg.out or f"outputs/{_slug(class_name)}_seed{cfg.seed}")
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []

    def write(stage_index: int, part: slice, images: torch.Tensor) -> None:
        res = images.shape[-1]
        for i, image in zip(range(part.start, part.stop), images):
            path = out / f"{i:03d}_{res}px.png"
            save_image((image + 1) / 2, path)
            files.append(str(path))

    labels = torch.full((cfg.num,), label, dtype=torch.long)
    print(
        f"sampling {cfg.num} × class {label} ({class_name!r}) through {' → '.join(f'{s.stage.resolution}px' for s in cascade.stages)}"
        f" on {device}"
        + (f", classifier guidance s={settings[0].classifier_scale:g}" if classifier else "")
        + (f", autoguidance w={settings[0].guide_scale:g} by {guide.path} (step {guide.payload['step']})" if guide else ""),
        flush=True,
    )
    outputs = cascade.sample(labels, settings, seed=cfg.seed, progress=progress, on_stage_output=write)
    for i in range(cfg.num):
        path = out / f"{i:03d}_strip.png"
        save_image((strip([o[i] for o in outputs]) + 1) / 2, path)

    described = cascade.describe(settings)
    for entry, name, loaded in zip(described["stages"], names, cascade.stages):
        entry |= {"name": name, "sha256": sha256[loaded.path]}
        if "aug_level" in entry:
            source = resolved.source(name, "aug_level")
            if not source.startswith("--") and ".tuned.json" not in source:  # the config file or the schema's default
                given = cfg.upsamplers[name].settings.aug_level is not None
                source = source if given else "the checkpoint's sample_aug_level"
            entry["aug_level_source"] = source
    if classifier is not None:
        described["classifier"]["sha256"] = sha256[classifier.path]
    if guide is not None:
        described["guide"]["sha256"] = sha256[guide.path]
    record = {
        "command": list(argv),
        "class": {"index": label, "name": class_name},
        "num": cfg.num,
        "seed": cfg.seed,
        **described,
        "torch": torch.__version__,
        "notes": notes,
        "out": str(out),
        "files": files,
        "seeding": "stage j, image i: torch.Generator(device).manual_seed(cascade.pipeline.orchestrator.image_seed(seed, j, i))",
    }
    (out / "cascade.json").write_text(json.dumps(record, indent=2))
    return record


def main(config: str | Path, argv: Sequence[str] | None = None, *, description: str | None = None) -> None:
    """``scripts/cascade_sample.py``: bad input is one ``error:`` line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        resolved = settings_from_argv(argv, config, description=description)
        report = run_cascade(resolved, device=resolve_device(resolved.config.device), argv=[sys.argv[0], *argv])
    except (ValueError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(
        f"wrote {len(report['files'])} images to {report['out']}/ (strips: {report['out']}/*_strip.png, settings: "
        f"{report['out']}/cascade.json)"
    )
