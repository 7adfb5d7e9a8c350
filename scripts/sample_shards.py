"""Sample N images of the base or of the whole cascade, sharded over ranks and resumable (ADM / CDM protocol).

    python scripts/sample_shards.py --base-ckpt runs/base/checkpoints/last.pt --num-samples 50000 --out samples/base
    torchrun --nproc_per_node 8 scripts/sample_shards.py --base-ckpt ... --sr256-ckpt ... --num-samples 50000 --out samples/c256
    python scripts/sample_shards.py ... --classes random --seed 1      # ADM: uniformly random classes
    python scripts/sample_shards.py ... --class 207 --num-samples 1000         # one class

The same command on 1 process or K ranks gives bit-identical images (same machine and kind of
device); run it again after a kill or preemption and it samples only the missing shards. Writes
``samples_{N}x{R}x{R}x3.npz`` per stage (ADM evaluator format: ``arr_0`` uint8 images, ``arr_1``
labels) and/or ``png/{R}px/``, and ``manifest.json``. See cascade/pipeline/shards.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from cascade.data import class_index  # noqa: E402
from cascade.diffusion.samplers import SAMPLERS  # noqa: E402
from cascade.pipeline.orchestrator import Cascade, ChainError, StageSettings  # noqa: E402
from cascade.pipeline.shards import ShardError, ShardJob, init_distributed, run_shards  # noqa: E402
from cascade.training.checkpoint import CheckpointError  # noqa: E402
from cascade.utils.cli import OneLineParser  # noqa: E402
from cascade.utils.device import resolve_device  # noqa: E402
from cascade.utils.npz import NpzError  # noqa: E402

STAGES = ("base", "sr256", "sr1024")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-ckpt", required=True, help="base stage checkpoint")
    p.add_argument("--sr256-ckpt", help="64→256 upsampler: sample the cascade up to 256px")
    p.add_argument("--sr1024-ckpt", help="256→1024 upsampler (needs --sr256-ckpt)")
    p.add_argument("--classifier-ckpt", help="noisy classifier for classifier guidance of the base")
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
    p.add_argument("--guidance-scale", type=float, default=0.0, help="classifier guidance scale s of the base")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale w of the base")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (it is used only where the hardware has native bf16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    defaults = StageSettings()
    for name in STAGES:
        p.add_argument(f"--{name}-steps", type=int, default=defaults.steps, help=f"{name} sampler steps")
        p.add_argument(f"--{name}-sampler", choices=list(SAMPLERS), default=defaults.sampler, help=f"{name} sampler")
        p.add_argument(f"--{name}-batch-size", type=int, default=defaults.batch_size, help=f"{name} images per network call")
    for name in STAGES[1:]:
        p.add_argument(f"--{name}-aug-level", type=int, help=f"noise-augmentation level of {name}'s input (default: the stage's)")
    return p


def main() -> None:
    args = parser().parse_args()
    try:
        if args.sr1024_ckpt and not args.sr256_ckpt:
            raise ShardError("--sr1024-ckpt needs --sr256-ckpt (the 1024px stage upsamples the 256px stage's output)")
        for path in (args.base_ckpt, args.sr256_ckpt, args.sr1024_ckpt, args.classifier_ckpt):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"checkpoint {path} does not exist; pass the right path")
        rank, world, device = init_distributed(str(resolve_device(args.device)))
        if device.type == "cuda":  # the same kernels for the same batch on every run
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        upsamplers = [p for p in (args.sr256_ckpt, args.sr1024_ckpt) if p]
        cascade = Cascade.from_checkpoints(args.base_ckpt, upsamplers, args.classifier_ckpt, device=device, bf16=not args.fp32)
        names = STAGES[: 1 + len(upsamplers)]
        settings = [
            StageSettings(
                sampler=getattr(args, f"{n}_sampler"),
                steps=getattr(args, f"{n}_steps"),
                batch_size=getattr(args, f"{n}_batch_size"),
                cfg_scale=args.cfg_scale if n == "base" else 1.0,
                classifier_scale=args.guidance_scale if n == "base" else 0.0,
                aug_level=getattr(args, f"{n}_aug_level", None),
            )
            for n in names
        ]
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
        manifest = run_shards(
            cascade, settings, job, bf16=not args.fp32, rank=rank, world=world, progress=not args.no_progress, command=sys.argv
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
        print(f"{'done' if manifest.get('complete') else 'incomplete'}{speed}: {args.out}/{files} and {args.out}/manifest.json")


if __name__ == "__main__":
    main()
