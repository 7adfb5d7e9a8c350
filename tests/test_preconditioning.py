"""The low-res prior preconditioning: its skip is the exact Gaussian posterior mean, its c_out the posterior std."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from cascade.diffusion.losses import DiffusionLoss
from cascade.diffusion.preconditioning import LowresPrior, gaussian_lowres_estimate
from cascade.diffusion.process import x0_eps_from_prediction
from cascade.diffusion.schedules import cosine_schedule, linear_schedule
from stages.upsampler import UpsamplerStage

N = 400_000  # scalar draws per statistical check: standard errors ≈ 0.2 %


class Zero(nn.Module):
    """A network with F ≡ 0 (or a constant): what is left is the preconditioning itself."""

    def __init__(self, value: float = 0.0, channels: int = 3) -> None:
        super().__init__()
        self.value, self.channels, self.num_classes = value, channels, 7

    def forward(self, x_t, t, *, lowres, aug_level, **cond):
        return torch.full((x_t.shape[0], self.channels, *x_t.shape[-2:]), self.value)


@pytest.mark.parametrize("alpha_bar_s", [0.999, 0.5, 0.08])
def test_lowres_estimate_is_the_gaussian_posterior(alpha_bar_s):
    g = torch.Generator().manual_seed(0)
    data_std = 0.5
    x = data_std * torch.randn(N, generator=g)
    z = alpha_bar_s**0.5 * x + (1 - alpha_bar_s) ** 0.5 * torch.randn(N, generator=g)
    mean, var = gaussian_lowres_estimate(z, torch.tensor(alpha_bar_s), data_std)
    residual = x - mean
    assert abs(float((residual * z).mean())) < 3e-3  # orthogonal to z: the least-squares (Bayes) estimate
    assert float(residual.var()) == pytest.approx(float(var), rel=1e-2)


@pytest.mark.parametrize("k", [0, 100, 500, 900, 999])
def test_skip_is_the_posterior_mean_and_c_out_its_std(k):
    """x_0 ~ N(m, τ²): with F = 0, x̂_0 is E[x_0 | x_t] (residual ⟂ x_t) and x̂_0(F=1) − x̂_0(F=0) = std[x_0 | x_t]."""
    schedule = linear_schedule(1000)
    prior = LowresPrior(Zero(), schedule=schedule, aug_schedule=schedule)
    g = torch.Generator().manual_seed(k)
    m = torch.rand(N, generator=g) * 2 - 1  # any centres
    tau2 = torch.tensor(0.3) ** 2
    x0 = m + tau2.sqrt() * torch.randn(N, generator=g)
    ab = schedule.alphas_cumprod[k]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(N, generator=g)
    shape = lambda v: v.view(1, 1, 1, -1)  # noqa: E731  one "image" of N pixels
    t = schedule.timesteps[k : k + 1]
    x0_hat = prior.denoise(shape(x_t), t, shape(m), tau2.view(1, 1, 1, 1), torch.zeros(1, 1, 1, N)).flatten()
    residual = x0 - x0_hat
    assert abs(float(residual.mean())) < 3e-3
    assert abs(float((residual * (x_t - ab.sqrt() * m)).mean())) < 3e-3
    c_out = prior.denoise(shape(x_t), t, shape(m), tau2.view(1, 1, 1, 1), torch.ones(1, 1, 1, N)).flatten() - x0_hat
    assert float(c_out[0]) == pytest.approx(float(residual.std()), rel=1e-2)


def test_output_is_v_and_limits():
    """α x_t − σ v gives back x̂_0; at the last t x̂_0 is the prior centre, at aug level 0 that is the low-res image."""
    schedule, aug = linear_schedule(1000), cosine_schedule(1000)
    prior = LowresPrior(Zero(value=0.0, channels=6), schedule=schedule, aug_schedule=aug, residual_std=0.2)
    g = torch.Generator().manual_seed(0)
    x_t, lowres = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    t, s = schedule.timesteps[[999, 0]], aug.timesteps[[0, 0]]
    out = prior(x_t, t, lowres=lowres, aug_level=s)
    assert out.shape == (2, 6, 8, 8) and torch.equal(out[:, 3:], torch.zeros(2, 3, 8, 8))  # extra channels untouched
    ab = schedule.alphas_cumprod[[999, 0]].view(-1, 1, 1, 1).float()
    x0, _ = x0_eps_from_prediction(out[:, :3], "v", x_t, ab)
    mean, tau2 = prior.prior(lowres, s)
    assert torch.allclose(x0, prior.denoise(x_t, t, mean, tau2, torch.zeros_like(x_t)), atol=1e-5)
    assert torch.allclose(x0[0], lowres[0], atol=2e-3)  # t = T: the (clean) low-res image
    assert torch.allclose(x0[1], x_t[1] / ab[1].sqrt(), atol=2e-2)  # t = 0: about the noisy image itself (c_skip → 1/α)
    assert prior.num_classes == 7  # the wrapped network's attributes show through


def test_stage_wraps_its_network_and_requires_v():
    net = instantiate(
        {
            "_target_": "cascade.nn.UNet",
            "_partial_": True,
            "model_channels": 32,
            "channel_mult": [1, 2],
            "num_res_blocks": 1,
            "attention_resolutions": [],
            "middle_attention": False,
        }
    )
    prior = instantiate({"_target_": "cascade.diffusion.preconditioning.LowresPrior", "_partial_": True, "residual_std": 0.01})
    kwargs = dict(
        net=net,
        schedule=linear_schedule(1000),
        aug_schedule=linear_schedule(1000),
        name="sr16",
        resolution=16,
        lowres_resolution=4,
        lowres_prior=prior,
    )
    stage = UpsamplerStage(objective=DiffusionLoss(parameterization="v"), **kwargs)
    wrapped = stage.build(num_classes=3)
    assert isinstance(wrapped, LowresPrior)
    assert set(wrapped.state_dict()) == {f"net.{k}" for k in wrapped.net.state_dict()}  # schedules are not saved
    g = torch.Generator().manual_seed(0)  # not the global RNG: its state depends on which tests ran before
    out = stage.sample(wrapped, torch.zeros(2, 3, 4, 4), torch.tensor([0, 2]), aug_level=0, steps=2, progress=False, generator=g)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    # An untrained (zero-output) network samples the Gaussian prior N(bicubic image, τ_0²): here τ_0 = 0.01 around 0.
    # Two solver steps follow the prior's flow only approximately (std 0.0107–0.0120 over seeds 0–7), and the largest
    # of 1536 draws lies near 4σ; 6σ bounds it.
    assert 0.008 < float(out.std()) < 0.0125 and float(out.abs().max()) < 0.06
    with pytest.raises(ValueError, match="parameterization=v"):
        UpsamplerStage(objective=DiffusionLoss(parameterization="eps"), **kwargs)


@pytest.mark.parametrize("k", [0, 30, 300, 999])
def test_detail_weighting_makes_the_v_loss_the_error_of_f(k):
    """Weighted v-loss = ‖F − F*‖², F* = (x_0 − E_prior[x_0 | x_t]) / c_out, the target F has under the prior (EDM's 1/c_out²)."""
    schedule, aug = linear_schedule(1000), linear_schedule(1000)
    f_value = 0.7
    prior = LowresPrior(Zero(value=f_value), schedule=schedule, aug_schedule=aug, residual_std=0.05, detail_weighting=True)
    g = torch.Generator().manual_seed(k)
    x0, lowres, noise = (torch.randn(4, 3, 8, 8, generator=g) * 0.5 for _ in range(3))
    kk, s = torch.full((4,), k), aug.timesteps[[0, 50, 200, 499]]
    v_loss = DiffusionLoss(parameterization="v")(prior, schedule, x0, kk, noise, lowres=lowres, aug_level=s)  # (4,)
    t = schedule.timesteps[kk]
    ab = schedule.alphas_cumprod[kk].view(-1, 1, 1, 1).float()
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    mean, tau2 = prior.prior(lowres, s)
    posterior_mean = prior.denoise(x_t, t, mean, tau2, torch.zeros_like(x0))
    c_out = prior.denoise(x_t, t, mean, tau2, torch.ones_like(x0)) - posterior_mean
    f_star = (x0 - posterior_mean) / c_out
    expected = ((f_value - f_star) ** 2).mean(dim=(1, 2, 3))  # (4,)
    assert torch.allclose(v_loss * prior.loss_weight(t, s), expected, rtol=1e-4)
    unweighted = LowresPrior(Zero(), schedule=schedule, aug_schedule=aug, residual_std=0.05)
    assert torch.equal(unweighted.loss_weight(t, s), torch.ones(4))


class Recording(Zero):
    """A constant-F network that remembers the timesteps and conditioning levels it was called at."""

    def forward(self, x_t, t, *, lowres, aug_level, **cond):
        self.seen = (t, aug_level)
        return super().forward(x_t, t, lowres=lowres, aug_level=aug_level, **cond)


def test_upsampler_stage_applies_the_detail_weighting():
    kwargs = dict(
        net=lambda **_: Recording(value=0.3),
        schedule=linear_schedule(1000),
        aug_schedule=linear_schedule(1000),
        objective=DiffusionLoss(parameterization="v"),
        name="sr16",
        resolution=16,
        lowres_resolution=4,
        class_conditional=False,
    )
    images, labels = torch.rand(6, 3, 16, 16) * 2 - 1, torch.zeros(6, dtype=torch.long)
    losses = {}
    for weighting in (False, True):
        prior = instantiate(
            {
                "_target_": "cascade.diffusion.preconditioning.LowresPrior",
                "_partial_": True,
                "residual_std": 0.05,
                "detail_weighting": weighting,
            }
        )
        net = UpsamplerStage(lowres_prior=prior, **kwargs).build(num_classes=1)
        losses[weighting] = UpsamplerStage(lowres_prior=prior, **kwargs).loss(
            net, images, labels, torch.Generator().manual_seed(0)
        )
    t, s = net.net.seen
    weight = net.loss_weight(t, s)  # (6,)
    assert torch.allclose(losses[True], losses[False] * weight, rtol=1e-5) and bool((weight > 1).any())


class Logit(nn.Module):
    """F ≡ 0 and a given detail-scale logit map (1, 1, H, W), then ``extra`` zero channels (a learned variance)."""

    def __init__(self, logit: torch.Tensor, extra: int = 0) -> None:
        super().__init__()
        self.logit, self.extra = logit, extra

    def forward(self, x_t, t, *, lowres, aug_level, **cond):
        b, _, h, w = x_t.shape
        zeros = torch.zeros(b, 3, h, w)
        return torch.cat([zeros, self.logit.expand(b, 1, h, w), torch.zeros(b, self.extra, h, w)], dim=1)


@pytest.mark.parametrize("k", [100, 500, 900])
def test_learned_detail_scale_is_the_per_pixel_posterior(k):
    """Pixels whose logits give τ_0 = 0.02 and τ_0 = 0.4: with F = 0, x̂_0 is each pixel's own Gaussian posterior mean."""
    schedule, aug = linear_schedule(1000), linear_schedule(1000)
    tau_max, tau0 = 0.5, 0.05
    low, high = 0.02, 0.4
    logit_of = lambda tau: math.log(tau / (tau_max - tau)) - math.log(tau0 / (tau_max - tau0))  # noqa: E731  sigmoid(g + b) = τ/τ_max
    half = N // 2
    logit = torch.cat([torch.full((half,), logit_of(low)), torch.full((half,), logit_of(high))]).view(1, 1, 1, N)
    prior = LowresPrior(Logit(logit, extra=3), schedule=schedule, aug_schedule=aug, residual_std=tau0, detail_scale_max=tau_max)
    g = torch.Generator().manual_seed(k)
    lowres = (torch.rand(N, generator=g) * 2 - 1).view(1, 1, 1, N).expand(1, 3, 1, N)  # aug level 0: the centre m itself
    tau = torch.cat([torch.full((half,), low), torch.full((half,), high)])
    x0 = lowres[0, 0, 0] + tau * torch.randn(N, generator=g)  # (N,) ~ N(m, τ(x)²) pixel by pixel
    ab = schedule.alphas_cumprod[k]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(N, generator=g)
    t, s = schedule.timesteps[k : k + 1], aug.timesteps[:1]
    out = prior(x_t.view(1, 1, 1, N).expand(1, 3, 1, N), t, lowres=lowres, aug_level=s)
    assert out.shape == (1, 6, 1, N) and torch.equal(out[:, 3:], torch.zeros(1, 3, 1, N))  # the variance passes through
    x0_hat, _ = x0_eps_from_prediction(out[:, :3], "v", x_t.view(1, 1, 1, N).expand(1, 3, 1, N), ab.view(1, 1, 1, 1).float())
    residual = x0 - x0_hat[0, 0, 0]
    m = lowres[0, 0, 0]
    for group in (slice(0, half), slice(half, N)):  # the Bayes residual is orthogonal to the pixel's own observation
        r, obs = residual[group], (x_t - ab.sqrt() * m)[group]
        assert abs(float((r * obs).mean())) < 3e-3 * float(obs.std())
        assert abs(float(r.mean())) < 3e-3


def test_learned_detail_scale_starts_at_the_fixed_prior():
    """A zero logit gives exactly the fixed-τ_0 prior; the stage sizes its network for the extra channel and trains it."""
    schedule, aug = linear_schedule(1000), linear_schedule(1000)
    g = torch.Generator().manual_seed(0)
    x_t, lowres = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    t, s = schedule.timesteps[[700, 20]], aug.timesteps[[0, 40]]
    fixed = LowresPrior(Zero(), schedule=schedule, aug_schedule=aug, residual_std=0.05)
    learned = LowresPrior(
        Logit(torch.zeros(1, 1, 1, 1)), schedule=schedule, aug_schedule=aug, residual_std=0.05, detail_scale_max=0.4
    )
    assert torch.allclose(learned(x_t, t, lowres=lowres, aug_level=s), fixed(x_t, t, lowres=lowres, aug_level=s), atol=1e-6)
    assert LowresPrior.extra_output_channels(residual_std=0.05) == 0
    assert LowresPrior.extra_output_channels(residual_std=0.05, detail_scale_max=0.4) == 1
    with pytest.raises(ValueError, match="must exceed residual_std"):
        LowresPrior(Zero(), schedule=schedule, aug_schedule=aug, residual_std=0.05, detail_scale_max=0.05)
    with pytest.raises(ValueError, match="use one of the two"):
        LowresPrior(Zero(), schedule=schedule, aug_schedule=aug, residual_std=0.05, detail_scale_max=0.4, detail_weighting=True)

    net = instantiate(
        {"_target_": "cascade.nn.UNet", "_partial_": True, "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
         "attention_resolutions": [], "middle_attention": False}
    )  # fmt: skip
    prior = instantiate(
        {
            "_target_": "cascade.diffusion.preconditioning.LowresPrior",
            "_partial_": True,
            "residual_std": 0.05,
            "detail_scale_max": 0.4,
        }
    )
    stage = UpsamplerStage(
        net=net,
        schedule=schedule,
        aug_schedule=aug,
        objective=DiffusionLoss(parameterization="v", learned_variance=True),
        name="sr16",
        resolution=16,
        lowres_resolution=4,
        lowres_prior=prior,
    )
    wrapped = stage.build(num_classes=3)
    assert wrapped.net.out[-1].out_channels == 3 + 1 + 3  # F, the logit, the learned variance
    torch.nn.init.normal_(wrapped.net.out[-1].weight, std=0.01)  # past the zero initialisation: gradients reach the logit
    loss = stage.loss(wrapped, torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 1]), torch.Generator().manual_seed(1))
    loss.mean().backward()
    assert torch.isfinite(loss).all() and float(wrapped.net.out[-1].weight.grad[3].abs().sum()) > 0
    out = stage.sample(wrapped, torch.zeros(2, 3, 4, 4), torch.tensor([0, 2]), aug_level=0, steps=2, progress=False, generator=g)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
