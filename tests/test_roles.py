"""Stage roles (cascade.roles): role types, the generator/upsampler options ADM's models need, previews by role,
the sampler registry, and checkpoints written before the roles were explicit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra.utils import instantiate

from cascade.data.resize import downsample, upsample
from cascade.diffusion.losses import DiffusionLoss
from cascade.diffusion.samplers import REGISTRY, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_dpmpp_2m_sde
from cascade.diffusion.schedules import cosine_schedule, linear_schedule
from cascade.evaluation import previews
from cascade.nn import UNet
from cascade.nn.native import group_norm_kernels
from cascade.roles import Generator, NoisyClassifier, Upsampler
from cascade.training import checkpoint
from cascade.training.checkpoint import load_stage, save_checkpoint
from stages.base import GeneratorStage, default_spacing
from stages.classifier import ClassifierStage
from stages.upsampler import UpsamplerStage

NET = {
    "_target_": "cascade.nn.UNet",
    "_partial_": True,
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [],
    "middle_attention": False,
    "dropout": 0.0,
    "norm_groups": 8,
}
CLF_NET = {
    "_target_": "cascade.nn.EncoderClassifier",
    "_partial_": True,
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [],
    "head_channels": 32,
}


def generator(**overrides) -> GeneratorStage:
    kwargs = dict(net=instantiate(NET), schedule=cosine_schedule(1000), objective=DiffusionLoss(), name="g", resolution=8)
    return GeneratorStage(**{**kwargs, **overrides})


def upsampler(**overrides) -> UpsamplerStage:
    kwargs = dict(
        net=instantiate(NET),
        schedule=linear_schedule(1000),
        objective=DiffusionLoss(),
        aug_schedule=linear_schedule(1000),
        name="u",
        resolution=16,
        lowres_resolution=4,
        aug_max_level=500,
        sample_aug_level=50,
    )
    return UpsamplerStage(**{**kwargs, **overrides})


def perturbed(net: torch.nn.Module) -> torch.nn.Module:
    """Random weights in the zero-initialised layers, so every input reaches the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


# --- role types ----------------------------------------------------------------------------------


def test_each_stage_plays_exactly_its_role():
    roles = (Generator, Upsampler, NoisyClassifier)
    clf = ClassifierStage(net=instantiate(CLF_NET), schedule=cosine_schedule(1000), resolution=8)
    for stage, role in [(generator(), Generator), (upsampler(), Upsampler), (clf, NoisyClassifier)]:
        assert [isinstance(stage, r) for r in roles] == [r is role for r in roles]
    assert not issubclass(UpsamplerStage, GeneratorStage)  # siblings over one core, not one role inheriting another


def test_build_does_not_change_the_stage():
    stage = generator()
    before = dict(vars(stage))
    stage.build(num_classes=5)
    assert vars(stage) == before


# --- the generator: null class, unconditional --------------------------------------------------------


def test_null_class_row_only_with_label_dropout():
    assert generator(p_uncond=0.1).build(5).class_embed.num_embeddings == 6
    assert generator(p_uncond=0.0).build(5).class_embed.num_embeddings == 5
    assert (
        UNet(
            num_classes=5,
            null_class=False,
            model_channels=16,
            channel_mult=[1],
            attention_resolutions=[],
            middle_attention=False,
            norm_groups=8,
        ).class_embed.num_embeddings
        == 5
    )


def test_classifier_free_guidance_without_a_null_class_is_refused():
    stage = generator(p_uncond=0.0)
    net = perturbed(stage.build(3))
    labels = torch.tensor([0, 2])
    assert stage.sample(net, labels, steps=2, progress=False).shape == (2, 3, 8, 8)  # w = 1: the conditional model
    with pytest.raises(ValueError, match="without label dropout"):
        stage.sample(net, labels, steps=2, cfg_scale=2.0, progress=False)


def test_training_without_label_dropout_never_uses_a_null_label():
    stage = generator(p_uncond=0.0)
    seen = []
    net = stage.build(3)
    net.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["class_labels"].clone()), with_kwargs=True)
    stage.loss(net, torch.zeros(64, 3, 8, 8), torch.arange(64) % 3, torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], torch.arange(64) % 3)


