"""The upsampler stages (sr256, sr1024): augmentation statistics, conditioning paths, crops, configs, smoke runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from PIL import Image

from cascade.data import ShapesDataset
from cascade.data.windows import AlignedWindows
from cascade.diffusion.losses import DiffusionLoss
from cascade.diffusion.preconditioning import LowresPrior
from cascade.diffusion.schedules import linear_schedule
from cascade.evaluation.metrics import highfreq_energy
from cascade.nn import UNet
from cascade.nn.layers import AttentionBlock, ResBlock
from cascade.training.checkpoint import load_checkpoint, load_stage
from stages.upsampler import (
    CROP_CONTEXT,
    UpsamplerStage,
    downsample,
    gaussian_blur,
    prepare_lowres,
    upsample,
    windowed_crops,
)
from tests.helpers import compose_train, run_script

UPSAMPLERS = ["sr256", "sr1024"]


def small_stage(**overrides) -> UpsamplerStage:
    """A 16px ← 4px upsampler with a tiny attention-free network (fast on CPU)."""
    net = instantiate(
        {
            "_target_": "cascade.nn.UNet",
            "_partial_": True,
            "model_channels": 32,
            "channel_mult": [1, 2],
            "num_res_blocks": 1,
            "attention_resolutions": [],
            "middle_attention": False,
            "dropout": 0.0,
        }
    )
    kwargs = dict(
        net=net,
        schedule=linear_schedule(1000),
        objective=DiffusionLoss(learned_variance=True),
        aug_schedule=linear_schedule(1000),
        name="sr16",
        resolution=16,
        lowres_resolution=4,
        aug_max_level=500,
        sample_aug_level=50,
        lowres_upsample="nearest",
    )
    return UpsamplerStage(**{**kwargs, **overrides})


def perturbed(net: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised layers (output conv, residual branches) random weights, so every input matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [−1, 1] (B, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


# --- configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["default", "tiny"])
@pytest.mark.parametrize("name", UPSAMPLERS)
def test_upsampler_configs_compose_and_instantiate(name, preset):
    cfg = compose_train([f"stage={name}", f"preset={preset}"])
    stage = instantiate(cfg.stage)
    assert isinstance(stage, UpsamplerStage) and stage.name == name
    assert stage.factor == 4 and stage.resolution == {"sr256": 256, "sr1024": 1024}[name]
    assert stage.schedule.alphas_cumprod.allclose(linear_schedule(1000).alphas_cumprod)
    instantiate(cfg.trainer)
    with torch.device("meta"):
        net = stage.build(num_classes=10)
    if preset == "tiny":  # the tiny presets precondition around the low-res image (see tiny_sr256.yaml)
        assert isinstance(net, LowresPrior) and net.schedule is stage.schedule and net.aug_schedule is stage.aug_schedule
        net = net.net
    assert isinstance(net, UNet) and net.lowres_channels == 3 and net.aug_embed is not None and net.num_classes == 10


def test_default_sr256_is_adm_64_to_256_upsampler():
    stage = instantiate(compose_train(["stage=sr256"]).stage)
    with torch.device("meta"):
        net = stage.build(num_classes=1000)
    # ADM's 311.8M plus our noise-augmentation embedding (0.74M).
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(311.8e6, rel=0.01)
    assert stage.objective.learned_variance and stage.out_channels == 6 and stage.crop_size is None


@pytest.mark.parametrize("preset", ["default", "tiny"])
def test_sr1024_is_attention_free_and_crop_trained(preset):
    stage = instantiate(compose_train(["stage=sr1024", f"preset={preset}"]).stage)
    with torch.device("meta"):
        net = stage.build(num_classes=1000)
    assert not any(isinstance(m, AttentionBlock) for m in net.modules())  # no attention at any resolution
    assert stage.crop_size is not None and stage.crop_size < stage.resolution and stage.blur_prob == 0.5
    if preset == "default":
        assert stage.crop_size == 256
        blocks = list(net.encoder.blocks)
        assert sum(isinstance(b[0], ResBlock) for b in blocks[:3]) < sum(isinstance(b[0], ResBlock) for b in blocks[-8:])
        assert sum(p.numel() for p in net.parameters()) < 500e6


def test_class_conditioning_can_be_turned_off():
    stage = small_stage(class_conditional=False)
    net = perturbed(stage.build(num_classes=10))
    assert net.num_classes is None
    lowres = images(2, 4)
    out = stage.sample(net, lowres, steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert out.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="not class-conditional"):
        stage.sample(net, lowres, torch.tensor([0, 1]), steps=2, progress=False)
    loss = stage.loss(net, images(2, 16), torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert loss.shape == (2,) and torch.isfinite(loss).all()


# --- noise conditioning augmentation ---------------------------------------------------------------


def test_noise_augmentation_has_the_forward_process_moments_at_a_given_level():
    """At a fixed s the conditioning is N(√ᾱ_s x_lr, (1 − ᾱ_s) I): per-pixel mean and variance over many draws."""
    stage = small_stage()  # nearest resize: every 4×4 block of the conditioning is one low-res pixel
    lowres = images(1, 4, seed=3)  # (1, 3, 4, 4)
    n = 20_000
    for s in (0, 137, 500):
        cond, level = stage.sampling_condition(lowres.expand(n, -1, -1, -1), s, torch.Generator().manual_seed(s))
        assert level.tolist() == [s] * n and cond.shape == (n, 3, 16, 16)
        z = cond[..., ::4, ::4].double()  # (n, 3, 4, 4) the corrupted low-res image
        ab = float(stage.aug_schedule.alphas_cumprod[s])
        expected_mean, expected_var = ab**0.5 * lowres[0].double(), 1 - ab
        # Standard errors: σ/√n for the mean, σ²·√(2/n) for the variance; 5 standard errors over 48 pixels.
        assert (z.mean(0) - expected_mean).abs().max() < 5 * (expected_var / n) ** 0.5
        assert (z.var(0) / expected_var - 1).abs().max() < 5 * (2 / n) ** 0.5


def test_training_augmentation_draws_uniform_levels_with_the_forward_process_moments():
    stage = small_stage()
    n = 8192
    hi = images(1, 16, seed=4).expand(n, -1, -1, -1)
    inputs = stage.training_inputs(hi, torch.Generator().manual_seed(0))
    s = inputs.aug_level  # (n,)
    assert int(s.min()) == 0 and int(s.max()) == stage.aug_max_level
    assert float(s.double().mean()) == pytest.approx(stage.aug_max_level / 2, abs=5 * 145 / n**0.5)  # U{0..500}: sd 145
    # Standardise each example with its own s: (z − √ᾱ_s x_lr) / √(1 − ᾱ_s) must be N(0, 1).
    ab = stage.aug_schedule.alphas_cumprod[s][:, None, None, None]  # (n, 1, 1, 1)
    z = inputs.lowres[..., ::4, ::4].double()  # (n, 3, 4, 4)
    r = (z - ab.sqrt() * downsample(hi[:1], 4).double()) / (1 - ab).sqrt()
    assert abs(float(r.mean())) < 5 / r.numel() ** 0.5
    assert float(r.var()) == pytest.approx(1.0, abs=5 * (2 / r.numel()) ** 0.5)
    assert not inputs.blurred.any() and inputs.offsets is None and torch.equal(inputs.images, hi)


def test_the_augmentation_level_reaches_the_network():
    stage = small_stage()
    net = perturbed(stage.build(num_classes=10))
    x_t, lowres = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    t, y = torch.tensor([10, 700]), torch.tensor([1, 2])
    out = [net(x_t, t, class_labels=y, lowres=lowres, aug_level=torch.tensor([s, s])) for s in (0, 250)]
    assert not torch.allclose(out[0], out[1])

    # The training loss passes the drawn s (and the matching conditioning) to the network.
    seen = {}

    def spy(x, t, **cond):
        seen.update(cond)
        return net(x, t, **cond)

    spy.num_classes = net.num_classes  # label dropout's null label is the network's class count
    batch = images(4, 16)
    stage.loss(spy, batch, torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(5))
    expected = stage.training_inputs(batch, torch.Generator().manual_seed(5))
    assert torch.equal(seen["aug_level"], expected.aug_level) and torch.equal(seen["lowres"], expected.lowres)

    # And sampling at another level gives another image.
    lr = images(2, 4)
    samples = [
        stage.sample(net, lr, y, aug_level=s, steps=2, generator=torch.Generator().manual_seed(0), progress=False)
        for s in (0, 250)
    ]
    assert not torch.allclose(samples[0], samples[1])


def test_sampling_levels_outside_the_trained_range_are_refused():
    stage = small_stage()
    net = stage.build(num_classes=10)
    with pytest.raises(ValueError, match="aug_level must be in 0..500"):
        stage.sample(net, images(1, 4), aug_level=501, steps=1, progress=False)
    with pytest.raises(ValueError, match="sample_aug_level"):
        small_stage(sample_aug_level=600)


# --- blur augmentation ------------------------------------------------------------------------------


def test_blur_is_applied_to_about_blur_prob_of_training_examples():
    n = 4000
    hi = images(n // 40, 16, seed=6).repeat(40, 1, 1, 1)
    blurred = small_stage(blur_prob=0.5).training_inputs(hi, torch.Generator().manual_seed(0))
    plain = small_stage(blur_prob=0.0).training_inputs(hi, torch.Generator().manual_seed(0))  # same random stream
    assert float(blurred.blurred.float().mean()) == pytest.approx(0.5, abs=0.04)
    changed = (blurred.lowres - plain.lowres).flatten(1).abs().amax(1) > 1e-6  # (n,)
    assert torch.equal(changed, blurred.blurred)  # exactly the flagged examples differ
    assert torch.equal(blurred.aug_level, plain.aug_level)


def test_blur_is_never_applied_at_sampling():
    stage = small_stage(blur_prob=1.0)
    net = perturbed(stage.build(num_classes=10))
    lowres, s = images(2, 4, seed=7), 120
    # The conditioning at sampling is exactly upsample(q_sample(lowres, s)) with no blur.
    cond, _ = stage.sampling_condition(lowres, s, torch.Generator().manual_seed(0))
    noise = torch.randn(lowres.shape, generator=torch.Generator().manual_seed(0))
    ab = stage.aug_schedule.alphas_cumprod[s].float()
    torch.testing.assert_close(cond, upsample(ab.sqrt() * lowres + (1 - ab).sqrt() * noise, 4, "nearest"))
    # And that is what the network sees at every sampler step.
    seen = []

    def spy(x, t, **kw):
        seen.append(kw["lowres"])
        return net(x, t, **kw)

    stage.sample(
        spy, lowres, torch.tensor([0, 1]), aug_level=s, steps=3, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert len(seen) == 3 and all(torch.equal(c, cond) for c in seen)


# --- crops --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
def test_conditioning_of_a_crop_equals_the_crop_of_the_full_conditioning(mode):
    """Crops are degraded on windows only; with enough context that is exactly the full image's conditioning."""
    kernel = 5
    sigma = torch.tensor([0.6, 0.45, 0.5])

    def degrade(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # downsample → blur → upsample, deterministic
        return upsample(gaussian_blur(downsample(x, 4), torch.ones(len(b), dtype=torch.bool), sigma[b], kernel), 4, mode)

    hi = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    full = degrade(hi, torch.arange(3))  # (3, 3, 128, 128)
    offsets = torch.tensor([[0, 0], [24, 3], [11, 24]])  # low-res (top, left); image corners included
    hi_crops, cond = windowed_crops(hi, offsets, 8, 4, CROP_CONTEXT + kernel // 2, lambda w, b: degrade(w, torch.tensor([b])))
    for b, (y, x) in enumerate(offsets.tolist()):
        window = (b, slice(None), slice(4 * y, 4 * y + 32), slice(4 * x, 4 * x + 32))
        assert torch.equal(hi_crops[b], hi[window])
        torch.testing.assert_close(cond[b], full[window], rtol=0, atol=1e-5)


def test_hi_res_and_low_res_crops_are_aligned():
    # A hi-res image made of constant 4×4 blocks: the block means of each crop are the aligned low-res crop,
    # and its nearest-upsampled conditioning is the crop itself.
    lowres = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    hi = lowres.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # (2, 3, 64, 64)
    offsets = torch.tensor([[2, 7], [8, 0]])
    block_means = lambda w, b: upsample(F.avg_pool2d(w, 4), 4, "nearest")  # noqa: E731
    hi_crops, cond = windowed_crops(hi, offsets, 8, 4, 2, block_means)
    for b, (y, x) in enumerate(offsets.tolist()):
        torch.testing.assert_close(F.avg_pool2d(hi_crops[b : b + 1], 4)[0], lowres[b, :, y : y + 8, x : x + 8])
    torch.testing.assert_close(cond, hi_crops)

    # Through the stage: offsets are inside the image, the target is the hi-res crop at 4× the offset,
    # and the conditioning shows the same region (augmentation at s = 0 only adds noise of std 0.01).
    stage = small_stage(
        resolution=64,
        lowres_resolution=16,
        crop_size=32,
        aug_max_level=0,
        sample_aug_level=0,
        lowres_upsample="bicubic",
        blur_prob=0.0,
    )
    batch = images(64, 64, seed=8)
    inputs = stage.training_inputs(batch, torch.Generator().manual_seed(0))
    assert inputs.images.shape == inputs.lowres.shape == (64, 3, 32, 32)
    assert inputs.offsets.min() >= 0 and inputs.offsets.max() <= 16 - 8 and len(set(map(tuple, inputs.offsets.tolist()))) > 10
    reference = upsample(downsample(batch, 4), 4, "bicubic")
    for b, (y, x) in enumerate(inputs.offsets.tolist()):
        assert torch.equal(inputs.images[b], batch[b, :, 4 * y : 4 * y + 32, 4 * x : 4 * x + 32])
        assert (inputs.lowres[b] - reference[b, :, 4 * y : 4 * y + 32, 4 * x : 4 * x + 32]).abs().max() < 0.08


def window_stage(**overrides) -> UpsamplerStage:
    """A 128px ← 32px stage training 16px crops from 64px windows (context 6 low-res pixels), blur always on."""
    return small_stage(
        resolution=128,
        lowres_resolution=32,
        crop_size=16,
        crop_windows=True,
        noise_augmentation=False,
        aug_schedule=None,
        aug_max_level=None,
        sample_aug_level=None,
        blur_prob=1.0,
        lowres_upsample="bicubic",
        **overrides,
    )


def test_a_window_trains_its_central_crop_with_the_whole_images_conditioning():
    stage = window_stage()
    assert stage.crop_context == CROP_CONTEXT + 2 and stage.training_window == 16 + 2 * 4 * stage.crop_context == 64
    batch = images(5, 128, seed=3)
    corners = [(0, 0), (64, 64), (8, 40), (32, 0), (60, 4)]  # hi-res window (top, left), multiples of the factor
    windows = torch.stack([batch[b, :, y : y + 64, x : x + 64] for b, (y, x) in enumerate(corners)])
    inputs = stage.training_inputs(windows, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the draws of training_inputs: blur flags, then σ
    blur = torch.rand(5, generator=g) < 1.0
    sigma = 0.4 + 0.2 * torch.rand(5, generator=g)
    whole = stage.conditioning(batch, None, blur, sigma, None)  # (5, 3, 128, 128)
    for b, (y, x) in enumerate(corners):
        crop = (slice(None), slice(y + 24, y + 40), slice(x + 24, x + 40))  # the window's central 16px
        assert torch.equal(inputs.images[b], batch[b][crop])
        torch.testing.assert_close(inputs.lowres[b], whole[b][crop], rtol=0, atol=1e-5)
    assert inputs.offsets.tolist() == [[6, 6]] * 5


def test_training_data_makes_windows_only_when_asked():
    shapes = ShapesDataset(resolution=128, size=16)
    assert small_stage(resolution=128, lowres_resolution=32, crop_size=16).training_data(shapes) is shapes
    windows = window_stage().training_data(shapes)
    assert isinstance(windows, AlignedWindows) and (windows.size, windows.align) == (64, 4)
    torch.manual_seed(0)
    assert window_stage().training_inputs(windows[0][0][None], None).images.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="trains on 128px images or 64px windows"):
        window_stage().training_inputs(torch.zeros(1, 3, 48, 48), None)
    with pytest.raises(ValueError, match="crop_windows needs crop training"):
        small_stage(crop_windows=True)


# --- sampling and helpers -------------------------------------------------------------------------------


def test_sampling_any_size_is_reproducible_and_in_range():
    stage = small_stage(crop_size=8)
    net = perturbed(stage.build(num_classes=10))
    lowres = images(2, 8)  # twice the nominal low-res size: fully convolutional
    run = lambda seed, **kw: stage.sample(  # noqa: E731
        net,
        lowres,
        torch.tensor([3, 10]),
        steps=3,
        generator=torch.Generator().manual_seed(seed),  # noqa: E731
        progress=False,
        **kw,
    )
    out = run(0)
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1
    assert torch.equal(out, run(0)) and not torch.equal(out, run(1))
    assert torch.isfinite(run(0, cfg_scale=2.0, sampler="ddim")).all()
    with pytest.raises(ValueError, match="class labels must be in"):
        stage.sample(net, lowres, torch.tensor([3, 11]), steps=1, progress=False)


def test_highfreq_energy_separates_sharp_from_bicubic():
    hi = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bicubic = upsample(downsample(hi, 4), 4, "bicubic")
    assert (highfreq_energy(bicubic, 4) < 0.1 * highfreq_energy(hi, 4)).all()


def test_prepare_lowres_crops_and_resizes_with_notes():
    image = torch.rand(3, 90, 120) * 2 - 1
    out, notes = prepare_lowres(image, 64)
    assert out.shape == (3, 64, 64) and len(notes) == 2 and "centre-cropped" in notes[0] and "antialiased" in notes[1]
    same, notes = prepare_lowres(out, 64)
    assert torch.equal(same, out) and notes == []


# --- end to end ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", UPSAMPLERS)
def test_smoke_training_writes_a_checkpoint_that_rebuilds_the_upsampler(smoke_runs, name):
    run = smoke_runs / name
    for produced in ["checkpoints/last.pt", "config.yaml", "metrics.jsonl", "loss.png", "samples/step_0000002.png"]:
        assert (run / produced).is_file(), produced
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    report = rows[-1]
    assert {"psnr", "psnr_bicubic", "ssim", "consistency_psnr", "hf_ratio"} <= set(report)
    grid = Image.open(run / "samples" / "step_0000002.png")
    assert grid.width == 4 * 256 + 5 * 2  # columns: low-res, bicubic, model, truth (tiny sr1024 reports on 256px crops)

    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert payload["stage"] == name and payload["step"] == 2 and payload["resolution"] == {"sr256": 256, "sr1024": 1024}[name]
    stage, net, _ = load_stage(run / "checkpoints" / "last.pt")
    assert isinstance(stage, UpsamplerStage) and stage.name == name and not net.training
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, payload["ema"][key])


def super_resolve(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run_script("super_resolve.py", "--device", "cpu", *args, cwd=cwd)


@pytest.mark.slow
def test_super_resolve_script(smoke_runs, tmp_path):
    ckpt = smoke_runs / "sr256" / "checkpoints" / "last.pt"
    Image.new("RGB", (80, 70), color=(200, 40, 90)).save(tmp_path / "photo.png")
    result = super_resolve(
        tmp_path, "--ckpt", str(ckpt), "--input", "photo.png", "--class", "2", "--steps", "2", "--aug-level", "10"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: centre-cropped" in result.stdout and "note: resized" in result.stdout
    assert Image.open(tmp_path / "photo_256px.png").size == (256, 256)

    missing = super_resolve(tmp_path, "--ckpt", str(ckpt), "--input", "nope.png")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    bad_class = super_resolve(tmp_path, "--ckpt", str(ckpt), "--input", "photo.png", "--class", "99")
    assert bad_class.returncode == 2 and "out of range" in bad_class.stderr and "Traceback" not in bad_class.stderr
