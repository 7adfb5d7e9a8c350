"""Samplers: pure functions of a model function, a starting noise and a step schedule.

Every sampler has the signature
``sampler(model_fn, x_T, schedule, *, cond=None, generator=None, progress=True) -> x_0``
(plus its own keyword options), walks ``schedule`` from its last step to its first, and
ends on the clean sample (ᾱ_{−1} = 1). Respacing is simply passing a respaced schedule.
Guidance is applied by wrapping ``model_fn`` (see :mod:`cascade.diffusion.guidance`); samplers never
know about it. They run under ``torch.inference_mode`` (no autograd bookkeeping at all);
classifier guidance takes its input gradient by stepping out of it for that one call
(:func:`cascade.diffusion.guidance.log_prob_gradient`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cascade.diffusion.denoiser import ModelFn
from cascade.diffusion.process import model_log_variance, x0_from_eps
from cascade.diffusion.schedules import NoiseSchedule, Spacing
from cascade.utils.rng import Generator, randn

__all__ = [
    "SamplerName",
    "GuidanceMode",
    "SamplerSpec",
    "REGISTRY",
    "SAMPLERS",
    "sample_ddpm",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "get_sampler",
    "sampler_spec",
]

SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"]
GuidanceMode = Literal["mean", "eps"]  # how classifier guidance enters a step (cascade.diffusion.guidance)


def _steps(schedule: NoiseSchedule, x: Tensor, desc: str, progress: bool) -> Iterator[tuple[int, Tensor]]:
    """Positions k = K−1 … 0 with the batch's training timesteps t (B,), under a progress bar.

    The schedule is read on the host once, before the loop: a step reads no tensor value (no device sync).
    """
    timesteps = schedule.timesteps.tolist()
    for k in tqdm(range(len(schedule) - 1, -1, -1), desc=desc, disable=not progress, leave=False, unit="step"):
        yield k, torch.full((x.shape[0],), timesteps[k], device=x.device, dtype=torch.long)


def _noise_like(x: Tensor, generator: Generator) -> Tensor:
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


@torch.inference_mode()
def sample_ddpm(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    cond: Mapping[str, Tensor] | None = None,
    generator: Generator = None,
    progress: bool = True,
) -> Tensor:
    """Ancestral sampling of p_θ(x_{t−1} | x_t) = N(μ̃(x_t, x̂_0), Σ) (Ho et al. 2020, Alg. 2).

    μ̃ is the posterior mean (eq. 7) at the predicted x̂_0; Σ is β̃, β or the learned range
    (Nichol & Dhariwal eq. 15), from the model output's ``var_frac``. On a respaced schedule
    β and β̃ are those of the kept steps (Nichol & Dhariwal §4).
    """
    cond = dict(cond or {})
    # Host copies, read once: a step reads no tensor value (no device sync; CUDA-graph friendly).
    ab_all, ab_prev_all, betas = schedule.alphas_cumprod.tolist(), schedule.alphas_cumprod_prev.tolist(), schedule.betas.tolist()
    x = x_T
    for k, t in _steps(schedule, x, "DDPM", progress):
        out = model_fn(x, t, **cond)
        ab, ab_prev, beta = ab_all[k], ab_prev_all[k], betas[k]
        x0 = x0_from_eps(x, out.eps, torch.tensor(ab, dtype=x.dtype))  # (B, C, H, W)
        mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        if k == 0:
            x = mean
        else:
            kk = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
            log_var = model_log_variance(schedule, kk, out.var_frac, x)  # (B, C, H, W)
            x = mean + torch.exp(0.5 * log_var) * _noise_like(x, generator)
    return x


@torch.inference_mode()
def sample_ddim(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    eta: float = 0.0,
    cond: Mapping[str, Tensor] | None = None,
    generator: Generator = None,
    progress: bool = True,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1−ᾱ_{t−1}−σ²) ε̂ + σ z.

    σ = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}); η = 0 is the deterministic probability-flow
    discretisation, η = 1 is ancestral sampling with Σ = β̃ of the schedule's steps.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    cond = dict(cond or {})
    ab_all, ab_prev_all = schedule.alphas_cumprod.tolist(), schedule.alphas_cumprod_prev.tolist()  # read once (no per-step sync)
    x = x_T
    for k, t in _steps(schedule, x, "DDIM", progress):
        out = model_fn(x, t, **cond)
        ab, ab_prev = ab_all[k], ab_prev_all[k]
        x0 = x0_from_eps(x, out.eps, torch.tensor(ab, dtype=x.dtype))  # (B, C, H, W)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * out.eps
        if sigma > 0:
            x = x + sigma * _noise_like(x, generator)
    return x


@torch.inference_mode()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    cond: Mapping[str, Tensor] | None = None,
    generator: Generator = None,
    progress: bool = True,
    lower_order_final: bool = True,
    stochastic: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep solver of the diffusion ODE.

    In the data-prediction form with λ = log(α/σ), α = √ᾱ, σ = √(1−ᾱ), h_i = λ_{i} − λ_{i−1}:
    x_i = (σ_i/σ_{i−1}) x_{i−1} − α_i (e^{−h_i} − 1) D_i, with D_i = (1 + 1/(2r_i)) x̂_0^{(i−1)}
    − 1/(2r_i) x̂_0^{(i−2)}, r_i = h_{i−1}/h_i. The first step is first order (DDIM); so is the
    step onto the schedule's first step when ``lower_order_final`` (the usual remedy for the
    large last log-SNR jump of few-step schedules; Lu et al. 2022b §5); the final jump, to
    σ = 0, returns x̂_0. One model evaluation per schedule step.

    ``stochastic``: the solver of the reverse SDE instead (SDE-DPM-Solver++(2M), Lu et al. 2022b §4, the
    midpoint form), with the same D_i: x_i = (σ_i/σ_{i−1}) e^{−h_i} x_{i−1} + α_i (1 − e^{−2h_i}) D_i
    + σ_i √(1 − e^{−2h_i}) z_i, z_i ~ N(0, I) from ``generator`` (per-image streams make image i's noise
    independent of its batch: :mod:`cascade.utils.rng`). Each step forgets part of x_{i−1} and draws fresh
    noise in its place, so the model's errors at earlier steps are partly washed out rather than carried along
    the ODE's trajectory; it needs more steps for the same discretisation error. Without it ``generator`` is
    unused: the ODE solver is deterministic.
    """
    cond = dict(cond or {})
    alpha_t = schedule.alphas_cumprod.sqrt()  # (K,)
    sigma_t = (1.0 - schedule.alphas_cumprod).sqrt()  # (K,)
    # Host copies, read once: a step reads no tensor value (no device sync; CUDA-graph friendly).
    alpha, sigma, lam = alpha_t.tolist(), sigma_t.tolist(), (alpha_t / sigma_t).log().tolist()
    x = x_T
    x0_prev: Tensor | None = None
    h_prev = 0.0
    for k, t in _steps(schedule, x, "DPM-Solver++(2M) SDE" if stochastic else "DPM-Solver++(2M)", progress):
        out = model_fn(x, t, **cond)
        x0 = x0_from_eps(x, out.eps, torch.tensor(alpha[k] ** 2, dtype=x.dtype))  # (B, C, H, W)
        if k == 0:
            return x0
        h = lam[k - 1] - lam[k]
        if x0_prev is None or (k == 1 and lower_order_final):
            d = x0  # first order: the first step has no history; the last one is too long to extrapolate
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        if stochastic:
            x = (sigma[k - 1] / sigma[k] * math.exp(-h)) * x - alpha[k - 1] * math.expm1(-2 * h) * d
            x = x + sigma[k - 1] * math.sqrt(-math.expm1(-2 * h)) * _noise_like(x, generator)
        else:
            x = (sigma[k - 1] / sigma[k]) * x - alpha[k - 1] * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def sample_dpmpp_2m_sde(model_fn: ModelFn, x_T: Tensor, schedule: NoiseSchedule, **options: Any) -> Tensor:
    """SDE-DPM-Solver++(2M): :func:`sample_dpmpp_2m` with ``stochastic=True`` (its keyword options otherwise)."""
    return sample_dpmpp_2m(model_fn, x_T, schedule, stochastic=True, **options)


