"""Evaluation: metrics against closed forms and constructed cases, feature extractors, the tuned aug level, the CLI."""

from __future__ import annotations

import json
import math
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cascade.data.resize import downsample
from cascade.evaluation import features as features_module
from cascade.evaluation.evaluate import (
    classification_accuracy_score,
    faithful_levels,
    json_ready,
    reference_classifier,
    select_level,
)
from cascade.evaluation.features import FeatureError, InceptionFeatures, inception_weights, tiles
from cascade.evaluation.fid import fid, frechet_distance, inception_score, knn_radii, precision_recall
from cascade.evaluation.metrics import ShapeJudge, colour_blind, luminance, psnr, ssim, super_resolution_metrics, topk_accuracy
from cascade.evaluation.run import evaluation_config, feature_kind
from cascade.evaluation.tuned import read_tuned, tuned_path, write_tuned
from cascade.pipeline.job import settings_from_argv
from tests.helpers import CONFIGS, run_script

CPU = torch.device("cpu")


# --- Fréchet distance ------------------------------------------------------------------------------


def test_frechet_distance_of_diagonal_gaussians_is_mean_gap_plus_std_gaps():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    std1, std2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 0.5, 0.5])
    expected = float((mu1 - mu2).square().sum() + (std1 - std2).square().sum())  # Tr(Σ1+Σ2−2(Σ1Σ2)^½) = Σ(σ1−σ2)²
    assert frechet_distance(mu1, torch.diag(std1**2), mu2, torch.diag(std2**2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_non_commuting_2d_gaussians_matches_the_2x2_square_root():
    # For a 2×2 PSD M, Tr √M = √(Tr M + 2√det M); with M = Σ1^½ Σ2 Σ1^½: Tr M = Tr Σ1Σ2, det M = det Σ1 det Σ2.
    s1 = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[0.5, -0.3], [-0.3, 1.5]], dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([-0.2, 0.4], dtype=torch.float64)
    cross = math.sqrt(float(torch.trace(s1 @ s2)) + 2 * math.sqrt(float(torch.det(s1) * torch.det(s2))))
    expected = float((mu1 - mu2).square().sum()) + float(s1.trace() + s2.trace()) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero_and_of_two_gaussian_samples_near_the_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g)  # fewer samples than a full-rank covariance would like: still ≈ 0
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)
    a = torch.randn(20000, 3, generator=g)  # N(0, I)
    b = torch.randn(20000, 3, generator=g) * 2 + 1  # N(1, 4I): d² = 3·1 + 3·(1 − 2)² = 6
    assert fid(a, b) == pytest.approx(6.0, abs=0.15)


# --- precision / recall ------------------------------------------------------------------------------


def test_knn_radii_on_a_line():
    points = torch.arange(10.0)[:, None]  # 0, 1, …, 9
    assert knn_radii(points, k=3).tolist() == [3, 2, 2, 2, 2, 2, 2, 2, 2, 3]


def test_precision_recall_of_identical_and_disjoint_sets():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone(), k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_of_a_constructed_case():
    # k = 1. Real {0, 1, 10, 11, 30}: radii 1, 1, 1, 1, 19. Fake {0.5, 5, 10.2}: radii 4.5, 4.5, 5.2.
    # Precision: 0.5 (in 0's ball) and 10.2 (in 10's) are inside, 5 is not → 2/3.
    # Recall: 0, 1, 10, 11 are inside fake balls, 30 is not (19.8 from 10.2 > 5.2) → 4/5.
    real = torch.tensor([0.0, 1.0, 10.0, 11.0, 30.0])[:, None]
    fake = torch.tensor([0.5, 5.0, 10.2])[:, None]
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3) and recall == pytest.approx(4 / 5)


# --- Inception Score -----------------------------------------------------------------------------------


def test_inception_score_bounds_and_a_hand_computed_case():
    confident = torch.eye(5).repeat(4, 1)  # every class equally often, each image certain: IS = number of classes
    assert inception_score(confident, splits=1)[0] == pytest.approx(5.0)
    assert inception_score(torch.full((20, 5), 0.2), splits=2) == (pytest.approx(1.0), pytest.approx(0.0))
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # p(y) = (0.75, 0.25)
    kl = [math.log(1 / 0.75), 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)]
    assert inception_score(probs, splits=1)[0] == pytest.approx(math.exp(sum(kl) / 2))


# --- PSNR / SSIM, top-k, selection -----------------------------------------------------------------------


