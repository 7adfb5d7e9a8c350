"""Score a batch of samples (.npz or folder) against a reference: FID, sFID (or why not), IS, precision/recall, FD_DINOv2.

    python scripts/score_samples.py samples/base/samples_50000x64x64x3.npz --ref VIRTUAL_imagenet64_labeled.npz \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --out metrics.json
    torchrun --nproc_per_node 8 scripts/score_samples.py samples.npz --ref /data/imagenet/train_folder_64px/ ...
    python scripts/score_samples.py samples.npz --ref configs/data/shapes.yaml --num-samples 1000 ...  # our data set
    ... --dinov2-weights dinov2_vitl14_pretrain.pth        # adds FD_DINOv2 (EDM2)

The reference is an ADM reference batch .npz (mu/sigma used for FID when present; images arr_0 for
precision/recall and the other features), a folder of images, or a data config (configs/data/*.yaml,
its train split at the samples' resolution). Reference statistics computed from images are cached
in --cache-dir. Under torchrun each rank extracts features of its share; statistics are all-reduced.
See cascade/evaluation/scoring.py for the protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from cascade.evaluation.dinov2 import DinoV2Features  # noqa: E402
from cascade.evaluation.features import FeatureError, FeatureExtractor, InceptionFeatures, inception_weights  # noqa: E402
from cascade.evaluation.scoring import reference_statistics, score_samples  # noqa: E402
from cascade.evaluation.sources import DatasetImages, FolderImages, ImageSource, NpzImages, SourceError  # noqa: E402
from cascade.pipeline.shards import init_distributed  # noqa: E402
from cascade.utils.cli import OneLineParser  # noqa: E402
from cascade.utils.device import resolve_device  # noqa: E402
from cascade.utils.npz import NpzError, npz_keys  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("samples", help="an .npz (arr_0 uint8 N×H×W×3) or a folder of images")
    p.add_argument("--ref", required=True, help="ADM reference batch .npz, a folder of images, or a configs/data/*.yaml")
    p.add_argument("--ref-split", choices=["train", "val"], default="train", help="split of a data config reference")
    p.add_argument("--ref-num", type=int, help="use this many reference images (a data config: a fixed random subset)")
    p.add_argument("--num-samples", type=int, default=50_000, help="samples scored (the first N); fewer available is an error")
    p.add_argument("--inception-weights", help="FID Inception weights file (default: the torch hub cache, downloaded once)")
    p.add_argument("--dinov2-weights", help="DINOv2 ViT-L/14 weights file: adds FD_DINOv2")
    p.add_argument("--pr-num", type=int, default=10_000, help="images per side for precision/recall (ADM: its 10k reference)")
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
    for name in ("num_samples", "pr_num", "batch_size", "is_splits", "pr_k"):
        if getattr(args, name) < (0 if name == "pr_num" else 1):
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
        pr_num=args.pr_num,
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
    args = parser().parse_args(argv)
    try:
        run(args, extractors)
    except (SourceError, FeatureError, NpzError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
