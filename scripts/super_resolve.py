"""Super-resolve your own image with a trained upsampler stage (sr256: 64→256, sr1024: 256→1024).

    python scripts/super_resolve.py --ckpt runs/sr256/checkpoints/last.pt --input photo.png [--class 3]
        [--aug-level 50] [--consistency on|off] [--steps 25] [--sampler dpmpp_2m] [--seed 0] [--out photo_256px.png] [--device auto]

The input is centre-cropped to a square and resized (antialiased) to the stage's low-res
resolution when it is not already that size; a note says so. Without --class a
class-conditional stage uses its null class (unconditional super-resolution).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

from cascade.data import class_index
from cascade.diffusion.samplers import SAMPLERS
from cascade.training.checkpoint import CheckpointError, load_stage
from cascade.utils.cli import OneLineParser, on_off
from cascade.utils.device import resolve_device
from stages.upsampler import UpsamplerStage, load_image, super_resolve


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="upsampler stage checkpoint (sr256 or sr1024)")
    parser.add_argument("--input", required=True, help="image to super-resolve (any format PIL reads)")
    parser.add_argument("--class", dest="class_", default=None, help="class index or name (default: the null class)")
    parser.add_argument("--aug-level", type=int, default=None, help="noise-augmentation level s (default: the stage's)")
    parser.add_argument(
        "--consistency",
        type=on_off,
        default=None,
        metavar="on|off",
        help="project the output onto the images whose downsample is the input (default: the stage's)",
    )
    parser.add_argument("--steps", type=int, default=25, help="sampler steps")
    parser.add_argument("--sampler", default="dpmpp_2m", choices=list(SAMPLERS), help="sampler")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentation noise and the sampler")
    parser.add_argument("--out", default=None, help="output PNG (default: <input stem>_<R>px.png in the current folder)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    try:
        if args.cfg_scale < 0:
            raise ValueError(f"--cfg-scale must be >= 0 (1 = no guidance), got {args.cfg_scale}")
        device = resolve_device(args.device)
        image = load_image(args.input)
        stage, net, payload = load_stage(args.ckpt, device=device)
        if not isinstance(stage, UpsamplerStage):
            raise ValueError(f"{args.ckpt} is a {payload['stage']!r} checkpoint, not an upsampler (sr256 / sr1024)")
        label = None if args.class_ is None else class_index(payload["class_names"], args.class_)
        generator = torch.Generator(device).manual_seed(args.seed)
        output, notes = super_resolve(
            stage,
            net,
            image,
            class_label=label,
            aug_level=args.aug_level,
            sampler=args.sampler,
            steps=args.steps,
            cfg_scale=args.cfg_scale,
            enforce_consistency=args.consistency,
            generator=generator,
        )
        for note in notes:
            print(f"note: {note}")
        out = Path(args.out or f"{Path(args.input).stem}_{stage.resolution}px.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image((output.float().cpu() + 1) / 2, out)
        print(
            f"wrote {out} ({output.shape[-1]}x{output.shape[-2]}, stage {stage.name}, aug level "
            f"{stage.sample_aug_level if args.aug_level is None else args.aug_level}, {args.sampler} {args.steps} steps, seed {args.seed})"
        )
    except (ValueError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
