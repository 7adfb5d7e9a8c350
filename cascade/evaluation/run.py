"""Evaluate one stage checkpoint: the orchestration behind ``scripts/evaluate_stage.py``.

The settings are ``configs/evaluate/evaluate.yaml`` (flat keys: they are the command line,
``steps=…``, ``sr_steps=…``), validated against :class:`EvaluationConfig`, and handed to each
role as its own typed view: :class:`GeneratorEvaluation` (guidance sweep, CAS),
:class:`UpsamplerEvaluation` (aug-level sweep, tuned file), :class:`ClassifierEvaluation`
(accuracy by noise level). The stage's role comes from the checkpoint.

Features of FID / IS / precision-recall are chosen explicitly: ``features=inception`` or
``features=classifier``, or ``auto``, which asks the data set what its images are
(:func:`cascade.data.image_domain`: natural → Inception, synthetic → a classifier trained on it).

Writes ``metrics.json``, the plots and grids of :mod:`cascade.evaluation.evaluate`, and for an
upsampler ``<ckpt>.tuned.json`` (:mod:`cascade.evaluation.tuned`).

The same command runs on one process or under ``torchrun --nproc_per_node=K`` (NCCL on GPUs, gloo
on CPUs; :func:`cascade.utils.distributed.init_distributed`): sampling, super-resolution, feature
extraction and the classifier's noisy accuracy are split over ranks by fixed batches, every image's
randomness is a function of (seed, image index), statistics are all-reduced (not images), and rank 0
writes the files — the figures of K ranks equal one process's (counts exactly, float sums to
rounding). The judges trained here (the reference classifier, CAS's classifier) train on rank 0
alone; the other ranks load the reference rank 0 saved.

The whole cascade's final-resolution FID is not a stage evaluation: sample the chain with
``scripts/sample_shards.py`` and score its last ``.npz`` with ``scripts/score_samples.py`` against a
reference at that resolution (README, "Sampling and evaluation at the papers' scale"); CAS of such a
file: ``scripts/cas_score.py`` (:func:`cas_from_npz`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import torch
from hydra.utils import get_class
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from torch.utils.data import Dataset

from cascade.data import ShapesDataset, image_domain
from cascade.evaluation.evaluate import (
    LOWER_IS_BETTER,
    FeatureSpace,
    aug_level_sweep,
    classification_accuracy_score,
    classifier_noise_accuracy,
    faithful_levels,
    guidance_sweep,
    json_ready,
    plot_sr_sweep,
    random_subset,
    reference_classifier,
    select_level,
    setting_name,
)
from cascade.evaluation.features import InceptionFeatures, NoisyClassifierFeatures, TimmFeatures, inception_weights
from cascade.evaluation.held_out import held_out_data, shown_classes, without_augmentation
from cascade.evaluation.previews import held_out_by_class
from cascade.evaluation.tuned import write_tuned
from cascade.training.checkpoint import LoadedStage, guide_problem, open_stage
from cascade.utils.device import resolve_device
from cascade.utils.distributed import barrier, init_distributed, rank_world

__all__ = [
    "ReferenceSettings",
    "CasSettings",
    "EvaluationConfig",
    "GeneratorEvaluation",
    "UpsamplerEvaluation",
    "ClassifierEvaluation",
    "FeatureKind",
    "evaluation_config",
    "feature_kind",
    "evaluate_checkpoint",
]

FeatureKind = Literal["inception", "classifier"]


@dataclass
class ReferenceSettings:
    """The clean-image judge, trained from scratch on the checkpoint's own data set."""

    arch: str = "resnet18"
    steps: int = 400
    batch_size: int = 64
    lr: float = 2.0e-3
    ckpt: Optional[str] = None  # reuse a saved one; otherwise trained and saved to out_dir/reference_<arch>[_crop<c>].pt
    eval_images: int = 1000


@dataclass
class ShapeJudgeSettings(ReferenceSettings):
    """The base's colour-blind judge: a reference classifier that sees luminance only (geometry, not colour)."""

    enabled: bool = True