def test_unconditional_generator_reaches_a_class_through_classifier_guidance_only():
    stage = generator(class_conditional=False)
    net = perturbed(stage.build(3))
    assert net.class_embed is None
    assert stage.loss(net, torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), torch.Generator().manual_seed(0)).shape == (2,)
    clf = perturbed(instantiate(CLF_NET)(resolution=8, num_classes=3))
    labels = torch.tensor([0, 2])
    run = lambda scale, sampler="ddim": stage.sample(  # noqa: E731
        net,
        labels,
        sampler=sampler,
        steps=3,
        classifier=clf,
        classifier_scale=scale,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert not torch.equal(run(0.0), run(5.0)) and not torch.equal(run(0.0, "ddpm"), run(5.0, "ddpm"))
    assert torch.equal(
        run(0.0),
        stage.sample(
            net, torch.tensor([1, 1]), sampler="ddim", steps=3, generator=torch.Generator().manual_seed(0), progress=False
        ),
    )  # labels unseen
    with pytest.raises(ValueError, match="not class-conditional"):
        stage.sample(net, labels, steps=2, cfg_scale=2.0, progress=False)


# --- the upsampler without noise augmentation ---------------------------------------------------------


def test_upsampler_without_noise_augmentation_never_corrupts_its_input():
    stage = upsampler(
        noise_augmentation=False, aug_schedule=None, aug_max_level=None, sample_aug_level=None, lowres_upsample="bilinear"
    )
    net = perturbed(stage.build(3))
    assert net.aug_embed is None
    hi = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inputs = stage.training_inputs(hi, torch.Generator().manual_seed(0))
    assert inputs.aug_level is None
    torch.testing.assert_close(inputs.lowres, upsample(downsample(hi, 4), 4, "bilinear"), rtol=0, atol=0)
    lowres = downsample(hi, 4)
    cond, level = stage.sampling_condition(lowres, None, torch.Generator().manual_seed(0))
    assert level is None and torch.equal(cond, upsample(lowres, 4, "bilinear"))
    assert stage.loss(net, hi, torch.tensor([0, 1, 2, 0]), torch.Generator().manual_seed(0)).shape == (4,)
    out = stage.sample(net, lowres, torch.tensor([0, 1, 2, 0]), steps=2, progress=False)
    assert out.shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="takes no aug_level"):
        stage.sample(net, lowres, torch.tensor([0, 1, 2, 0]), aug_level=0, steps=2, progress=False)


def test_upsampler_without_noise_augmentation_refuses_augmentation_settings():
    with pytest.raises(ValueError, match="aug_max_level"):
        upsampler(noise_augmentation=False, aug_schedule=None, sample_aug_level=None)
    with pytest.raises(ValueError, match="needs aug_schedule"):
        upsampler(aug_schedule=None)


# --- previews by role ------------------------------------------------------------------------------


def test_previews_are_chosen_by_role_and_refuse_another_role():
    assert isinstance(previews.default_preview(generator()), previews.GeneratorPreview)
    assert isinstance(previews.default_preview(upsampler()), previews.UpsamplerPreview)
    with pytest.raises(ValueError, match="is a generator, but its preview UpsamplerPreview"):
        previews.bind(generator(), previews.UpsamplerPreview())
    with pytest.raises(ValueError, match="crop=6 must be a multiple of 4"):
        previews.bind(upsampler(), previews.UpsamplerPreview(crop=6))


