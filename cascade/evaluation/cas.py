"""Classification Accuracy Score of a batch of samples on file (CDM §4.1; Ravuri & Vinyals 2019): ``scripts/cas_score.py``.

CDM's CAS trains a classifier on generated images only and reports its top-1 / top-5 accuracy on
the real validation set. Here the generated images are an ADM-format ``.npz`` (``arr_0`` uint8
(N, H, W, 3), ``arr_1`` the requested labels), e.g. the final file of ``scripts/sample_shards.py``
(whole cascade: its last resolution), and the real data are those of the checkpoint the samples
came from: its data config's held-out images at the samples' resolution
(:func:`cascade.evaluation.held_out.held_out_data`; never the images the classifier trains on).
The recipe is :func:`cascade.evaluation.evaluate.classification_accuracy_score` (a timm network
from scratch, the same one ``evaluate_stage.py`` uses for the base's best guidance setting), with
its real-data baseline: the same recipe on N real training images.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade.evaluation.evaluate import classification_accuracy_score, json_ready
from cascade.evaluation.held_out import held_out_data
from cascade.evaluation.run import CasSettings
from cascade.evaluation.sources import NpzImages, SourceError
from cascade.training.checkpoint import CheckpointError, load_checkpoint
from cascade.utils.cli import OneLineParser
from cascade.utils.device import resolve_device
from cascade.utils.npz import NpzError, npz_keys, read_array

__all__ = ["cas_from_npz", "parser", "main"]


def cas_from_npz(
    samples: str | Path,
    ckpt: str | Path,
    cas: CasSettings,
    *,
    num_samples: int | None = None,
    data_root: str | Path | None = None,
    device: torch.device = torch.device("cpu"),
    bf16: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """CAS of the images in ``samples`` (their labels ``arr_1``), tested on held-out images of ``ckpt``'s data set.

    ``num_samples``: train on the first N images only (default: all). ``data_root``: a class-folder tree
    of real images instead of the checkpoint's data set (a checkpoint converted from guided-diffusion has
    none); a fixed 10 % of it is held out, as ``evaluate_stage.py data=imagefolder`` does. SourceError
    (one line) for a file that cannot serve: no labels, labels outside the checkpoint's classes, fewer
    images than asked; ValueError when there is no real data to test on.
    """
    source = NpzImages(samples)
    if num_samples is not None:
        source.limit(num_samples, "--num-samples")
    if "arr_1" not in npz_keys(samples):
        raise SourceError(f"{samples} has no labels (arr_1); CAS needs the class each image was sampled for")
    labels = torch.from_numpy(read_array(samples, "arr_1").astype(np.int64))[: source.num]  # (N,)
    if len(labels) < source.num:
        raise SourceError(f"{samples}: arr_1 holds {len(labels)} labels for {source.num} images")
    payload = load_checkpoint(ckpt)
    num_classes = len(payload["class_names"])
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise SourceError(
            f"{samples} has labels {int(labels.min())}..{int(labels.max())} but {ckpt} knows {num_classes} classes; "
            "pass the checkpoint the samples were drawn from"
        )
    if data_root is not None:
        if not Path(data_root).is_dir():
            raise FileNotFoundError(f"--data-root {data_root} is not a folder; pass a tree of class folders of real images")
        data = {"train": {"_target_": "cascade.data.ImageFolderDataset", "root": str(data_root), "flip": False}}
        train, val, held_out = held_out_data(data, source.resolution, "base", class_names=payload["class_names"], named=True)
    else:
        data = (payload.get("config") or {}).get("data")
        if not data:
            raise ValueError(
                f"{ckpt} carries no data config (e.g. converted from guided-diffusion); pass --data-root FOLDER, "
                "a tree of class folders of real images (ImageNet's val/ in its synset folders)"
            )
        train, val, held_out = held_out_data(data, source.resolution, "base")
    images = torch.cat([pixels for _, pixels in source.batches(1000)])  # (N, 3, R, R) uint8
    report = classification_accuracy_score(
        images,
        labels,
        num_classes=num_classes,
        train_data=train,
        val_data=val,
        arch=cas.arch,
        steps=cas.steps,
        batch_size=cas.batch_size,
        lr=cas.lr,
        eval_images=cas.eval_images,
        real_baseline=cas.real_baseline,
        device=device,
        bf16=bf16,
        seed=seed,
        progress=progress,
    )
    return {
        "samples": str(samples),
        "ckpt": str(ckpt),
        "resolution": source.resolution,
        "held_out": held_out,
        "settings": asdict(cas),
        "seed": seed,
        **report,
    }


def parser() -> argparse.ArgumentParser:
    defaults = CasSettings()
    p = OneLineParser(
        description="Classification Accuracy Score (CDM) of an ADM-format .npz of samples: a classifier trained on them, "
        "tested on real held-out images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("samples", help="an .npz with arr_0 uint8 (N, R, R, 3) and arr_1 labels (sample_shards.py's final file)")
    p.add_argument(
        "--ckpt", required=True, help="a checkpoint of the stages the samples came from: its data set is the real data"
    )
    p.add_argument(
        "--data-root",
        help="real images: a tree of class folders (default: the checkpoint's data set; needed for converted checkpoints)",
    )
    p.add_argument("--arch", default=defaults.arch, help="timm architecture trained from scratch")
    p.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--eval-images", type=int, default=defaults.eval_images, help="held-out real images tested on")
    p.add_argument("--no-real-baseline", action="store_true", help="skip the same recipe trained on real images")
    p.add_argument("--num-samples", type=int, help="train on the first N samples (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--out", help="report JSON (default: <samples>.cas.json)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    """``scripts/cas_score.py``: bad input is one ``error:`` line and exit code 2."""
    args = parser().parse_args(argv)
    try:
        for name in ("steps", "batch_size", "eval_images"):
            if getattr(args, name) < 1:
                raise SourceError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if not Path(args.ckpt).is_file():
            raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist; pass the checkpoint the samples came from")
        cas = CasSettings(
            arch=args.arch,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            real_baseline=not args.no_real_baseline,
            eval_images=args.eval_images,
        )
        report = cas_from_npz(
            args.samples,
            args.ckpt,
            cas,
            num_samples=args.num_samples,
            data_root=args.data_root,
            device=resolve_device(args.device),
            bf16=not args.fp32,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except (SourceError, NpzError, CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out) if args.out else Path(str(args.samples) + ".cas.json")
    out.write_text(json.dumps(json_ready({"command": sys.argv, **report}), indent=2))
    real = f"; real data: top-1 {report['real_data']['top1']:.4f}" if "real_data" in report else ""
    print(f"CAS ({args.arch}, {report['train_images']} samples): top-1 {report['top1']:.4f} top-5 {report['top5']:.4f}{real}")
    print(f"wrote {out}")
