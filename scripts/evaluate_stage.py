"""Evaluate one stage checkpoint: the stage is recognised from the checkpoint; writes metrics.json and PNG plots.

    python scripts/evaluate_stage.py ckpt=runs/classifier/checkpoints/last.pt preset=tiny
    python scripts/evaluate_stage.py ckpt=runs/base/checkpoints/last.pt classifier_ckpt=runs/classifier/checkpoints/last.pt
    python scripts/evaluate_stage.py ckpt=runs/sr256/checkpoints/last.pt preset=tiny      # also writes last.tuned.json
    python scripts/evaluate_stage.py ckpt=... features=inception features_path=/path/to/weights-inception-2015-12-05-6726825d.pth

Settings: configs/evaluate/evaluate.yaml (preset=tiny: configs/evaluate/preset/tiny.yaml).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cascade.training.checkpoint import CheckpointError
from cascade.utils.device import resolve_device
from cascade.evaluation.evaluate import (
    LOWER_IS_BETTER,
    FeatureSpace,
    aug_level_sweep,
    classification_accuracy_score,
    classifier_noise_accuracy,
    guidance_sweep,
    json_ready,
    plot_sr_sweep,
    random_subset,
    reference_classifier,
    select_level,
)
from cascade.evaluation.held_out import held_out_data
from cascade.evaluation.features import InceptionFeatures, NoisyClassifierFeatures, TimmFeatures, inception_weights
from cascade.pipeline.orchestrator import LoadedStage, load
from cascade.evaluation.tuned import write_tuned


def feature_kind(cfg: DictConfig, data: dict[str, Any]) -> str:
    if cfg.features not in ("auto", "inception", "classifier"):
        raise ValueError(f"features={cfg.features} is unknown; use inception, classifier or auto")
    if cfg.features == "auto":
        return "classifier" if str(data["train"]["_target_"]).endswith("ShapesDataset") else "inception"
    return str(cfg.features)


def judge(cfg: DictConfig, loaded: LoadedStage, train: Any, val: Any, out_dir: Path, device: torch.device) -> tuple[Any, dict]:
    """The reference classifier (trained on random ``crop`` crops of images larger than ``crop``) and its report."""
    crop = cfg.crop if cfg.crop < loaded.stage.resolution else None
    name = f"reference_{cfg.reference.arch}" + (f"_crop{crop}" if crop else "") + ".pt"
    path = Path(cfg.reference.ckpt) if cfg.reference.ckpt else out_dir / name
    net, report = reference_classifier(
        path, explicit=bool(cfg.reference.ckpt), arch=cfg.reference.arch, crop=crop, train_data=train, val_data=val,
        steps=cfg.reference.steps, batch_size=cfg.reference.batch_size, lr=cfg.reference.lr,
        eval_images=cfg.reference.eval_images, device=device, bf16=cfg.bf16, seed=cfg.seed, progress=cfg.progress)
    return net, report


def feature_space(cfg: DictConfig, kind: str, inception: Any, reference: Any, ref_report: dict | None, loaded: LoadedStage,
                  device: torch.device) -> FeatureSpace:
    if kind == "inception":
        extractor = inception
    elif cfg.features_path:  # a noisy classifier checkpoint at t = 0
        clf = load(cfg.features_path, device)
        if not clf.is_classifier or clf.class_names != loaded.class_names:
            raise ValueError(f"features_path={cfg.features_path} must be a noisy-classifier checkpoint of the same classes "
                             f"as {cfg.ckpt} (it is a {clf.name!r} checkpoint of {len(clf.class_names)} classes)")
        extractor = NoisyClassifierFeatures(
            clf.net, clf.stage.schedule.timesteps[:1], input_size=clf.stage.resolution,
            description=f"classifier: noisy classifier {cfg.features_path} at t=0, attention-pooled features")
    else:
        size = ref_report["crop"] or loaded.stage.resolution
        extractor = TimmFeatures(reference, input_size=size, description=f"classifier: reference {cfg.reference.arch} trained "
                                 f"from scratch on this data set ({size}px), pre-logits features")
    crop = extractor.input_size or cfg.crop
    return FeatureSpace(extractor, crop=crop, tiles_per_image=cfg.tiles_per_image, batch_size=cfg.feature_batch_size)


def evaluate_base(cfg: DictConfig, loaded: LoadedStage, train: Any, val: Any, inception: Any, out_dir: Path,
                  device: torch.device) -> dict[str, Any]:
    reference, ref_report = judge(cfg, loaded, train, val, out_dir, device)
    features = feature_space(cfg, feature_kind(cfg, loaded.payload["config"]["data"]), inception, reference, ref_report,
                             loaded, device)
    real = features.of_dataset(train, random_subset(len(train), cfg.num_real, cfg.seed), progress=cfg.progress)
    classifier = load(cfg.classifier_ckpt, device) if cfg.classifier_ckpt else None
    if classifier is not None and not classifier.is_classifier:
        raise ValueError(f"classifier_ckpt={cfg.classifier_ckpt} is a {classifier.name!r} checkpoint, not a noisy classifier")
    sweep, samples, labels = guidance_sweep(loaded.stage, loaded.net, reference=reference, features=features, real_features=real,
                           class_names=loaded.class_names, out_dir=out_dir, classifier=classifier.net if classifier else None,
                           classifier_schedule=classifier.stage.schedule if classifier else None,
                           classifier_scales=list(cfg.classifier_scales), cfg_scales=list(cfg.cfg_scales),
                           num_samples=cfg.num_samples, batch_size=cfg.batch_size, sampler=cfg.sampler, steps=cfg.steps,
                           pr_k=cfg.pr_k, is_splits=cfg.is_splits, device=device, bf16=cfg.bf16, seed=cfg.seed,
                           progress=cfg.progress)
    report = {"features": features.description, "reference": ref_report, **sweep}
    if cfg.cas.enabled:  # on the samples of the lowest-FID setting
        best = min(sweep["guidance"], key=lambda r: r["fid"])
        report["cas"] = {"classifier_scale": best["classifier_scale"], "cfg_scale": best["cfg_scale"],
                         **classification_accuracy_score(
                             samples, labels, num_classes=len(loaded.class_names), train_data=train, val_data=val,
                             arch=cfg.cas.arch, steps=cfg.cas.steps, batch_size=cfg.cas.batch_size, lr=cfg.cas.lr,
                             eval_images=cfg.cas.eval_images, real_baseline=cfg.cas.real_baseline, device=device,
                             bf16=cfg.bf16, seed=cfg.seed, progress=cfg.progress)}
    for r in sweep["guidance"]:
        print(f"s={r['classifier_scale']:g} w={r['cfg_scale']:g}: FID {r['fid']:.2f}  IS {r['is']:.2f}  precision "
              f"{r['precision']:.3f}  recall {r['recall']:.3f}  requested-class accuracy {r['requested_class_accuracy']:.3f}")
    if "cas" in report:
        cas = report["cas"]
        print(f"CAS ({cas['arch']}, s={cas['classifier_scale']:g} w={cas['cfg_scale']:g}): top-1 {cas['top1']:.3f} top-5 "
              f"{cas['top5']:.3f}" + (f"; real data: top-1 {cas['real_data']['top1']:.3f}" if "real_data" in cas else ""))
    return report


def evaluate_upsampler(cfg: DictConfig, loaded: LoadedStage, train: Any, val: Any, inception: Any, out_dir: Path,
                       device: torch.device) -> dict[str, Any]:
    kind = feature_kind(cfg, loaded.payload["config"]["data"])
    reference, ref_report = None, None
    if kind == "classifier" and not cfg.features_path:
        reference, ref_report = judge(cfg, loaded, train, val, out_dir, device)
    features = feature_space(cfg, kind, inception, reference, ref_report, loaded, device)
    levels = [int(s) for s in cfg.aug_levels]
    sweep = aug_level_sweep(loaded.stage, loaded.net, val, aug_levels=levels, features=features, out_dir=out_dir,
                            num_images=cfg.num_images, crop=cfg.sr_crop, batch_size=cfg.sr_batch_size, sampler=cfg.sr_sampler,
                            steps=cfg.sr_steps, pr_k=cfg.pr_k, device=device, bf16=cfg.bf16, seed=cfg.seed,
                            progress=cfg.progress)
    best = select_level(sweep["levels"], cfg.select_by)
    plot_sr_sweep(sweep, best["aug_level"], cfg.select_by, out_dir / "sr_sweep.png")
    chosen_by = f"{'lowest' if cfg.select_by in LOWER_IS_BETTER else 'highest'} {cfg.select_by} over aug levels {levels}"
    report = {"features": features.description, "reference": ref_report, **sweep, "select_by": cfg.select_by,
              "chosen_aug_level": best["aug_level"], "chosen_by": chosen_by, "tuned_file": None}
    if cfg.write_tuned:
        report["tuned_file"] = str(write_tuned(cfg.ckpt, {"aug_level": best["aug_level"]}, chosen_by=chosen_by,
                                               step=loaded.payload["step"], report=out_dir / "metrics.json"))
    for r in sweep["levels"]:
        print(f"s={r['aug_level']}: PSNR {r['psnr']:.2f} (bicubic {r['psnr_bicubic']:.2f})  SSIM {r['ssim']:.3f} "
              f"(bicubic {r['ssim_bicubic']:.3f})  consistency {r['consistency_psnr']:.2f} dB  FID {r['fid']:.2f} "
              f"(bicubic {sweep['bicubic']['fid']:.2f})")
    print(f"chosen aug level: {best['aug_level']} ({chosen_by})" + (
        f"; wrote {report['tuned_file']}: cascade_sample.py now samples {loaded.name} at this level with this checkpoint "
        "(a flag or --replay still overrides; delete the file to undo)" if report["tuned_file"] else ""))
    return report


@hydra.main(config_path="../configs/evaluate", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        device = resolve_device(cfg.device)
        loaded = load(cfg.ckpt, device)
        out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.ckpt).resolve().parents[1] / "eval"
        out_dir.mkdir(parents=True, exist_ok=True)
        data = loaded.payload["config"]["data"]
        resolution = loaded.stage.resolution
        role = "classifier" if loaded.is_classifier else "upsampler" if loaded.is_upsampler else "base"
        train, val, held_out = held_out_data(data, resolution, role)  # never the training images (issue 20 item 5)
        report: dict[str, Any] = {"ckpt": str(cfg.ckpt), "stage": loaded.name, "step": loaded.payload["step"],
                                  "held_out": held_out, "settings": OmegaConf.to_container(cfg, resolve=True)}
        if loaded.is_classifier:
            report |= classifier_noise_accuracy(loaded.stage, loaded.net, val, out_dir=out_dir, buckets=cfg.eval_buckets,
                                                num_images=cfg.eval_images, device=device, seed=cfg.seed)
            accuracy = report["accuracy_by_t"].items()
            print("held-out accuracy by t: " + ", ".join(f"{k.removeprefix('acc_')} {v:.3f}" for k, v in accuracy))
        else:  # fail fast on missing Inception weights, before anything is trained or sampled
            kind = feature_kind(cfg, data)
            inception = InceptionFeatures(inception_weights(cfg.features_path), device) if kind == "inception" else None
            evaluate = evaluate_upsampler if loaded.is_upsampler else evaluate_base
            report |= evaluate(cfg, loaded, train, val, inception, out_dir, device)
        (out_dir / "metrics.json").write_text(json.dumps(json_ready(report), indent=2))
        print(f"wrote {out_dir / 'metrics.json'} and plots in {out_dir}")
    except (ValueError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