def test_generator_preview_puts_held_out_images_of_each_class_before_its_samples(tmp_path):
    """Row c of the grid: ``real_per_class`` held-out images labelled c (in data order), a white gap, the samples."""
    import numpy as np
    from PIL import Image

    from cascade.training.trainer import ReportContext

    # Held-out images whose pixels name their label and position: image i is constant (i mod 5)/5 - 0.9 in
    # channel 0 and label i mod 3, so class c's first images are i = c and i = c + 3.
    data = [(torch.full((3, 8, 8), (i % 5) / 5 - 0.9).index_fill_(0, torch.tensor([1, 2]), 0.0), i % 3) for i in range(12)]
    stage = generator()
    net = stage.build(num_classes=3)
    context = ReportContext(
        step=1, out_dir=tmp_path, class_names=["a", "b", "c"], val_data=data, device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    previews.GeneratorPreview(steps=2, per_class=2, real_per_class=2)(stage, net, context)
    grid = (
        torch.from_numpy(np.array(Image.open(tmp_path / "latest.png").convert("RGB"))).permute(2, 0, 1) / 255
    )  # (3, 2 + 3·10, 2 + 5·10): 8px tiles, 2px gaps
    assert grid.shape == (3, 32, 52)
    tile = lambda r, c: grid[:, 2 + 10 * r : 10 + 10 * r, 2 + 10 * c : 10 + 10 * c]  # noqa: E731
    for row in range(3):
        for column, index in enumerate((row, row + 3)):
            expected = ((index % 5) / 5 - 0.9 + 1) / 2
            assert tile(row, column)[0].sub(expected).abs().max() < 1 / 255 + 1e-6
        assert tile(row, 2).min() == 1.0  # the white gap
    # No held-out split: the plain grid of samples.
    context = dataclasses.replace(context, val_data=None)
    previews.GeneratorPreview(steps=2, per_class=2, real_per_class=2)(stage, net, context)
    assert Image.open(tmp_path / "latest.png").size == (22, 32)


# --- the sampler registry ----------------------------------------------------------------------------


def test_sampler_registry_says_spacing_and_guidance_mode():
    assert {n: (s.fn, s.default_spacing, s.guidance_mode) for n, s in REGISTRY.items()} == {
        "ddpm": (sample_ddpm, "uniform", "mean"),
        "ddim": (sample_ddim, "logsnr", "eps"),
        "dpmpp_2m": (sample_dpmpp_2m, "logsnr", "eps"),
        "dpmpp_2m_sde": (sample_dpmpp_2m_sde, "logsnr", "eps"),
    }
    assert default_spacing("ddpm") == "uniform" and default_spacing("dpmpp_2m") == "logsnr"


# --- checkpoints written before the roles were explicit ------------------------------------------------

# The stage configs as the code before this change wrote them into checkpoints: stages.base.BaseStage and
# UpsamplerStage with their preview keywords, ClassifierStage with its eval keywords, modules by their old paths.
OLD_CONFIGS = {
    "base": {
        "_target_": "stages.base.BaseStage",
        "name": "base",
        "resolution": 8,
        "p_uncond": 0.1,
        "fixed_variance": "large",
        "preview_sampler": "dpmpp_2m",
        "preview_steps": 2,
        "preview_per_class": 2,
        "preview_max_classes": 3,
        "net": NET,
        "schedule": {"_target_": "cascade.schedules.cosine_schedule", "num_steps": 1000},
        "objective": {
            "_target_": "cascade.losses.DiffusionLoss",
            "parameterization": "v",
            "learned_variance": True,
            "vb_weight": 0.001,
        },
    },
    "sr": {
        "_target_": "stages.upsampler.UpsamplerStage",
        "name": "sr",
        "resolution": 16,
        "lowres_resolution": 4,
        "class_conditional": True,
        "p_uncond": 0.1,
        "fixed_variance": "large",
        "aug_max_level": 500,
        "sample_aug_level": 50,
        "lowres_upsample": "bicubic",
        "blur_prob": 0.0,
        "blur_sigma": [0.4, 0.6],
        "blur_kernel_size": None,
        "crop_size": None,
        "lowres_prior": None,
        "preview_sampler": "dpmpp_2m",
        "preview_steps": 2,
        "preview_images": 2,
        "preview_crop": None,
        "net": NET,
        "schedule": {"_target_": "cascade.schedules.linear_schedule", "num_steps": 1000},
        "aug_schedule": {"_target_": "cascade.schedules.linear_schedule", "num_steps": 1000},
        "objective": {
            "_target_": "cascade.losses.DiffusionLoss",
            "parameterization": "eps",
            "learned_variance": True,
            "vb_weight": 0.001,
        },
    },
    "classifier": {
        "_target_": "stages.classifier.ClassifierStage",
        "name": "classifier",
        "resolution": 8,
        "eval_buckets": 4,
        "eval_images": 8,
        "eval_batch_size": 8,
        "net": CLF_NET,
        "schedule": {"_target_": "cascade.schedules.cosine_schedule", "num_steps": 1000},
    },
}


def old_network(name: str, config: dict, num_classes: int) -> torch.nn.Module:
    """The network the old code built for ``config``: every class table with a null row, upsamplers with a level embedding."""
    net = instantiate(config["net"])
    if name == "classifier":
        return net(resolution=config["resolution"], num_classes=num_classes)
    extra = {"lowres_channels": 3, "aug_level_embedding": True} if name == "sr" else {}
    return perturbed(net(resolution=config["resolution"], num_classes=num_classes, out_channels=6, **extra))


@pytest.mark.parametrize(
    "name,role,p_uncond",
    [
        ("base", Generator, 0.1),
        ("base", Generator, 0.0),
        ("sr", Upsampler, 0.1),
        ("sr", Upsampler, 0.0),
        ("classifier", NoisyClassifier, None),
    ],
)
def test_checkpoints_written_before_the_roles_load(tmp_path, name, role, p_uncond):
    config = dict(OLD_CONFIGS[name])
    if p_uncond is not None:
        config["p_uncond"] = p_uncond
    classes = ["a", "b", "c"]
    net = old_network(name, config, len(classes))
    payload = {
        "stage": name,
        "config": {"stage": config, "seed": 0},
        "class_names": classes,
        "resolution": config["resolution"],
        "step": 2,
        "model": net.state_dict(),
        "ema": net.state_dict(),
    }
    save_checkpoint(payload, tmp_path / "last.pt")
    stage, loaded, _ = load_stage(tmp_path / "last.pt")
    assert isinstance(stage, role) and stage.name == name
    same = {k: v for k, v in net.state_dict().items() if not k.endswith("class_embed.weight")}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in same.items())
    if name == "classifier":
        return
    rows = loaded.class_embed.weight
    assert rows.shape[0] == (4 if p_uncond else 3)  # p_uncond = 0: the old, never-trained null row is dropped
    assert torch.equal(rows, net.class_embed.weight[: rows.shape[0]])
    labels = torch.tensor([0, 2])
    g = torch.Generator().manual_seed(0)
    if name == "base":
        assert stage.sample(loaded, labels, steps=2, generator=g, progress=False).shape == (2, 3, 8, 8)
    else:
        assert stage.sample(loaded, torch.zeros(2, 3, 4, 4), labels, steps=2, generator=g, progress=False).shape == (2, 3, 16, 16)