@dataclass
class CasSettings:
    """Classification Accuracy Score (CDM §4.1) of the base's best setting."""

    enabled: bool = True
    arch: str = "resnet50"
    steps: int = 400
    batch_size: int = 64
    lr: float = 2.0e-3
    real_baseline: bool = True
    eval_images: int = 1000


@dataclass
class EvaluationConfig:
    """The schema of ``configs/evaluate/evaluate.yaml`` (its comments say what each key does)."""

    ckpt: str = MISSING
    classifier_ckpt: Optional[str] = None
    guide_ckpt: Optional[str] = None  # base: an earlier checkpoint of the same run, for autoguidance (guide_scales ≠ 1)
    data: Optional[Dict[str, Any]] = None  # evaluation images named on the command line (default: the checkpoint's data)
    out_dir: Optional[str] = None
    device: str = "auto"
    bf16: bool = True
    seed: int = 0
    progress: bool = True
    # features (every role that measures distributions)
    features: str = "auto"  # inception | classifier | auto
    features_path: Optional[str] = None
    crop: int = 256
    tiles_per_image: Optional[int] = 16
    pr_k: int = 3
    pr_num: int = 10000  # precision/recall on the first pr_num images of each set (ADM: its 10k reference subset)
    is_splits: int = 10
    feature_batch_size: int = 100
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    shape_judge: ShapeJudgeSettings = field(default_factory=ShapeJudgeSettings)
    # generator
    sampler: str = "dpmpp_2m"
    steps: int = 25
    num_samples: int = 10000
    num_real: int = 10000
    batch_size: int = 50
    classifier_scales: List[float] = field(default_factory=lambda: [0.0, 1.0, 3.0])
    cfg_scales: List[float] = field(default_factory=lambda: [1.0])
    guide_scales: List[float] = field(default_factory=lambda: [1.0])
    cas: CasSettings = field(default_factory=CasSettings)
    # upsampler
    aug_levels: List[int] = field(default_factory=lambda: [0, 25, 50, 100, 200, 300])
    select_by: str = "fid"
    select_max_loss: Optional[Dict[str, float]] = None  # e.g. {psnr: 1.0, ssim: 0.05}: only levels this close to bicubic compete
    write_tuned: bool = True
    num_images: int = 1000
    sr_crop: Optional[int] = None
    sr_batch_size: int = 8
    sr_steps: int = 25
    sr_sampler: str = "dpmpp_2m"
    enforce_consistency: Optional[bool] = None  # project outputs onto their low-res inputs; null: the checkpoint's default
    # classifier
    eval_buckets: int = 4
    eval_images: int = 1000

    def generator(self) -> GeneratorEvaluation:
        return GeneratorEvaluation(
            sampler=self.sampler,
            steps=self.steps,
            batch_size=self.batch_size,
            num_samples=self.num_samples,
            num_real=self.num_real,
            classifier_scales=list(self.classifier_scales),
            cfg_scales=list(self.cfg_scales),
            guide_scales=list(self.guide_scales),
            classifier_ckpt=self.classifier_ckpt,
            guide_ckpt=self.guide_ckpt,
            cas=self.cas,
        )

    def upsampler(self) -> UpsamplerEvaluation:
        return UpsamplerEvaluation(
            sampler=self.sr_sampler,
            steps=self.sr_steps,
            batch_size=self.sr_batch_size,
            aug_levels=[int(s) for s in self.aug_levels],
            select_by=self.select_by,
            max_loss=None if self.select_max_loss is None else dict(self.select_max_loss),
            write_tuned=self.write_tuned,
            num_images=self.num_images,
            crop=self.sr_crop,
            enforce_consistency=self.enforce_consistency,
        )

    def classifier(self) -> ClassifierEvaluation:
        return ClassifierEvaluation(buckets=self.eval_buckets, num_images=self.eval_images)


