"""Training losses of a denoising network: L_simple and the hybrid L_simple + λ L_vlb.

A loss holds only hyperparameters and returns a per-example loss; the training loop
reduces it (EDM ``training/loss.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cascade.diffusion.denoiser import split_learned_variance
from cascade.diffusion.process import (
    Parameterization,
    at,
    mean_flat,
    model_log_variance,
    prediction_target,
    q_posterior,
    q_sample,
    vlb_term,
    x0_eps_from_prediction,
)
from cascade.diffusion.schedules import NoiseSchedule

__all__ = ["DiffusionLoss"]


class DiffusionLoss:
    """L_simple = ‖target − net(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, cond)‖² (Ho et al. eq. 14), optionally hybrid.

    With ``learned_variance`` the network outputs 2C channels, the second half setting the
    "learned range" variance, and the loss is L_simple + λ·T·L_t (Nichol & Dhariwal 2021,
    eq. 16): L_t in bits/dim with a stop-gradient on the mean, so the variance alone learns
    from the bound. λ·T is ADM's weighting (λ = 0.001 gives 1 at T = 1000).

    ``min_snr_gamma`` γ: Min-SNR-γ weighting (Hang et al. 2023, eq. 8): every timestep's
    L_simple is rescaled so that, in x_0 terms, it weighs min(SNR_t, γ) — ε-, v- and x_0-errors
    are SNR, SNR + 1 and 1 times the x_0-error, so the factor is min(SNR, γ) / that. It stops the
    near-noiseless timesteps (huge SNR, nothing left to learn about the image's layout) from
    dominating the gradient; the paper measures ≈ 3× faster convergence with γ = 5.

    ``logsnr_mean`` μ, ``logsnr_std`` s: which timesteps training draws. None (default, as DDPM and
    ADM): t uniform over the schedule. A number: t drawn so that log-SNR λ_t = log(ᾱ_t / (1 − ᾱ_t))
    is distributed as N(μ, s²) over the schedule's range (:meth:`draw_positions`). This is EDM's
    log-normal noise distribution (Karras et al. 2022, Table 1: ln σ ~ N(P_mean, P_std²), i.e.
    λ = 2 ln(σ_data / σ)); with σ_data = 0.5, P_mean = −1.2, P_std = 1.2 it is μ ≈ 1.0, s = 2.4. The
    uniformly drawn cosine schedule spreads λ much wider (a sech density of standard deviation π),
    spending steps on the nearly pure-noise and nearly clean ends, where little is learned.
    """

    def __init__(
        self,
        parameterization: Parameterization = "eps",  # what the network predicts
        learned_variance: bool = False,  # second half of the output channels sets Σ
        vb_weight: float = 0.001,  # λ of the hybrid loss
        min_snr_gamma: float | None = None,  # γ of Min-SNR-γ weighting of L_simple; None: unweighted
        logsnr_mean: float | None = None,  # training t drawn with log-SNR ~ N(mean, std²); None: t uniform
        logsnr_std: float = 2.4,  # spread of that log-SNR distribution (EDM: 2 · P_std = 2.4)
    ) -> None:
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive (the paper uses 5), got {min_snr_gamma}")
        if logsnr_std <= 0:
            raise ValueError(f"logsnr_std must be positive (EDM's is 2.4), got {logsnr_std}")
        self.parameterization = parameterization
        self.learned_variance = learned_variance
        self.vb_weight = vb_weight
        self.min_snr_gamma = min_snr_gamma
        self.logsnr_mean = logsnr_mean
        self.logsnr_std = logsnr_std

    def draw_positions(self, schedule: NoiseSchedule, batch: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """Training positions k (B,) into ``schedule``: uniform, or log-SNR ~ N(μ, s²) (see the class docstring).

        The discrete schedule gets the probability mass the normal density puts on each step's
        span of log-SNR: p_k ∝ N(λ_k; μ, s²) · |λ_{k+1} − λ_{k−1}| / 2 (the span at the ends is one-sided).
        """
        if self.logsnr_mean is None:
            return torch.randint(0, len(schedule), (batch,), generator=generator, device=device)  # (B,)
        ab = schedule.alphas_cumprod
        lam = torch.log(ab / (1 - ab))  # (K,) decreasing
        edges = torch.cat([lam[:1], (lam[1:] + lam[:-1]) / 2, lam[-1:]])  # (K+1,) midpoints, the ends at the ends
        span = edges[:-1] - edges[1:]  # (K,) positive
        density = torch.exp(-0.5 * ((lam - self.logsnr_mean) / self.logsnr_std) ** 2)  # (K,)
        probs = (density * span).float()  # (K,)
        if len(schedule) == 1 or not bool(probs.sum() > 0):
            raise ValueError(
                f"log-SNR ~ N({self.logsnr_mean}, {self.logsnr_std}²) puts no mass on this schedule's range "
                f"[{float(lam[-1]):.1f}, {float(lam[0]):.1f}]; choose logsnr_mean inside it"
            )
        k = torch.multinomial(probs.to(generator.device), batch, replacement=True, generator=generator)  # (B,)
        return k.to(device)

    def __call__(
        self,
        net: Callable[..., Tensor],
        schedule: NoiseSchedule,
        x0: Tensor,
        k: Tensor,
        noise: Tensor,
        **cond: Tensor,
    ) -> Tensor:
        """Per-example loss (B,) for clean data x0 (B, C, H, W) at schedule positions k (B,)."""
        x_t = q_sample(schedule, x0, k, noise)  # (B, C, H, W)
        out = net(x_t, schedule.timesteps.to(k.device)[k], **cond).float()  # (B, C or 2C, H, W)
        var_frac = None
        if self.learned_variance:
            out, var_frac = split_learned_variance(out)
        alpha_bar = at(schedule.alphas_cumprod, k, x0)  # (B, 1, 1, 1)
        target = prediction_target(self.parameterization, x0, noise, alpha_bar)
        loss = mean_flat((target - out) ** 2)  # (B,)
        if self.min_snr_gamma is not None:
            snr = (alpha_bar / (1 - alpha_bar)).flatten()  # (B,)
            per_x0 = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[self.parameterization]  # (B,)
            loss = loss * snr.clamp(max=self.min_snr_gamma) / per_x0  # (B,)
        if self.learned_variance:
            # Stop-gradient on the mean: L_vlb trains the variance only (Nichol & Dhariwal §3.1).
            x0_hat, _ = x0_eps_from_prediction(out.detach(), self.parameterization, x_t, alpha_bar)
            model_mean, _, _ = q_posterior(schedule, x0_hat, x_t, k)
            log_var = model_log_variance(schedule, k, var_frac, x_t)
            vb = vlb_term(schedule, x0, x_t, k, model_mean, log_var)  # (B,)
            loss = loss + self.vb_weight * len(schedule) * vb
        return loss

    def __repr__(self) -> str:
        return (
            f"DiffusionLoss(parameterization={self.parameterization!r}, "
            f"learned_variance={self.learned_variance}, vb_weight={self.vb_weight}, min_snr_gamma={self.min_snr_gamma}, "
            f"logsnr_mean={self.logsnr_mean}, logsnr_std={self.logsnr_std})"
        )