# --- loaded networks' memory format ---------------------------------------------------------------


def test_loaded_network_samples_channels_last_on_a_cpu_with_the_kernel_and_the_same_images(tmp_path, monkeypatch):
    if group_norm_kernels() is None:
        pytest.skip("the C++ GroupNorm kernel cannot be built here")
    config = {
        "_target_": "stages.base.GeneratorStage",
        "name": "base",
        "resolution": 8,
        "net": NET,
        "schedule": {"_target_": "cascade.diffusion.schedules.cosine_schedule", "num_steps": 1000},
        "objective": {"_target_": "cascade.diffusion.losses.DiffusionLoss"},
    }
    net = perturbed(instantiate(config).build(num_classes=3))
    state = net.state_dict()
    payload = {"stage": "base", "config": {"stage": config, "seed": 0}, "class_names": ["a", "b", "c"], "resolution": 8}
    payload.update(step=1, model=state, ema=state)
    save_checkpoint(payload, tmp_path / "last.pt")
    stage, fast, _ = load_stage(tmp_path / "last.pt")
    monkeypatch.setattr(checkpoint, "group_norm_kernels", lambda: None)  # as where it cannot be built
    _, plain, _ = load_stage(tmp_path / "last.pt")
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # a 1×1 kernel is stored alike in both layouts, a 3×3 one is not
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    g = torch.Generator().manual_seed(0)
    x_t, t, labels = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([100, 900]), torch.tensor([0, 2])
    with torch.no_grad():
        outputs = [n(x_t, t, class_labels=labels) for n in (fast, plain)]  # (2, 3, 8, 8) each
    # float32: the layouts differ in summation order only (a sampled image would also amplify that through its steps)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5 * outputs[1].abs().max().item())