@dataclass
class GeneratorEvaluation:
    """A generator's guidance sweep: every (classifier scale, CFG scale, autoguidance scale) from the same seed."""

    sampler: str
    steps: int
    batch_size: int
    num_samples: int  # generated images per setting
    num_real: int  # real training images compared with
    classifier_scales: list[float]
    cfg_scales: list[float]
    guide_scales: list[float]
    classifier_ckpt: str | None
    guide_ckpt: str | None
    cas: CasSettings


@dataclass
class UpsamplerEvaluation:
    """An upsampler's sweep over augmentation levels on held-out images, and the level it picks."""

    sampler: str
    steps: int
    batch_size: int
    aug_levels: list[int]
    select_by: str
    max_loss: dict[str, float] | None  # metric → how far below bicubic's a level may be and still be chosen
    write_tuned: bool
    num_images: int
    crop: int | None  # super-resolve the central aligned crop of this hi-res size
    enforce_consistency: bool | None  # project outputs onto their low-res inputs; None: the stage's default

    def __post_init__(self) -> None:
        if self.max_loss is not None:
            faithful_levels([], self.max_loss)  # checks the margins before any sampling


@dataclass
class ClassifierEvaluation:
    """A noisy classifier's held-out accuracy per t-bucket."""

    buckets: int
    num_images: int