def test_psnr_ssim_of_identical_and_offset_images():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5  # [−0.5, 0.5] in [−1, 1] units
    assert psnr(x, x) == math.inf and ssim(x, x) == pytest.approx(1.0)
    # An offset of 0.1 in [−1, 1] is 0.05 on [0, 1]: PSNR = 10 log10(1 / 0.05²).
    assert psnr(x + 0.1, x) == pytest.approx(10 * math.log10(1 / 0.05**2), rel=1e-4)
    assert ssim(x + 0.1, x) < 1.0


def test_super_resolution_metrics_of_the_ground_truth():
    hi = F.interpolate(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, size=32, mode="bilinear")
    m = super_resolution_metrics(hi, hi, downsample(hi, 4), 4)
    assert m["psnr"] == math.inf and m["ssim"] == pytest.approx(1.0) and m["hf_ratio"] == pytest.approx(1.0)
    assert m["consistency_psnr"] == math.inf  # the truth downsampled is exactly its low-res input
    assert m["psnr_bicubic"] < 60 and m["hf_ratio_bicubic"] < 1.0
    assert json.loads(json.dumps(json_ready(m)))["psnr"] == "inf"  # strict JSON


def test_topk_accuracy():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    accuracy = topk_accuracy(logits, torch.tensor([0, 1, 2]), ks=(1, 2))
    assert accuracy == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}


def test_select_level_by_metric_direction_and_ties():
    sweep = [
        {"aug_level": 0, "fid": 5.0, "psnr": 20.0},
        {"aug_level": 50, "fid": 3.0, "psnr": 20.0},
        {"aug_level": 100, "fid": 3.0, "psnr": 19.0},
    ]
    assert select_level(sweep, "fid")["aug_level"] == 50  # lowest FID; the tie with 100 goes to the lower level
    assert select_level(sweep, "psnr")["aug_level"] == 0
    with pytest.raises(ValueError, match="select_by='lpips' is not a metric of the sweep; choose one of: fid, psnr"):
        select_level(sweep, "lpips")


def test_faithful_levels_keep_a_noisy_level_from_winning_on_fid():
    """The tiny sr256's sweep: s = 100 has the lowest FID only because the conditioning's noise reaches the output."""
    sweep = [
        {"aug_level": 0, "fid": 14.9, "psnr": 27.47, "psnr_bicubic": 27.24, "ssim": 0.907, "ssim_bicubic": 0.913},
        {"aug_level": 50, "fid": 11.7, "psnr": 26.30, "psnr_bicubic": 27.24, "ssim": 0.870, "ssim_bicubic": 0.913},
        {"aug_level": 100, "fid": 9.7, "psnr": 24.35, "psnr_bicubic": 27.24, "ssim": 0.408, "ssim_bicubic": 0.913},
    ]
    assert select_level(sweep, "fid")["aug_level"] == 100
    assert [r["aug_level"] for r in faithful_levels(sweep, {"psnr": 1.0, "ssim": 0.05})] == [0, 50]
    assert select_level(faithful_levels(sweep, {"psnr": 1.0, "ssim": 0.05}), "fid")["aug_level"] == 50
    assert [r["aug_level"] for r in faithful_levels(sweep, {"psnr": 0.5})] == [0]
    assert faithful_levels(sweep, {"ssim": 0.001}) == []  # the caller then chooses over all levels and says so
    for bad in ({"fid": 1.0}, {"psnr": -1.0}):
        with pytest.raises(ValueError, match="must map psnr / ssim to margins >= 0"):
            faithful_levels(sweep, bad)
    with pytest.raises(ValueError, match="must map psnr / ssim"):  # refused when the settings are read, before sampling
        evaluation_config({"ckpt": "x.pt", "select_max_loss": {"lpips": 0.1}}).upsampler()


def test_tiles_are_aligned_and_paired_between_sets():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    every = tiles(images, 4)
    assert every.shape == (8, 3, 4, 4) and torch.equal(every[1], images[0, :, 0:4, 4:8])
    some, again = tiles(images, 4, per_image=2, seed=3), tiles(images + 1, 4, per_image=2, seed=3)
    assert some.shape == (4, 3, 4, 4) and torch.equal(some + 1, again)  # the same positions in both sets
    assert tiles(images, 8) is images


# --- feature extractors ----------------------------------------------------------------------------------