@dataclass(frozen=True)
class SamplerSpec:
    """What a sampler's name decides besides its function.

    ``default_spacing``: the respacing used when the caller names none — uniform steps for
    ancestral sampling (ADM's respacing, Nichol & Dhariwal §4), log-SNR steps for the ODE
    solvers (Lu et al. 2022). ``guidance_mode``: how classifier guidance is applied — ADM's
    shift of the Gaussian step's mean by sΣ∇ log p (Dhariwal & Nichol Alg. 1) for the ancestral
    sampler, the ε-correction ε − s√(1−ᾱ)∇ log p (Alg. 2) for DDIM and DPM-Solver.
    """

    fn: Callable[..., Tensor]
    default_spacing: Spacing
    guidance_mode: GuidanceMode


REGISTRY: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, default_spacing="uniform", guidance_mode="mean"),
    "ddim": SamplerSpec(sample_ddim, default_spacing="logsnr", guidance_mode="eps"),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, default_spacing="logsnr", guidance_mode="eps"),
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde, default_spacing="logsnr", guidance_mode="eps"),
}

SAMPLERS: dict[str, Callable[..., Tensor]] = {name: spec.fn for name, spec in REGISTRY.items()}


def sampler_spec(name: SamplerName) -> SamplerSpec:
    """The registry entry of ``name``; an unknown name is a one-line error listing the choices."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(REGISTRY)}") from None


def get_sampler(name: SamplerName) -> Callable[..., Tensor]:
    """The sampler function called ``name``; an unknown name is a one-line error listing the choices."""
    return sampler_spec(name).fn