def evaluation_config(cfg: DictConfig | dict[str, Any]) -> EvaluationConfig:
    """The typed settings of a composed hydra config (interpolations resolved); one-line ValueError if they do not fit."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvaluationConfig), data))
    except OmegaConfBaseException as error:
        raise ValueError(f"the evaluation settings do not fit: {str(error).splitlines()[0]}") from None


def feature_kind(features: str, data: dict[str, Any]) -> FeatureKind:
    """``features`` as given, or for ``auto`` what the training data set declares about its images."""
    if features not in ("auto", "inception", "classifier"):
        raise ValueError(f"features={features} is unknown; use inception, classifier or auto")
    if features == "auto":
        return "inception" if image_domain(get_class(data["train"]["_target_"])) == "natural" else "classifier"
    return features  # type: ignore[return-value]


def _judge(
    cfg: EvaluationConfig,
    loaded: LoadedStage,
    train: Dataset,
    val: Dataset,
    out_dir: Path,
    device: torch.device,
    view: Literal["colour", "shape"] = "colour",
) -> tuple[nn.Module, dict[str, Any]]:
    """The reference classifier (trained on random ``crop`` crops of images larger than ``crop``) and its report.

    ``view="shape"``: the colour-blind judge (``cfg.shape_judge``: luminance only), saved as ``reference_shape_<arch>.pt``.
    """
    crop = cfg.crop if cfg.crop < loaded.stage.resolution else None
    ref = cfg.shape_judge if view == "shape" else cfg.reference
    name = "reference_" + ("shape_" if view == "shape" else "") + ref.arch + (f"_crop{crop}" if crop else "") + ".pt"
    path = Path(ref.ckpt) if ref.ckpt else out_dir / name
    rank, _ = rank_world()
    if rank != 0:  # rank 0 trains (or checks) and saves the judge first; the others load that file
        barrier()
    judged = reference_classifier(
        path,
        explicit=bool(ref.ckpt),
        view=view,
        arch=ref.arch,
        crop=crop,
        train_data=train,
        val_data=val,
        steps=ref.steps,
        batch_size=ref.batch_size,
        lr=ref.lr,
        eval_images=ref.eval_images,
        device=device,
        bf16=cfg.bf16,
        seed=cfg.seed,
        progress=cfg.progress and rank == 0,
    )
    if rank == 0:
        barrier()
    return judged


def _feature_space(
    cfg: EvaluationConfig,
    kind: FeatureKind,
    inception: Any,
    reference: nn.Module | None,
    ref_report: dict | None,
    loaded: LoadedStage,
    device: torch.device,
) -> FeatureSpace:
    if kind == "inception":
        extractor = inception
    elif cfg.features_path:  # a noisy classifier checkpoint at t = 0
        clf = open_stage(cfg.features_path, device)
        if not clf.is_classifier or clf.class_names != loaded.class_names:
            raise ValueError(
                f"features_path={cfg.features_path} must be a noisy-classifier checkpoint of the same classes "
                f"as {cfg.ckpt} (it is a {clf.name!r} checkpoint of {len(clf.class_names)} classes)"
            )
        extractor = NoisyClassifierFeatures(
            clf.net,
            clf.stage.schedule.timesteps[:1],
            input_size=clf.stage.resolution,
            description=f"classifier: noisy classifier {cfg.features_path} at t=0, attention-pooled features",
        )
    else:
        size = ref_report["crop"] or loaded.stage.resolution
        extractor = TimmFeatures(
            reference,
            input_size=size,
            description=f"classifier: reference {cfg.reference.arch} trained "
            f"from scratch on this data set ({size}px), pre-logits features",
        )
    crop = extractor.input_size or cfg.crop
    return FeatureSpace(extractor, crop=crop, tiles_per_image=cfg.tiles_per_image, batch_size=cfg.feature_batch_size)


def open_guide(path: str, loaded: LoadedStage, device: torch.device) -> LoadedStage:
    """The autoguidance guide at ``path``: a checkpoint of the same generator (:func:`guide_problem` says what must match)."""
    guide = open_stage(path, device)
    problem = guide_problem(guide, loaded)
    if problem is not None:
        raise ValueError(f"guide_ckpt={problem}")
    return guide


def _evaluate_generator(
    cfg: EvaluationConfig,
    kind: FeatureKind,
    loaded: LoadedStage,
    train: Dataset,
    val: Dataset,
    inception: Any,
    out_dir: Path,
    device: torch.device,
    judge_train: Dataset,
) -> dict[str, Any]:
    run = cfg.generator()
    guide = open_guide(run.guide_ckpt, loaded, device) if run.guide_ckpt else None  # before any work: a wrong path fails at once
    reference, ref_report = _judge(cfg, loaded, judge_train, val, out_dir, device)
    shape_judge, shape_report = (
        _judge(cfg, loaded, judge_train, val, out_dir, device, view="shape") if cfg.shape_judge.enabled else (None, None)
    )
    features = _feature_space(cfg, kind, inception, reference, ref_report, loaded, device)
    real = features.of_dataset(train, random_subset(len(train), run.num_real, cfg.seed), pr_num=cfg.pr_num, progress=cfg.progress)
    classifier = open_stage(run.classifier_ckpt, device) if run.classifier_ckpt else None
    if classifier is not None and not classifier.is_classifier:
        raise ValueError(f"classifier_ckpt={run.classifier_ckpt} is a {classifier.name!r} checkpoint, not a noisy classifier")
    shown = shown_classes(train)  # a few synsets of ImageNet: request only the classes the real images show
    requested = None if shown is None else sorted(shown)
    requested_rows = (requested or list(range(len(loaded.class_names))))[:10]  # the classes of the sample grids' rows
    sweep, samples, labels = guidance_sweep(
        loaded.stage,
        loaded.net,
        reference=reference,
        shape_judge=shape_judge,
        features=features,
        real_features=real,
        class_names=loaded.class_names,
        out_dir=out_dir,
        classes=requested,
        held_out=held_out_by_class(val, requested_rows, 2),  # each grid row starts with 2 held-out images of its class
        classifier=classifier.net if classifier else None,
        classifier_schedule=classifier.stage.schedule if classifier else None,
        classifier_scales=run.classifier_scales,
        cfg_scales=run.cfg_scales,
        guide=guide.net if guide else None,
        guide_scales=run.guide_scales,
        num_samples=run.num_samples,
        batch_size=run.batch_size,
        sampler=run.sampler,
        steps=run.steps,
        pr_k=cfg.pr_k,
        pr_num=cfg.pr_num,
        is_splits=cfg.is_splits,
        device=device,
        bf16=cfg.bf16,
        seed=cfg.seed,
        progress=cfg.progress,
        keep_best=run.cas.enabled,
    )
    report = {"features": features.description, "reference": ref_report, "shape_judge": shape_report, **sweep}
    if guide is not None:
        report["guide"] = guide.describe()
    rank, _ = rank_world()
    if run.cas.enabled and rank == 0:  # on the samples of the lowest-FID setting, gathered on rank 0
        best = min(sweep["guidance"], key=lambda r: r["fid"])
        cas = run.cas
        report["cas"] = {
            "classifier_scale": best["classifier_scale"],
            "cfg_scale": best["cfg_scale"],
            "guide_scale": best["guide_scale"],
            **classification_accuracy_score(
                samples,
                labels,
                num_classes=len(loaded.class_names),
                train_data=judge_train,
                val_data=val,
                arch=cas.arch,
                steps=cas.steps,
                batch_size=cas.batch_size,
                lr=cas.lr,
                eval_images=cas.eval_images,
                real_baseline=cas.real_baseline,
                device=device,
                bf16=cfg.bf16,
                seed=cfg.seed,
                progress=cfg.progress,
            ),
        }
    if run.cas.enabled:
        barrier()  # the other ranks wait while rank 0 trains CAS's classifier
    for r in sweep["guidance"] if rank == 0 else []:
        print(
            f"{setting_name(r['classifier_scale'], r['cfg_scale'], r['guide_scale'])}: FID {r['fid']:.2f}  IS {r['is']:.2f}  precision "
            f"{r['precision']:.3f}  recall {r['recall']:.3f}  requested-class accuracy {r['requested_class_accuracy']:.3f}"
            + (f" (shape judge {r['shape_accuracy']:.3f})" if "shape_accuracy" in r else "")
        )
        if "shape_accuracy" in r:
            classes = sweep["requested_classes"] or range(len(loaded.class_names))
            pairs = zip(classes, r["per_class_accuracy"], r["per_class_shape_accuracy"])
            print(
                "  per class, colour / shape judge: " + ", ".join(f"{loaded.class_names[c]} {a:.2f}/{b:.2f}" for c, a, b in pairs)
            )
    if "cas" in report and rank == 0:
        cas_report = report["cas"]
        print(
            f"CAS ({cas_report['arch']}, {setting_name(cas_report['classifier_scale'], cas_report['cfg_scale'], cas_report['guide_scale'])}): top-1 "
            f"{cas_report['top1']:.3f} top-5 {cas_report['top5']:.3f}"
            + (f"; real data: top-1 {cas_report['real_data']['top1']:.3f}" if "real_data" in cas_report else "")
        )
    return report


def _evaluate_upsampler(
    cfg: EvaluationConfig,
    kind: FeatureKind,
    loaded: LoadedStage,
    train: Dataset,
    val: Dataset,
    inception: Any,
    out_dir: Path,
    device: torch.device,
    judge_train: Dataset,
) -> dict[str, Any]:
    run = cfg.upsampler()
    reference, ref_report = None, None
    if kind == "classifier" and not cfg.features_path:
        reference, ref_report = _judge(cfg, loaded, judge_train, val, out_dir, device)
    features = _feature_space(cfg, kind, inception, reference, ref_report, loaded, device)
    augmented = loaded.stage.noise_augmentation  # ADM's upsamplers have none: one pass, no level to choose
    redraw = None
    if isinstance(val, ShapesDataset):  # the built-in data re-renders a scene with the detail the low-res cannot show redrawn
        lowres_resolution = loaded.stage.lowres_resolution

        def redraw(index: int, generator: torch.Generator) -> torch.Tensor:
            return val.redrawn(index, lowres_resolution, generator)

    sweep = aug_level_sweep(
        loaded.stage,
        loaded.net,
        val,
        aug_levels=run.aug_levels if augmented else [None],
        features=features,
        out_dir=out_dir,
        num_images=run.num_images,
        crop=run.crop,
        batch_size=run.batch_size,
        sampler=run.sampler,
        steps=run.steps,
        pr_k=cfg.pr_k,
        pr_num=cfg.pr_num,
        device=device,
        bf16=cfg.bf16,
        seed=cfg.seed,
        progress=cfg.progress,
        redraw=redraw,
        enforce_consistency=run.enforce_consistency,
    )
    rank, _ = rank_world()
    if sweep["enforce_consistency"] and rank == 0:
        print(
            f"{loaded.name}'s outputs are projected onto their low-res inputs (enforce_consistency): the consistency "
            "figures are exact up to the final clamp to [-1, 1]; PSNR, SSIM, HF ratio and FID say what the model adds"
        )
    bound = sweep["realistic_bound"]
    if bound is not None and rank == 0:
        print(
            f"realistic bound (the truth with the detail its low-res input cannot show redrawn): PSNR {bound['psnr']:.2f}  "
            f"SSIM {bound['ssim']:.3f}  consistency {bound['consistency_psnr']:.2f} dB  HF ratio {bound['hf_ratio']:.2f}  "
            f"FID {bound['fid']:.2f}"
        )
    if not augmented:
        (r,) = sweep["levels"]
        if rank == 0:
            print(
                f"no noise augmentation: PSNR {r['psnr']:.2f} (bicubic {r['psnr_bicubic']:.2f})  SSIM {r['ssim']:.3f} (bicubic "
                f"{r['ssim_bicubic']:.3f})  consistency {r['consistency_psnr']:.2f} dB  FID {r['fid']:.2f} "
                f"(bicubic {sweep['bicubic']['fid']:.2f}); {loaded.name} has no aug level to choose, no tuned file written"
            )
        return {"features": features.description, "reference": ref_report, **sweep, "noise_augmentation": False}
    faithful = sweep["levels"] if run.max_loss is None else faithful_levels(sweep["levels"], run.max_loss)
    best = select_level(faithful or sweep["levels"], run.select_by)
    if rank == 0:
        plot_sr_sweep(sweep, best["aug_level"], run.select_by, out_dir / "sr_sweep.png")
    chosen_by = f"{'lowest' if run.select_by in LOWER_IS_BETTER else 'highest'} {run.select_by} over aug levels {run.aug_levels}"
    if run.max_loss is not None:
        within = " and ".join(
            f"{margin:g}{' dB' if m == 'psnr' else ''} of bicubic's {m.upper()}" for m, margin in run.max_loss.items()
        )
        chosen_by += f" within {within}" if faithful else f" (none is within {within}: chosen over all of them)"
    report = {
        "features": features.description,
        "reference": ref_report,
        **sweep,
        "select_by": run.select_by,
        "select_max_loss": run.max_loss,
        "chosen_aug_level": best["aug_level"],
        "chosen_by": chosen_by,
        "tuned_file": None,
    }
    if run.write_tuned and rank == 0:
        report["tuned_file"] = str(
            write_tuned(
                cfg.ckpt,
                {"aug_level": best["aug_level"]},
                chosen_by=chosen_by,
                step=loaded.payload["step"],
                report=out_dir / "metrics.json",
            )
        )
    for r in sweep["levels"] if rank == 0 else []:
        print(
            f"s={r['aug_level']}: PSNR {r['psnr']:.2f} (bicubic {r['psnr_bicubic']:.2f})  SSIM {r['ssim']:.3f} "
            f"(bicubic {r['ssim_bicubic']:.3f})  consistency {r['consistency_psnr']:.2f} dB  HF ratio {r['hf_ratio']:.2f} "
            f"(bicubic {r['hf_ratio_bicubic']:.2f})  FID {r['fid']:.2f} (bicubic {sweep['bicubic']['fid']:.2f})"
        )
    if rank != 0:
        return report
    print(
        f"chosen aug level: {best['aug_level']} ({chosen_by})"
        + (
            f"; wrote {report['tuned_file']}: cascade_sample.py now samples {loaded.name} at this level with this checkpoint "
            "(a flag or --replay still overrides; delete the file to undo)"
            if report["tuned_file"]
            else ""
        )
    )
    return report


def _evaluate_classifier(
    cfg: EvaluationConfig, loaded: LoadedStage, val: Dataset, out_dir: Path, device: torch.device
) -> dict[str, Any]:
    run = cfg.classifier()
    report = classifier_noise_accuracy(
        loaded.stage,
        loaded.net,
        val,
        out_dir=out_dir,
        buckets=run.buckets,
        num_images=run.num_images,
        device=device,
        seed=cfg.seed,
    )
    accuracy = report["accuracy_by_t"].items()
    if rank_world()[0] == 0:
        print("held-out accuracy by t: " + ", ".join(f"{k.removeprefix('acc_')} {v:.3f}" for k, v in accuracy))
    return report


def evaluation_data(cfg: EvaluationConfig, loaded: LoadedStage) -> dict[str, Any]:
    """The data config evaluation reads: ``cfg.data`` when named, else the one the stage trained on.

    A checkpoint converted from another project's release (``scripts/convert_checkpoint.py``) has no
    data config: without ``data=…`` it is refused with one line naming the fix.
    """
    if cfg.data is not None:
        if not isinstance(cfg.data.get("train"), dict) or "_target_" not in cfg.data["train"]:
            raise ValueError("data= names no data set (no data.train._target_); use data=imagefolder data.root=FOLDER")
        return cfg.data
    data = loaded.payload["config"].get("data")
    if data is None:
        source = loaded.payload.get("source") or {}
        origin = f"converted from {source['format']} {source['file']}" if "file" in source else "written without training"
        example = (
            " (ImageNet's val/ in its synset folders, n01440764 …: the labels follow ADM's sorted-synset order)"
            if len(loaded.class_names) == 1000
            else ""
        )
        raise ValueError(
            f"{cfg.ckpt} was {origin} and carries no data config to take evaluation images from; name them: "
            f"data=imagefolder data.root=FOLDER_OF_CLASS_FOLDERS{example}"
        )
    return data


def evaluate_checkpoint(cfg: EvaluationConfig) -> tuple[dict[str, Any], Path]:
    """Evaluate the stage in ``cfg.ckpt`` by its role; write ``metrics.json`` and the plots. Returns (report, out_dir).

    Under ``torchrun`` (a process group already joined, or joined here from the environment) every
    rank returns the same report and rank 0 writes the files.
    """
    rank, world, device = init_distributed(str(resolve_device(cfg.device)))
    if device.type == "cuda":  # the same kernels for the same batch on every run
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    loaded = open_stage(cfg.ckpt, device)
    data = evaluation_data(cfg, loaded)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.ckpt).resolve().parents[1] / "eval"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    resolution = loaded.stage.resolution
    role = "classifier" if loaded.is_classifier else "upsampler" if loaded.is_upsampler else "base"
    # Never the training images, labels in the stage's class order; metrics see the images themselves (no random
    # flip), the judges train with the augmentation.
    named = cfg.data is not None
    train, val, held_out = held_out_data(
        without_augmentation(data), resolution, role, class_names=loaded.class_names, named=named
    )
    judge_train = (
        held_out_data(data, resolution, role, class_names=loaded.class_names, named=named)[0] if role == "base" else train
    )
    report: dict[str, Any] = {
        "ckpt": str(cfg.ckpt),
        "stage": loaded.name,
        "step": loaded.payload["step"],
        "source": loaded.payload.get("source"),  # a converted checkpoint's original file (name, sha256)
        "data": data,
        "held_out": held_out,
        "settings": asdict(cfg),
    }
    if loaded.is_classifier:
        report |= _evaluate_classifier(cfg, loaded, val, out_dir, device)
    else:  # fail fast on missing Inception weights, before anything is trained or sampled
        kind = feature_kind(cfg.features, data)
        inception = InceptionFeatures(inception_weights(cfg.features_path), device) if kind == "inception" else None
        evaluate = _evaluate_upsampler if loaded.is_upsampler else _evaluate_generator
        report |= evaluate(cfg, kind, loaded, train, val, inception, out_dir, device, judge_train)
    report["world_size"] = world
    if rank == 0:
        (out_dir / "metrics.json").write_text(json.dumps(json_ready(report), indent=2))
    barrier()
    return report, out_dir
