"""The command line of ``scripts/score_samples.py``: score a batch of samples (.npz or folder) against a reference.

Usage and protocol: the script's docstring and :mod:`cascade.evaluation.scoring`. Under ``torchrun``
each rank extracts features of its share (:func:`cascade.utils.distributed.init_distributed`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cascade.evaluation.dinov2 import DinoV2Features
from cascade.evaluation.features import FeatureError, FeatureExtractor, InceptionFeatures, inception_weights
from cascade.evaluation.scoring import reference_statistics, score_samples
from cascade.evaluation.sources import DatasetImages, FolderImages, ImageSource, NpzImages, SourceError
from cascade.utils.cli import OneLineParser
from cascade.utils.device import resolve_device
from cascade.utils.distributed import init_distributed
from cascade.utils.npz import NpzError, npz_keys

__all__ = ["DESCRIPTION", "parser", "open_samples", "open_reference", "build_extractors", "run", "main"]

DESCRIPTION = (
    "Score a batch of samples (.npz or folder) against a reference: FID, sFID (or why not), IS, precision/recall, FD_DINOv2."
)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("samples", help="an .npz (arr_0 uint8 N×H×W×3) or a folder of images")
    p.add_argument("--ref", required=True, help="ADM reference batch .npz, a folder of images, or a configs/data/*.yaml")
    p.add_argument("--ref-split", choices=["train", "val"], default="train", help="split of a data config reference")
    p.add_argument("--ref-num", type=int, help="use this many reference images (a data config: a fixed random subset)")
    p.add_argument("--num-samples", type=int, default=50_000, help="samples scored (the first N); fewer available is an error")
    p.add_argument("--inception-weights", help="FID Inception weights file (default: the torch hub cache, downloaded once)")
    p.add_argument("--dinov2-weights", help="DINOv2 ViT-L/14 weights file: adds FD_DINOv2")
    p.add_argument(
        "--pr-num",
        type=int,
        default=10_000,
        help="reference images for precision/recall (ADM: the 10k images of its reference batch)",
    )
    p.add_argument(
        "--pr-samples", type=int, default=0, help="samples for precision/recall, the first N (0: all of them, as ADM's evaluator)"
    )
    p.add_argument("--pr-k", type=int, default=3, help="k of the k-NN balls (Kynkäänniemi et al. 2019)")
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits")
    p.add_argument("--batch-size", type=int, default=100, help="images per feature-network call")
    p.add_argument(
        "--cache-dir",
        default=os.path.join(os.path.expanduser("~"), ".cache", "cascade", "reference_stats"),
        help="where reference statistics are cached",
    )
    p.add_argument("--out", help="metrics JSON (default: beside the samples, <samples>.metrics.json)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    return p


def open_samples(path: str) -> ImageSource:
    if Path(path).is_dir():
        return FolderImages(path)
    if not Path(path).is_file():
        raise SourceError(f"samples {path} do not exist; pass an .npz or a folder of images")
    return NpzImages(path)


def open_reference(args: argparse.Namespace, resolution: int) -> tuple[ImageSource | None, str | None]:
    """(image source or None, .npz path or None) of the reference."""
    ref = Path(args.ref)
    if ref.is_dir():
        return FolderImages(ref), None
    if not ref.is_file():
        raise SourceError(f"reference {ref} does not exist; pass an ADM reference batch .npz, a folder, or a data config .yaml")
    if ref.suffix in (".yaml", ".yml"):
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(ref), resolve=False)
        entry = config.get(args.ref_split) if isinstance(config, dict) else None
        if not entry:
            raise SourceError(f"{ref} has no {args.ref_split!r} data set; use --ref-split train or a data config with one")
        dataset = instantiate(entry, resolution=resolution)
        order = None
        if args.ref_num is not None and args.ref_num < len(dataset):
            order = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[: args.ref_num].tolist())
        return DatasetImages(dataset, resolution=resolution, config=entry, order=order), None
    keys = npz_keys(ref)
    return (NpzImages(ref) if "arr_0" in keys else None), str(ref)


def build_extractors(args: argparse.Namespace, device: torch.device) -> dict[str, FeatureExtractor]:
    extractors: dict[str, FeatureExtractor] = {"fid": InceptionFeatures(inception_weights(args.inception_weights), device)}
    if args.dinov2_weights:
        extractors["dinov2"] = DinoV2Features.from_file(args.dinov2_weights, device)
    return extractors


def run(args: argparse.Namespace, extractors: dict[str, FeatureExtractor] | None = None) -> dict[str, Any]:
    """Score as ``args`` say; ``extractors`` replaces the Inception / DINOv2 networks (tests use small random ones)."""
    for name in ("num_samples", "pr_num", "pr_samples", "batch_size", "is_splits", "pr_k"):
        if getattr(args, name) < (0 if name in ("pr_num", "pr_samples") else 1):
            raise SourceError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    samples = open_samples(args.samples)
    samples.limit(args.num_samples, "--num-samples")
    rank, _, device = init_distributed(str(resolve_device(args.device)))
    ref_source, ref_npz = open_reference(args, samples.resolution)
    if ref_source is not None and ref_source.resolution != samples.resolution:
        raise SourceError(
            f"the reference {args.ref} is at {ref_source.resolution}px but the samples are at "
            f"{samples.resolution}px; compare at one resolution"
        )
    if ref_source is not None and args.ref_num is not None and not isinstance(ref_source, DatasetImages):
        ref_source.limit(args.ref_num, "--ref-num")
    extractors = extractors if extractors is not None else build_extractors(args, device)
    reference = reference_statistics(
        ref_source,
        extractors,
        npz=ref_npz,
        cache_dir=args.cache_dir,
        pr_num=args.pr_num,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    metrics = score_samples(
        samples,
        reference,
        extractors,
        pr_k=args.pr_k,
        pr_samples=args.pr_samples or samples.num,
        is_splits=args.is_splits,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    if rank == 0:
        out = Path(args.out) if args.out else Path(str(args.samples).rstrip("/") + ".metrics.json")
        out.write_text(json.dumps({"command": sys.argv, **metrics}, indent=2))
        shown = [
            f"{k.upper()} {metrics[k]:.4f}" for k in metrics if (k == "fid" or k.startswith("fd_")) and metrics[k] is not None
        ]
        if metrics.get("is") is not None:
            shown.append(f"IS {metrics['is']:.3f}")
        if metrics.get("precision") is not None:
            shown.append(f"precision {metrics['precision']:.4f} recall {metrics['recall']:.4f}")
        print(f"{samples.num} samples at {samples.resolution}px: {', '.join(shown)}; sFID: not computed (see {out})")
        print(f"wrote {out}")
    return metrics


def main(argv: list[str] | None = None, extractors: dict[str, FeatureExtractor] | None = None) -> None:
    """``scripts/score_samples.py``: bad input is one ``error:`` line and exit code 2."""
    args = parser().parse_args(argv)
    try:
        run(args, extractors)
    except (SourceError, FeatureError, NpzError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
