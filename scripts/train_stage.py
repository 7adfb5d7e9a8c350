"""Train one stage of the cascade.

    python scripts/train_stage.py stage=base [data=shapes] [preset=tiny] [trainer.max_steps=N] [run_dir=DIR]
    torchrun --nproc_per_node=8 scripts/train_stage.py stage=base data=imagefolder data.root=/data/imagenet/train

Running the same command again with the same run_dir resumes from run_dir/checkpoints/last.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cascade.checkpoint import CheckpointError  # noqa: E402
from cascade.device import resolve_device  # noqa: E402


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        device = resolve_device(cfg.device)
        # Global RNG: weight initialisation and dropout only; data order and diffusion noise have their own generators.
        torch.manual_seed(cfg.seed + int(os.environ.get("RANK", "0")))
        stage = instantiate(cfg.stage)
        dataset = instantiate(cfg.data.train, resolution=stage.resolution)
        val_data = instantiate(cfg.data.val, resolution=stage.resolution) if cfg.data.get("val") else None
        trainer = instantiate(cfg.trainer)
        config = OmegaConf.to_container(cfg, resolve=True)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, Path(cfg.run_dir) / "config.yaml", resolve=True)
        trainer.fit(stage, dataset, run_dir=cfg.run_dir, config=config, seed=cfg.seed, device=device, val_data=val_data)
    except (ValueError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
