"""Stages, configs and the training loop: compose the real configs, shrink them, run them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from cascade.diffusion.samplers import SAMPLERS
from cascade.diffusion.schedules import cosine_schedule, linear_schedule
from cascade.nn import EncoderClassifier, UNet
from cascade.training.checkpoint import load_checkpoint, load_stage
from stages.base import BaseStage, check_same_schedule
from stages.classifier import ClassifierStage, random_recolour
from tests.helpers import PRESETS, STAGES, compose_train, run_script, train


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("stage", STAGES)
def test_every_config_composes_and_instantiates(stage, preset):
    cfg = compose_train([f"stage={stage}", f"preset={preset}"])
    built = instantiate(cfg.stage)
    assert built.name == stage
    trainer = instantiate(cfg.trainer)
    assert trainer.max_steps == cfg.trainer.max_steps
    dataset = instantiate(cfg.data.train, resolution=built.resolution)
    image, label = dataset[0]
    assert image.shape == (3, built.resolution, built.resolution) and 0 <= label < dataset.num_classes
    with torch.device("meta"):  # full-size networks build instantly on the meta device
        net = built.build(num_classes=dataset.num_classes)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_default_base_is_adm_imagenet64():
    cfg = compose_train(["stage=base"])
    stage = instantiate(cfg.stage)
    with torch.device("meta"):
        net = stage.build(num_classes=1000)
    assert isinstance(net, UNet)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(295.9e6, rel=0.01)
    assert stage.objective.learned_variance and stage.out_channels == 6
    # Cosine schedule of docs/design.md §2.1.
    torch.testing.assert_close(stage.schedule.alphas_cumprod, cosine_schedule(1000).alphas_cumprod)


def test_default_classifier_is_adm_64px_classifier():
    stage = instantiate(compose_train(["stage=classifier"]).stage)
    with torch.device("meta"):
        net = stage.build(num_classes=1000)
    assert isinstance(net, EncoderClassifier)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(65.4e6, rel=0.01)


def test_imagefolder_data_config(tmp_path):
    for name in ["cat", "dog"]:
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (80 + 10 * i, 70), color=(40 * i, 100, 200)).save(tmp_path / name / f"{i}.png")
    cfg = compose_train(["stage=base", "data=imagefolder", f"data.root={tmp_path}"])
    dataset = instantiate(cfg.data.train, resolution=64)
    assert dataset.class_names == ["cat", "dog"] and len(dataset) == 6
    assert dataset[0][0].shape == (3, 64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["base", "classifier"])
def test_smoke_training_writes_a_checkpoint_that_rebuilds_the_stage(smoke_runs, stage):
    run = smoke_runs / stage
    for produced in ["checkpoints/last.pt", "checkpoints/step_0000002.pt", "config.yaml", "metrics.jsonl", "loss.png"]:
        assert (run / produced).is_file(), produced
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    if stage == "base":
        assert (run / "samples" / "step_0000002.png").is_file()
    else:
        assert any(key.startswith("acc_t") for key in rows[-1])

    # The checkpoint alone rebuilds the stage: config, class names, weights (loadable with weights_only=True).
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert payload["stage"] == stage and payload["step"] == 2 and payload["resolution"] == 64
    assert len(payload["class_names"]) == 10
    rebuilt, net, _ = load_stage(run / "checkpoints" / "last.pt")
    assert rebuilt.name == stage and not net.training
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, payload["ema"][name])


@pytest.mark.slow
def test_running_the_same_command_again_resumes(smoke_runs, tmp_path):
    shutil.copytree(smoke_runs / "classifier", tmp_path / "classifier")
    result = train(tmp_path, "classifier", "trainer.max_steps=3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert load_checkpoint(tmp_path / "classifier" / "checkpoints" / "last.pt")["step"] == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "classifier" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3


def evaluate(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_script("evaluate_stage.py", "device=cpu", *overrides, cwd=cwd)


@pytest.mark.slow
def test_evaluate_stage_reports_classifier_accuracy_by_noise_level(smoke_runs, tmp_path):
    """The classifier branch of evaluate_stage.py (the base and upsampler branches: tests/test_evaluate.py)."""
    clf = smoke_runs / "classifier" / "checkpoints" / "last.pt"
    result = evaluate(tmp_path, f"ckpt={clf}", f"out_dir={tmp_path / 'clf'}", "eval_images=8")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "clf" / "metrics.json").read_text())
    assert len(report["accuracy_by_t"]) == 4 and (tmp_path / "clf" / "accuracy_by_t.png").is_file()


def test_evaluate_missing_checkpoint_is_one_line(tmp_path):
    result = evaluate(tmp_path, f"ckpt={tmp_path / 'nope.pt'}")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_bad_device_is_one_line_and_exit_code_2(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = train(tmp_path, "base", "device=cuda")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "device=cuda" in result.stderr and "Traceback" not in result.stderr


def tiny_base_and_classifier() -> tuple[BaseStage, torch.nn.Module, ClassifierStage, torch.nn.Module]:
    cfg = compose_train(["stage=base", "preset=tiny"])
    base = instantiate(cfg.stage)
    base_net = base.build(num_classes=10).eval()
    clf_cfg = compose_train(["stage=classifier", "preset=tiny"])
    clf = instantiate(clf_cfg.stage)
    clf_net = clf.build(num_classes=10).eval()
    return base, base_net, clf, clf_net


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_guided_base_sampling_runs_every_sampler(sampler):
    base, base_net, clf, clf_net = tiny_base_and_classifier()
    labels = torch.tensor([0, 3])
    run = lambda scale, cfg_scale=1.0: base.sample(  # noqa: E731
        base_net,
        labels,
        sampler=sampler,
        steps=4,
        classifier=clf_net,
        classifier_schedule=clf.schedule,
        classifier_scale=scale,
        cfg_scale=cfg_scale,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    plain, guided = run(0.0), run(3.0)
    assert plain.shape == (2, 3, 64, 64) and plain.abs().max() <= 1
    assert not torch.equal(plain, guided)  # the classifier gradient reaches the sample
    assert torch.equal(plain, run(0.0))  # reproducible from the generator
    assert torch.isfinite(run(0.0, cfg_scale=3.0)).all()


def test_autoguided_base_needs_its_guide_and_moves_the_sample():
    base, base_net, _, _ = tiny_base_and_classifier()
    guide = base.build(num_classes=10).eval()  # the same stage; its output layer starts at zero, as the model's
    with torch.no_grad():  # so perturb every weight: a different model of the same stage
        g = torch.Generator().manual_seed(1)
        for p in guide.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    run = lambda **guidance: base.sample(  # noqa: E731
        base_net, torch.tensor([0, 3]), steps=3, generator=torch.Generator().manual_seed(0), progress=False, **guidance
    )
    assert torch.equal(run(), run(guide=guide, guide_scale=1.0))  # w = 1: the model alone
    assert not torch.equal(run(), run(guide=guide, guide_scale=2.0))
    with pytest.raises(ValueError, match="needs a guide network"):
        run(guide_scale=2.0)


def test_classifier_on_another_schedule_is_refused():
    with pytest.raises(ValueError, match="another noise schedule"):
        check_same_schedule(cosine_schedule(1000), linear_schedule(1000), "the classifier")


def test_recolour_keeps_brightness_and_edges_and_changes_only_drawn_images():
    """random_recolour changes hue/saturation of the drawn fraction only; V (HSV max) and flat regions survive."""
    images = torch.full((64, 3, 8, 8), -0.6)  # (B, 3, 8, 8) a grey background ...
    images[:, 0, 2:6, 2:6], images[:, 1, 2:6, 2:6] = 0.8, -0.2  # ... with a reddish square
    out = random_recolour(images, 0.5, torch.Generator().manual_seed(0))
    changed = (out - images).abs().flatten(1).amax(1) > 1e-3  # (B,)
    assert 16 < int(changed.sum()) < 48  # about half, drawn per image
    assert torch.allclose(out[~changed], images[~changed])
    value = lambda x: ((x + 1) / 2).amax(1)  # noqa: E731  HSV value, (B, 8, 8)
    assert torch.allclose(value(out), value(images), atol=1e-4)  # hue and saturation moves keep V
    grey = out[:, :, 0, 0]  # (B, 3) the background: no saturation to rotate
    assert torch.allclose(grey, torch.full_like(grey, -0.6), atol=1e-4)
    square = out[changed][:, :, 3, 3]  # (n, 3) the square's new colours differ from one another
    assert square.std(0).max() > 0.1
    again = random_recolour(images, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # from the generator alone: exact resume


def test_recoloured_classifier_trains_with_the_generator_only():
    """The recolouring draws from the training generator: two losses from equal generators are equal, and differ from ADM's."""
    cfg = compose_train(["stage=classifier", "preset=tiny", "stage.recolour=1.0"])
    stage = instantiate(cfg.stage)
    assert stage.recolour == 1.0
    net = stage.build(num_classes=10).eval()
    images, labels = torch.rand(4, 3, 64, 64) * 2 - 1, torch.arange(4)
    first = stage.loss(net, images, labels, torch.Generator().manual_seed(3))
    assert torch.equal(first, stage.loss(net, images, labels, torch.Generator().manual_seed(3)))
    plain = instantiate(compose_train(["stage=classifier", "preset=tiny"]).stage)
    assert not torch.equal(first, plain.loss(net, images, labels, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="recolour"):
        ClassifierStage(net=stage.net, schedule=stage.schedule, recolour=1.5)
