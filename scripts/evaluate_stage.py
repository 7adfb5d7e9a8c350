"""Evaluate one stage checkpoint: the stage is recognised from the checkpoint; writes metrics.json and PNG plots.

    python scripts/evaluate_stage.py ckpt=runs/classifier/checkpoints/last.pt preset=tiny
    python scripts/evaluate_stage.py ckpt=runs/base/checkpoints/last.pt classifier_ckpt=runs/classifier/checkpoints/last.pt
    python scripts/evaluate_stage.py ckpt=runs/sr256/checkpoints/last.pt preset=tiny      # also writes last.tuned.json
    python scripts/evaluate_stage.py ckpt=... features=inception features_path=/path/to/weights-inception-2015-12-05-6726825d.pth
    # a stage converted from guided-diffusion has no data config: name the evaluation images (ImageNet synset folders)
    python scripts/evaluate_stage.py ckpt=runs/base/checkpoints/last.pt classifier_ckpt=runs/classifier/checkpoints/last.pt \
        data=imagefolder data.root=/path/to/imagenet/val
    torchrun --nproc_per_node 8 scripts/evaluate_stage.py ckpt=... num_samples=50000   # the same figures, split over 8 GPUs

Settings: configs/evaluate/evaluate.yaml (preset=tiny: configs/evaluate/preset/tiny.yaml); the work is
cascade.evaluation.run.evaluate_checkpoint.
"""

from __future__ import annotations

import sys

import hydra
import torch.distributed as dist
from omegaconf import DictConfig

from cascade.evaluation.run import evaluate_checkpoint, evaluation_config
from cascade.training.checkpoint import CheckpointError


@hydra.main(config_path="../configs/evaluate", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        _, out_dir = evaluate_checkpoint(evaluation_config(cfg))
        rank = dist.get_rank() if dist.is_initialized() else 0
    except (ValueError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"wrote {out_dir / 'metrics.json'} and plots in {out_dir}")


if __name__ == "__main__":
    main()
