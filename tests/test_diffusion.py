"""Closed-form identities of the diffusion core (schedules, kernels, parameterisations, losses)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from cascade.diffusion.denoiser import ModelOutput, network_model_fn
from cascade.diffusion.losses import DiffusionLoss
from cascade.diffusion.process import (
    discretized_gaussian_log_likelihood,
    eps_from_x0,
    model_log_variance,
    normal_kl,
    prediction_target,
    q_posterior,
    q_sample,
    v_from_x0_eps,
    vlb_term,
    x0_eps_from_prediction,
    x0_from_eps,
)
from cascade.diffusion.samplers import SAMPLERS, sample_ddim, sample_ddpm
from cascade.diffusion.schedules import (
    NoiseSchedule,
    cosine_schedule,
    linear_schedule,
    logsnr_spaced_timesteps,
    respace,
    spaced_timesteps,
)

SCHEDULES = {
    "linear": linear_schedule(1000),
    "cosine": cosine_schedule(1000),
    "cosine-respaced": respace(cosine_schedule(1000), 50),
    "cosine-shifted": cosine_schedule(1000, shift=4.0),
}


def test_linear_schedule_end_points():
    betas = linear_schedule(1000).betas
    torch.testing.assert_close(betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    # Scaled for other lengths so that the total noise stays comparable (ADM).
    torch.testing.assert_close(linear_schedule(500).betas[[0, -1]], torch.tensor([2e-4, 0.04], dtype=torch.float64))


def test_cosine_schedule_matches_formula():
    T, s = 1000, 0.008
    schedule = cosine_schedule(T, s=s)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = schedule.betas
    for t in [1, 10, 100, 500, 900, 990]:  # paper's t; our index t−1; β unclipped there
        assert betas[t - 1] < 0.999
        assert schedule.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)  # clipped at the end


def test_shifted_cosine_schedule_lowers_every_log_snr_by_two_log_shift():
    """Hoogeboom et al. 2023, §3.1: log-SNR_shift(t) = log-SNR(t) − 2·log(shift), at every step."""
    plain, shifted = cosine_schedule(1000), cosine_schedule(1000, shift=4.0)
    log_snr = lambda ab: (ab / (1 - ab)).log()  # noqa: E731
    torch.testing.assert_close(
        log_snr(shifted.alphas_cumprod), log_snr(plain.alphas_cumprod) - 2 * math.log(4.0), rtol=0, atol=1e-9
    )
    assert cosine_schedule(1000, shift=1.0).alphas_cumprod.equal(plain.alphas_cumprod)  # ADM's, bit for bit
    with pytest.raises(ValueError, match="shift must be positive"):
        cosine_schedule(1000, shift=0.0)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_q_sample_statistics(name):
    schedule = SCHEDULES[name]
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.tensor([0.7, -0.3, 0.0])[None].expand(n, 3)
    for k in [0, len(schedule) // 3, len(schedule) - 1]:
        kk = torch.full((n,), k)
        x_t = q_sample(schedule, x0, kk, torch.randn(x0.shape, generator=g))
        ab = schedule.alphas_cumprod[k].item()
        se = 4 * math.sqrt((1 - ab) / n)  # four standard errors
        torch.testing.assert_close(x_t.mean(0), math.sqrt(ab) * x0[0], atol=se, rtol=0)
        torch.testing.assert_close(x_t.var(0), torch.full((3,), 1 - ab), atol=4 * (1 - ab) * math.sqrt(2 / n), rtol=0)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_posterior_equals_bayes_rule(name):
    """q(x_{t−1}|x_t,x_0) ∝ q(x_t|x_{t−1}) q(x_{t−1}|x_0): a product of two Gaussians in x_{t−1}."""
    schedule = SCHEDULES[name].to_dict()
    schedule = NoiseSchedule(torch.tensor(schedule["timesteps"]), torch.tensor(schedule["alphas_cumprod"], dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    k = torch.arange(1, len(schedule), dtype=torch.long)
    x0 = torch.randn((len(k), 4), generator=g, dtype=torch.float64)
    x_t = torch.randn((len(k), 4), generator=g, dtype=torch.float64)
    ab = schedule.alphas_cumprod[k][:, None]
    ab_prev = schedule.alphas_cumprod[k - 1][:, None]
    alpha = ab / ab_prev  # one-step α of this (possibly respaced) chain
    # q(x_t | x_{t−1}) = N(√α x_{t−1}, 1−α) as a function of x_{t−1}: precision α/(1−α), mean x_t/√α.
    # q(x_{t−1} | x_0) = N(√ᾱ_{t−1} x_0, 1−ᾱ_{t−1}).
    precision = alpha / (1 - alpha) + 1 / (1 - ab_prev)
    mean = (alpha.sqrt() * x_t / (1 - alpha) + ab_prev.sqrt() * x0 / (1 - ab_prev)) / precision
    ours_mean, ours_var, _ = q_posterior(schedule, x0, x_t, k)
    torch.testing.assert_close(ours_mean, mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours_var.expand_as(mean), (1 / precision).expand_as(mean), rtol=1e-9, atol=1e-15)


def test_posterior_at_first_step_is_x0():
    schedule = SCHEDULES["cosine"]
    x0, x_t = torch.randn(2, 5), torch.randn(2, 5)
    mean, var, _ = q_posterior(schedule, x0, x_t, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()


def test_parameterisation_round_trips():
    g = torch.Generator().manual_seed(2)
    x0, eps = (
        torch.randn((6, 3, 4, 4), generator=g, dtype=torch.float64),
        torch.randn((6, 3, 4, 4), generator=g, dtype=torch.float64),
    )
    ab = torch.tensor([0.9999, 0.9, 0.5, 0.1, 1e-3, 4e-5], dtype=torch.float64).reshape(6, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    torch.testing.assert_close(x0_from_eps(x_t, eps, ab), x0)
    torch.testing.assert_close(eps_from_x0(x_t, x0, ab), eps)
    for parameterization in ["eps", "x0", "v"]:
        target = prediction_target(parameterization, x0, eps, ab)
        x0_hat, eps_hat = x0_eps_from_prediction(target, parameterization, x_t, ab)
        torch.testing.assert_close(x0_hat, x0)
        torch.testing.assert_close(eps_hat, eps)
    # v is the velocity d x_t / dφ of x_t = cos φ x_0 + sin φ ε (Salimans & Ho eq. 4).
    phi = torch.atan2((1 - ab).sqrt(), ab.sqrt())
    torch.testing.assert_close(v_from_x0_eps(x0, eps, ab), -torch.sin(phi) * x0 + torch.cos(phi) * eps)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_respacing_keeps_alpha_bar_and_is_a_valid_diffusion(name):
    schedule = SCHEDULES[name]
    for kept in [spaced_timesteps(1000, 50), logsnr_spaced_timesteps(schedule, 25), torch.tensor([3, 17, 400, 999])]:
        respaced = respace(schedule, kept)
        torch.testing.assert_close(respaced.alphas_cumprod, schedule.alphas_cumprod[kept])
        # The recomputed β are a diffusion on their own: ∏(1 − β'_k) = ᾱ at every kept step.
        torch.testing.assert_close(torch.cumprod(1 - respaced.betas, 0), respaced.alphas_cumprod)
        assert ((respaced.betas > 0) & (respaced.betas < 1)).all()
    assert len(respace(schedule, 50)) == 50 and len(respace(schedule, 25, "logsnr")) == 25
    assert spaced_timesteps(1000, 50)[[0, -1]].tolist() == [0, 999]
    assert torch.equal(respace(schedule, 1000).timesteps, schedule.timesteps)


def test_respace_rejects_foreign_steps():
    with pytest.raises(ValueError, match="not steps of this schedule"):
        respace(respace(SCHEDULES["linear"], 10), torch.tensor([5]))
    with pytest.raises(ValueError, match="num_steps"):
        spaced_timesteps(1000, 0)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_vlb_of_true_posterior_is_zero(name):
    schedule = SCHEDULES[name]
    k = torch.arange(1, len(schedule))
    x0, x_t = torch.randn(len(k), 3, 4, 4), torch.randn(len(k), 3, 4, 4)
    mean, _, log_var = q_posterior(schedule, x0, x_t, k)
    assert vlb_term(schedule, x0, x_t, k, mean, log_var.expand_as(mean)).abs().max() < 1e-5
    # And positive for any other model.
    assert (vlb_term(schedule, x0, x_t, k, mean + 0.1, log_var.expand_as(mean)) > 0).all()


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(3)
    m1, m2, lv1, lv2 = torch.randn((4, 100), generator=g, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_discretized_likelihood_is_a_distribution_over_8bit_values():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)  # every 8-bit value
    for mean, log_scale in [(0.0, -1.0), (0.93, -4.0), (-1.2, 0.5)]:
        logp = discretized_gaussian_log_likelihood(bins, torch.tensor(mean), torch.tensor(log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_model_log_variance_interpolates_between_beta_tilde_and_beta():
    schedule = SCHEDULES["cosine-respaced"]
    k = torch.tensor([3, 20, 49])
    like = torch.zeros(3, 1, 2, 2)
    small = model_log_variance(schedule, k, None, like)
    torch.testing.assert_close(small[:, 0, 0, 0], schedule.posterior_log_variance_clipped[k].float())
    large = model_log_variance(schedule, k, torch.ones_like(like), like)
    torch.testing.assert_close(large[:, 0, 0, 0], schedule.betas[k].log().float())
    half = model_log_variance(schedule, k, torch.full_like(like, 0.5), like)
    torch.testing.assert_close(half, (small + large) / 2)


class OracleNet(torch.nn.Module):
    """A 'network' that returns the exact target for fixed (x0, ε); optionally learned-variance channels."""

    def __init__(self, x0, eps, schedule, parameterization, var_raw=None):
        super().__init__()
        self.x0, self.eps, self.schedule, self.parameterization, self.var_raw = x0, eps, schedule, parameterization, var_raw
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x_t, t, **cond):
        ab = self.schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        out = self.scale * prediction_target(self.parameterization, self.x0, self.eps, ab)
        if self.var_raw is not None:
            out = torch.cat([out, self.var_raw.expand_as(out)], dim=1)
        return out


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_simple_loss_is_zero_for_the_exact_prediction(parameterization):
    schedule = SCHEDULES["linear"]
    x0, eps = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    k = torch.randint(0, 1000, (8,))
    loss = DiffusionLoss(parameterization)
    assert loss(OracleNet(x0, eps, schedule, parameterization), schedule, x0, k, eps).abs().max() < 1e-8
    wrong = OracleNet(x0, eps + 1.0, schedule, "eps")
    torch.testing.assert_close(DiffusionLoss("eps")(wrong, schedule, x0, k, eps), torch.ones(8))


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_weighting_is_the_x0_error_times_min_snr_gamma(parameterization):
    # Hang et al. 2023, eq. 8: whatever the network predicts, the weighted loss is min(SNR_t, γ)·‖x_0 − x̂_0‖².
    schedule = SCHEDULES["cosine"]
    x0, eps = torch.randn(16, 3, 4, 4), torch.randn(16, 3, 4, 4)
    k = torch.linspace(0, 999, 16).long()
    out = torch.randn(16, 3, 4, 4)  # any prediction

    def net(x_t, t, **cond):
        return out

    weighted = DiffusionLoss(parameterization, min_snr_gamma=5.0)(net, schedule, x0, k, eps)
    alpha_bar = schedule.alphas_cumprod[k].view(-1, 1, 1, 1).float()
    x_t = q_sample(schedule, x0, k, eps)
    x0_hat, _ = x0_eps_from_prediction(out, parameterization, x_t, alpha_bar)
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    expected = ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3)) * snr.clamp(max=5.0)
    torch.testing.assert_close(weighted, expected.float(), rtol=1e-4, atol=1e-6)
    assert snr.min() < 5.0 < snr.max()  # both sides of γ are tested
    with pytest.raises(ValueError, match="min_snr_gamma must be positive"):
        DiffusionLoss(parameterization, min_snr_gamma=0.0)


def test_uniform_timesteps_are_torch_randint_draws():
    # The default keeps the draws every earlier run made (resume and old configs reproduce bit for bit).
    schedule = SCHEDULES["cosine"]
    k = DiffusionLoss("v").draw_positions(schedule, 64, torch.Generator().manual_seed(3), torch.device("cpu"))
    torch.testing.assert_close(k, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("mean, std", [(1.0, 2.4), (-2.0, 1.0)])
def test_lognormal_timesteps_put_logsnr_on_its_normal(mean, std):
    # EDM's noise distribution (Karras et al. 2022, Table 1) in log-SNR: the drawn λ_t follow N(mean, std²), compared
    # with the closed-form CDF at its quartiles and ±1.5 std (the schedule spans λ ∈ [−20, 13], so truncation is nil).
    schedule = SCHEDULES["cosine"]
    loss = DiffusionLoss("v", logsnr_mean=mean, logsnr_std=std)
    k = loss.draw_positions(schedule, 100_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    ab = schedule.alphas_cumprod[k]
    lam = torch.log(ab / (1 - ab))
    normal = Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    for z in (-1.5, -0.6745, 0.0, 0.6745, 1.5):
        x = torch.tensor(mean + z * std, dtype=torch.float64)
        assert abs(float((lam < x).double().mean() - normal.cdf(x))) < 0.01  # one step of λ is ≤ 0.1 wide here
    uniform = torch.log(schedule.alphas_cumprod / (1 - schedule.alphas_cumprod))
    assert (
        lam.std() < uniform[torch.randint(0, 1000, (100_000,), generator=torch.Generator().manual_seed(1))].std()
    )  # narrower than the uniform draw's sech law


def test_lognormal_timesteps_refuse_bad_settings():
    with pytest.raises(ValueError, match="logsnr_std must be positive"):
        DiffusionLoss("v", logsnr_mean=1.0, logsnr_std=0.0)
    far = DiffusionLoss("v", logsnr_mean=500.0, logsnr_std=1.0)
    with pytest.raises(ValueError, match="no mass on this schedule's range"):
        far.draw_positions(SCHEDULES["cosine"], 4, torch.Generator().manual_seed(0), torch.device("cpu"))


def test_hybrid_loss_vlb_trains_variance_only():
    schedule = SCHEDULES["linear"]
    x0 = torch.randn(8, 3, 4, 4).clamp(-1, 1)
    eps = torch.randn(8, 3, 4, 4)
    k = torch.randint(1, 1000, (8,))
    # v_raw = −1 → var_frac 0 → Σ = β̃: the model equals the true posterior, so L_vlb = 0.
    net = OracleNet(x0, eps, schedule, "eps", var_raw=torch.tensor(-1.0))
    loss = DiffusionLoss("eps", learned_variance=True)(net, schedule, x0, k, eps)
    assert loss.abs().max() < 1e-5
    # With a wrong mean and a wrong variance, the bound's gradient reaches the variance but not the mean:
    # the gradient w.r.t. the mean output equals that of L_simple alone.
    var_raw = torch.zeros((), requires_grad=True)
    net = OracleNet(x0, eps + 0.3, schedule, "eps", var_raw=var_raw)
    hybrid = DiffusionLoss("eps", learned_variance=True, vb_weight=1.0)(net, schedule, x0, k, eps)
    grad_mean, grad_var = torch.autograd.grad(hybrid.sum(), [net.scale, var_raw])
    assert grad_var.abs() > 0
    net_simple = OracleNet(x0, eps + 0.3, schedule, "eps")
    (expected,) = torch.autograd.grad(DiffusionLoss("eps")(net_simple, schedule, x0, k, eps).sum(), net_simple.scale)
    torch.testing.assert_close(grad_mean, expected)
    assert hybrid.shape == (8,)


def test_network_model_fn_resolves_parameterisation_and_variance():
    schedule = SCHEDULES["cosine"]
    x0, eps = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 10, 500, 999])
    ab = schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    for parameterization in ["eps", "x0", "v"]:
        net = OracleNet(x0, eps, schedule, parameterization, var_raw=torch.tensor(1.0))
        out = network_model_fn(net, schedule, parameterization=parameterization, variance="learned")(x_t, t)
        torch.testing.assert_close(out.eps, eps, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(out.var_frac, torch.ones_like(eps))
    out = network_model_fn(OracleNet(x0, eps, schedule, "eps"), schedule, variance="large")(x_t, t)
    assert torch.equal(out.var_frac, torch.ones_like(eps))
    assert network_model_fn(OracleNet(x0, eps, schedule, "eps"), schedule)(x_t, t).var_frac is None
    # Clipping x̂_0 to [−1, 1] re-derives ε from the clipped x̂_0.
    big = OracleNet(3 * x0.sign(), eps, schedule, "x0")
    out = network_model_fn(big, schedule, parameterization="x0", clip_x0=True)(x_t, t)
    torch.testing.assert_close(x0_from_eps(x_t, out.eps, ab), x0.sign(), atol=1e-3, rtol=1e-3)


def test_ddim_with_eta_one_is_ancestral_sampling():
    """DDIM's σ at η = 1 is √β̃ of the chain's own steps: the same noise gives the DDPM sample."""
    schedule = respace(SCHEDULES["cosine"], 30)
    model_fn = lambda x, t, **_: ModelOutput(eps=torch.tanh(x) * 0.5 + 0.01 * t.float().reshape(-1, 1))  # noqa: E731
    x_T = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    a = sample_ddim(model_fn, x_T, schedule, eta=1.0, generator=torch.Generator().manual_seed(1), progress=False)
    b = sample_ddpm(model_fn, x_T, schedule, generator=torch.Generator().manual_seed(1), progress=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_samplers_are_reproducible_and_respect_the_generator():
    schedule = respace(SCHEDULES["linear"], 20)
    model_fn = lambda x, t, **_: ModelOutput(eps=0.3 * x)  # noqa: E731
    x_T = torch.randn(4, 8)
    run = lambda seed: sample_ddpm(model_fn, x_T, schedule, generator=torch.Generator().manual_seed(seed), progress=False)  # noqa: E731
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_samplers_run_on_cuda():
    schedule = respace(SCHEDULES["cosine"], 10)
    model_fn = lambda x, t, **_: ModelOutput(eps=0.3 * x)  # noqa: E731
    x_T = torch.randn(4, 3, 8, 8, device="cuda")
    for sampler in SAMPLERS.values():
        out = sampler(model_fn, x_T, schedule, generator=torch.Generator("cuda").manual_seed(0), progress=False)
        assert out.device.type == "cuda" and torch.isfinite(out).all()
