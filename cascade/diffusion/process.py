"""Gaussian diffusion mathematics: forward kernel, posterior, parameterisations, likelihood terms.

All functions are pure. Positions ``k`` index a :class:`~cascade.diffusion.schedules.NoiseSchedule`
(for the full training schedule, k equals the training timestep t). Schedule values are
kept in float64 and cast to the dtype of the tensors they meet.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from cascade.diffusion.schedules import NoiseSchedule

__all__ = [
    "Parameterization",
    "at",
    "q_sample",
    "q_posterior",
    "x0_from_eps",
    "eps_from_x0",
    "v_from_x0_eps",
    "x0_eps_from_prediction",
    "prediction_target",
    "model_log_variance",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "vlb_term",
    "mean_flat",
]

Parameterization = Literal["eps", "x0", "v"]


def at(values: Tensor, k: Tensor, like: Tensor) -> Tensor:
    """``values[k]`` shaped (B, 1, …, 1) to broadcast against ``like`` (B, …), in ``like``'s dtype."""
    out = values.to(like.device, non_blocking=True)[k.to(like.device)].to(like.dtype)  # (B,); a host table: no stream sync
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension: (B, …) → (B,)."""
    return x.flatten(1).mean(dim=1)


def q_sample(schedule: NoiseSchedule, x0: Tensor, k: Tensor, noise: Tensor) -> Tensor:
    """Draw from the forward kernel q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (Ho et al. eq. 4)."""
    ab = at(schedule.alphas_cumprod, k, x0)  # (B, 1, 1, 1)
    return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise  # (B, C, H, W)


def q_posterior(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0) (Ho et al. eqs. 6–7).

    μ̃ = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t,
    β̃ = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t.
    """
    ab, ab_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    coef_x0 = ab_prev.sqrt() * schedule.betas / (1.0 - ab)  # (K,)
    coef_xt = (1.0 - schedule.betas).sqrt() * (1.0 - ab_prev) / (1.0 - ab)  # (K,)
    mean = at(coef_x0, k, x_t) * x0 + at(coef_xt, k, x_t) * x_t  # (B, C, H, W)
    var = at(schedule.posterior_variance, k, x_t)  # (B, 1, 1, 1)
    log_var = at(schedule.posterior_log_variance_clipped, k, x_t)  # (B, 1, 1, 1)
    return mean, var, log_var


# --- Parameterisations: exact conversions between ε, x_0 and v given (x_t, ᾱ_t) -------------


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """x_0 = (x_t − √(1 − ᾱ) ε) / √ᾱ."""
    return (x_t - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    """ε = (x_t − √ᾱ x_0) / √(1 − ᾱ)."""
    return (x_t - alpha_bar.sqrt() * x0) / (1.0 - alpha_bar).sqrt()


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """v = √ᾱ ε − √(1 − ᾱ) x_0 (Salimans & Ho 2022, "Progressive Distillation", §4)."""
    return alpha_bar.sqrt() * eps - (1.0 - alpha_bar).sqrt() * x0


def x0_eps_from_prediction(
    prediction: Tensor, parameterization: Parameterization, x_t: Tensor, alpha_bar: Tensor
) -> tuple[Tensor, Tensor]:
    """(x_0, ε) implied by a network prediction of ε, x_0 or v at noisy input x_t."""
    if parameterization == "eps":
        return x0_from_eps(x_t, prediction, alpha_bar), prediction
    if parameterization == "x0":
        return prediction, eps_from_x0(x_t, prediction, alpha_bar)
    if parameterization == "v":
        a, s = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
        return a * x_t - s * prediction, s * x_t + a * prediction
    raise ValueError(f"unknown parameterization {parameterization!r}; use 'eps', 'x0' or 'v'")


def prediction_target(parameterization: Parameterization, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """What a network of this parameterisation should output for the pair (x_0, ε)."""
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from_x0_eps(x0, eps, alpha_bar)
    raise ValueError(f"unknown parameterization {parameterization!r}; use 'eps', 'x0' or 'v'")


# --- Variances and likelihood terms ---------------------------------------------------------


def model_log_variance(schedule: NoiseSchedule, k: Tensor, var_frac: Tensor | None, like: Tensor) -> Tensor:
    """log Σ = v log β_t + (1 − v) log β̃_t ("learned range", Nichol & Dhariwal 2021, eq. 15).

    ``var_frac`` v ∈ [0, 1] per element; ``None`` means v = 0, the posterior variance β̃.
    β and β̃ are those of ``schedule``'s own (possibly respaced) steps.
    """
    min_log = at(schedule.posterior_log_variance_clipped, k, like)  # (B, 1, 1, 1)
    if var_frac is None:
        return min_log.expand_as(like)
    max_log = at(schedule.betas.log(), k, like)  # (B, 1, 1, 1)
    return var_frac * max_log + (1.0 - var_frac) * min_log  # (B, C, H, W)


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, e^{log_var1}) ‖ N(mean2, e^{log_var2})), elementwise, in nats."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) of 8-bit data in [−1, 1] under N(mean, e^{2·log_scale}) integrated over each bin.

    The bins have width 2/255; the first and last extend to −∞ and +∞ (Ho et al. 2020, eq. 13).
    Elementwise, in nats.
    """
    inv_std = torch.exp(-log_scale)
    upper = (x - mean + 1.0 / 255.0) * inv_std
    lower = (x - mean - 1.0 / 255.0) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Φ(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)  # log(1 − Φ(lower))
    mid = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, mid))


def vlb_term(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, k: Tensor, model_mean: Tensor, model_log_var: Tensor) -> Tensor:
    """The variational bound term L_t per example, in bits per dimension.

    For k > 0: KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) (Ho et al. eq. 5);
    for k = 0: the decoder's negative log-likelihood −log p_θ(x_0 | x_1) on 8-bit bins.
    Returns (B,).
    """
    true_mean, _, true_log_var = q_posterior(schedule, x0, x_t, k)
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)  # (B,)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)  # (B,)
    return torch.where(k.to(kl.device) == 0, nll, kl)
