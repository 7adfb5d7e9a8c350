"""The command line of ``scripts/sample_shards.py``: flags → settings (the path ``cascade_sample.py`` takes) → :func:`run_shards`.

Stage settings are merged by :func:`cascade.pipeline.settings.merge_settings`, as for
``cascade_sample.py``: ``configs/cascade.yaml`` (or ``--config``) ← ``<ckpt>.tuned.json`` (e.g. the
aug level ``evaluate_stage.py`` chose for an upsampler) ← the flags given. The chain is the base
and the upsamplers whose checkpoint is given (``--sr256-ckpt``, ``--sr1024-ckpt`` or ``--stage
NAME=PATH``, in order): a sharded run never ends early because a default checkpoint is missing.
The manifest records every stage's settings and where each came from.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from cascade.data import class_index
from cascade.pipeline.job import (
    add_stage_flags,
    optional_ckpt_overrides,
    select_stages,
    stage_flag_overrides,
    stage_pairs,
    stage_settings,
)
from cascade.pipeline.orchestrator import Cascade, ChainError, StageSettings
from cascade.pipeline.settings import CONFIG_SOURCE, Override, ResolvedSettings, merge_settings
from cascade.pipeline.shards import ShardError, ShardJob, run_shards
from cascade.training.checkpoint import CheckpointError
from cascade.utils.cli import OneLineParser
from cascade.utils.device import resolve_device
from cascade.utils.distributed import init_distributed
from cascade.utils.npz import NpzError

__all__ = ["build_parser", "resolve", "shard_settings", "main"]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cascade.yaml"


def _pre_parser() -> argparse.ArgumentParser:
    p = OneLineParser(add_help=False, allow_abbrev=False)
    p.add_argument("--config", help=f"stage settings file (default {CONFIG_SOURCE})")
    p.add_argument(
        "--stage", action="append", default=[], metavar="NAME=PATH", help="an upsampler of the chain, in order (repeat)"
    )
    return p


def build_parser(upsamplers: Sequence[str], description: str | None = None) -> argparse.ArgumentParser:
    """The flags of the job and ``--<name>-*`` of the base and every upsampler in ``upsamplers``."""
    p = OneLineParser(
        description=description,
        parents=[_pre_parser()],
        epilog="Per-stage flags default to the stage's tuned file (<ckpt>.tuned.json), then the config. The chain is "
        "the base and every upsampler whose checkpoint is given (--<name>-ckpt of the config's upsamplers, or --stage).",
    )
    p.add_argument("--out", required=True, help="output folder (holds the manifest; rerun with the same --out to resume)")
    p.add_argument("--num-samples", type=int, default=50_000, help="number of images (the papers: 50,000; ADM's --num_samples)")
    p.add_argument("--seed", type=int, default=0, help="seed of every image's noise (and of random classes)")
    p.add_argument(
        "--classes",
        choices=["round-robin", "random"],
        default="round-robin",
        help="class of image i: i mod C, or uniform at random from (seed, i) as ADM samples",
    )
    p.add_argument("--class", dest="class_", help="one class (index or name) for every image")
    p.add_argument("--shard-size", type=int, default=256, help="images per shard (unit of work and resumption)")
    p.add_argument("--format", choices=["npz", "png", "both"], default="npz", help="final output")
    p.add_argument("--keep-shards", action="store_true", help="keep shards/ after the final files are written")
    p.add_argument("--classifier-ckpt", help="noisy classifier for classifier guidance of the base ('none': no guidance)")
    p.add_argument("--guidance-scale", type=float, help="classifier guidance scale s of the base (default: the config's)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale w of the base (default: the config's)")
    p.add_argument("--guide-scale", type=float, help="autoguidance scale w of the base by --guide-ckpt (default: the config's)")
    p.add_argument("--guide-ckpt", help="autoguidance guide: an earlier checkpoint of the base's run ('none': no guide)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (it is used only where the hardware has native bf16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_stage_flags(p, upsamplers)
    return p


def resolve(
    argv: Sequence[str], config: str | Path = CONFIG, description: str | None = None
) -> tuple[argparse.Namespace, ResolvedSettings]:
    """Parse ``argv`` and merge the stage settings: (the parsed flags, the merged settings of the chain)."""
    pre, _ = _pre_parser().parse_known_args(argv)
    config_path = Path(pre.config or config)
    if not config_path.is_file():
        raise FileNotFoundError(f"--config {config_path} does not exist")
    file_layer = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    pairs = stage_pairs(pre.stage, _pre_parser())
    configured = list((file_layer.get("upsamplers") or {}).keys())
    known = list(dict.fromkeys([*configured, *(name for name, _ in pairs)]))
    args = build_parser(known, description).parse_args(argv)
    flags = vars(args)
    chain = [name for name, _ in pairs] or [name for name in configured if flags.get(f"{name}:ckpt") is not None]
    given = [name for name in configured if flags.get(f"{name}:ckpt") is not None]
    if not pairs and given and given != configured[: len(given)]:
        raise ShardError(
            f"the upsamplers {', '.join(given)} do not start the config's chain {' → '.join(configured)}; give the "
            f"checkpoints of {' and '.join(configured[: configured.index(given[-1]) + 1])} (or the chain with --stage NAME=PATH)"
        )
    overrides: list[Override] = []
    if args.guidance_scale is not None:
        overrides.append(Override("base.settings.classifier_scale", args.guidance_scale, "--guidance-scale"))
    if args.cfg_scale is not None:
        overrides.append(Override("base.settings.cfg_scale", args.cfg_scale, "--cfg-scale"))
    if args.guide_scale is not None:
        overrides.append(Override("base.settings.guide_scale", args.guide_scale, "--guide-scale"))
    overrides += optional_ckpt_overrides({"classifier": args.classifier_ckpt, "guide": args.guide_ckpt})
    overrides += [Override(f"upsamplers.{name}.ckpt", path, f"--stage {name}={path}") for name, path in pairs]
    overrides += stage_flag_overrides(flags, known)
    label = CONFIG_SOURCE if pre.config is None else str(config_path)
    return args, merge_settings(file_layer, overrides, chain=chain, config_source=label)


def shard_settings(resolved: ResolvedSettings, names: Sequence[str]) -> tuple[list[StageSettings], dict[str, dict[str, str]]]:
    """The orchestrator's settings of stages ``names`` (base first) and, per stage, where each setting came from."""
    cfg = resolved.config
    typed = [cfg.base.settings, *[cfg.upsamplers[name].settings for name in names[1:]]]
    sources = {name: {key: resolved.source(name, key) for key in vars(s)} for name, s in zip(names, typed)}
    return [stage_settings(s) for s in typed], sources


