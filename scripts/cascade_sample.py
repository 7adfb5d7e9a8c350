"""Sample a class through the whole cascade: 64px base (guided) → 256px → 1024px.

    python scripts/cascade_sample.py --class 207 [--num 4] [--seed 0] [--guidance-scale 1.0] [--out DIR]
    python scripts/cascade_sample.py --class "golden retriever" --sr1024-steps 50 --sr256-aug-level 100
    python scripts/cascade_sample.py --replay outputs/golden_retriever_seed0/cascade.json   # the same images again

Defaults come from configs/cascade.yaml. A stage whose default checkpoint is absent ends the
cascade at the previous resolution. Writes one PNG per sample per stage, a side-by-side strip
per sample, and cascade.json with every setting and seed needed to reproduce the images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from cascade.training.checkpoint import CheckpointError
from cascade.utils.cli import OneLineParser
from cascade.utils.device import resolve_device
from cascade.pipeline.job import SR_STAGES, CascadeRequest, run_cascade
from cascade.diffusion.samplers import SAMPLERS

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cascade.yaml"


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Every flag defaults to None: unset flags fall back to --replay's cascade.json, then to configs/cascade.yaml.
    p.add_argument("--class", dest="class_", help="class index or name, e.g. 207 or 'golden retriever'")
    p.add_argument("--num", type=int, help="number of samples")
    p.add_argument("--seed", type=int, help="seed of every stage's noise")
    p.add_argument("--guidance-scale", type=float, help="classifier guidance scale s of the base (0 = off)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale w of the base (1 = off)")
    p.add_argument("--out", help="output folder (default outputs/<class>_seed<seed>)")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--fp32", action="store_true", default=None, help="no bf16 autocast")
    p.add_argument("--stop-at", type=int, choices=[64, 256, 1024], help="last resolution to produce")
    p.add_argument("--classifier-ckpt", help="noisy classifier checkpoint ('none': no classifier guidance)")
    p.add_argument("--replay", help="a cascade.json: rerun its exact settings (flags given here override)")
    for name in ("base", *SR_STAGES):
        p.add_argument(f"--{name}-ckpt", help=f"{name} checkpoint")
        p.add_argument(f"--{name}-steps", type=int, help=f"{name} sampler steps")
        p.add_argument(f"--{name}-sampler", choices=list(SAMPLERS), help=f"{name} sampler")
        p.add_argument(f"--{name}-batch-size", type=int, help=f"{name} images per sampler call")
    for name in SR_STAGES:
        p.add_argument(f"--{name}-aug-level", type=int, help=f"noise-augmentation level s of {name}'s low-res input")
    return p


def main() -> None:
    args = parser().parse_args()
    try:
        request = CascadeRequest.from_sources(OmegaConf.to_container(OmegaConf.load(CONFIG)), vars(args), argv=sys.argv)
        report = run_cascade(request, device=resolve_device(request.device))
    except (ValueError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(report['files'])} images to {report['out']}/ (strips: {report['out']}/*_strip.png, settings: "
          f"{report['out']}/cascade.json)")


if __name__ == "__main__":
    main()
