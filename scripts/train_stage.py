"""Train one stage of the cascade.

    python scripts/train_stage.py stage=base [data=shapes] [preset=tiny] [trainer.max_steps=N] [run_dir=DIR]
    torchrun --nproc_per_node=8 scripts/train_stage.py stage=base data=imagefolder data.root=/data/imagenet/train

Running the same command again with the same run_dir resumes from run_dir/checkpoints/last.pt
(or the newest intact numbered checkpoint if last.pt is corrupt). SIGTERM / SIGINT save a
checkpoint and exit 0. Bad input is one line on stderr and exit code 2; a run stopped by
non-finite losses is one line and exit code 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from cascade.evaluation import previews
from cascade.training.checkpoint import CheckpointError
from cascade.training.faults import TrainingDiverged
from cascade.utils.device import resolve_device
from stages.upsampler import UpsamplerStage

BAD_INPUT = (ValueError, CheckpointError, FileNotFoundError)


def fail(message: object, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        device = resolve_device(cfg.device)
        # Global RNG: weight initialisation and dropout only; data order and diffusion noise have their own generators.
        torch.manual_seed(cfg.seed + int(os.environ.get("RANK", "0")))
        stage = instantiate(cfg.stage)
        reporter = previews.bind(stage, instantiate(cfg.preview) if cfg.get("preview") is not None else None)
        dataset = instantiate(cfg.data.train, resolution=stage.resolution)
        if isinstance(stage, UpsamplerStage):
            dataset = stage.training_data(dataset)  # with crop_windows: only the windows its crops need
        val_data = instantiate(cfg.data.val, resolution=stage.resolution) if cfg.data.get("val") else None
        trainer = instantiate(cfg.trainer)
        config = OmegaConf.to_container(cfg, resolve=True)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, Path(cfg.run_dir) / "config.yaml", resolve=True)
        trainer.fit(
            stage, dataset, run_dir=cfg.run_dir, config=config, seed=cfg.seed, device=device, val_data=val_data, reporter=reporter
        )
    except BAD_INPUT as error:
        fail(error, 2)
    except InstantiationException as error:  # hydra wraps what a constructor raised: report the cause
        if not isinstance(error.__cause__, BAD_INPUT):
            raise
        fail(error.__cause__, 2)
    except MissingMandatoryValue as error:
        hint = " (data=imagefolder needs data.root=/path/to/class/folders)" if error.full_key.startswith("data.") else ""
        fail(f"missing config value {error.full_key}; set it on the command line{hint}", 2)
    except TrainingDiverged as error:
        fail(error, 1)


if __name__ == "__main__":
    main()