def main(argv: Sequence[str] | None = None, *, description: str | None = None) -> None:
    """``scripts/sample_shards.py``: bad input is one ``error:`` line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rank, manifest, out = 0, {}, "?"
    try:
        args, resolved = resolve(argv, description=description)
        out = args.out
        rank, world, device = init_distributed(str(resolve_device(args.device)))
        if device.type == "cuda":  # the same kernels for the same batch on every run
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        notes: list[str] = []
        base, upsamplers, classifier, guide = select_stages(resolved, device, notes)
        cascade = Cascade(base, [up for _, up in upsamplers], classifier, guide=guide, device=device, bf16=not args.fp32)
        names = ["base", *[name for name, _ in upsamplers]]
        settings, sources = shard_settings(resolved, names)
        for name, level in zip(names, cascade.aug_levels(settings)):
            if level is not None and sources[name]["aug_level"] == "default":
                sources[name]["aug_level"] = "the checkpoint's sample_aug_level"
        if rank == 0:
            for note in notes:
                print(f"note: {note}")
        fixed = class_index(cascade.class_names, args.class_) if args.class_ is not None else None
        job = ShardJob(
            out=args.out,
            num=args.num_samples,
            seed=args.seed,
            classes=args.classes,
            fixed_class=fixed,
            shard_size=args.shard_size,
            format=args.format,
            keep_shards=args.keep_shards,
        )
        provenance: dict[str, Any] = {"stage_names": names, "setting_sources": sources, "notes": notes}
        provenance["tuned"] = {name: record for name, record in resolved.tuned.items() if name in names}
        manifest = run_shards(
            cascade,
            settings,
            job,
            bf16=not args.fp32,
            rank=rank,
            world=world,
            progress=not args.no_progress,
            command=[sys.argv[0], *argv],
            provenance=provenance,
        )
    except (ValueError, ShardError, ChainError, CheckpointError, FileNotFoundError, NpzError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        run = manifest.get("last_run")
        speed = f" ({run['images_sampled']} images in {run['seconds']:.1f} s on {run['world_size']} rank(s))" if run else ""
        files = ", ".join(manifest.get("files", {})) or "png/"
        print(f"{'done' if manifest.get('complete') else 'incomplete'}{speed}: {out}/{files} and {out}/manifest.json")