def test_no_inception_weights_and_no_network_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(features_module, "download_url_to_file", offline)
    with pytest.raises(FeatureError) as error:
        inception_weights(None)
    message = str(error.value)
    assert "\n" not in message and "could not be downloaded" in message
    assert "features_path=/path/to/weights-inception-2015-12-05-6726825d.pth" in message
    with pytest.raises(FeatureError, match="features_path=nope.pth does not exist"):
        inception_weights("nope.pth")


def test_inception_features_load_from_a_weights_file(tmp_path, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    # The network with random weights, saved as a weights file (the real one is downloaded or given by the user).
    with monkeypatch.context() as m:
        m.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, strict=True: None)
        torch.save(fidelity.FeatureExtractorInceptionV3("x", ["2048"]).state_dict(), tmp_path / "inception.pth")
    extractor = InceptionFeatures(inception_weights(tmp_path / "inception.pth"), CPU)
    feats, probs = extractor(torch.rand(1, 3, 64, 64) * 2 - 1)  # resized to 299px inside: one image is enough
    assert feats.shape == (1, 2048) and probs.shape == (1, 1008)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(FeatureError, match="is not the FID Inception weights file"):
        InceptionFeatures(tmp_path / "other.pth", CPU)


class _Classes:
    num_classes = 10


def test_a_given_reference_checkpoint_of_another_recipe_is_refused(tmp_path):
    path = tmp_path / "ref.pt"
    torch.save({"arch": "resnet18", "crop": None, "num_classes": 3, "model": {}}, path)
    with pytest.raises(ValueError, match="reference.ckpt=.* was trained as .*'num_classes': 3.* needs .*'num_classes': 10"):
        reference_classifier(
            path,
            explicit=True,
            arch="resnet18",
            crop=None,
            train_data=_Classes(),
            val_data=[],
            steps=1,
            batch_size=1,
            lr=1e-3,
            eval_images=1,
            device=CPU,
            bf16=False,
            seed=0,
            progress=False,
        )


class _Colours(torch.utils.data.Dataset):
    """Class c is a flat 16px image of colour c (plus a little noise): trivially learnable."""

    num_classes = 4
    colours = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]]) * 0.8

    def __init__(self, n: int, seed: int) -> None:
        self.labels = torch.arange(n) % 4
        self.noise = 0.1 * torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.colours[self.labels[i], :, None, None] + self.noise[i], int(self.labels[i])


