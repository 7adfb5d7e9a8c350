"""Sampler steps never wait for the device: no ``.item()``, ``float(t)``, ``int(t)`` or ``bool(t)`` of a device tensor.

Checked by sampling on PyTorch's ``meta`` device, whose tensors have shapes but no values: reading any value on the
host raises there, exactly where a CUDA run would synchronise (``torch.cuda.set_sync_debug_mode`` is CUDA-only). Host
tables (the schedule, read once before the loop) stay legal. Every registered sampler, the network model function, the
upsampler's prior, and both guidances are run this way.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cascade.diffusion.denoiser import network_model_fn
from cascade.diffusion.guidance import classifier_free_guidance, classifier_guidance, classifier_log_prob
from cascade.diffusion.samplers import SAMPLERS
from cascade.diffusion.schedules import cosine_schedule, respace
from cascade.nn import EncoderClassifier, UNet

META = torch.device("meta")


def _unet(**kwargs) -> nn.Module:
    net = UNet(
        resolution=16,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        head_channels=32,
        dropout=0.0,
        **kwargs,
    )
    return net.to(META).eval()


def test_meta_device_catches_a_host_read() -> None:
    """The detector works: every way of reading a device value on the host raises on meta tensors."""
    x = torch.zeros(2, device=META)
    for read in (lambda: x.sum().item(), lambda: float(x.sum()), lambda: int(x.sum()), lambda: bool(x.any()), lambda: x.tolist()):
        with pytest.raises(RuntimeError):
            read()


@pytest.mark.parametrize(
    "sampler, guidance",
    [
        *((name, "none") for name in sorted(SAMPLERS)),
        ("ddpm", "classifier"),
        ("ddim", "classifier"),
        ("dpmpp_2m", "classifier-free"),
    ],
)
def test_sampler_step_does_no_host_sync(sampler: str, guidance: str) -> None:
    schedule = respace(cosine_schedule(100), 4)
    net = _unet(num_classes=3, out_channels=6)
    model_fn = network_model_fn(net, schedule, variance="learned")
    labels = torch.zeros(2, dtype=torch.long, device=META)
    if guidance == "classifier":
        classifier = (
            EncoderClassifier(
                resolution=16,
                model_channels=32,
                channel_mult=(1, 2),
                num_res_blocks=1,
                attention_resolutions=(8,),
                head_channels=32,
                num_classes=3,
            )
            .to(META)
            .eval()
        )
        model_fn = classifier_guidance(
            model_fn, classifier_log_prob(classifier), schedule, 1.0, mode="mean" if sampler == "ddpm" else "eps"
        )
    elif guidance == "classifier-free":
        model_fn = classifier_free_guidance(model_fn, 2.0, null_label=3)
    x_T = torch.empty(2, 3, 16, 16, device=META)
    out = SAMPLERS[sampler](model_fn, x_T, schedule, cond={"class_labels": labels}, generator=None, progress=False)
    assert out.shape == x_T.shape and out.device == META


def test_upsampler_prior_step_does_no_host_sync() -> None:
    """The upsamplers' preconditioned network (its ᾱ and augmentation-level look-ups) inside a sampler."""
    from cascade.diffusion.preconditioning import LowresPrior

    schedule = respace(cosine_schedule(100), 3)
    net = LowresPrior(
        _unet(lowres_channels=3, aug_level_embedding=True), schedule=cosine_schedule(100), aug_schedule=cosine_schedule(100)
    )
    net = net.to(META)
    model_fn = network_model_fn(net, schedule, parameterization="v")
    cond = {"lowres": torch.empty(2, 3, 16, 16, device=META), "aug_level": torch.zeros(2, dtype=torch.long, device=META)}
    out = SAMPLERS["ddim"](model_fn, torch.empty(2, 3, 16, 16, device=META), schedule, cond=cond, progress=False)
    assert out.shape == (2, 3, 16, 16)
