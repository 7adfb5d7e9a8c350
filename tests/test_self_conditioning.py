"""Self-conditioning (Chen, Zhang & Hinton 2022, §3.2): the two passes, the coin, sampling and exact resume."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from cascade.diffusion.losses import DiffusionLoss
from cascade.diffusion.schedules import cosine_schedule
from cascade.diffusion.self_conditioning import SelfConditioning
from cascade.nn import UNet
from stages.base import GeneratorStage
from tests.test_reliability import Noise, assert_same_state, fit

SCHEDULE = cosine_schedule(100)


class Linear(nn.Module):
    """prediction = a·x_t + b·lowres (and a constant learned-variance half): every pass in closed form."""

    num_classes = 7

    def __init__(self, variance_channels: int = 0) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.7)), nn.Parameter(torch.tensor(0.3))
        self.variance_channels = variance_channels
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, lowres: torch.Tensor) -> torch.Tensor:
        self.seen.append(lowres.detach().clone())
        out = self.a * x_t + self.b * lowres  # (B, 3, H, W)
        extra = torch.full_like(x_t[:, : self.variance_channels], 5.0)  # (B, V, H, W)
        return torch.cat([out, extra], dim=1)


@pytest.mark.parametrize("parameterization", ["v", "eps"])
@pytest.mark.parametrize("variance_channels", [0, 3])
def test_the_second_pass_sees_the_clamped_estimate_of_the_first_and_no_gradient_flows_through_it(
    parameterization, variance_channels
):
    inner = Linear(variance_channels)
    net = SelfConditioning(inner, schedule=SCHEDULE, parameterization=parameterization)
    x_t = 3 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # large: the clamp matters
    t = SCHEDULE.timesteps[torch.tensor([10, 80])]
    ab = SCHEDULE.alphas_cumprod[torch.tensor([10, 80])].float().view(-1, 1, 1, 1)
    first = 0.7 * x_t  # the first pass: lowres = 0
    if parameterization == "v":
        x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * first
    else:
        x0 = (x_t - (1 - ab).sqrt() * first) / ab.sqrt()
    estimate = x0.clamp(-1, 1)
    assert (x0.abs() > 1).any()  # the clamp is exercised

    out = net(x_t, t)  # refine=True: sampling's form
    assert torch.equal(inner.seen[0], torch.zeros_like(x_t))
    torch.testing.assert_close(inner.seen[1], estimate)
    torch.testing.assert_close(out[:, :3], 0.7 * x_t + 0.3 * estimate)
    assert out.shape[1] == 3 + variance_channels  # the learned variance passes through
    out[:, :3].sum().backward()
    torch.testing.assert_close(inner.a.grad, x_t.sum())  # not x_t + ∂estimate/∂a: the estimate is a constant
    torch.testing.assert_close(inner.b.grad, estimate.sum())

    inner.seen.clear()
    torch.testing.assert_close(net(x_t, t, refine=False)[:, :3], 0.7 * x_t)  # one pass, zero estimate
    assert len(inner.seen) == 1 and not inner.seen[0].any()
    assert net.num_classes == 7  # the wrapped network's attributes show through


def tiny_stage(self_condition: bool) -> GeneratorStage:
    unet = functools.partial(
        UNet,
        model_channels=8,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[],
        head_channels=8,
        dropout=0.0,
        norm_groups=4,
    )
    return GeneratorStage(
        net=unet,
        schedule=SCHEDULE,
        objective=DiffusionLoss(parameterization="v"),
        resolution=8,
        self_condition=self_condition,
    )


class Counting(nn.Module):
    """Counts the passes of the network it wraps."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0
        self.num_classes = net.num_classes

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def test_the_stage_builds_a_self_conditioned_unet_and_draws_its_coin_from_the_training_generator():
    plain = tiny_stage(False).build(num_classes=3)
    assert isinstance(plain, UNet) and plain.lowres_channels == 0  # off: the stage is as before
    stage = tiny_stage(True)
    net = stage.build(num_classes=3)
    assert isinstance(net, SelfConditioning) and net.net.lowres_channels == 3 and net.num_classes == 3
    counter = Counting(net.net)
    net.net = counter
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0])

    def loss_and_passes(seed: int) -> tuple[torch.Tensor, int]:
        counter.calls = 0
        loss = stage.loss(net, images, labels, torch.Generator().manual_seed(seed))  # (4,)
        return loss, counter.calls

    passes = []
    for seed in range(12):
        loss, calls = loss_and_passes(seed)
        again, calls_again = loss_and_passes(seed)
        assert torch.equal(loss, again) and calls == calls_again  # a pure function of the generator
        passes.append(calls)
    assert set(passes) == {1, 2}  # both halves of the coin occur


def test_sampling_refines_at_every_model_call_and_is_a_pure_function_of_its_seed():
    stage = tiny_stage(True)
    torch.manual_seed(0)
    net = stage.build(num_classes=3).eval()
    counter = Counting(net.net)
    net.net = counter
    labels = torch.tensor([0, 2])
    first = stage.sample(net, labels, steps=4, generator=torch.Generator().manual_seed(5), progress=False)
    calls = counter.calls
    second = stage.sample(net, labels, steps=4, generator=torch.Generator().manual_seed(5), progress=False)
    assert torch.equal(first, second) and first.shape == (2, 3, 8, 8)
    assert calls == 2 * 4  # DPM-Solver++(2M): one model call per step, two passes per call


class SelfConditionedNoiseStage(GeneratorStage):
    """The tiny self-conditioned stage at the 4×4 resolution of ``Noise``."""

    def __init__(self) -> None:
        unet = functools.partial(
            UNet, model_channels=8, channel_mult=[1], num_res_blocks=1, attention_resolutions=[], head_channels=8, norm_groups=4
        )
        super().__init__(
            net=unet, schedule=SCHEDULE, objective=DiffusionLoss(parameterization="v"), resolution=4, self_condition=True
        )


def test_a_self_conditioned_run_resumes_bit_identically(tmp_path):
    fit(tmp_path / "whole", steps=6, stage=SelfConditionedNoiseStage(), dataset=Noise())
    run = tmp_path / "split"
    fit(run, steps=3, stage=SelfConditionedNoiseStage(), dataset=Noise(), ckpt_every=100)
    fit(run, steps=6, stage=SelfConditionedNoiseStage(), dataset=Noise())
    assert_same_state(tmp_path / "whole" / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