class _Stripes(torch.utils.data.Dataset):
    """Class 0: horizontal stripes, class 1: vertical ones, in a random colour pair each: geometry is the class."""

    num_classes = 2

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 2
        self.colours = torch.rand(n, 2, 3, 1, 1, generator=g) * 2 - 1  # (n, 2, 3, 1, 1): stripe and gap colour
        self.phase = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        bands = ((torch.arange(16) + self.phase[i]) // 2 % 2).float()  # (16,) 2px stripes
        mask = bands[:, None].expand(16, 16) if self.labels[i] == 0 else bands[None, :].expand(16, 16)  # (16, 16)
        return self.colours[i, 0] * mask + self.colours[i, 1] * (1 - mask), int(self.labels[i])


@pytest.mark.parametrize("data, shape_top1", [(_Stripes, (0.9, 1.0)), (_Colours, (0.0, 0.6))])
def test_shape_judge_names_geometry_and_cannot_name_colours(data, shape_top1, tmp_path):
    # The colour-blind judge sees luminance only, trained with random polarity, contrast and brightness: it learns
    # stripes' orientation whatever their colours, and cannot tell flat colours apart (chance 0.25), which the
    # ordinary reference learns at once.
    kwargs = dict(
        explicit=False,
        arch="test_resnet",
        crop=None,
        train_data=data(256, seed=0),
        val_data=data(64, seed=1),
        steps=40,
        batch_size=32,
        lr=2e-3,
        eval_images=64,
        device=CPU,
        bf16=False,
        seed=0,
        progress=False,
    )
    shape, report = reference_classifier(tmp_path / "shape.pt", view="shape", **kwargs)
    assert isinstance(shape, ShapeJudge) and report["view"] == "shape"
    assert shape_top1[0] <= report["held_out"]["top1"] <= shape_top1[1]
    _, colour = reference_classifier(tmp_path / "colour.pt", **kwargs)
    assert colour["held_out"]["top1"] >= 0.9
    images = torch.stack([data(4, seed=2)[i][0] for i in range(4)])
    recoloured = luminance(images)  # the same geometry in gray: the shape judge's view is unchanged
    torch.testing.assert_close(shape(recoloured), shape(images))
    again, _ = reference_classifier(tmp_path / "shape.pt", view="shape", **kwargs)  # loaded, not retrained
    torch.testing.assert_close(again(images), shape(images))


def test_colour_blind_views_are_luminance_with_random_polarity():
    images = torch.rand(64, 3, 8, 8) * 2 - 1
    view = colour_blind(images, torch.Generator().manual_seed(0))
    assert view.shape == images.shape and torch.equal(view[:, 0], view[:, 1]) and torch.equal(view[:, 0], view[:, 2])
    corr = torch.stack(
        [torch.corrcoef(torch.stack([v[0].flatten(), luminance(x[None])[0, 0].flatten()]))[0, 1] for v, x in zip(view, images)]
    )  # (64,)
    assert (corr > 0.99).sum() > 16 and (corr < -0.99).sum() > 16  # both polarities, each an affine map of luma
    assert torch.equal(view, colour_blind(images, torch.Generator().manual_seed(0)))


def test_cas_is_high_for_faithful_samples_and_zero_for_samples_of_the_wrong_class():
    real, held_out = _Colours(64, seed=0), _Colours(32, seed=1)
    images = torch.stack([real[i][0] for i in range(len(real))])
    samples = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # "generated": the right colours
    kwargs = dict(
        num_classes=4,
        train_data=real,
        val_data=held_out,
        arch="test_resnet",
        steps=20,
        batch_size=16,
        lr=2e-3,
        eval_images=32,
        device=CPU,
        bf16=False,
        progress=False,
    )
    faithful = classification_accuracy_score(samples, real.labels, real_baseline=True, **kwargs)
    assert faithful["top1"] >= 0.9 and faithful["real_data"]["top1"] >= 0.9 and faithful["train_images"] == 64
    wrong = classification_accuracy_score(samples, (real.labels + 1) % 4, real_baseline=False, **kwargs)  # class y drawn as y−1
    assert wrong["top1"] <= 0.1 and "real_data" not in wrong


# --- settings and the choice of features ---------------------------------------------------------------------


class _Undeclared(torch.utils.data.Dataset):
    """A data set that does not say what its images are."""


def test_auto_features_follow_what_the_data_set_declares():
    assert feature_kind("auto", {"train": {"_target_": "cascade.data.ShapesDataset"}}) == "classifier"
    assert feature_kind("auto", {"train": {"_target_": "cascade.data.ImageFolderDataset"}}) == "inception"
    assert feature_kind("inception", {"train": {"_target_": "cascade.data.ShapesDataset"}}) == "inception"
    with pytest.raises(ValueError, match="_Undeclared does not declare its image domain"):
        feature_kind("auto", {"train": {"_target_": f"{__name__}._Undeclared"}})
    with pytest.raises(ValueError, match="features=dino is unknown"):
        feature_kind("dino", {"train": {"_target_": "cascade.data.ShapesDataset"}})


def test_evaluation_settings_are_typed_per_role():
    cfg = evaluation_config({"ckpt": "x.pt", "steps": 3, "sr_steps": 5, "sr_batch_size": 2, "aug_levels": [0, 9]})
    assert (cfg.generator().steps, cfg.upsampler().steps, cfg.upsampler().batch_size) == (3, 5, 2)
    assert cfg.upsampler().aug_levels == [0, 9] and cfg.classifier().buckets == 4
    with pytest.raises(ValueError, match="the evaluation settings do not fit: .*sr_stepz"):
        evaluation_config({"ckpt": "x.pt", "sr_stepz": 5})


# --- the tuned aug level reaches the sampler ---------------------------------------------------------------


def sampling(*argv: str):
    """The merged sampling settings of ``cascade_sample.py argv…`` with the real configs/cascade.yaml."""
    return settings_from_argv(list(argv), CONFIGS / "cascade.yaml")


def test_tuned_level_is_a_layer_between_config_and_flags(tmp_path):
    ckpt = tmp_path / "sr256" / "last.pt"
    ckpt.parent.mkdir()
    flags = ["--class", "1", "--sr256-ckpt", str(ckpt)]
    assert sampling(*flags).config.upsamplers["sr256"].settings.aug_level is None
    write_tuned(ckpt, {"aug_level": 120}, chosen_by="lowest fid over aug levels [0, 120]", step=7, report="m.json")
    assert tuned_path(ckpt) == tmp_path / "sr256" / "last.tuned.json" and read_tuned(ckpt)["checkpoint"]["step"] == 7
    tuned = sampling(*flags)
    assert tuned.config.upsamplers["sr256"].settings.aug_level == 120
    assert tuned.source("sr256", "aug_level").startswith(str(tuned_path(ckpt)))
    flagged = sampling(*flags, "--sr256-aug-level", "30")
    assert (
        flagged.config.upsamplers["sr256"].settings.aug_level == 30
        and flagged.source("sr256", "aug_level") == "--sr256-aug-level"
    )
    tuned_path(ckpt).write_text("{not json")
    with pytest.raises(ValueError, match="last.tuned.json is not a tuned-settings file"):
        sampling(*flags)


# --- the CLI end to end ------------------------------------------------------------------------------------


def evaluate(cwd: Path, *overrides: str):
    return run_script("evaluate_stage.py", "device=cpu", "preset=tiny", "progress=false", *overrides, cwd=cwd)


@pytest.mark.slow
def test_upsampler_sweep_writes_a_level_that_cascade_sample_uses(smoke_runs, tmp_path):
    shutil.copytree(smoke_runs / "sr256", tmp_path / "sr256")  # the tuned file must not reach the shared smoke runs
    sr256 = tmp_path / "sr256" / "checkpoints" / "last.pt"
    result = evaluate(
        tmp_path,
        f"ckpt={sr256}",
        "out_dir=ev",
        "aug_levels=[7,30]",
        "num_images=4",
        "sr_crop=128",  # the mechanics, on a quarter of the pixels
        "sr_batch_size=4",
        "sr_steps=2",
        "reference.steps=2",
        "reference.batch_size=8",
        "reference.eval_images=8",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert [r["aug_level"] for r in report["levels"]] == [7, 30] and report["features"].startswith("classifier:")
    for key in ["psnr", "psnr_bicubic", "ssim", "ssim_bicubic", "consistency_psnr", "fid", "precision", "recall"]:
        assert key in report["levels"][0]
    bound = report["realistic_bound"]  # the held-out truth with its unresolvable detail redrawn: true to the input, as sharp
    assert bound["consistency_psnr"] > 35 and 0.8 < bound["hf_ratio"] < 1.25 and bound["psnr"] < 60
    assert "psnr_bicubic" not in bound and "realistic bound" in result.stdout
    chosen = report["chosen_aug_level"]
    faithful = faithful_levels(report["levels"], report["select_max_loss"])  # the tiny preset's fidelity bounds
    assert report["select_max_loss"] == {"psnr": 1.0, "ssim": 0.05}
    assert chosen == select_level(faithful or report["levels"], "fid")["aug_level"]
    assert ("within 1 dB of bicubic's PSNR and 0.05 of bicubic's SSIM" in report["chosen_by"]) == bool(faithful)
    assert read_tuned(sr256)["settings"] == {"aug_level": chosen}
    for png in ["sr_sweep.png", "sr_samples.png"]:
        assert (tmp_path / "ev" / png).is_file()

    sample = run_script(
        "cascade_sample.py",
        "--device",
        "cpu",
        "--class",
        "1",
        "--num",
        "1",
        "--stop-at",
        "256",
        "--base-ckpt",
        str(smoke_runs / "base" / "checkpoints" / "last.pt"),
        "--classifier-ckpt",
        "none",
        "--sr256-ckpt",
        str(sr256),
        "--base-steps",
        "2",
        "--sr256-steps",
        "2",
        "--out",
        "s",
        cwd=tmp_path,
    )
    assert sample.returncode == 0, sample.stderr[-2000:]
    entry = json.loads((tmp_path / "s" / "cascade.json").read_text())["stages"][1]
    assert entry["aug_level"] == chosen and entry["aug_level_source"].startswith(str(tuned_path(sr256)))
    assert f"sr256 aug level {chosen} from {tuned_path(sr256)}" in sample.stdout


@pytest.mark.slow
def test_base_evaluation_reports_fid_is_precision_recall_accuracy_and_cas(smoke_runs, tmp_path):
    base = smoke_runs / "base" / "checkpoints" / "last.pt"
    clf = smoke_runs / "classifier" / "checkpoints" / "last.pt"
    result = evaluate(
        tmp_path,
        f"ckpt={base}",
        f"classifier_ckpt={clf}",
        "out_dir=ev",
        "num_samples=8",
        "num_real=16",
        "batch_size=8",
        "steps=2",
        "classifier_scales=[0,1]",
        "cfg_scales=[1,2]",
        "reference.steps=2",
        "reference.batch_size=8",
        "reference.eval_images=8",
        "shape_judge.steps=2",
        "shape_judge.batch_size=8",
        "cas.steps=2",
        "is_splits=2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["stage"] == "base" and report["features"].startswith("classifier: reference resnet18")
    settings = sorted((g["classifier_scale"], g["cfg_scale"]) for g in report["guidance"])
    assert settings == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for g in report["guidance"]:
        assert g["fid"] >= 0 and 1 <= g["is"] <= 10 and 0 <= g["precision"] <= 1 and 0 <= g["recall"] <= 1
        assert 0 <= g["requested_class_accuracy"] <= 1 and 0 <= g["shape_accuracy"] <= 1
        assert len(g["per_class_shape_accuracy"]) == len(g["per_class_accuracy"])
    assert report["shape_judge"]["view"] == "shape" and (tmp_path / "ev" / "reference_shape_resnet18.pt").is_file()
    cas = report["cas"]
    assert cas["arch"] == "resnet18" and cas["train_images"] == 8 and 0 <= cas["top1"] <= cas["top5"] <= 1
    assert set(cas["real_data"]) == {"top1", "top5"}
    for png in ["fid_vs_accuracy.png", "guidance_accuracy.png", "samples_cls0_cfg2.png"]:
        assert (tmp_path / "ev" / png).is_file()


def test_sample_grid_rows_start_with_held_out_images_of_their_class():
    from cascade.data import ShapesDataset
    from cascade.evaluation.evaluate import _beside_held_out
    from cascade.evaluation.previews import held_out_by_class

    data = ShapesDataset(size=40, resolution=8, split="test", seed=0)
    held_out = held_out_by_class(data, [3, 7], per_class=2)  # (2 classes, 2, 3, 8, 8), in the order asked
    assert held_out is not None and held_out.shape == (2, 2, 3, 8, 8)
    assert torch.equal(held_out[1, 0], torch.as_tensor(data[7][0]).float()) and int(data[7][1]) == 7
    samples = torch.rand(2 * 8, 3, 8, 8) * 2 - 1  # class 3's eight samples, then class 7's
    images, columns = _beside_held_out(samples, held_out, rows=2)
    assert columns == 2 + 1 + 8 and images.shape == (2 * columns, 3, 8, 8)
    assert torch.equal(images[0], held_out[0, 0]) and torch.equal(images[columns + 1], held_out[1, 1])
    assert torch.equal(images[2], torch.ones(3, 8, 8)) and torch.equal(images[columns + 3], samples[8])
    alone, columns = _beside_held_out(samples[:12], held_out, rows=2)  # a row short of samples: the samples alone
    assert columns == 8 and torch.equal(alone, samples[:12])


@pytest.mark.slow
def test_autoguidance_by_the_model_itself_changes_nothing_and_a_foreign_guide_is_one_line(smoke_runs, tmp_path):
    base = smoke_runs / "base" / "checkpoints" / "last.pt"
    small = ("num_samples=8", "num_real=16", "batch_size=8", "steps=2", "classifier_scales=[0]", "reference.steps=2")
    small += ("reference.batch_size=8", "reference.eval_images=8", "shape_judge.enabled=false", "cas.enabled=false")
    result = evaluate(tmp_path, f"ckpt={base}", f"guide_ckpt={base}", "guide_scales=[1,2]", "out_dir=ev", *small)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    plain, guided = sorted(report["guidance"], key=lambda g: g["guide_scale"])
    assert (plain["guide_scale"], guided["guide_scale"]) == (1, 2) and report["guide"]["path"] == str(base)
    for key in ("fid", "precision", "recall", "requested_class_accuracy"):  # ε_guide + w (ε − ε_guide) = ε when the two agree
        assert guided[key] == plain[key], key
    assert (tmp_path / "ev" / "samples_cls0_cfg1_ag2.png").is_file()
    clf = smoke_runs / "classifier" / "checkpoints" / "last.pt"
    result = evaluate(tmp_path, f"ckpt={base}", f"guide_ckpt={clf}", "guide_scales=[2]", "out_dir=ev2", *small)
    assert result.returncode != 0 and "autoguidance needs an earlier checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "ev2" / "metrics.json").exists()


@pytest.mark.slow
def test_missing_inception_file_is_one_line(smoke_runs, tmp_path):
    result = evaluate(
        tmp_path,
        f"ckpt={smoke_runs / 'base' / 'checkpoints' / 'last.pt'}",
        "features=inception",
        f"features_path={tmp_path / 'nope.pth'}",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "features_path=" in result.stderr and "does not exist" in result.stderr
